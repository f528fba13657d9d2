"""Artifact Parquet written in even chunks of rows, whatever batches the step hands over.

A step writes batch by batch; one row group per batch (a ParquetWriter's default) made a file's bytes depend on
the batching, which an incremental build and a full one need not share. Here every chunk but the last holds
ROWS_PER_GROUP rows, so the bytes follow from the rows alone and both builds write the same bytes. Compression and
encoding, not the row groups, are most of what writing costs (template's 192,000 rows: 0.85 s in even groups,
1.07 s in 1,000-row groups).

An artifact's rows and row memo (`DataParts`) go one chunk per part file of a Parquet dataset folder: a nightly
build on grown data derives the same rows for the same leading parts, and a part equal to the same part of the
previous build is linked from it, not compressed and written again. Quarantines (`EvenRowGroupWriter`) stay one file.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from catalog import layout
from catalog.store import link_file

ROWS_PER_GROUP = 65_536
# rows per part of an artifact's data and memo: a grown dataset writes its last part again, so a small part keeps
# that small (on average half a part per step); files of 16,384 rows still compress and read as well
ROWS_PER_PART = 16_384
# LZ4 rather than Parquet's default snappy: on bench_incremental's 200,000-row ingest, clean and template data,
# writing took 0.34-0.77 s against 0.48-0.87 s and reading 0.06-0.15 s against 0.15-0.42 s, for 4-6% more bytes
COMPRESSION = "lz4"


class _EvenChunks:
    """Takes rows in batches of any size and hands them on to `_emit` in chunks of `rows_per_chunk` rows."""

    def __init__(self, rows_per_chunk: int | None):
        self.rows_per_chunk = rows_per_chunk or ROWS_PER_GROUP
        self._pending: list[pa.Table] = []
        self._rows = 0

    def write_table(self, table: pa.Table) -> None:
        if not table.num_rows:
            return
        self._pending.append(table)
        self._rows += table.num_rows
        while self._rows >= self.rows_per_chunk:
            self._flush(self.rows_per_chunk)

    def write_batch(self, batch: pa.RecordBatch) -> None:
        self.write_table(pa.Table.from_batches([batch]))

    def _flush(self, rows: int) -> None:
        table = pa.concat_tables(self._pending)
        self._emit(table.slice(0, rows))
        rest = table.slice(rows)
        self._pending, self._rows = ([rest] if rest.num_rows else []), rest.num_rows

    def _emit(self, chunk: pa.Table) -> None:
        raise NotImplementedError

    def _finish(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        if self._rows:
            self._flush(self._rows)
        self._finish()

    def __enter__(self) -> Any:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()


class EvenRowGroupWriter(_EvenChunks):
    """A ParquetWriter (same options) that writes one file in row groups of `rows_per_group` rows."""

    def __init__(self, path: Path | str, schema: pa.Schema, rows_per_group: int | None = None, **options: Any):
        super().__init__(rows_per_group)
        self.schema = schema
        self._writer = pq.ParquetWriter(path, schema, **{"compression": COMPRESSION, **options})

    def _emit(self, chunk: pa.Table) -> None:
        self._writer.write_table(chunk, row_group_size=chunk.num_rows)

    def _finish(self) -> None:
        self._writer.close()


class DataParts(_EvenChunks):
    """Writes rows to the Parquet dataset folder `name` of the artifact folder `out` (its data unless told), a part
    file (one row group) per `rows_per_part` rows.

    `earlier`: an artifact of the same step and recipe; a part whose rows (and schema) equal its part of the same
    number is hard-linked from there (same writer, same rows: same bytes) and counted in `linked`.
    """

    def __init__(self, out: Path, schema: pa.Schema, earlier: Path | None = None, rows_per_part: int | None = None,
                 name: str = layout.DATA, compression: str = COMPRESSION, dictionary: bool = True):
        super().__init__(rows_per_part or ROWS_PER_PART)
        self.schema, self.folder, self.compression, self.dictionary = schema, Path(out) / name, compression, dictionary
        self.folder.mkdir(parents=True, exist_ok=True)
        self.earlier = Path(earlier) / name if earlier is not None else None
        self.parts = self.linked = self.rows_emitted = 0
        self._origins: list[np.ndarray] = []

    def write_table(self, table: pa.Table, earlier_rows: np.ndarray | None = None) -> None:
        """Add rows; `earlier_rows`: each row's row in the earlier build's folder that it is known to equal (-1: not
        known). A part whose rows all sit where they sat in the earlier build is linked without reading it back."""
        if table.num_rows:
            self._origins.append(np.full(table.num_rows, -1, np.int64) if earlier_rows is None else earlier_rows)
        super().write_table(table)

    def write_earlier(self, start: int, count: int) -> None:
        """Add rows [start, start + count) of the earlier build's folder. A whole part of them sitting where it sat
        is linked without being read; the rest are read from their earlier parts (ingest's unchanged files)."""
        assert self.earlier is not None
        parts, bounds = self._earlier_parts
        while count > 0:
            part = int(np.searchsorted(bounds, start, side="right")) - 1
            size, before = int(bounds[part + 1] - bounds[part]), parts[part]
            # only a full part: the rows after a shorter (last) one may fill its part up in this build
            if not self._rows and start == bounds[part] == self.rows_emitted and count >= size == self.rows_per_chunk \
                    and before.name == layout.PART.format(self.parts):
                link_file(before, self.folder / layout.PART.format(self.parts))
                self.parts, self.linked, self.rows_emitted = self.parts + 1, self.linked + 1, self.rows_emitted + size
                start, count = start + size, count - size
                continue
            taken = min(count, int(bounds[part + 1]) - start)
            rows = pq.read_table(before).slice(start - int(bounds[part]), taken).cast(self.schema)
            self.write_table(rows, np.arange(start, start + taken))
            start, count = start + taken, count - taken

    @functools.cached_property
    def _earlier_parts(self) -> tuple[list[Path], np.ndarray]:
        """The earlier build's part files, and the first row of each (then its row count)."""
        assert self.earlier is not None
        parts = layout.parts_of(self.earlier)
        return parts, layout.part_bounds(parts)

    def _emit(self, chunk: pa.Table) -> None:
        target = self.folder / layout.PART.format(self.parts)
        self.parts += 1
        first, self.rows_emitted = self.rows_emitted, self.rows_emitted + chunk.num_rows
        origins = np.concatenate(self._origins) if self._origins else np.zeros(0, np.int64)
        self._origins = [origins[chunk.num_rows:]] if len(origins) > chunk.num_rows else []
        before = self.earlier / target.name if self.earlier is not None else None
        in_place = sits_in_place(origins[:chunk.num_rows], first)
        if before is not None and before.is_file() and (
                _same_count(before, chunk) if in_place else _same_rows(before, chunk)):
            link_file(before, target)
            self.linked += 1
        else:
            pq.write_table(chunk, target, row_group_size=max(chunk.num_rows, 1), compression=self.compression,
                           use_dictionary=self.dictionary)

    def _finish(self) -> None:
        if not self.parts:  # no rows: still one (empty) part, which carries the schema
            self._emit(self.schema.empty_table())


def sits_in_place(earlier_rows: np.ndarray, first: int) -> bool:
    """Tell whether rows `first`, `first` + 1, ... are each the earlier build's row of the same number (and there are
    any): their part is the earlier part, row for row."""
    return len(earlier_rows) > 0 and bool((earlier_rows == np.arange(first, first + len(earlier_rows))).all())


def _same_count(path: Path, chunk: pa.Table) -> bool:
    # rows known equal to those of the earlier part in the same places: the same writer gave it the same bytes
    return pq.ParquetFile(path).metadata.num_rows == chunk.num_rows


def _same_rows(path: Path, chunk: pa.Table) -> bool:
    # reading LZ4 back and comparing in Arrow costs a fraction of compressing and writing the part again. Field by
    # field, not with the schema's metadata: Parquet names a list's items "element" where Arrow says "item"
    if not _same_count(path, chunk):
        return False
    before = pq.read_table(path)
    return before.schema.metadata == chunk.schema.metadata and before.equals(chunk)


def link_data(source: Path, out: Path) -> None:
    """Give `out` the rows of the artifact folder `source` as they are: each part file hard-linked."""
    parts = layout.data_parts(source)
    if parts == [layout.data_path(source)]:  # a single Parquet file by the data's name
        link_file(parts[0], layout.data_path(out))
        return
    layout.data_path(out).mkdir(parents=True, exist_ok=True)
    for part in parts:
        link_file(part, layout.data_path(out) / part.name)
