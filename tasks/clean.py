"""Step 2, clean: normalise text and drop unusable rows, keeping every dropped row with its reason.

Checks, in order, each row taking the first reason that applies: empty, too long in characters, too
long or too short in GPT-2 tokens, other script (optional), exact duplicate of normalised text, near
duplicate (MinHash/LSH over word 3-grams of the whole row, and the same response). The quarantine holds
the row, a reason code and a detail.
"""

from __future__ import annotations

import hashlib
import html
import json
import re
import unicodedata
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from prefect import task

from catalog import layout
from catalog.caching import finish_step, step_task_options
from catalog.sections import CleanConfig, RunnerConfig
from catalog.step import Step
from catalog.store import ArtifactRef
from toolkit.language import identify_language, latin_share
from toolkit.runner import map_batches

TEXT_FIELDS = ("instruction", "input", "response")
_INVISIBLE = re.compile("[\u200b\u200c\u200d\u2060\ufeff\u00ad]")
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_HTML_TAG = re.compile(r"</?(?:p|br|div|span|b|i|em|strong|ul|ol|li|h[1-6])\s*/?>", re.IGNORECASE)
# only the runs that change: matching every single space between words made this the slowest pass of clean
_SPACE_RUNS = re.compile(r"[\t\r\f\v][ \t\r\f\v]*| [ \t\r\f\v]+")
_BLANK_LINES = re.compile(r"\n{3,}")
_LINE_EDGES = re.compile(" ?\n ?")
_NON_WORD = re.compile(r"\W+")
# GPT-2's one special token, which the template writes as text; in the data it would end a sequence early
END_OF_TEXT = "<|endoftext|>"
_TRAILING_END_OF_TEXT = re.compile(r"(?:\s*<\|endoftext\|>)+\s*\Z")


def normalize_text(text: str) -> str:
    """Give back text in NFKC with invisible/control characters, simple HTML remnants and extra spaces removed."""
    if not text.isascii():
        text = _INVISIBLE.sub("", unicodedata.normalize("NFKC", text))
    text = _CONTROL.sub("", text.replace("\r\n", "\n"))
    if "<" in text or "&" in text:
        text = html.unescape(_HTML_TAG.sub(" ", text))
    if text.isascii():
        # without Unicode spaces, per-line stripping leaves at most one space at each line end: one pass does it
        text = _SPACE_RUNS.sub(" ", text)
        if " \n" in text or "\n " in text:
            text = _LINE_EDGES.sub("\n", text)
    else:
        text = "\n".join(_SPACE_RUNS.sub(" ", line).strip() for line in text.split("\n"))
    if "\n\n\n" in text:
        text = _BLANK_LINES.sub("\n\n", text)
    return text.strip()


def _normalize_messages(text: str) -> str:
    if not text:
        return text
    turns = json.loads(text)
    return json.dumps([{**t, "content": normalize_text(t["content"])} for t in turns])


def token_counts(texts: list[str], batch: int = 1000) -> list[int]:
    """Give back the GPT-2 token count of each text, tokenizing in batches."""
    from toolkit.tokenizer import gpt2_encoder

    backend = gpt2_encoder()
    counts: list[int] = []
    for start in range(0, len(texts), batch):
        # the Rust tokenizer without offsets, and len() of each encoding: no id lists are built just to be counted
        counts.extend(map(len, backend.encode_batch_fast(texts[start:start + batch], add_special_tokens=False)))
    return counts


def token_count_bounds(texts: pd.Series) -> tuple[pd.Series, pd.Series]:
    """Give back (lower, upper) bounds of each normalised text's GPT-2 token count, without tokenizing.

    Byte-level BPE gives every token at least one UTF-8 byte, so bytes bound the count from above; the
    pre-tokenizer never joins two whitespace-separated words into one piece and every piece is at least
    one token, so the word count bounds it from below (control characters are gone after normalize_text).
    """
    words = texts.map(lambda text: len(text.split()))
    return words, texts.str.encode("utf-8").str.len()


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
    for band in range(bands):
        _, inverse, counts = np.unique(key_column(band), return_inverse=True, return_counts=True)
        shared |= counts[inverse] > 1
    return shared


def near_duplicate_matches(positions: np.ndarray, signatures: np.ndarray, config: CleanConfig,
                           responses_of: Callable[[np.ndarray], list[str]] | None = None) -> dict[int, int]:
    """Give back {row: earlier row it nearly duplicates} among rows `positions` (ascending) with their signatures.

    A row is compared with the rows kept before it; of those whose estimated Jaccard of word 3-grams
    reaches the threshold (and, given `responses_of`, whose response matches: see responses_match), the
    earliest is named, so the answer never depends on hash or set order.
    """
    bands, rows = lsh_bands(config.near_duplicate_threshold, config.near_duplicate_num_perm)
    keys = _band_keys(signatures, bands, rows)
    # a row that shares no band key with any other row can neither match nor be matched: only the rest go
    # through the row-by-row loop, which is what keeps a million rows cheap
    looped = _shared(lambda band: keys[:, band], bands, len(positions))
    return _first_matches(positions[looped], signatures[looped], keys[looped], config, responses_of)


