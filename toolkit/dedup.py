"""Find exact and near duplicates among rows: MinHash over word 3-grams, LSH bands for candidates."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from catalog.sections import CleanConfig

# numpy, not datasketch: a whole batch's signatures in one matrix operation, not a MinHash object updated per row

TEXT_FIELDS = ("instruction", "input", "response")
_NON_WORD = re.compile(r"\W+")


def shingle_hashes(texts: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Give back (a 64-bit hash of each lower-cased word 3-gram, texts one after another; 3-grams per text;
    words per text)."""
    split = pc.utf8_split_whitespace(pc.utf8_lower(pa.array(texts, pa.large_string())))
    # Arrow keeps an empty word for leading or trailing spaces (and for ""), which str.split() does not
    words = pc.list_flatten(split)
    real = pc.greater(pc.utf8_length(words), 0)
    owners = pc.filter(pc.list_parent_indices(split), real).to_numpy(zero_copy_only=False)
    counts = np.bincount(owners, minlength=len(texts)).astype(np.int64)
    encoded = pc.dictionary_encode(pc.filter(words, real))
    # each distinct word hashed once, by its text alone: a row's hashes never depend on the other rows or on
    # the library version (unlike hash() or pandas' hashing)
    digests = b"".join(hashlib.blake2b(w.encode("utf-8"), digest_size=8).digest()
                       for w in encoded.dictionary.to_pylist())
    word_hashes = np.frombuffer(digests, "<u8")[encoded.indices.to_numpy(zero_copy_only=False)]
    first, second, third = word_hashes[:-2], word_hashes[1:-1], word_hashes[2:]
    with np.errstate(over="ignore"):  # the wrap-around of uint64 arithmetic is the point
        grams = first * _GRAM_MIX[0] + second * _GRAM_MIX[1] + third * _GRAM_MIX[2]
    # a 3-gram starting in the last two words of a text would run into the next text
    keep = np.ones(len(word_hashes), bool)
    ends = np.cumsum(counts)
    keep[ends[ends >= 1] - 1] = False
    keep[ends[ends >= 2] - 2] = False
    return grams[keep[:len(grams)]], np.maximum(counts - 2, 0), counts


_GRAM_MIX = np.frombuffer(hashlib.shake_128(b"itune word 3-gram").digest(24), "<u8") | np.uint64(1)


