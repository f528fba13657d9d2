"""Work functions of ingest, clean, validate, template and tokenize, called without Prefect on real Parquet."""

import json

import pandas as pd
import pytest

from catalog.config import CleanConfig, DataConfig, TemplateConfig, TokenizeConfig, ValidateConfig
from data_checks.clean_suite import check_clean_data
from tasks.clean import normalize_text, write_clean
from tasks.ingest import IngestError, write_ingest
from tasks.template import apply_template
from tasks.tokenize import fit_example, write_tokenize
from tasks.validate import write_validate
from toolkit.split_groups import split_of
from toolkit.tokenizer import IGNORE_INDEX, gpt2_tokenizer


def test_gpt2_tokenizer_is_the_real_bpe_offline():
    tokenizer = gpt2_tokenizer()
    assert len(tokenizer) == 50257
    assert tokenizer("Hello world").input_ids == [15496, 995]
    assert tokenizer("<|endoftext|>").input_ids == [50256]
    assert tokenizer.decode([15496, 995]) == "Hello world"


def test_builtin_source_gives_distinct_checkable_tasks(tmp_path, ingest_frames):
    frame, quarantine = ingest_frames(DataConfig(builtin_examples=700))
    assert len(frame) == 700 and quarantine.empty
    assert frame["id"].is_unique
    assert frame["category"].nunique() >= 6
    ordered = frame[frame["category"] == "sort_numbers"].iloc[0]
    assert ordered["response"].split() == sorted(ordered["input"].strip("[]").split(","))


def test_ingest_writes_parquet_and_quarantines_bad_lines_with_file_and_row(tmp_path):
    source = tmp_path / "alpaca.jsonl"
    source.write_text(
        json.dumps({"instruction": "Say hi", "input": "", "output": "hi"}) + "\n"
        + "{not json\n"
        + json.dumps({"instruction": "Add", "input": "1 2", "output": None}) + "\n"
    )
    out = tmp_path / "out"
    out.mkdir()
    counts = write_ingest(DataConfig(source=str(source)), out)
    assert (counts["rows"], counts["quarantined"]) == (1, 2)
    quarantine = pd.read_parquet(out / "quarantine.parquet")
    assert list(quarantine["row"]) == ["2", "3"]
    assert "invalid JSON" in quarantine["reason"][0]
    assert quarantine["field"][1] == "output" and "null" in quarantine["reason"][1]
    assert set(quarantine["file"]) == {str(source)}


def test_ingest_reads_the_real_self_instruct_seed_tasks(shared_data, ingest_frames):
    path = shared_data / "self-instruct" / "seed_tasks.jsonl"
    frame, quarantine = ingest_frames(DataConfig(source=str(path)))
    tasks = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    instances = sum(len(t["instances"]) for t in tasks)
    assert len(tasks) == 175
    assert len(frame) + len(quarantine) == instances  # one row per instance, nothing silently dropped
    assert len(frame) >= 175
    assert (frame["instruction"].str.len() > 0).all()


def test_ingest_reads_real_prompt_completion_files(shared_data, ingest_frames):
    folder = shared_data / "self-instruct" / "t0_train_50k"
    first = sorted(folder.glob("*.jsonl"))[0]
    frame, _ = ingest_frames(DataConfig(source=str(first)))
    assert len(frame) > 0
    assert frame["category"].iloc[0] == first.name.split(".")[0]


def test_missing_source_is_a_one_line_error(tmp_path, ingest_frames):
    with pytest.raises(IngestError, match="no such file or folder"):
        ingest_frames(DataConfig(source=str(tmp_path / "missing.jsonl")))


def test_normalize_text_removes_invisible_control_and_html():
    assert normalize_text("ﬁne\u200b  text\x07<br>more &amp; less ") == "fine text more & less"


def test_clean_quarantines_every_dropped_row_with_a_reason(clean_frames):
    frame = pd.DataFrame({
        "id": ["1", "2", "3", "4"], "instruction": ["Do it", "  ", "Do it", "Other"],
        "input": ["", "", "", ""], "response": ["ok", "ok", "ok", " \u200b "],
        "source": ["s"] * 4, "category": ["c"] * 4, "messages": [""] * 4,
    })
    kept, dropped = clean_frames(frame, CleanConfig())
    assert list(kept["id"]) == ["1"]
    assert dict(zip(dropped["id"], dropped["reason"], strict=True)) == {
        "2": "empty_instruction", "3": "exact_duplicate", "4": "empty_response"}


def _pipeline_to(step, tmp_path, examples=200):
    """Run the data work functions up to `step` on real Parquet; give back the folder of each."""
    folders = {}
    previous = None
    for name in ("ingest", "clean", "validate", "template", "tokenize"):
        out = tmp_path / name
        out.mkdir()
        if name == "ingest":
            stats = write_ingest(DataConfig(builtin_examples=examples), out)
        elif name == "clean":
            stats = write_clean(CleanConfig(), previous, out)
        elif name == "validate":
            stats = write_validate(ValidateConfig(), previous, out)
        elif name == "template":
            pd.read_parquet(previous / "data.parquet").pipe(apply_template, TemplateConfig()).to_parquet(
                out / "data.parquet")
            stats = {}
        else:
            stats = write_tokenize(TokenizeConfig(max_length=64), previous, out)
        (out / "manifest.json").write_text(json.dumps(stats, default=str))
        folders[name] = out
        previous = out
        if name == step:
            return folders, stats
    return folders, stats


