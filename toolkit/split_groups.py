"""Which split a row lands in: a hash of its group key, so held-out items are never trained on.

One item asked in several phrasings (the built-in tasks) or one passage under many templates (T0) shares
a group key, so all its rows land on the same side; a new row never moves an old one.
"""

from __future__ import annotations

import hashlib
import re

import pandas as pd

_SPACES = re.compile(r"\s+")
_SENTENCE_END = re.compile(r"\n|\"|(?<=[.!?:])\s")
_WORD = re.compile(r"\w+")
BUILTIN_SOURCE = "builtin:tasks:"
# A sentence of at least this many words is taken for part of a passage (an article, a context, a review) that
# the data may ask about under several templates or questions: templates' own sentences are shorter.
PASSAGE_WORDS = 20


def _normalised(text: str) -> str:
    return _SPACES.sub(" ", text).strip().lower()


def passage_sentences(text: str) -> set[str]:
    """Give back the long sentences of a text (20+ words; lower case, words only): what marks its passage."""
    found = (" ".join(_WORD.findall(part.lower())) for part in _SENTENCE_END.split(text))
    return {sentence for sentence in found if sentence.count(" ") + 1 >= PASSAGE_WORDS}


def item_key(instruction: str, input_text: str) -> str:
    """Give back the item a user row asks about: its passage when it has one, else instruction + input.

    Prompt/completion data such as T0 renders one passage through many templates (passage first, question
    first, quoted, with choices, with one question or another). What they share whatever wraps the passage is
    its long sentences (sentences end at a line break, a quote or a full stop); of those, the one with the
    smallest hash names the passage, so every rendering of it picks the same one.
    """
    sentences = passage_sentences(instruction + "\n" + input_text)
    if sentences:
        return "passage\x1f" + min(sentences, key=lambda text: hashlib.sha256(text.encode("utf-8")).digest())
    return "item\x1f" + _normalised(instruction) + "\x1f" + _normalised(input_text)


def group_keys(frame: pd.DataFrame, split_by: str) -> list[str]:
    """Give back each row's split group: rows of one group always land in the same split.

    `auto`: built-in tasks by their normalised (input, response), so one item asked in several phrasings is
    held out whole; other data by `item_key`. `instruction_input`: normalised instruction + input. Any other
    value names a column (a conversation or document id, say).
    """
    if split_by not in ("auto", "instruction_input"):
        if split_by not in frame.columns:
            raise ValueError(f"template.split_by: no column '{split_by}' (columns: {', '.join(frame.columns)}; "
                             "or auto, instruction_input)")
        return ["column\x1f" + str(value) for value in frame[split_by]]
    sources = frame["source"] if "source" in frame else pd.Series("", index=frame.index)
    keys = []
    for instruction, input_text, response, source in zip(frame["instruction"], frame["input"], frame["response"],
                                                         sources, strict=True):
        if split_by == "instruction_input":
            keys.append("item\x1f" + _normalised(instruction) + "\x1f" + _normalised(input_text))
        elif str(source).startswith(BUILTIN_SOURCE):
            keys.append("answer\x1f" + _normalised(input_text) + "\x1f" + _normalised(response))
        else:
            keys.append(item_key(instruction, input_text))
    return keys


def split_of(group: str, val_fraction: float, test_fraction: float) -> str:
    """Give back train/val/test for a group key (or an id), from its hash alone."""
    bucket = int(hashlib.sha256(group.encode("utf-8")).hexdigest()[:8], 16) / 0xFFFFFFFF
    if bucket < val_fraction:
        return "val"
    if bucket < val_fraction + test_fraction:
        return "test"
    return "train"
