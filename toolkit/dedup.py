"""Find exact and near duplicates among rows: MinHash over word 3-grams, LSH bands for candidates."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from catalog import layout
from catalog.sections import CleanConfig
from toolkit.near_matches import first_matches, later_matches, shared_rows
from toolkit.row_memo import rows_at

# numpy, not datasketch: a whole batch's signatures in one matrix operation, not a MinHash object updated per row

TEXT_FIELDS = ("instruction", "input", "response")


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


def first_of_same(keys: np.ndarray) -> np.ndarray:
    """Give back, for each 16-byte key, the first row holding the same key (by hash tables, not a sort)."""
    halves = np.ascontiguousarray(keys).view("<u8").reshape(len(keys), 2)
    high, low = (pd.factorize(halves[:, half])[0].astype(np.int64) for half in (0, 1))
    # numbered in order of first appearance: the n-th first appearance holds number n
    numbers = pd.factorize(high * (int(low.max(initial=0)) + 1) + low)[0]
    return np.flatnonzero(~pd.Index(numbers).duplicated())[numbers]


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

    def finish(self, responses_of: Callable[[np.ndarray], list[str]], settled: int = 0,
               settled_near: pa.Table | None = None) -> dict[int, tuple[str, str]]:
        """Give back {row: (reason, detail)} for the duplicate rows among those that passed every other check.

        `settled`: the first rows are those of the last build, in its order, and `settled_near` (id, detail) its near
        duplicates: their answers stand (toolkit/near_matches.py), and only the rows after them are compared.
        """
        ids = pa.chunked_array(self.ids, pa.string())
        alive = np.concatenate(self.alive) if self.alive else np.zeros(0, bool)
        marks: dict[int, tuple[str, str]] = {}
        if self.config.drop_exact_duplicates and self.rows:
            # the first row of each text, whatever became of it, is the one the others duplicate
            earlier = first_of_same(np.concatenate(self.exact_keys))
            rows = np.flatnonzero(alive & (earlier != np.arange(self.rows)))
            names = rows_at(ids, earlier[rows]).to_pylist()
            marks.update({row: ("exact_duplicate", "duplicate of " + name)
                          for row, name in zip(rows.tolist(), names, strict=True)})
            alive[rows] = False
        if self.config.drop_near_duplicates and self.chunks and settled:
            marks.update(self._later_near(ids, alive, settled, settled_near, responses_of))
        elif self.config.drop_near_duplicates and self.chunks:
            # exact duplicates are out of the running; of the rest only rows sharing a band key go through the
            # row-by-row loop, so only their signatures are gathered out of the chunks (no full-size copies)
            still = [alive[positions] for positions, _, _ in self.chunks]
            shared = shared_rows(lambda band: np.concatenate([keys[kept, band] for (_, _, keys), kept
                                                          in zip(self.chunks, still, strict=True)]),
                             self.bands, sum(int(kept.sum()) for kept in still))
            looped, start = [], 0
            for (positions, signatures, keys), kept in zip(self.chunks, still, strict=True):
                mine = shared[start:start + int(kept.sum())]
                start += int(kept.sum())
                looped.append((positions[kept][mine], signatures[kept][mine], keys[kept][mine]))
            # the response must match too: T0 asks several different questions about one long passage, and
            # those rows share nearly all their 3-grams while teaching different answers
            found = first_matches(*(np.concatenate(part) for part in zip(*looped, strict=True)), self.config,
                                  responses_of)
            marks.update(_near_marks(ids, found))
        return marks

    def _later_near(self, ids: pa.ChunkedArray, alive: np.ndarray, settled: int, settled_near: pa.Table | None,
                    responses_of: Callable[[np.ndarray], list[str]]) -> dict[int, tuple[str, str]]:
        """Give back the near duplicates when the first `settled` rows and their answers are the last build's."""
        marks: dict[int, tuple[str, str]] = {}
        if settled_near is not None and settled_near.num_rows:
            # among rows still in the running ids are unique: equal ids are equal texts, exact duplicates
            running = np.flatnonzero(alive[:settled])
            where = pc.index_in(settled_near.column("id"), value_set=rows_at(ids, running))
            known = pc.is_valid(where)
            rows = running[pc.filter(where, known).to_numpy().astype(np.int64)]
            details = settled_near.column("detail").filter(known).to_pylist()
            marks = {int(row): ("near_duplicate", detail) for row, detail in zip(rows, details, strict=True)}
            alive[rows] = False
        still = [alive[positions] for positions, _, _ in self.chunks]
        positions = np.concatenate([p[kept] for (p, _, _), kept in zip(self.chunks, still, strict=True)])
        keys = np.concatenate([k[kept] for (_, _, k), kept in zip(self.chunks, still, strict=True)])
        bounds = np.cumsum([0, *(int(kept.sum()) for kept in still)])

        def signatures_at(rows: np.ndarray) -> np.ndarray:  # rows ascending: gathered chunk by chunk, no full copy
            gathered = np.empty((len(rows), self.config.near_duplicate_num_perm), np.uint32)
            for (_, signatures, _), kept, first, last in zip(self.chunks, still, bounds[:-1], bounds[1:], strict=True):
                start, end = np.searchsorted(rows, [first, last])
                gathered[start:end] = signatures[np.flatnonzero(kept)[rows[start:end] - first]]
            return gathered

        found = later_matches(settled, positions, keys, signatures_at, self.config, responses_of)
        return {**marks, **_near_marks(ids, found)}


