"""Per-row memos of the data steps: which rows a step has derived before, matched by content (a row's key).

A data step's artifact keeps, in `row_memo.parquet` (catalog/layout.py), what it derived for each row, keyed by
`row_keys`. When the next build of the same step has the same recipe (catalog.step.Step.earlier: same
config and code version all the way up), a row with a key in that memo is derived exactly as before, so only
unseen keys need the work; everything the whole table decides (duplicates, splits, packing) is decided again.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from catalog import layout
from catalog.parquet_writer import DataParts

KEY = "key"


def row_keys(rows: pa.Table | pa.RecordBatch) -> pa.Array:
    """Give back each row's memo key: its id (ingest's hash of instruction, input and response), and for a
    conversation that id with its turns hashed in, since turns the id does not cover shape what is derived."""
    ids = rows.column("id")
    ids = ids.combine_chunks() if isinstance(ids, pa.ChunkedArray) else ids
    if "messages" not in rows.schema.names:
        return ids
    messages = rows.column("messages")
    talks = np.flatnonzero(pc.not_equal(messages, "").to_numpy(zero_copy_only=False))
    if not len(talks):
        return ids
    keys = ids.to_pylist()
    for row, turns in zip(talks.tolist(), messages.take(pa.array(talks)).to_pylist(), strict=True):
        keys[row] = keys[row] + ":" + hashlib.blake2b(turns.encode("utf-8"), digest_size=8).hexdigest()
    return pa.array(keys, pa.string())


class MemoIndex:
    """Finds each row's row in an earlier memo (-1: not in it), batch after batch in table order.

    A memo keeps every row of the table it was built from, in order, and a grown table holds the earlier rows in
    the earlier order: so a batch is first matched by position, against the memo rows after the last one matched
    (one comparison of two key arrays). Only rows that do not line up are looked up by key, in a dict built the first
    time one is needed; rows past the memo's end, when all of it lined up, are new and need no lookup.
    """

    def __init__(self, memo: pa.Table | None):
        self.keys = memo.column(KEY).combine_chunks() if memo is not None else pa.array([], pa.string())
        self.next = 0  # the memo row after the last one matched
        self.in_order = True  # every row so far lined up with the memo row after the one before
        self._rows: dict[str, int] | None = None

    def positions(self, keys: pa.Array) -> np.ndarray:
        """Give back each key's row in the memo (-1: not in it)."""
        ahead = self.keys.slice(self.next, len(keys))
        lined_up = np.zeros(len(keys), bool)
        if len(ahead):
            lined_up[:len(ahead)] = pc.equal(keys.slice(0, len(ahead)).cast(ahead.type), ahead).to_numpy(
                zero_copy_only=False)
        positions = np.where(lined_up, self.next + np.arange(len(keys)), -1)
        # rows past the memo's end are new only while every memo row so far lined up: else they may have moved
        if not lined_up[:len(ahead)].all() or not (self.in_order or lined_up.all()):
            self.in_order = False
            if self._rows is None:
                self._rows = {key: row for row, key in reversed(list(enumerate(self.keys.to_pylist())))}
            stray = np.flatnonzero(~lined_up)
            positions[stray] = [self._rows.get(key, -1) for key in keys.take(pa.array(stray)).to_pylist()]
        if (positions >= 0).any():
            self.next = int(positions[positions >= 0][-1]) + 1
        return positions


def rows_at(values: Any, positions: np.ndarray) -> Any:
    """Give back a table's or a column's rows at `positions`, in one chunk: a slice where they run on one after
    another (the rows of a grown table that were there before), else a take."""
    if len(positions) and positions[-1] - positions[0] == len(positions) - 1 and (np.diff(positions) == 1).all():
        taken = values.slice(int(positions[0]), len(positions))
        return taken.combine_chunks() if isinstance(taken, (pa.ChunkedArray, pa.Table)) else taken
    if isinstance(values, pa.Table):
        return pa.Table.from_arrays([_chunked_take(column, positions) for column in values.columns],
                                    schema=values.schema)
    return _chunked_take(values, positions) if isinstance(values, pa.ChunkedArray) else values.take(pa.array(positions))


def _chunked_take(values: pa.ChunkedArray, positions: np.ndarray) -> pa.Array:
    # chunk by chunk: Arrow's take on a chunked column joins every chunk first (0.84 s for 50,000 of 1,000,000 texts)
    order = np.argsort(positions, kind="stable")
    ascending = np.asarray(positions)[order]
    bounds = np.cumsum([0, *(len(chunk) for chunk in values.chunks)])
    starts, ends = np.searchsorted(ascending, bounds[:-1]), np.searchsorted(ascending, bounds[1:])
    pieces = [chunk.take(pa.array(ascending[start:end] - first)) for chunk, first, start, end
              in zip(values.chunks, bounds[:-1].tolist(), starts.tolist(), ends.tolist(), strict=True) if end > start]
    taken = pa.concat_arrays(pieces) if pieces else pa.array([], values.type)
    back = np.empty(len(order), np.int64)
    back[order] = np.arange(len(order))
    return taken.take(pa.array(back))


