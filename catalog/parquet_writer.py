"""Artifact Parquet files written in even row groups, whatever batches the step hands over.

A step writes batch by batch; one row group per batch (a ParquetWriter's default) made a file's bytes depend on
the batching, which an incremental build and a full one need not share. Here every row group but the last holds
ROWS_PER_GROUP rows, so the bytes follow from the rows alone and both builds write the same file. Writing is a
little cheaper too (template's 192,000 rows: 0.85 s against 1.07 s in 1,000-row groups); compression and
encoding, not the row groups, are most of what writing costs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

ROWS_PER_GROUP = 65_536
# LZ4 rather than Parquet's default snappy: on the 200,000-row artifacts, writing took 0.34-0.77 s against
# 0.48-0.87 s and reading 0.06-0.15 s against 0.15-0.42 s, for 4-6% more bytes (benchmarks/RESULTS.md)
COMPRESSION = "lz4"


class EvenRowGroupWriter:
    """A ParquetWriter (same options) that buffers rows and writes them in row groups of `rows_per_group`."""

    def __init__(self, path: Path | str, schema: pa.Schema, rows_per_group: int | None = None, **options: Any):
        self.schema = schema
        self.rows_per_group = rows_per_group or ROWS_PER_GROUP
        self._writer = pq.ParquetWriter(path, schema, **{"compression": COMPRESSION, **options})
        self._pending: list[pa.Table] = []
        self._rows = 0

    def write_table(self, table: pa.Table) -> None:
        if not table.num_rows:
            return
        self._pending.append(table)
        self._rows += table.num_rows
        while self._rows >= self.rows_per_group:
            self._flush(self.rows_per_group)

    def write_batch(self, batch: pa.RecordBatch) -> None:
        self.write_table(pa.Table.from_batches([batch]))

    def _flush(self, rows: int) -> None:
        table = pa.concat_tables(self._pending)
        self._writer.write_table(table.slice(0, rows), row_group_size=rows)
        rest = table.slice(rows)
        self._pending, self._rows = ([rest] if rest.num_rows else []), rest.num_rows

    def close(self) -> None:
        if self._rows:
            self._flush(self._rows)
        self._writer.close()

    def __enter__(self) -> EvenRowGroupWriter:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()
