"""Tokenize's memo: each templated row's token ids, so a rebuild on grown data tokenizes only the rows it has not seen.

Kept per row key (toolkit/row_memo.py) for rows tokenized as one prompt and one completion: input ids, length,
target count, truncation and target tokens lost. Their labels are not stored: such a row's labels are its input
ids with the prompt part (all but the last n_target tokens) masked. A conversation can become several windows,
so a batch holding one is tokenized whole, as a full build does; packing is redone from the rows either way.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from catalog import layout
from catalog.sections import RunnerConfig
from toolkit.conversations import CUTS
from toolkit.row_memo import KEY, MemoIndex, MemoParts, MemoWriter, row_keys, with_memo
from toolkit.runner import map_batches
from toolkit.tokenizer import IGNORE_INDEX

KEPT = ["input_ids", "length", "n_target", "truncated", "n_target_lost"]
ROW = ["id", "split", "category"]  # what a tokenized row takes from its templated row, not from the memo


def pair_labels(input_ids: pa.ListArray, n_target: np.ndarray) -> pa.ListArray:
    """Give back the labels of rows tokenized as prompt + completion: -100 over the prompt, the ids over the rest."""
    offsets = input_ids.offsets.to_numpy()
    lengths = np.diff(offsets)
    flat = input_ids.values.to_numpy()[offsets[0]:offsets[-1]]
    within = np.arange(len(flat)) - np.repeat(offsets[:-1] - offsets[0], lengths)
    labels = np.where(within < np.repeat(lengths - n_target, lengths), IGNORE_INDEX, flat).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets - offsets[0], pa.int32()), pa.array(labels, pa.int32()))


def _ids_as_bytes(ids: pa.ListArray) -> pa.BinaryArray:
    """Give back each row's token ids as one binary value of little-endian int32 (how the memo keeps them)."""
    offsets = ids.offsets.to_numpy()
    values = np.ascontiguousarray(ids.flatten().to_numpy(), "<i4")
    return pa.BinaryArray.from_buffers(pa.binary(), len(ids), [
        None, pa.py_buffer(((offsets - offsets[0]) * 4).astype(np.int32).tobytes()), pa.py_buffer(values.tobytes())])