def test_validate_runs_the_great_expectations_suite_and_keeps_data_docs(tmp_path):
    folders, stats = _pipeline_to("validate", tmp_path)
    assert stats["passed"] and stats["checks"] > 10
    assert (folders["validate"] / "data_docs" / "index.html").is_file()
    report = json.loads((folders["validate"] / "report.json").read_text())
    expectations = {r["expectation"] for r in report}
    assert expectations >= {"expect_column_values_to_be_unique", "expect_column_values_to_not_be_null"}


def test_validate_blocks_on_duplicate_ids_and_names_the_expectation(tmp_path):
    clean = tmp_path / "clean"
    clean.mkdir()
    frame = pd.DataFrame({"id": ["a", "a"] + [str(i) for i in range(20)], "instruction": ["x"] * 22,
                          "input": [""] * 22, "response": ["y"] * 22, "source": ["s"] * 22, "category": ["c"] * 22})
    frame.to_parquet(clean / "data.parquet")
    (clean / "manifest.json").write_text(json.dumps({"quarantine_ratio": 0.0}))
    out = tmp_path / "validate"
    out.mkdir()
    stats = write_validate(ValidateConfig(), clean, out)
    assert not stats["passed"]
    assert "expect_column_values_to_be_unique on 'id'" in stats["failure"]
    warned = tmp_path / "warned"
    warned.mkdir()
    assert write_validate(ValidateConfig(warn_only=["expect_column_values_to_be_unique"]), clean, warned)["passed"]


def test_validate_checks_batch_by_batch_with_the_verdict_of_the_whole_table(tmp_path):
    clean = tmp_path / "clean"
    clean.mkdir()
    rows = 50
    instructions = ["x"] * rows
    instructions[3] = instructions[41] = "z" * 5000  # too long, in the first and the last of five batches
    ids = [str(i) for i in range(rows)]
    ids[45] = "7"  # a duplicate id across batches: no single batch sees it
    pd.DataFrame({"id": ids, "instruction": instructions, "input": [""] * rows, "response": ["y"] * rows,
                  "source": ["s"] * rows, "category": ["c"] * rows}).to_parquet(clean / "data.parquet")
    report, checked = check_clean_data(clean, {}, ValidateConfig(), tmp_path / "docs", rows_per_batch=10)
    assert checked == rows
    failed = {(o.expectation, o.column): o.observed for o in report.blocking_failures}
    assert failed == {("expect_column_value_lengths_to_be_between", "instruction"): 2,
                      ("expect_column_values_to_be_unique", "id"): 2}
    assert len({(o.suite, o.expectation, o.column) for o in report.outcomes}) == len(report.outcomes)


def test_split_is_stable_when_rows_are_added():
    ids = [f"id{i}" for i in range(2000)]
    before = {i: split_of(i, 0.1, 0.1) for i in ids[:1000]}
    after = {i: split_of(i, 0.1, 0.1) for i in ids}
    assert all(after[i] == s for i, s in before.items())
    shares = pd.Series(after).value_counts(normalize=True)
    assert 0.07 < shares["val"] < 0.13 and 0.07 < shares["test"] < 0.13


def test_template_renders_paper_form_with_bos_sep_eos():
    frame = pd.DataFrame({"id": ["1"], "instruction": ["Add the two numbers."], "input": ["2 3"], "response": ["5"],
                          "category": ["add_numbers"]})
    row = apply_template(frame, TemplateConfig()).iloc[0]
    assert row["prompt"] == "<|endoftext|>Instruction: Add the two numbers.\nInput: 2 3\nResponse:"
    assert row["completion"] == " 5<|endoftext|>"


def test_tokenize_masks_the_prompt_and_keeps_every_response(tmp_path):
    folders, stats = _pipeline_to("tokenize", tmp_path)
    table = pd.read_parquet(folders["tokenize"] / "data.parquet")
    templated = pd.read_parquet(folders["template"] / "data.parquet")
    assert stats["rows"] == len(templated) and stats["zero_target_rows"] == 0
    tokenizer = gpt2_tokenizer()
    row, source = table.iloc[0], templated.iloc[0]
    prompt_ids = tokenizer(source["prompt"]).input_ids
    assert list(row["input_ids"][: len(prompt_ids)]) == prompt_ids
    assert all(x == IGNORE_INDEX for x in row["labels"][: len(prompt_ids)])
    target = [x for x in row["labels"] if x != IGNORE_INDEX]
    assert tokenizer.decode(target) == source["completion"]
    assert target[-1] == tokenizer.eos_token_id


def test_truncation_keeps_the_response_and_the_prompt_ends():
    prompt, completion = list(range(100)), [7, 8, 9]
    ids, labels, truncated = fit_example(prompt, completion, 20)
    assert truncated and len(ids) == 20
    assert ids[-3:] == completion and labels[-3:] == completion
    assert ids[0] == 0 and ids[16] == 99  # BOS side and the SEP side of the prompt both survive