def with_memo(positions: np.ndarray, memo: pa.Table | None, fresh: pa.Table, columns: list[str]
              ) -> dict[str, pa.Array]:
    """Give back each column for every row: the memo's row where `positions` >= 0, else the next row of `fresh`
    (the unseen rows' values, in order)."""
    seen = positions >= 0
    if seen.all():
        assert memo is not None
        return {c: rows_at(memo.column(c), positions) for c in columns}
    if not seen.any():
        return {c: fresh.column(c).combine_chunks() for c in columns}
    assert memo is not None
    order = np.empty(len(positions), np.int64)
    order[seen] = np.arange(int(seen.sum()))
    order[~seen] = int(seen.sum()) + np.arange(int((~seen).sum()))
    return {c: pa.concat_arrays([rows_at(memo.column(c), positions[seen]),
                                 fresh.column(c).combine_chunks().cast(memo.schema.field(c).type)]).take(pa.array(order))
            for c in columns}


class MemoParts:
    """An earlier memo read a part at a time, only the parts and columns asked for (the last part read is kept);
    once rows are asked for from several parts at once (rows moved about), the memo is read whole, once."""

    def __init__(self, folder: Path | None):
        memo = layout.memo_file(folder) if folder is not None else None
        self.parts = layout.parts_of(memo) if memo is not None and memo.exists() else []
        self.bounds = layout.part_bounds(self.parts)
        self._kept: tuple[tuple[int, tuple[str, ...]], pa.Table] | None = None
        self._whole: dict[tuple[str, ...], pa.Table] = {}

    def rows(self, positions: np.ndarray, columns: list[str]) -> pa.Table:
        """Give back the memo rows at `positions` (each >= 0), those columns."""
        numbers = np.searchsorted(self.bounds, positions, side="right") - 1
        wanted = np.unique(numbers).tolist()
        if len(wanted) > 2 or tuple(columns) in self._whole:
            if tuple(columns) not in self._whole:
                self._whole[tuple(columns)] = pa.concat_tables(pq.read_table(part, columns=columns)
                                                               for part in self.parts)
            return rows_at(self._whole[tuple(columns)], positions)
        tables = [self._part(number, columns) for number in wanted]
        starts = np.cumsum([0, *(table.num_rows for table in tables)])
        local = positions - self.bounds[numbers] + starts[np.searchsorted(wanted, numbers)]
        return rows_at(pa.concat_tables(tables), local) if tables else pa.table(
            {name: pa.array([]) for name in columns})

    def _part(self, number: int, columns: list[str]) -> pa.Table:
        if self._kept is None or self._kept[0] != (number, tuple(columns)):
            self._kept = (number, tuple(columns)), pq.read_table(self.parts[number], columns=columns)
        return self._kept[1]


class MemoWriter:
    """Writes a step's row memo batch by batch: every row, in table order (see MemoIndex)."""

    def __init__(self, out: Path, schema: pa.Schema, earlier: Path | None = None):
        # in parts (the earlier build's linked where equal), uncompressed and without dictionaries: a memo is read
        # back whole by the next build only, and snappy made writing and reading it 3-6x slower (template's 194,000
        # rows: 0.45 s against 0.08 s to write) for a third less disk; its keys and texts are mostly distinct
        self.writer = DataParts(out, schema, earlier, name=layout.ROW_MEMO, compression="none", dictionary=False)
        self.schema = schema

    def write(self, keys: pa.Array, columns: dict[str, pa.Array], earlier_rows: np.ndarray) -> None:
        """Add rows; `columns` holds every memo column but the key, per row, and `earlier_rows` each row's row in the
        earlier memo that it was taken from (-1: derived here): a part of rows taken in place is linked unread."""
        self.writer.write_table(pa.Table.from_arrays(
            [keys, *(columns[name] for name in self.schema.names[1:])], schema=self.schema), earlier_rows)

    def write_earlier(self, start: int, count: int) -> None:
        """Add rows [start, start + count) of the earlier memo as they are (see DataParts.write_earlier)."""
        self.writer.write_earlier(start, count)

    def close(self) -> None:
        self.writer.close()


def changed_only(values: pa.Array, raw: pa.Array) -> pa.Array:
    """Give back `values` with null where it equals the row's own `raw` value: a memo need not keep those
    (pc.coalesce(memo value, raw) gives them back), and most rows come out of cleaning as they went in."""
    return pc.if_else(pc.equal(values, raw), pa.scalar(None, values.type), values)