def _near_marks(ids: pa.ChunkedArray, found: dict[int, int]) -> dict[int, tuple[str, str]]:
    names = rows_at(ids, np.array(list(found.values()), np.int64)).to_pylist()
    return {row: ("near_duplicate", "near duplicate of " + name) for row, name in zip(found, names, strict=True)}


FINGERPRINT_FIELDS = ("exact", "signature", "compared")


def fingerprint_fields(num_perm: int) -> list[pa.Field]:
    """Give back the Arrow fields a row memo keeps a row's fingerprints in (see Duplicates.fingerprints)."""
    # the signature as num_perm little-endian uint32 in one fixed-size value: Parquet reads that back without the
    # repetition levels of a list (the memo of 1,000,000 rows: 1.4 s as a list)
    return [pa.field("exact", pa.binary(16)), pa.field("signature", pa.binary(4 * num_perm)),
            pa.field("compared", pa.bool_())]


def fingerprint_columns(exact: np.ndarray, signatures: np.ndarray, compared: np.ndarray) -> dict[str, pa.Array]:
    """Give back Duplicates.fingerprints' arrays as Arrow columns."""
    return {"exact": pa.FixedSizeBinaryArray.from_buffers(pa.binary(16), len(exact), [None, pa.py_buffer(
                exact.tobytes())]),
            "signature": pa.FixedSizeBinaryArray.from_buffers(pa.binary(4 * signatures.shape[1]), len(signatures), [
                None, pa.py_buffer(np.ascontiguousarray(signatures, "<u4").tobytes())]),
            "compared": pa.array(compared, pa.bool_())}


def fingerprints_of(columns: dict[str, pa.Array]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Give back (exact keys, signatures, compared) from the Arrow columns fingerprint_columns made."""
    exact = columns["exact"]
    keys = np.frombuffer(exact.buffers()[1], "V16", count=len(exact), offset=exact.offset * 16)
    signatures = columns["signature"]
    size = signatures.type.byte_width
    matrix = np.frombuffer(signatures.buffers()[1], "<u4", count=len(signatures) * size // 4,
                           offset=signatures.offset * size).reshape(len(signatures), size // 4).astype(np.uint32)
    return keys, matrix, columns["compared"].to_numpy(zero_copy_only=False)


def settled_rows(ingested: Path, earlier: Path | None) -> tuple[int, pa.Table | None]:
    """Give back (how many leading rows of the ingest artifact `ingested` are those the earlier clean build read, in
    their order; that build's near duplicates (id, detail)): what Duplicates.finish takes as settled."""
    unchanged = layout.rows_in_unchanged_parts(ingested, earlier)
    settled = len(unchanged) if unchanged.all() else int(np.argmin(unchanged))
    if not settled or earlier is None:
        return 0, None
    dropped = pq.read_table(layout.quarantine_file(earlier), columns=["id", "reason", "detail"])
    return settled, dropped.filter(pc.equal(dropped.column("reason"), "near_duplicate"))