def _first_matches(positions: np.ndarray, signatures: np.ndarray, keys: np.ndarray, config: CleanConfig,
                   responses_of: Callable[[np.ndarray], list[str]] | None) -> dict[int, int]:
    # the responses are split when a pair needs them: every looped row's word list at once cost more memory
    responses = [] if responses_of is None else responses_of(positions)
    buckets: list[dict[int, list[int]]] = [{} for _ in range(keys.shape[1])]
    found: dict[int, int] = {}
    for i, row_keys in enumerate(keys.tolist()):
        # LSH buckets give candidates; the estimated Jaccard decides, so a bucket collision alone drops nothing
        near = np.array(sorted({j for band, key in enumerate(row_keys) for j in buckets[band].get(key, ())}), int)
        if len(near):
            near = near[(signatures[near] == signatures[i]).mean(axis=1) >= config.near_duplicate_threshold]
            match = next((j for j in near.tolist() if responses_of is None or responses_match(
                _answer_words(responses[i]), _answer_words(responses[j]), config.near_duplicate_min_words,
                config.near_duplicate_threshold)), None)
            if match is not None:
                found[int(positions[i])] = int(positions[match])
                continue
        for band, key in enumerate(row_keys):
            buckets[band].setdefault(key, []).append(i)
    return found


def near_duplicates(texts: Sequence[str], candidates: Sequence[bool], config: CleanConfig,
                    responses: Sequence[str] | None = None) -> dict[int, int]:
    """Give back {row: earlier row it nearly duplicates} for rows in `candidates` (see near_duplicate_matches)."""
    positions = np.flatnonzero(np.asarray(candidates, bool))
    signatures, compared = signatures_of([texts[p] for p in positions.tolist()], config)
    return near_duplicate_matches(positions[compared], signatures, config,
                                  None if responses is None else lambda rows: [responses[r] for r in rows.tolist()])


