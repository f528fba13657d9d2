"""Which split a row lands in: a hash of its group key, so held-out items are never trained on.

One item asked in several phrasings (the built-in tasks) or one passage under many templates (T0) shares
a group key, so all its rows land on the same side; a new row never moves an old one, except to join a passage
that it proves two old groups share (then the later group follows the earlier one).
"""

from __future__ import annotations

import hashlib
import re
from collections import defaultdict
from collections.abc import Iterable

import pandas as pd

_SPACES = re.compile(r"\s+")
_SENTENCE_END = re.compile(r"\n|\"|(?<=[.!?:])\s")
_WORD = re.compile(r"\w+")
BUILTIN_SOURCE = "builtin:tasks:"
# A sentence of at least this many words is taken for part of a passage (an article, a context, a review) that
# the data may ask about under several templates or questions: templates' own sentences are shorter.
PASSAGE_WORDS = 20
Passage = tuple[bytes, ...]
TEMPLATE_TEXT_ROWS = 32


def _normalised(text: str) -> str:
    return _SPACES.sub(" ", text).strip().lower()


def passage_sentences(text: str) -> set[str]:
    """Give back the long sentences of a text (20+ words; lower case, words only): what marks its passage."""
    found = (" ".join(_WORD.findall(part.lower())) for part in _SENTENCE_END.split(text))
    return {sentence for sentence in found if sentence.count(" ") + 1 >= PASSAGE_WORDS}


def _passage(instruction: str, input_text: str) -> Passage:
    return tuple(sorted(hashlib.blake2b(sentence.encode("utf-8"), digest_size=8).digest()
                        for sentence in passage_sentences(instruction + "\n" + input_text)))


def row_groups(frame: pd.DataFrame, split_by: str) -> tuple[list[str], list[Passage]]:
    """Give back each row's own group key, and the digests of its passage's long sentences (user data, `auto`).

    `auto`: built-in tasks by their normalised (input, response), so one item asked in several phrasings is
    held out whole; other data by normalised instruction + input, joined across rows by `join_passages`.
    `instruction_input`: normalised instruction + input. Any other value names a column (a conversation or
    document id, say).
    """
    if split_by not in ("auto", "instruction_input"):
        if split_by not in frame.columns:
            raise ValueError(f"template.split_by: no column '{split_by}' (columns: {', '.join(frame.columns)}; "
                             "or auto, instruction_input)")
        return ["column\x1f" + str(value) for value in frame[split_by]], [()] * len(frame)
    sources = frame["source"] if "source" in frame else pd.Series("", index=frame.index)
    keys, passages = [], []
    for instruction, input_text, response, source in zip(frame["instruction"], frame["input"], frame["response"],
                                                         sources, strict=True):
        if split_by == "auto" and str(source).startswith(BUILTIN_SOURCE):
            keys.append("answer\x1f" + _normalised(input_text) + "\x1f" + _normalised(response))
            passages.append(())
            continue
        keys.append("item\x1f" + _normalised(instruction) + "\x1f" + _normalised(input_text))
        passages.append(_passage(instruction, input_text) if split_by == "auto" else ())
    return keys, passages


def _is_template_text(rows: list[int], passages: list[Passage], sentence: bytes) -> bool:
    # A passage's long sentences travel together: its renderings share the same other sentences. A template's
    # own long sentence (an instruction of 20+ words) comes with a different passage in every row, and in many
    # rows. Taking a rare one for a passage only groups a few rows too many, which never leaks.
    if len(rows) < TEMPLATE_TEXT_ROWS:
        return False
    companions = {next((other for other in passages[row] if other != sentence), None) for row in rows}
    return len(companions) > max(4, len(rows) // 2)


def join_passages(passages: list[Passage]) -> list[str | None]:
    """Give back each row's passage group key (None: no passage), rows that share a passage sentence, directly
    or through others, sharing one.

    The group is named by its first row (table order), so rows appended later join the groups of the rows
    before them. Sentences that are a template's own text rather than a passage do not join rows.
    """
    rows_of: dict[bytes, list[int]] = defaultdict(list)
    for row, passage in enumerate(passages):
        for sentence in passage:
            rows_of[sentence].append(row)
    template_text = {sentence for sentence, rows in rows_of.items() if _is_template_text(rows, passages, sentence)}
    first = list(range(len(passages)))

    def root(row: int) -> int:
        while first[row] != row:
            first[row] = first[first[row]]
            row = first[row]
        return row

    for sentence, rows in rows_of.items():
        if sentence in template_text:
            continue
        for row in rows[1:]:
            a, b = root(rows[0]), root(row)
            first[max(a, b)] = min(a, b)

    def group(row: int) -> str | None:
        kept = [sentence for sentence in passages[row] if sentence not in template_text]
        return "passage\x1f" + min(kept).hex() if kept else None

    return [group(root(row)) if passages[row] else None for row in range(len(passages))]


def table_splits(frames: Iterable[pd.DataFrame], split_by: str, val_fraction: float, test_fraction: float
                 ) -> list[str]:
    """Give back the split of every row of a table read in frames, in table order."""
    splits: list[str] = []  # each row's own; only a row's short split name is kept, not its (long) key
    passages: list[Passage] = []
    for frame in frames:
        frame_splits, frame_passages = own_splits(frame, split_by, val_fraction, test_fraction)
        splits += frame_splits
        passages += frame_passages
    return joined_splits(splits, passages, val_fraction, test_fraction)


def own_splits(frame: pd.DataFrame, split_by: str, val_fraction: float, test_fraction: float
               ) -> tuple[list[str], list[Passage]]:
    """Give back each row's split by its own group key and its passage digests: what a row alone decides."""
    keys, passages = row_groups(frame, split_by)
    return [split_of(key, val_fraction, test_fraction) for key in keys], passages


def joined_splits(splits: list[str], passages: list[Passage], val_fraction: float, test_fraction: float
                  ) -> list[str]:
    """Give back every row's split once rows sharing a passage are joined: a row with a passage takes its group's."""
    return [split if group is None else split_of(group, val_fraction, test_fraction)
            for split, group in zip(splits, join_passages(passages), strict=True)]


def split_of(group: str, val_fraction: float, test_fraction: float) -> str:
    """Give back train/val/test for a group key (or an id), from its hash alone."""
    bucket = int(hashlib.sha256(group.encode("utf-8")).hexdigest()[:8], 16) / 0xFFFFFFFF
    if bucket < val_fraction:
        return "val"
    if bucket < val_fraction + test_fraction:
        return "test"
    return "train"
