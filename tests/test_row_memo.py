"""A row memo is found again for a grown, shrunk or reordered table: by position where rows stayed, by key elsewhere;
a memo part whose rows were all taken in place is linked without being read back."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import catalog.parquet_writer as writer_module
from catalog import layout
from toolkit.row_memo import KEY, MemoIndex, MemoParts, MemoWriter, rows_at, with_memo

SCHEMA = pa.schema([(KEY, pa.string()), ("derived", pa.string())])


def _memo(keys):
    return pa.table({KEY: keys, "derived": [f"from {key}" for key in keys]}, schema=SCHEMA)


def _positions(memo, keys, batch_rows):
    index = MemoIndex(memo)
    return np.concatenate([index.positions(pa.array(keys[start:start + batch_rows], pa.string()))
                           for start in range(0, len(keys), batch_rows)])


@pytest.mark.parametrize("batch_rows", [1, 7, 1000])
def test_each_key_finds_its_memo_row_whatever_moved(batch_rows):
    before = [f"k{i}" for i in range(50)]
    memo = _memo(before)
    cases = {
        "grown": before + ["new1", "new2"],
        "removed": before[:10] + before[11:],
        "inserted": before[:20] + ["new"] + before[20:],
        "reordered": before[25:] + before[:25],
        "repeated": before[:5] + ["k3"] + before[5:],
    }
    for name, keys in cases.items():
        found = _positions(memo, keys, batch_rows)
        expected = [before.index(key) if key in before else -1 for key in keys]
        assert found.tolist() == expected, name
        values = with_memo(found, memo, pa.table({"derived": [f"fresh {k}" for k in keys if k not in before]}),
                           ["derived"])["derived"].to_pylist()
        assert values == [f"from {k}" if k in before else f"fresh {k}" for k in keys], name


def test_rows_at_slices_a_run_and_takes_the_rest():
    memo = _memo([f"k{i}" for i in range(10)])
    assert rows_at(memo, np.arange(3, 7)).column(KEY).to_pylist() == ["k3", "k4", "k5", "k6"]
    assert rows_at(memo.column(KEY), np.array([5, 1, 2])).to_pylist() == ["k5", "k1", "k2"]


def _write_memo(out, keys, earlier=None, earlier_rows=None):
    out.mkdir()
    writer = MemoWriter(out, SCHEMA, earlier)
    writer.writer.rows_per_chunk = 4
    table = _memo(keys)
    writer.write(table.column(KEY).combine_chunks(), {"derived": table.column("derived").combine_chunks()},
                 np.full(len(keys), -1) if earlier_rows is None else earlier_rows)
    writer.close()
    return writer.writer, layout.parts_of(layout.memo_file(out))


def test_parts_taken_in_place_are_linked_unread_and_others_compared(tmp_path, monkeypatch):
    keys = [f"k{i}" for i in range(10)]
    _, before = _write_memo(tmp_path / "before", keys)
    compared = []
    monkeypatch.setattr(writer_module, "_same_rows", lambda path, chunk: compared.append(path.name) or
                        pq.read_table(path).equals(chunk))
    # rows 0-7 taken from the earlier memo in place, then two fresh rows and a new one
    origins = np.array([0, 1, 2, 3, 4, 5, 6, 7, -1, -1, -1])
    writer, after = _write_memo(tmp_path / "after", keys + ["new"], tmp_path / "before", origins)
    assert (writer.parts, writer.linked) == (3, 2) and compared == ["part-00002.parquet"]
    assert [p.stat().st_ino for p in after[:2]] == [p.stat().st_ino for p in before[:2]]
    assert layout.read_memo(tmp_path / "after").equals(_memo(keys + ["new"]))


def test_rows_at_takes_across_chunks_in_any_order():
    chunked = pa.chunked_array([pa.array(["a", "b", "c"]), pa.array([], pa.string()), pa.array(["d", "e"])])
    assert rows_at(chunked, np.array([4, 0, 3, 3, 1])).to_pylist() == ["e", "a", "d", "d", "b"]
    table = pa.table({"x": chunked})
    assert rows_at(table, np.array([2, 4])).column("x").to_pylist() == ["c", "e"]
    assert rows_at(chunked, np.array([], np.int64)).to_pylist() == []


def test_memo_parts_reads_only_the_parts_holding_the_rows_asked_for(tmp_path, monkeypatch):
    keys = [f"k{i}" for i in range(10)]
    _write_memo(tmp_path / "memo", keys)  # parts of 4 rows: k0-k3, k4-k7, k8-k9
    read = []
    real = pq.read_table
    monkeypatch.setattr(pq, "read_table", lambda path, *a, **k: read.append(path.name) or real(path, *a, **k))
    rows = MemoParts(tmp_path / "memo").rows(np.array([9, 1, 8]), ["derived"])
    assert rows.column("derived").to_pylist() == ["from k9", "from k1", "from k8"]
    assert sorted(read) == ["part-00000.parquet", "part-00002.parquet"]
    assert MemoParts(None).parts == []


def test_memo_parts_reads_the_whole_memo_once_when_rows_come_from_all_over(tmp_path, monkeypatch):
    keys = [f"k{i}" for i in range(10)]
    _write_memo(tmp_path / "memo", keys)
    parts = MemoParts(tmp_path / "memo")
    read = []
    real = pq.read_table
    monkeypatch.setattr(pq, "read_table", lambda path, *a, **k: read.append(path.name) or real(path, *a, **k))
    assert parts.rows(np.array([9, 1, 5]), ["derived"]).column("derived").to_pylist() == ["from k9", "from k1",
                                                                                          "from k5"]
    assert parts.rows(np.array([2, 8]), ["derived"]).column("derived").to_pylist() == ["from k2", "from k8"]
    assert sorted(read) == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]  # each part once