def check_rows(frame: pd.DataFrame, config: CleanConfig) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Give back (the rows normalised, a frame of each row's first failed check as `reason` and `detail`).

    Every check but the duplicate ones: a row alone decides these, so they run batch by batch. Rows that
    passed have reason "".
    """
    frame = frame.copy().reset_index(drop=True)
    for field in TEXT_FIELDS:
        frame[field] = frame[field].map(normalize_text)
    # prompt/completion sets often end each completion with the marker (T0 does): the template adds its own
    frame["response"] = frame["response"].str.replace(_TRAILING_END_OF_TEXT, "", regex=True)
    if "messages" in frame:
        frame["messages"] = frame["messages"].map(_normalize_messages)
    reason = pd.Series("", index=frame.index, dtype=object)
    detail = pd.Series("", index=frame.index, dtype=object)

    def mark(mask: Any, why: str, details: Any = "") -> None:
        fresh = (reason == "") & pd.Series(mask, index=frame.index)
        reason[fresh] = why
        detail[fresh] = details[fresh] if isinstance(details, pd.Series) else details

    for field in TEXT_FIELDS:
        mark(frame[field].str.contains(END_OF_TEXT, regex=False), "end_of_text_in_text",
             f"{field} holds {END_OF_TEXT}, which would end the training sequence there")
    min_chars = max(config.min_chars, 1)
    chars = {field: frame[field].str.len() for field in TEXT_FIELDS}
    mark(chars["instruction"] < min_chars, "empty_instruction")
    mark(chars["response"] < min_chars, "empty_response")
    for field, limit in (("instruction", config.max_instruction_chars), ("input", config.max_instruction_chars),
                         ("response", config.max_response_chars)):
        mark(chars[field] > limit, f"{field}_too_long", chars[field].map(lambda n, lim=limit: f"{n} chars > {lim}"))
    if config.max_prompt_tokens or config.max_response_tokens or config.min_response_tokens:
        _mark_token_bounds(frame, reason, mark, config)
    if config.language == "latin":
        share = (frame["instruction"] + " " + frame["input"] + " " + frame["response"]).map(latin_share)
        mark(share < config.min_script_share, "other_script", share.map(lambda v: f"latin share {v:.2f}"))
    elif config.language != "any":
        wanted = set(config.language.split(","))
        found = (frame["instruction"] + "\n" + frame["input"] + "\n" + frame["response"]).map(identify_language)
        language, confidence = found.str[0], found.str[1].astype(float)
        mark(~language.isin(wanted) & (confidence >= config.min_language_confidence), "other_language",
             language + " (" + confidence.map("{:.2f}".format) + ")")
    return frame, pd.DataFrame({"reason": reason, "detail": detail})


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
        lowered = {field: frame[field].str.lower() for field in TEXT_FIELDS}
        exact = lowered["instruction"] + "\x1f" + lowered["input"] + "\x1f" + lowered["response"]
        self.exact_keys.append(np.frombuffer(b"".join(
            hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest() for text in exact), "V16"))
        alive = (reason == "").to_numpy()
        self.alive.append(alive)
        self.ids.append(pa.array(frame["id"].tolist(), pa.string()))
        if self.config.drop_near_duplicates and alive.any():
            texts = (lowered["instruction"] + " " + lowered["input"] + " " + lowered["response"])[alive]
            rows = np.flatnonzero(alive)
            # 3-grams of a few thousand rows at a time: their arrays, not the signatures, are what costs memory
            for start in range(0, len(rows), 5_000):
                signatures, compared = signatures_of(texts.iloc[start:start + 5_000].tolist(), self.config)
                self.chunks.append((self.rows + rows[start:start + 5_000][compared], signatures,
                                    _band_keys(signatures, self.bands, self.band_rows)))
        self.rows += len(frame)

    def finish(self, responses_of: Callable[[np.ndarray], list[str]]) -> dict[int, tuple[str, str]]:
        """Give back {row: (reason, detail)} for the duplicate rows among those that passed every other check."""
        ids = pa.chunked_array(self.ids, pa.string())
        alive = np.concatenate(self.alive) if self.alive else np.zeros(0, bool)
        marks: dict[int, tuple[str, str]] = {}
        if self.config.drop_exact_duplicates and self.rows:
            # the first row of each text, whatever became of it, is the one the others duplicate
            _, first, inverse = np.unique(np.concatenate(self.exact_keys), return_index=True, return_inverse=True)
            earlier = first[inverse]
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


def _apply(checked: pd.DataFrame, marks: dict[int, tuple[str, str]], offset: int) -> pd.DataFrame:
    """Give back the batch's reason/detail frame (rows from `offset` on) with its duplicate marks filled in."""
    rows = [row for row in marks if offset <= row < offset + len(checked)]
    if not rows:
        return checked
    checked = checked.copy()
    checked.iloc[[row - offset for row in rows], 0] = [marks[row][0] for row in rows]
    checked.iloc[[row - offset for row in rows], 1] = [marks[row][1] for row in rows]
    return checked


def clean_rows(frame: pd.DataFrame, config: CleanConfig) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Give back (kept rows, dropped rows with `reason` and `detail`); every input row lands in exactly one."""
    frame, checked = check_rows(frame, config)
    duplicates = Duplicates(config)
    duplicates.add(frame, checked["reason"])
    checked = _apply(checked, duplicates.finish(lambda rows: frame["response"].iloc[rows].tolist()), 0)
    dropped = checked["reason"] != ""
    return frame[~dropped].reset_index(drop=True), frame[dropped].assign(**checked[dropped]).reset_index(drop=True)


def _mark_token_bounds(frame: pd.DataFrame, reason: pd.Series, mark: Any, config: CleanConfig) -> None:
    # only rows whose bounds leave the answer open are tokenized: the character checks removed the giants,
    # and most rows are far inside the limits
    alive = reason == ""
    counts = {}
    for name, texts, most, least in (
            ("prompt", frame["instruction"] + "\n" + frame["input"], config.max_prompt_tokens, 0),
            ("response", frame["response"], config.max_response_tokens, config.min_response_tokens)):
        lower, upper = token_count_bounds(texts[alive])
        undecided = ((upper > most) if most else pd.Series(False, index=upper.index)) | (lower < least)
        rows = undecided.index[undecided]
        counts[name] = pd.Series(-1, index=frame.index)  # -1: the bounds alone settle this row
        if len(rows):
            counts[name][rows] = token_counts(texts[rows].tolist())
    for name, most in (("prompt", config.max_prompt_tokens), ("response", config.max_response_tokens)):
        if most:
            mark(counts[name] > most, f"{name}_too_many_tokens",
                 counts[name].map(lambda n, m=most: f"{n} tokens > {m}"))
    least = config.min_response_tokens
    mark(counts["response"].between(0, least - 1), "response_too_few_tokens",
         counts["response"].map(lambda n: f"{n} tokens < {least}"))


STEP = Step("clean", __name__, libraries=("pyarrow", "numpy", "tokenizers", "py3langid"))


def check_batch(batch: pa.RecordBatch, config: CleanConfig) -> tuple[pd.DataFrame, pd.DataFrame]:
    """check_rows on one Arrow batch (row-local: any runner may run it)."""
    return check_rows(batch.to_pandas(), config)


def write_clean(config: CleanConfig, ingested: Path, out: Path, batch_rows: int = 20_000,
                runner: RunnerConfig | None = None) -> dict[str, Any]:
    """Write data.parquet and quarantine.parquet (upstream quarantine carried along); give back counts.

    Two passes over Arrow batches, so memory holds a batch plus a hash and a signature per row: the first
    normalises and checks each batch (on `runner`) into a staging file and feeds the duplicate finder here, in
    order; the second splits the staged rows into kept and dropped once the duplicates are known.
    """
    # pre_buffer=False: with it, Arrow keeps every byte it has read until the file is closed (all of it, by the end)
    source = pq.ParquetFile(layout.data_file(ingested), pre_buffer=False)
    schema = source.schema_arrow.remove_metadata()
    staged_schema = schema.append(pa.field("reason", pa.string())).append(pa.field("detail", pa.string()))
    staging = out / ".checked.parquet"
    duplicates = Duplicates(config)
    with pq.ParquetWriter(staging, staged_schema) as writer:
        for frame, checked in map_batches(check_batch, source.iter_batches(batch_size=batch_rows), config,
                                          runner=runner, step="clean"):
            duplicates.add(frame, checked["reason"])
            writer.write_table(pa.Table.from_pandas(pd.concat([frame, checked], axis=1), staged_schema,
                                                    preserve_index=False))
    marks = duplicates.finish(lambda rows: _rows_of(staging, "response", rows))
    kept = 0
    dropped: dict[str, int] = {}
    staged = pq.ParquetFile(staging, pre_buffer=False)
    with pq.ParquetWriter(layout.data_file(out), schema) as keep, \
            pq.ParquetWriter(layout.quarantine_file(out), staged_schema) as drop:
        offset = 0
        for batch in staged.iter_batches(batch_size=batch_rows):
            table = pa.Table.from_batches([batch])
            checked = _apply(table.select(["reason", "detail"]).to_pandas(), marks, offset)
            offset += table.num_rows
            table = table.set_column(table.schema.get_field_index("reason"), "reason",
                                     pa.array(checked["reason"].tolist(), pa.string()))
            table = table.set_column(table.schema.get_field_index("detail"), "detail",
                                     pa.array(checked["detail"].tolist(), pa.string()))
            is_dropped = pc.not_equal(table.column("reason"), "")
            keep.write_table(table.filter(pc.invert(is_dropped)).select(schema.names))
            drop.write_table(table.filter(is_dropped))
            kept += table.num_rows - int(pc.sum(is_dropped).as_py() or 0)
            for why, count in checked["reason"][checked["reason"] != ""].value_counts().items():
                dropped[why] = dropped.get(why, 0) + int(count)
    staging.unlink()
    upstream = pq.ParquetFile(layout.quarantine_file(ingested)).metadata.num_rows
    removed = sum(dropped.values())
    total = kept + removed + upstream
    duplicates_dropped = dropped.get("exact_duplicate", 0) + dropped.get("near_duplicate", 0)
    return {
        "rows": kept,
        "dropped": dict(sorted(dropped.items(), key=lambda kv: (-kv[1], kv[0]))),
        "duplicate_ratio": duplicates_dropped / max(kept + removed, 1),
        "quarantined_upstream": upstream,
        "quarantine_ratio": (removed + upstream) / total if total else 0.0,
    }


def _rows_of(path: Path, column: str, rows: np.ndarray) -> list[str]:
    """Give back one column's values at `rows` (ascending) of a Parquet file, reading only their row groups."""
    wanted = np.asarray(rows, np.int64)
    source = pq.ParquetFile(path, pre_buffer=False)
    values: list[str] = []
    offset = 0
    for group in range(source.num_row_groups):
        size = source.metadata.row_group(group).num_rows
        inside = wanted[(wanted >= offset) & (wanted < offset + size)]
        if len(inside):
            chunk = source.read_row_group(group, columns=[column]).column(0)
            values += chunk.take(pa.array(inside - offset)).to_pylist()
        offset += size
    return values


@task(**step_task_options(STEP))
def clean(config: dict[str, Any], root: str, ingested: ArtifactRef, runner: dict[str, Any] | None = None
          ) -> ArtifactRef:
    """Prefect task: the clean artifact for this ingest artifact; `runner` (where batches are checked) is not keyed."""
    ref, built = STEP.produce(config, root, [ingested], lambda out, inputs: write_clean(
        CleanConfig(**config), inputs[0], out, runner=RunnerConfig(**runner or {})))
    return finish_step(root, ref, built)
