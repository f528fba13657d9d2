"""Near duplicates among rows with MinHash signatures and LSH band keys: which earlier row each row repeats.

A row is compared with the rows kept before it, in table order: of those sharing a band key whose estimated Jaccard
of word 3-grams reaches the threshold and whose response matches (responses_match), the earliest is named, so the
answer never depends on hash or set order, and a row's answer depends on the rows before it alone. So a nightly build
whose table starts with the rows of the last build keeps that build's answers for them (`later_matches`) and
compares only the rows after them.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import numpy as np
import pandas as pd

from catalog.sections import CleanConfig

_NON_WORD = re.compile(r"\W+")


def answer_words(text: str) -> list[str]:
    return _NON_WORD.sub(" ", text.lower()).split()


def responses_match(first: list[str], second: list[str], min_words: int, threshold: float) -> bool:
    """Tell whether two responses (as from answer_words) say the same: equal words, or for long ones a Jaccard
    of word 3-grams at the threshold."""
    if first == second:
        return True
    if min(len(first), len(second)) < max(min_words, 3):
        return False
    grams = [set(zip(words, words[1:], words[2:], strict=False)) for words in (first, second)]
    return len(grams[0] & grams[1]) >= threshold * len(grams[0] | grams[1])


def shared_rows(key_column: Callable[[int], np.ndarray], bands: int, n: int) -> np.ndarray:
    """Give back which rows share at least one band key with another row."""
    shared = np.zeros(n, bool)
    for band in range(bands):  # a hash table per band: sorting a million keys per band cost several times more
        shared |= pd.Index(key_column(band)).duplicated(keep=False)
    return shared


def _first_match(row: int, near: set[int], signature: Callable[[int], np.ndarray], response: Callable[[int], str],
                 config: CleanConfig) -> int | None:
    """Give back the earliest of the candidate rows `near` that `row` nearly duplicates, or None."""
    if not near:
        return None
    # LSH buckets give candidates; the estimated Jaccard decides, so a bucket collision alone drops nothing
    ordered = sorted(near)
    mine = signature(row)
    close = [j for j in ordered if (signature(j) == mine).mean() >= config.near_duplicate_threshold]
    words = answer_words(response(row)) if close else []
    return next((j for j in close if responses_match(words, answer_words(response(j)), config.near_duplicate_min_words,
                                                     config.near_duplicate_threshold)), None)


def _record(row: int, match: int | None, row_keys: list[int], positions: np.ndarray, found: dict[int, int],
            buckets: list[dict[int, list[int]]]) -> None:
    """Name a matched row's match; keep an unmatched row in the buckets, a candidate for the rows after it."""
    if match is not None:
        found[int(positions[row])] = int(positions[match])
        return
    for band, key in enumerate(row_keys):
        buckets[band].setdefault(key, []).append(row)


def first_matches(positions: np.ndarray, signatures: np.ndarray, keys: np.ndarray, config: CleanConfig,
                  responses_of: Callable[[np.ndarray], list[str]]) -> dict[int, int]:
    """Give back {row: earlier row it nearly duplicates} among rows `positions` (ascending) with their signatures
    and band keys, each compared with the rows kept before it."""
    # the responses are split when a pair needs them: every looped row's word list at once cost more memory
    responses = responses_of(positions)
    buckets: list[dict[int, list[int]]] = [{} for _ in range(keys.shape[1])]
    found: dict[int, int] = {}
    for i, row_keys in enumerate(keys.tolist()):
        near = {j for band, key in enumerate(row_keys) for j in buckets[band].get(key, ())}
        _record(i, _first_match(i, near, signatures.__getitem__, responses.__getitem__, config), row_keys, positions,
                found, buckets)
    return found


def later_matches(settled: int, positions: np.ndarray, keys: np.ndarray,
                  signatures_at: Callable[[np.ndarray], np.ndarray], config: CleanConfig,
                  responses_of: Callable[[np.ndarray], list[str]]) -> dict[int, int]:
    """Give back first_matches' answers for the rows at or after row `settled`, among rows `positions` (ascending,
    the rows still in the running) with their band keys; the rows before `settled` are kept rows already.

    Only the earlier rows sharing a band key with a later row are candidates, so only their signatures
    (`signatures_at`: rows of `positions` -> their signatures) and responses are read.
    """
    later = np.flatnonzero(positions >= settled)
    before = np.flatnonzero(positions < settled)
    prior: list[dict[int, list[int]]] = []
    for band in range(keys.shape[1]):
        hits = before[pd.Index(keys[before, band]).isin(keys[later, band])]
        table: dict[int, list[int]] = {}
        for j, key in zip(hits.tolist(), keys[hits, band].tolist(), strict=True):
            table.setdefault(key, []).append(j)
        prior.append(table)
    needed = np.union1d(later, [j for table in prior for rows in table.values() for j in rows]).astype(np.int64)
    signatures = signatures_at(needed)
    responses = responses_of(positions[needed])
    where = {j: n for n, j in enumerate(needed.tolist())}
    buckets: list[dict[int, list[int]]] = [{} for _ in range(keys.shape[1])]
    found: dict[int, int] = {}
    for i in later.tolist():
        row_keys = keys[i].tolist()
        near = {j for band, key in enumerate(row_keys) for table in (prior[band], buckets[band])
                for j in table.get(key, ())}
        _record(i, _first_match(i, near, lambda j: signatures[where[j]], lambda j: responses[where[j]], config),
                row_keys, positions, found, buckets)
    return found