def minhash_signatures(hashes: np.ndarray, counts: np.ndarray, num_perm: int) -> np.ndarray:
    """Give back a (texts, num_perm) MinHash signature: per permutation a*h+b mod 2^32 (a odd), the minimum.

    `hashes` holds each text's 3-gram hashes one text after another, `counts` how many each text has (at
    least one). A bijection of 32-bit values is a fine permutation for sets of a few thousand 3-grams.
    """
    params = np.frombuffer(hashlib.shake_128(b"itune minhash").digest(8 * num_perm), "<u4")
    a, b = (params[0::2] | np.uint32(1))[:, None], params[1::2][:, None]
    values = (hashes >> np.uint64(32)).astype(np.uint32)
    ends = np.cumsum(counts)
    starts = ends - counts
    # blocks of texts keep the permutations x 3-grams matrix near 16 MB whatever the corpus size; the matrix is
    # permutation-major so the per-text minimum runs along contiguous memory (several times faster)
    budget = max(1, (1 << 22) // num_perm)
    signatures = np.empty((num_perm, len(counts)), np.uint32)
    first = 0
    while first < len(counts):
        last = max(first + 1, int(np.searchsorted(ends, starts[first] + budget, side="right")))
        block = values[None, starts[first]:ends[last - 1]] * a + b
        signatures[:, first:last] = np.minimum.reduceat(block, starts[first:last] - starts[first], axis=1)
        first = last
    return np.ascontiguousarray(signatures.T)


def lsh_bands(threshold: float, num_perm: int, recall: float = 0.95) -> tuple[int, int]:
    """Give back (bands, rows per band): the fewest candidates that still find a pair right at the threshold
    with probability `recall`.

    Every candidate is checked against the threshold afterwards, so a false candidate costs a comparison while
    a missed one keeps a duplicate; datasketch's balanced default (4 x 15 at 0.85 of 64) found only 31% of
    the pairs at 0.85 and 60% at 0.9.
    """
    for rows in range(num_perm, 0, -1):
        bands = num_perm // rows
        if 1 - (1 - threshold ** rows) ** bands >= recall:
            return bands, rows
    return num_perm, 1


def _answer_words(text: str) -> list[str]:
    return _NON_WORD.sub(" ", text.lower()).split()


def responses_match(first: list[str], second: list[str], min_words: int, threshold: float) -> bool:
    """Tell whether two responses (as from _answer_words) say the same: equal words, or for long ones a Jaccard
    of word 3-grams at the threshold."""
    if first == second:
        return True
    if min(len(first), len(second)) < max(min_words, 3):
        return False
    grams = [set(zip(words, words[1:], words[2:], strict=False)) for words in (first, second)]
    return len(grams[0] & grams[1]) >= threshold * len(grams[0] | grams[1])


def _band_keys(signatures: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """Give back a (texts, bands) uint64 key per LSH band: the band's values mixed into one number."""
    mix = np.frombuffer(hashlib.shake_128(b"itune lsh band").digest(8 * rows), "<u8") | np.uint64(1)
    keys = np.zeros((len(signatures), bands), np.uint64)
    with np.errstate(over="ignore"):
        for band in range(bands):
            for k in range(rows):
                keys[:, band] += signatures[:, band * rows + k].astype(np.uint64) * mix[k]
    return keys


def signatures_of(texts: Sequence[str], config: CleanConfig) -> tuple[np.ndarray, np.ndarray]:
    """Give back (MinHash signatures of the texts long enough to compare, which texts those are)."""
    hashes, grams, words = shingle_hashes(list(texts))
    # below 3 words there is no 3-gram at all: such rows only get the exact check
    compared = words >= max(config.near_duplicate_min_words, 3)
    if not compared.any():
        return np.empty((0, config.near_duplicate_num_perm), np.uint32), compared
    return minhash_signatures(hashes[np.repeat(compared, grams)], grams[compared],
                              config.near_duplicate_num_perm), compared


def _shared(key_column: Callable[[int], np.ndarray], bands: int, n: int) -> np.ndarray:
    """Give back which rows share at least one band key with another row."""
    shared = np.zeros(n, bool)
    for band in range(bands):  # a hash table per band: sorting a million keys per band cost several times more
        shared |= pd.Index(key_column(band)).duplicated(keep=False)
    return shared


def first_of_same(keys: np.ndarray) -> np.ndarray:
    """Give back, for each 16-byte key, the first row holding the same key (by hash tables, not a sort)."""
    halves = np.ascontiguousarray(keys).view("<u8").reshape(len(keys), 2)
    high, low = (pd.factorize(halves[:, half])[0].astype(np.int64) for half in (0, 1))
    # numbered in order of first appearance: the n-th first appearance holds number n
    numbers = pd.factorize(high * (int(low.max(initial=0)) + 1) + low)[0]
    return np.flatnonzero(~pd.Index(numbers).duplicated())[numbers]


def _first_matches(positions: np.ndarray, signatures: np.ndarray, keys: np.ndarray, config: CleanConfig,
                   responses_of: Callable[[np.ndarray], list[str]]) -> dict[int, int]:
    """Give back {row: earlier row it nearly duplicates} among rows `positions` (ascending) with their signatures.

    A row is compared with the rows kept before it; of those whose estimated Jaccard of word 3-grams
    reaches the threshold and whose response matches (see responses_match), the earliest is named, so the
    answer never depends on hash or set order.
    """
    # the responses are split when a pair needs them: every looped row's word list at once cost more memory
    responses = responses_of(positions)
    buckets: list[dict[int, list[int]]] = [{} for _ in range(keys.shape[1])]
    found: dict[int, int] = {}
    for i, row_keys in enumerate(keys.tolist()):
        # LSH buckets give candidates; the estimated Jaccard decides, so a bucket collision alone drops nothing
        near = np.array(sorted({j for band, key in enumerate(row_keys) for j in buckets[band].get(key, ())}), int)
        if len(near):
            near = near[(signatures[near] == signatures[i]).mean(axis=1) >= config.near_duplicate_threshold]
            match = next((j for j in near.tolist() if responses_match(
                _answer_words(responses[i]), _answer_words(responses[j]), config.near_duplicate_min_words,
                config.near_duplicate_threshold)), None)
            if match is not None:
                found[int(positions[i])] = int(positions[match])
                continue
        for band, key in enumerate(row_keys):
            buckets[band].setdefault(key, []).append(i)
    return found


class Duplicates:
    """Exact and near duplicates over rows seen batch by batch, keeping per row a hash, a signature, band keys."""

    def __init__(self, config: CleanConfig):
        self.config = config
        self.bands, self.band_rows = lsh_bands(config.near_duplicate_threshold, config.near_duplicate_num_perm)
        self.rows = 0
        self.exact_keys: list[np.ndarray] = []
        self.alive: list[np.ndarray] = []
        self.ids: list[pa.Array] = []
        # per chunk of compared rows: their row numbers, MinHash signatures and LSH band keys
        self.chunks: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []

    def add(self, frame: pd.DataFrame, reason: pd.Series) -> None:
        """Take in one batch of checked rows (from check_rows), in order."""
        alive = (reason == "").to_numpy()
        self.add_known(pa.array(frame["id"].tolist(), pa.string()), alive, *self.fingerprints(frame, alive))

    def fingerprints(self, frame: pd.DataFrame, alive: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Give back what the finder keeps of each row, which depends on the row alone: (its exact-text key, its
        MinHash signature (zeros where not compared), whether it is compared for near duplicates)."""
        lowered = {field: frame[field].str.lower() for field in TEXT_FIELDS}
        exact = lowered["instruction"] + "\x1f" + lowered["input"] + "\x1f" + lowered["response"]
        exact_keys = np.frombuffer(b"".join(
            hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest() for text in exact), "V16")
        signatures = np.zeros((len(frame), self.config.near_duplicate_num_perm), np.uint32)
        compared = np.zeros(len(frame), bool)
        if self.config.drop_near_duplicates and alive.any():
            texts = (lowered["instruction"] + " " + lowered["input"] + " " + lowered["response"])[alive]
            rows = np.flatnonzero(alive)
            # 3-grams of a few thousand rows at a time: their arrays, not the signatures, are what costs memory
            for start in range(0, len(rows), 5_000):
                chunk, chunk_compared = signatures_of(texts.iloc[start:start + 5_000].tolist(), self.config)
                signatures[rows[start:start + 5_000][chunk_compared]] = chunk
                compared[rows[start:start + 5_000][chunk_compared]] = True
        return exact_keys, signatures, compared

    def add_known(self, ids: pa.Array, alive: np.ndarray, exact_keys: np.ndarray, signatures: np.ndarray,
                  compared: np.ndarray) -> None:
        """Take in one batch of rows, in order, by their ids and fingerprints (as `fingerprints` gives them)."""
        self.exact_keys.append(exact_keys)
        self.alive.append(alive)
        self.ids.append(ids.cast(pa.string()))
        compared = compared & alive
        if self.config.drop_near_duplicates and compared.any():
            rows = np.flatnonzero(compared)
            self.chunks.append((self.rows + rows, signatures[rows], _band_keys(signatures[rows], self.bands,
                                                                               self.band_rows)))
        self.rows += len(ids)

    def finish(self, responses_of: Callable[[np.ndarray], list[str]]) -> dict[int, tuple[str, str]]:
        """Give back {row: (reason, detail)} for the duplicate rows among those that passed every other check."""
        ids = pa.chunked_array(self.ids, pa.string())
        alive = np.concatenate(self.alive) if self.alive else np.zeros(0, bool)
        marks: dict[int, tuple[str, str]] = {}
        if self.config.drop_exact_duplicates and self.rows:
            # the first row of each text, whatever became of it, is the one the others duplicate
            earlier = first_of_same(np.concatenate(self.exact_keys))
            rows = np.flatnonzero(alive & (earlier != np.arange(self.rows)))
            names = ids.take(pa.array(earlier[rows])).to_pylist()
            marks.update({row: ("exact_duplicate", "duplicate of " + name)
                          for row, name in zip(rows.tolist(), names, strict=True)})
            alive[rows] = False
        if self.config.drop_near_duplicates and self.chunks:
            # exact duplicates are out of the running; of the rest only rows sharing a band key go through the
            # row-by-row loop, so only their signatures are gathered out of the chunks (no full-size copies)
            still = [alive[positions] for positions, _, _ in self.chunks]
            shared = _shared(lambda band: np.concatenate([keys[kept, band] for (_, _, keys), kept
                                                          in zip(self.chunks, still, strict=True)]),
                             self.bands, sum(int(kept.sum()) for kept in still))
            looped, start = [], 0
            for (positions, signatures, keys), kept in zip(self.chunks, still, strict=True):
                mine = shared[start:start + int(kept.sum())]
                start += int(kept.sum())
                looped.append((positions[kept][mine], signatures[kept][mine], keys[kept][mine]))
            # the response must match too: T0 asks several different questions about one long passage, and
            # those rows share nearly all their 3-grams while teaching different answers
            found = _first_matches(*(np.concatenate(part) for part in zip(*looped, strict=True)), self.config,
                                   responses_of)
            names = ids.take(pa.array(list(found.values()), pa.int64())).to_pylist()
            marks.update({row: ("near_duplicate", "near duplicate of " + name)
                          for row, name in zip(found, names, strict=True)})
        return marks


FINGERPRINT_FIELDS = ("exact", "signature", "compared")


def fingerprint_fields(num_perm: int) -> list[pa.Field]:
    """Give back the Arrow fields a row memo keeps a row's fingerprints in (see Duplicates.fingerprints)."""
    return [pa.field("exact", pa.binary(16)), pa.field("signature", pa.list_(pa.uint32(), num_perm)),
            pa.field("compared", pa.bool_())]


def fingerprint_columns(exact: np.ndarray, signatures: np.ndarray, compared: np.ndarray) -> dict[str, pa.Array]:
    """Give back Duplicates.fingerprints' arrays as Arrow columns."""
    return {"exact": pa.FixedSizeBinaryArray.from_buffers(pa.binary(16), len(exact), [None, pa.py_buffer(
                exact.tobytes())]),
            "signature": pa.FixedSizeListArray.from_arrays(pa.array(signatures.ravel(), pa.uint32()),
                                                           signatures.shape[1]),
            "compared": pa.array(compared, pa.bool_())}


def fingerprints_of(columns: dict[str, pa.Array]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Give back (exact keys, signatures, compared) from the Arrow columns fingerprint_columns made."""
    exact = columns["exact"]
    keys = np.frombuffer(exact.buffers()[1], "V16", count=len(exact), offset=exact.offset * 16)
    signatures = columns["signature"]
    width = signatures.type.list_size
    matrix = signatures.flatten().to_numpy().reshape(len(signatures), width)
    return keys, matrix, columns["compared"].to_numpy(zero_copy_only=False)