def _bytes_as_ids(blobs: pa.BinaryArray) -> pa.ListArray:
    """Give back _ids_as_bytes' rows as a list<int32> column again."""
    if not len(blobs):
        return pa.array([], pa.list_(pa.int32()))
    _, offset_buffer, data = blobs.buffers()
    offsets = np.frombuffer(offset_buffer, np.int32, count=len(blobs) + 1, offset=blobs.offset * 4)
    values = np.frombuffer(data, "<i4", count=int(offsets[-1]) // 4)[offsets[0] // 4:] if data is not None \
        else np.zeros(0, "<i4")
    return pa.ListArray.from_arrays(pa.array((offsets - offsets[0]) // 4, pa.int32()), pa.array(values, pa.int32()))


def _has_conversations(batch: pa.RecordBatch) -> bool:
    return "segments" in batch.schema.names and bool(pc.any(pc.greater(
        pc.list_value_length(batch.column("segments")), 0)).as_py())


@dataclass(frozen=True)
class InPlace:
    """Templated rows [start, start + num_rows) that the earlier build tokenized into the same places, as were its memo
    rows (see rows_in_place): their tokenized rows and memo rows are the earlier build's, linked, not read."""

    start: int
    num_rows: int
    empty: pa.RecordBatch  # what passes through the runner in their stead (the templated columns, no rows)


class TokenMemo:
    """The memo a tokenize build reads (`earlier`: a tokenize artifact of the same recipe) and the one it writes."""

    def __init__(self, earlier: Path | None, out: Path, schema: pa.Schema):
        self.earlier = earlier
        self.index, self.before = MemoIndex(layout.read_memo(earlier, [KEY])), MemoParts(earlier)
        self.schema = schema
        # the ids as one binary value per row, their int32 bytes: Parquet reads that back several times faster than a
        # list, which carries repetition levels (input_ids of 1,000,000 rows: 2.0 s as a list)
        self.writer = MemoWriter(out, pa.schema([pa.field(KEY, pa.string()), pa.field("input_ids", pa.binary()),
                                                 *(schema.field(name) for name in KEPT[1:])]), earlier)
        self.reused = self.rows_read = 0

    def tokenized(self, batches: Iterable[pa.RecordBatch | InPlace],
                  tokenize: Callable[..., tuple[pa.RecordBatch, Any]], config: Any, runner: RunnerConfig | None
                  ) -> Iterator[tuple[pa.RecordBatch | InPlace, Any]]:
        """Yield `tokenize(batch, config)` of each batch, in order: rows in the memo from it, the rest on `runner`;
        an InPlace as it is (its memo rows linked)."""
        pending: deque[tuple[Any, Any, Any]] = deque()

        def unseen() -> Iterator[pa.RecordBatch]:
            for batch in batches:
                if isinstance(batch, InPlace):
                    self.index.next = batch.start + batch.num_rows  # its memo rows are its rows, in their places
                    pending.append((batch, None, None))
                    yield batch.empty
                    continue
                keys = row_keys(batch)
                whole = _has_conversations(batch)
                positions = np.full(batch.num_rows, -1, np.int64) if whole else self.index.positions(keys)
                pending.append((batch, keys, positions))
                yield batch.filter(pa.array(positions < 0))

        for fresh, cuts in map_batches(tokenize, unseen(), config, runner=runner, step="tokenize"):
            batch, keys, positions = pending.popleft()
            self.rows_read += batch.num_rows
            if isinstance(batch, InPlace):
                self.writer.write_earlier(batch.start, batch.num_rows)
                self.reused += batch.num_rows
                yield batch, dict.fromkeys(CUTS, 0)
                continue
            rows = fresh if (positions < 0).all() else self._merged(batch, positions, fresh)
            pairs = pc.invert(pc.greater(pc.list_value_length(batch.column("segments")), 0)) \
                if "segments" in batch.schema.names else pa.array(np.ones(batch.num_rows, bool))
            # a batch's pair rows come first in its tokenized rows, in order (tokenize_counted)
            paired = rows.slice(0, int(pc.sum(pairs).as_py() or 0))
            self.writer.write(keys.filter(pairs), {**{name: paired.column(name) for name in KEPT},
                                                   "input_ids": _ids_as_bytes(paired.column("input_ids"))},
                              positions[pairs.to_numpy(zero_copy_only=False)])
            self.reused += int((positions >= 0).sum())
            yield rows, cuts
        self.writer.close()

    def _merged(self, batch: pa.RecordBatch, positions: np.ndarray, fresh: pa.RecordBatch) -> pa.RecordBatch:
        seen = positions >= 0
        known = self.before.rows(positions[seen], KEPT)
        ids = _bytes_as_ids(known.column("input_ids").chunk(0))
        known = known.set_column(known.schema.get_field_index("input_ids"), "input_ids", ids).append_column(
            "labels", pair_labels(ids, known.column("n_target").to_numpy()))
        order = np.where(seen, np.cumsum(seen) - 1, -1)  # the seen rows' places in `known`
        columns = with_memo(order, known, pa.Table.from_batches([fresh]), [*KEPT, "labels"])
        return pa.RecordBatch.from_arrays([batch.column(name) if name in ROW else columns[name]
                                           for name in self.schema.names], schema=self.schema)

    def record(self) -> dict[str, Any]:
        return {"rows_reused": self.reused,
                "reused_from": self.earlier.name if self.earlier is not None and self.reused else None}


def rows_in_place(packing: bool, templated: Path, earlier: Path | None, memo_rows: int) -> np.ndarray | None:
    """Give back each templated row's row in the earlier build's data where it is the same row there (-1: not known):
    its templated part is unchanged. None where rows are not one per templated row (packed, or conversations cut)
    or the earlier memo (`memo_rows` rows) does not hold one row per templated row."""
    before = layout.read_manifest(earlier) if earlier is not None else {}
    if packing or not before or before.get("packing") or before.get("conversations_cut", 1):
        return None
    if memo_rows != before.get("examples"):  # a conversation row: memo rows out of step
        return None
    unchanged = layout.rows_in_unchanged_parts(templated, earlier)
    return np.where(unchanged, np.arange(len(unchanged)), -1)


def batch_figures(rows: pa.RecordBatch) -> dict[str, int]:
    """Give back what write_tokenize counts of tokenized rows: examples, truncated, zero_target, and their token ids'
    and labels' range (min_input_ids, ..., absent without tokens)."""
    return {"examples": rows.num_rows, **_counted(rows), **_token_ranges(rows)}


def _counted(rows: Any) -> dict[str, int]:
    return {"truncated": int(pc.sum(rows.column("truncated")).as_py() or 0),
            "zero_target": int(pc.sum(pc.equal(rows.column("n_target"), 0)).as_py() or 0)}


def _token_ranges(rows: Any) -> dict[str, int]:
    ranges = {}
    for name in ("input_ids", "labels"):
        values = pc.list_flatten(rows.column(name))
        if len(values):
            low, high = pc.min_max(values).values()
            ranges |= {f"min_{name}": low.as_py(), f"max_{name}": high.as_py()}
    return ranges


def _footer_ranges(file: pq.ParquetFile) -> dict[str, int] | None:
    """Give back a one-row-group part's token id and label range from its footer's statistics (None: not there)."""
    ranges = {}
    group = file.metadata.row_group(0)
    for index in range(group.num_columns):
        column = group.column(index)
        name = column.path_in_schema.split(".")[0]
        if name in ("input_ids", "labels") and column.num_values:
            stats = column.statistics
            if stats is None or not stats.has_min_max:
                return None
            ranges |= {f"min_{name}": stats.min, f"max_{name}": stats.max}
    return ranges


class EarlierFigures:
    """batch_figures of rows of the earlier build's data, from two small columns and, for whole parts, the token
    ranges Parquet keeps in each part's footer (the token ids themselves are not read)."""

    def __init__(self, earlier: Path | None):
        self.parts = layout.data_parts(earlier) if earlier is not None else []
        self.bounds = layout.part_bounds(self.parts)

    def of(self, start: int, count: int) -> dict[str, int]:
        figures: dict[str, int] = {"examples": count, "truncated": 0, "zero_target": 0}
        for number in range(int(np.searchsorted(self.bounds, start, side="right")) - 1, len(self.parts)):
            first, last = max(start, int(self.bounds[number])), min(start + count, int(self.bounds[number + 1]))
            if first >= last:
                break
            file = pq.ParquetFile(self.parts[number])
            whole = (first, last) == (self.bounds[number], self.bounds[number + 1])
            footer = _footer_ranges(file) if whole and file.metadata.num_row_groups == 1 else None
            rows = file.read(columns=["truncated", "n_target"] + (["input_ids", "labels"] if footer is None else []))
            rows = rows.slice(first - int(self.bounds[number]), last - first)
            for name, value in _counted(rows).items():
                figures[name] += value
            for name, value in (footer if footer is not None else _token_ranges(rows)).items():
                figures[name] = (min if name.startswith("min") else max)(figures.get(name, value), value)
        return figures
