"""Incremental data steps on a real Prefect API: a grown or edited folder gives what a from-scratch run gives."""

import hashlib
import json
import random
import shutil
from pathlib import Path

import pandas as pd
import pytest

from catalog.config import STEPS, load_config
from commands.running import run_pipeline
from tests.conftest import tiny_overrides

pytestmark = pytest.mark.usefixtures("prefect_api")
DATA_STEPS = STEPS[:5]
WORDS = [f"w{n}" for n in range(400)]


def _rows(seed: int, n: int) -> list[dict[str, str]]:
    rng = random.Random(seed)
    # long enough rows for the near-duplicate check (16+ words); every fifth input a 20+ word passage sentence
    return [{"instruction": " ".join(rng.choices(WORDS, k=24)) + ".",
             "input": " ".join(rng.choices(WORDS, k=22)) + "." if i % 5 == 0 else "",
             "output": " ".join(rng.choices(WORDS, k=12))} for i in range(n)]


def _write(path: Path, rows: list[dict[str, str]]) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")


def _run(folder: Path, root: Path) -> dict:
    summary = run_pipeline(load_config(overrides=tiny_overrides(root, **{"data.source": str(folder)})), "tokenize")
    assert "error" not in summary, summary.get("error")
    return summary


def _parquet_digests(summary: dict) -> dict[str, dict[str, str]]:
    folders = {step: Path(summary["steps"][step]["artifact"]) for step in DATA_STEPS}
    return {step: {path.relative_to(folder).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
                   for path in sorted(folder.rglob("*.parquet")) if path.is_file()}
            for step, folder in folders.items()}


def _manifest(summary: dict, step: str) -> dict:
    return json.loads((Path(summary["steps"][step]["artifact"]) / "manifest.json").read_text())


@pytest.fixture(scope="module", autouse=True)
def small_parts():
    """Parts of 64 rows, so the data of 180 rows spans several and a grown folder can reuse the leading ones."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("catalog.parquet_writer.ROWS_PER_PART", 64)
        yield


@pytest.fixture(scope="module")
def first_night(tmp_path_factory, small_parts):
    """A folder of three files run to tokenize once: (folder, root) to copy for each change."""
    base = tmp_path_factory.mktemp("night")
    folder = base / "source"
    folder.mkdir()
    for part in range(3):
        _write(folder / f"part-{part}.jsonl", _rows(part, 60))
    _run(folder, base / "root")
    return folder, base / "root"


@pytest.fixture
def night(first_night, tmp_path):
    """The first night's folder, to change in place (each row's `source` names its path, so the path must stay),
    and a copy of its artifact root; the folder is put back afterwards."""
    folder, root = first_night
    shutil.copytree(folder, tmp_path / "folder-before")
    shutil.copytree(root, tmp_path / "root")
    yield folder, tmp_path / "root"
    shutil.rmtree(folder)
    shutil.copytree(tmp_path / "folder-before", folder)


def _edit_a_row(folder: Path) -> None:
    rows = [json.loads(line) for line in (folder / "part-1.jsonl").read_text().splitlines()]
    rows[7]["output"] = "an edited answer"
    _write(folder / "part-1.jsonl", rows)


def _near_duplicate_first(folder: Path) -> None:
    # a new file that sorts first holding a near copy of an old row: now the old row is the later one, and drops
    old = json.loads((folder / "part-2.jsonl").read_text().splitlines()[3])
    words = old["instruction"].split()
    words[5] = "changed"
    _write(folder / "a-new.jsonl", [{**old, "instruction": " ".join(words)}, *_rows(9, 5)])


CHANGES = {
    "added_file": lambda folder: _write(folder / "part-3.jsonl", _rows(3, 20)),
    "removed_file": lambda folder: (folder / "part-0.jsonl").unlink(),
    "edited_row": _edit_a_row,
    "near_duplicate_of_an_old_row": _near_duplicate_first,
}


@pytest.mark.parametrize("change", CHANGES)
def test_incremental_run_equals_a_full_run_byte_for_byte(night, tmp_path, change):
    folder, root = night
    CHANGES[change](folder)
    incremental = _run(folder, root)
    full = _run(folder, tmp_path / "scratch")
    assert {s: v["key"] for s, v in incremental["steps"].items()} == {s: v["key"] for s, v in full["steps"].items()}
    assert _parquet_digests(incremental) == _parquet_digests(full)
    # the figures too, though parts taken as they were are counted from their footers, not read
    figures = ("rows", "examples", "tokens", "target_tokens", "truncated_share", "zero_target_rows", "min_token_id",
               "max_token_id", "min_label", "max_label", "repeated_ids", "packing", "train_rows")
    assert {name: _manifest(incremental, "tokenize")[name] for name in figures} == {
        name: _manifest(full, "tokenize")[name] for name in figures}
    assert _manifest(full, "clean")["rows_reused"] == 0
    assert _manifest(incremental, "clean")["rows_reused"] > 100
    assert _manifest(incremental, "tokenize")["rows_reused"] > 100
    assert _parquet_digests(incremental)["tokenize"]["data.parquet/part-00001.parquet"]  # more than one part
    if change == "added_file":  # the new rows come last: the parts before theirs are linked, not written again
        for step in ("ingest", "clean", "template", "tokenize"):
            manifest = _manifest(incremental, step)
            assert 1 <= manifest["parts_linked"] < manifest["parts"], step
    if change == "near_duplicate_of_an_old_row":
        dropped = pd.read_parquet(Path(incremental["steps"]["clean"]["artifact"]) / "quarantine.parquet")
        assert f"{folder / 'part-2.jsonl'}:4" in set(dropped.loc[dropped["reason"] == "near_duplicate", "source"])


def test_a_broken_new_file_is_quarantined_or_refused_and_earlier_rows_are_untouched(night, tmp_path):
    folder, root = night
    bad = folder / "part-3.jsonl"
    bad.write_text(json.dumps(_rows(3, 1)[0]) + "\n{not json\n" + json.dumps({"instruction": "x", "output": None}))
    summary = _run(folder, root)
    rejected = pd.read_parquet(Path(summary["steps"]["ingest"]["artifact"]) / "quarantine.parquet")
    assert set(zip(rejected["file"], rejected["row"], rejected["field"], strict=True)) == {
        (str(bad), "2", ""), (str(bad), "3", "output")}
    assert _parquet_digests(summary) == _parquet_digests(_run(folder, tmp_path / "scratch"))

    # a file that cannot be read at all stops the run with one line naming it; nothing built before is touched
    (folder / "part-4.csv").write_text("question,answer\nq,a\n")
    refused = run_pipeline(load_config(overrides=tiny_overrides(root, **{"data.source": str(folder)})), "tokenize")
    assert f"{folder / 'part-4.csv'}: row 1: unknown format" in refused["error"]
    assert "\n" not in refused["error"].strip()
    (folder / "part-4.csv").unlink()
    again = _run(folder, root)
    assert {step: v["state"] for step, v in again["steps"].items()} == dict.fromkeys(DATA_STEPS, "Cached")


def test_the_data_steps_gpt2_encoder_is_the_one_transformers_builds():
    from toolkit.tokenizer import gpt2_encoder, gpt2_tokenizer

    # a fresh one: calls with truncation=/padding= leave those settings on the cached tokenizer's backend
    built_by_transformers = gpt2_tokenizer.__wrapped__().backend_tokenizer
    assert json.loads(gpt2_encoder().to_str()) == json.loads(built_by_transformers.to_str())
    assert gpt2_encoder().encode("Hello world<|endoftext|>").ids == [15496, 995, 50256]
