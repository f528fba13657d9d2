"""Artifact files hold even row groups: their bytes follow from their rows, not from how a step batched them;
an artifact's data parts equal to an earlier build's are linked from it."""

import hashlib
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from catalog import layout
from catalog.parquet_writer import DataParts, EvenRowGroupWriter
from catalog.store import sha256_file


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


def _parts(out, table, earlier=None):
    out.mkdir()
    with DataParts(out, table.schema, earlier, rows_per_part=1000) as writer:
        for batch in table.to_batches(max_chunksize=333):
            writer.write_batch(batch)
    return writer, layout.data_parts(out)


def test_a_grown_table_links_the_parts_it_shares_and_writes_the_bytes_a_fresh_write_gives(tmp_path):
    table = pa.table({"id": [f"row-{i}" for i in range(2500)], "text": [f"text {i}" for i in range(2500)]})
    grown = pa.concat_tables([table, pa.table({"id": ["new"], "text": ["new text"]})])
    _, before = _parts(tmp_path / "before", table)
    writer, after = _parts(tmp_path / "after", grown, earlier=tmp_path / "before")
    _, fresh = _parts(tmp_path / "fresh", grown)
    assert [p.name for p in after] == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    assert (writer.parts, writer.linked) == (3, 2)  # the last part gained a row: written again
    assert [p.stat().st_ino for p in after[:2]] == [p.stat().st_ino for p in before[:2]]
    assert after[2].stat().st_ino != before[2].stat().st_ino
    assert [p.read_bytes() for p in after] == [p.read_bytes() for p in fresh]
    assert layout.read_data(tmp_path / "after").equals(grown) and layout.data_rows(tmp_path / "after") == 2501
    assert sha256_file(after[0]) == hashlib.sha256(after[0].read_bytes()).hexdigest()


def test_an_edited_row_is_written_again_and_an_empty_table_still_has_a_part(tmp_path):
    table = pa.table({"id": [f"row-{i}" for i in range(1500)]})
    _parts(tmp_path / "before", table)
    edited = table.set_column(0, "id", pa.array(["changed"] + [f"row-{i}" for i in range(1, 1500)]))
    writer, _ = _parts(tmp_path / "after", edited, earlier=tmp_path / "before")
    assert (writer.parts, writer.linked) == (2, 1)
    assert layout.read_data(tmp_path / "after").equals(edited)
    writer, parts = _parts(tmp_path / "empty", table.slice(0, 0))
    assert writer.parts == 1 and layout.data_columns(tmp_path / "empty") == ["id"] and layout.data_rows(
        tmp_path / "empty") == 0


def test_earlier_rows_in_place_are_linked_unread_and_the_rest_read_back(tmp_path, monkeypatch):
    table = pa.table({"id": [f"row-{i}" for i in range(2500)], "text": [f"text {i}" for i in range(2500)]})
    _, before = _parts(tmp_path / "before", table)
    read = []
    real_read = pq.read_table
    monkeypatch.setattr(pq, "read_table", lambda path, *a, **k: read.append(Path(path).name) or real_read(path, *a,
                                                                                                           **k))
    (tmp_path / "after").mkdir()
    new = pa.table({"id": ["new"], "text": ["new text"]})
    with DataParts(tmp_path / "after", table.schema, tmp_path / "before", rows_per_part=1000) as writer:
        writer.write_earlier(0, 2500)  # two full parts in place, then the short last part, which new rows fill up
        writer.write_table(new)
    after = layout.data_parts(tmp_path / "after")
    assert (writer.parts, writer.linked) == (3, 2)
    assert read == ["part-00002.parquet"], read
    assert [p.stat().st_ino for p in after[:2]] == [p.stat().st_ino for p in before[:2]]
    _, fresh = _parts(tmp_path / "fresh", pa.concat_tables([table, new]))
    assert [p.read_bytes() for p in after] == [p.read_bytes() for p in fresh]
