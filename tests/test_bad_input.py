"""Bad input: every kind ends in quarantine with a reason, a one-line error naming the file, or a correct read."""

import gzip
import json

import pandas as pd
import pytest

from catalog.config import DataConfig
from tasks.ingest import IngestError, write_ingest

GOOD = {"instruction": "Say hi", "input": "", "output": "hi"}


def _jsonl(*records):
    return "\n".join(r if isinstance(r, str) else json.dumps(r) for r in records) + "\n"


def _write(folder, name, content):
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif isinstance(content, pd.DataFrame):
        content.to_parquet(path)
    else:
        path.write_text(content, encoding="utf-8")
    return path


# case: (files {name: content}, source inside tmp, extra config, outcome)
# outcome: ("quarantine", code, field, row) | ("error", text the line must hold) | ("rows", n)
CASES = {
    "invalid_json_line": ({"a.jsonl": _jsonl(GOOD, "{not json")}, "a.jsonl", {},
                          ("quarantine", "invalid_json", "", "2")),
    "latin1_line": ({"a.jsonl": _jsonl(GOOD).encode() + json.dumps({**GOOD, "output": "café"}, ensure_ascii=False)
                     .encode("latin-1")}, "a.jsonl", {}, ("quarantine", "not_utf8", "", "2")),
    "latin1_csv": ({"a.csv": "instruction,output\nSay,café\n".encode("latin-1")}, "a.csv", {},
                   ("error", "line 2: not valid UTF-8")),
    "utf16_with_bom_is_read": ({"a.jsonl": _jsonl(GOOD, {**GOOD, "output": "hé"}).encode("utf-16")}, "a.jsonl", {},
                               ("rows", 2)),
    "missing_required_column_csv": ({"a.csv": "instruction,input,answer\nSay,,hi\n"}, "a.csv", {"format": "alpaca"},
                                    ("error", "missing required column(s) output")),
    "missing_field_in_record": ({"a.jsonl": _jsonl(GOOD, {"instruction": "x", "input": ""})}, "a.jsonl",
                                {"format": "alpaca"}, ("quarantine", "missing_field", "output", "2")),
    "unknown_format": ({"a.jsonl": _jsonl({"question": "q", "answer": "a"})}, "a.jsonl", {},
                       ("error", "row 1: unknown format")),
    "null_where_text_expected": ({"a.jsonl": _jsonl(GOOD, {**GOOD, "output": None})}, "a.jsonl", {},
                                 ("quarantine", "missing_field", "output", "2")),
    "number_where_text_expected": ({"a.jsonl": _jsonl(GOOD, {**GOOD, "instruction": 42})}, "a.jsonl", {},
                                   ("quarantine", "wrong_type", "instruction", "2")),
    "empty_file": ({"a.jsonl": ""}, "a.jsonl", {}, ("error", "empty")),
    "empty_file_beside_good_one": ({"d/a.jsonl": "", "d/b.jsonl": _jsonl(GOOD)}, "d", {},
                                   ("quarantine", "empty_file", "", "0")),
    "ten_megabyte_row": ({"a.jsonl": _jsonl(GOOD, {**GOOD, "output": "x" * 10_000_000})}, "a.jsonl", {},
                         ("quarantine", "record_too_large", "response", "2")),
    "nul_byte_in_text": ({"a.jsonl": _jsonl(GOOD, {**GOOD, "input": "a\u0000b"})}, "a.jsonl", {},
                         ("quarantine", "nul_byte", "input", "2")),
    "raw_nul_bytes_in_line": ({"a.jsonl": _jsonl(GOOD).encode() + b"\x00\x00\x00\n"}, "a.jsonl", {},
                              ("quarantine", "invalid_json", "", "2")),
    "duplicate_keys": ({"a.jsonl": _jsonl(GOOD, '{"instruction": "a", "output": "b", "output": "c"}')}, "a.jsonl",
                       {}, ("quarantine", "duplicate_keys", "", "2")),
    "mixed_schemas_across_files": ({"d/a.jsonl": _jsonl(GOOD),
                                    "d/b.jsonl": _jsonl({"instruction": "Hi", "context": "", "response": "yo"}),
                                    "d/c.csv": "prompt,completion\nP,C\n"}, "d", {}, ("rows", 3)),
    "csv_embedded_newlines_and_quotes": ({"a.csv": 'instruction,output\n"Say ""hi""\nplease","line1\nline2, ok"\n'},
                                         "a.csv", {}, ("rows", 1)),
    "csv_broken_quote": ({"a.csv": 'instruction,output\nok,fine\n"never closed,x\n'}, "a.csv", {},
                         ("error", "unreadable CSV")),
    "conversation_without_assistant": ({"a.jsonl": _jsonl(
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
        {"messages": [{"role": "system", "content": "be nice"}, {"role": "user", "content": "hi"}]})},
        "a.jsonl", {}, ("quarantine", "no_assistant_turn", "messages", "2")),
    "unreadable_parquet": ({"a.parquet": b"PAR1 this is not parquet"}, "a.parquet", {},
                           ("error", "unreadable Parquet file")),
    "corrupt_gzip": ({"a.jsonl.gz": b"not gzip at all"}, "a.jsonl.gz", {}, ("error", "not a readable gzip file")),
    "path_does_not_exist": ({}, "nope.jsonl", {}, ("error", "no such file or folder")),
    "directory_without_data_files": ({"d/readme.txt": "hello"}, "d", {}, ("error", "holds no data files")),
    "record_not_an_object": ({"a.jsonl": _jsonl(GOOD, "[1, 2]")}, "a.jsonl", {},
                             ("quarantine", "not_an_object", "", "2")),
    "self_instruct_empty_instances": ({"a.jsonl": _jsonl({"instruction": "x", "instances": [{"input": "",
                                       "output": "y"}]}, {"instruction": "x", "instances": []})}, "a.jsonl", {},
                                      ("quarantine", "bad_instances", "instances", "2")),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_quarantined_or_one_line_error_never_a_traceback(case, tmp_path):
    files, source, extra, outcome = CASES[case]
    for name, content in files.items():
        _write(tmp_path, name, content)
    out = tmp_path / "out"
    out.mkdir()
    config = DataConfig(source=str(tmp_path / source), **extra)
    if outcome[0] == "error":
        with pytest.raises(IngestError) as caught:
            write_ingest(config, out)
        message = str(caught.value)
        assert "\n" not in message and outcome[1] in message
        assert str(tmp_path) in message  # names the file (or folder) at fault
        return
    counts = write_ingest(config, out)
    quarantine = pd.read_parquet(out / "quarantine.parquet")
    rows = pd.read_parquet(out / "data.parquet")
    if outcome[0] == "rows":
        assert len(rows) == outcome[1] and quarantine.empty, quarantine.to_dict("records")
        if case == "csv_embedded_newlines_and_quotes":
            assert rows["instruction"][0] == 'Say "hi"\nplease' and rows["response"][0] == "line1\nline2, ok"
        if case == "utf16_with_bom_is_read":
            assert rows["response"].tolist() == ["hi", "hé"]
        return
    _, code, field, row = outcome
    assert counts["quarantined"] == len(quarantine) == 1, quarantine.to_dict("records")
    bad = quarantine.iloc[0]
    assert (bad["code"], bad["field"], bad["row"]) == (code, field, row)
    assert bad["file"].startswith(str(tmp_path)) and bad["reason"]
    assert counts["quarantined_by_code"] == {code: 1}
    assert len(rows) >= 1  # the good rows beside the bad one are kept


def test_gzip_file_reads_like_the_plain_one(tmp_path):
    (tmp_path / "a.jsonl.gz").write_bytes(gzip.compress(_jsonl(GOOD).encode()))
    out = tmp_path / "out"
    out.mkdir()
    assert write_ingest(DataConfig(source=str(tmp_path / "a.jsonl.gz")), out)["rows"] == 1
