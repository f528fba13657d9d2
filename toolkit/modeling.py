"""GPT-2 models shared by fine-tune and evaluate: model sources, the response-token loss, batch padding.

Heavy libraries (torch, transformers) are imported inside functions so a cached rerun never pays
for them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from toolkit.tokenizer import GPT2_VOCAB_SIZE, IGNORE_INDEX

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel

# From-scratch GPT-2 sizes: (layers, width, heads). "small" is GPT-2 124M's shape.
SCRATCH_SIZES: dict[str, tuple[int, int, int]] = {
    "tiny": (2, 128, 2),
    "tiny-deep": (4, 128, 4),  # the quickstart's: tiny's cost is mostly the LM head, so depth comes cheap
    "mini": (4, 256, 4),
    "small": (12, 768, 12),
    "medium": (24, 1024, 16),
}


class ModelSourceError(ValueError):
    """A model name that cannot be loaded here."""


def parse_scratch(name: str) -> tuple[int, int, int] | None:
    """Give back (layers, width, heads) for `scratch:<size>` names, None for other model names."""
    if not name.startswith("scratch:"):
        return None
    size = name.split(":", 1)[1]
    if size not in SCRATCH_SIZES:
        raise ModelSourceError(f"unknown from-scratch size '{size}' (choose from {', '.join(SCRATCH_SIZES)})")
    return SCRATCH_SIZES[size]


def hub_token(secret_block: str | None = None) -> str | None:
    """Give back the Hugging Face Hub token: the Prefect Secret block named `secret_block`, else HF_TOKEN, else None.

    The value goes to `from_pretrained(token=...)` and nowhere else: no log line, config, manifest or
    error message holds it (the block's name may appear, never its value).
    """
    if not secret_block:
        return os.environ.get("HF_TOKEN") or None
    from prefect.blocks.system import Secret

    try:
        value = Secret.load(secret_block).get()
    except Exception as exc:  # missing block, unreachable API, wrong block type: all mean "no token here"
        # Only the exception's type is kept (and the chain cut): a validation error would quote the stored value.
        missing = isinstance(exc, ValueError) and "unable to find block document" in str(exc).lower()
        raise ModelSourceError(
            f"cannot read the Hub token from the Prefect Secret block '{secret_block}' (model.hub_token_secret): "
            f"{'no such block' if missing else type(exc).__name__}; create it with `prefect block create secret`, "
            "or unset model.hub_token_secret to use HF_TOKEN"
        ) from None
    if not isinstance(value, str) or not value:
        raise ModelSourceError(f"the Prefect Secret block '{secret_block}' (model.hub_token_secret) must hold "
                               "a non-empty string")
    return value


def load_base_model(name: str, init_seed: int = 0, dropout: float = 0.0, max_positions: int = 1024, *,
                    trust_remote_code: bool = False, attn_implementation: str = "sdpa",
                    hub_token_secret: str | None = None, position_init: str = "random") -> PreTrainedModel:
    """Give back the model fine-tuning starts from: fresh GPT-2 weights, a local folder, or a Hub id.

    Remote code stays off unless the config asks for it: a folder or Hub repo could otherwise run
    arbitrary Python at load time. A Hub token (see `hub_token`) is read only for a folder or Hub id.
    """
    import torch
    from transformers import AutoModelForCausalLM, GPT2Config

    shape = parse_scratch(name)
    if shape is not None:
        layers, width, heads = shape
        config = GPT2Config(
            vocab_size=GPT2_VOCAB_SIZE, n_positions=max_positions, n_embd=width, n_layer=layers, n_head=heads,
            bos_token_id=GPT2_VOCAB_SIZE - 1, eos_token_id=GPT2_VOCAB_SIZE - 1, pad_token_id=GPT2_VOCAB_SIZE - 1,
            resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout,
        )
        torch.manual_seed(init_seed)
        model = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation)
        if position_init == "sinusoidal":
            sinusoidal_positions(model.transformer.wpe.weight)
        return model
    # Read even for a local folder: a block named in the config that cannot be read is an error to report, not skip.
    options = {"trust_remote_code": trust_remote_code, "attn_implementation": attn_implementation,
               "token": hub_token(hub_token_secret)}
    if Path(name).expanduser().is_dir():
        model = AutoModelForCausalLM.from_pretrained(Path(name).expanduser(), local_files_only=True, **options)
    else:
        try:
            model = AutoModelForCausalLM.from_pretrained(name, **options)
        except OSError as exc:
            raise ModelSourceError(
                f"model '{name}' is neither a local folder nor reachable on the Hugging Face Hub "
                f"({str(exc).splitlines()[0][:120]}); pass a folder written by save_pretrained, or scratch:tiny"
            ) from None
    # GPT-2 checkpoints ship without a pad token; padding with EOS is safe because padded positions
    # are masked out of attention and labelled -100.
    if model.config.pad_token_id is None:
        model.config.pad_token_id = model.config.eos_token_id
    if model.generation_config is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = model.config.pad_token_id
    return model


def sinusoidal_positions(weight: torch.Tensor, scale: float = 0.05) -> None:
    """Set a position-embedding matrix to the Transformer paper's sines and cosines, in place.

    Offsets between positions are then linear maps from the first step, which attention heads that look a fixed
    distance back (copying, reversing) pick up sooner than from random vectors; the values stay trainable.
    """
    import torch

    positions, width = weight.shape
    angles = torch.arange(positions).unsqueeze(1) / 10000 ** (torch.arange(0, width, 2) / width)
    with torch.no_grad():
        weight[:, 0::2] = torch.sin(angles) * scale
        weight[:, 1::2] = torch.cos(angles) * scale


def response_token_loss(model: PreTrainedModel, batch: dict[str, torch.Tensor], reduction: str = "mean"
                        ) -> torch.Tensor:
    """Give back causal cross-entropy over response tokens only, applying the LM head only there.

    Same loss as `model(..., labels=...)`, but the vocabulary projection (most of a small GPT-2's
    compute) runs only at the positions whose next token is a target.
    """
    import torch.nn.functional as F

    # Through the model's own forward (so a DDP wrapper syncs gradients), keeping one position's logits.
    outputs = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"),
                    position_ids=batch.get("position_ids"), logits_to_keep=1, output_hidden_states=True,
                    use_cache=False)
    hidden = outputs.hidden_states[-1]
    head = (model.module if hasattr(model, "module") else model).get_output_embeddings()
    targets = batch["labels"][:, 1:]
    selected = targets != IGNORE_INDEX
    logits = head(hidden[:, :-1][selected])
    return F.cross_entropy(logits.float(), targets[selected], reduction=reduction)


def pad_batch(rows: list[dict[str, Any]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Give back a right-padded batch: input_ids, labels (-100 on padding), and attention_mask or position_ids.

    Packed rows carry position_ids that restart at every packed example. They go to the model without
    an attention mask: transformers then reads the example boundaries from the restarts and gives each
    example its own causal attention (block-diagonal for SDPA/eager, varlen for flash attention), as if
    it were alone. A 2-D mask of ones would let each example attend to the ones packed before it.
    Padding at the end gets position 0 (each pad its own example) and label -100, so nothing attends to it.
    """
    import torch

    width = max(len(row["input_ids"]) for row in rows)

    def padded(key: str, fill: int) -> torch.Tensor:
        return torch.tensor([list(row[key]) + [fill] * (width - len(row[key])) for row in rows], dtype=torch.long)

    batch = {"input_ids": padded("input_ids", pad_token_id), "labels": padded("labels", IGNORE_INDEX)}
    if "position_ids" in rows[0]:
        batch["position_ids"] = padded("position_ids", 0)
    else:
        batch["attention_mask"] = torch.tensor([[1] * len(row["input_ids"]) + [0] * (width - len(row["input_ids"]))
                                                for row in rows], dtype=torch.long)
    return batch


def count_parameters(model: Any) -> int:
    return sum(p.numel() for p in model.parameters())
