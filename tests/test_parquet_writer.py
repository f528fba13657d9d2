"""Artifact files hold even row groups: their bytes follow from their rows, not from how a step batched them."""

import pyarrow as pa
import pyarrow.parquet as pq

from catalog.parquet_writer import EvenRowGroupWriter


def _write(path, table, batch_rows):
    with EvenRowGroupWriter(path, table.schema, rows_per_group=1000) as writer:
        for batch in table.to_batches(max_chunksize=batch_rows):
            writer.write_batch(batch)
    return path.read_bytes()


def test_the_same_rows_batched_differently_give_the_same_file(tmp_path):
    table = pa.table({"id": [f"row-{i}" for i in range(2500)], "n": list(range(2500))})
    one = _write(tmp_path / "a.parquet", table, 7)
    other = _write(tmp_path / "b.parquet", table, 999)
    assert one == other
    groups = pq.ParquetFile(tmp_path / "a.parquet").metadata
    assert [groups.row_group(i).num_rows for i in range(groups.num_row_groups)] == [1000, 1000, 500]
    assert pq.read_table(tmp_path / "a.parquet").equals(table)
