"""Warm starts and "what changed tonight", on real runs: tiny GPT-2, a JSONL source that changes between nights.

Night one trains from scratch (the first champion). Night two sees 4 rows removed, 3 edited, 12 new and
one unreadable line, a lower learning rate, and warm-starts from the champion.
"""

import json

import pytest
from typer.testing import CliRunner

from catalog import layout
from catalog.config import load_config
from commands.app import app
from commands.running import run_pipeline
from tasks.finetune import STEP as FINETUNE
from tests.conftest import tiny_overrides
from toolkit import builtin_tasks
from toolkit.registry import Registry
from toolkit.warm_start import WarmStartError, finetune_config

pytestmark = pytest.mark.usefixtures("prefect_api")


def _rows(count: int) -> list[dict[str, str]]:
    """Give back `count` distinct Alpaca rows of the built-in tasks."""
    unique = dict.fromkeys((r["instruction"], r["input"], r["response"]) for r in builtin_tasks.generate(2 * count))
    return [{"instruction": i, "input": x, "output": y} for i, x, y in list(unique)[:count]]


def _write(path, rows, broken: tuple[str, ...] = ()) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows) + "".join(line + "\n" for line in broken),
                    encoding="utf-8")


def _config(root, source, **extra):
    return load_config(overrides=tiny_overrides(root, **{"data.source": source, "data.format": "alpaca", **extra}))


def _run(root, source, **extra):
    summary = run_pipeline(_config(root, source, **extra), "evaluate")
    assert "error" not in summary, summary.get("error")
    return summary


@pytest.fixture(scope="module")
def nights(tmp_path_factory):
    work = tmp_path_factory.mktemp("nightly")
    root, source = work / "artifacts", work / "tasks.jsonl"
    rows = _rows(240)
    _write(source, rows)
    first = _run(root, source)
    grown = rows[:50] + rows[54:]  # 4 removed
    for n in (10, 100, 200):  # 3 edited in place
        grown[n] = {**grown[n], "output": f"edited {n}"}
    new = [{"instruction": "Repeat the number.", "input": str(n), "output": str(n)} for n in range(1000, 1012)]
    grown = grown[:120] + new + grown[120:]  # 12 new, in the middle
    _write(source, grown, broken=('{"instruction": "cut off',))
    second = _run(root, source, **{"train.init_from": "champion", "train.learning_rate": 0.001})
    return root, source, first, second


def test_warm_start_trains_from_the_champion_and_records_it(nights):
    _, _, first, second = nights
    champion = first["steps"]["finetune"]["key"]
    manifest = layout.read_manifest(second["steps"]["finetune"]["artifact"])
    assert manifest["config"]["train"]["init_from"] == champion  # resolved before the key: in the key
    assert manifest["init_from"]["model_key"] == champion
    assert manifest["init_from"]["model_folder"].endswith(f"finetune/{champion}/model")
    assert "train.init_from" not in json.dumps(layout.read_manifest(first["steps"]["finetune"]["artifact"])["config"])


def test_a_new_champion_changes_the_warm_started_key(nights):
    root, source, first, second = nights
    cfg = _config(root, source, **{"train.init_from": "champion"})
    registry = Registry(root)
    tokenized = second["steps"]["tokenize"]["key"]
    keys = []
    for model in (first, second):
        registry.promote_manual(model["steps"]["finetune"]["key"], "test: pick the champion")
        keys.append(FINETUNE.plan(finetune_config(cfg), str(root), [("tokenize", tokenized)]).key)
    assert keys[0] != keys[1]
    cold = load_config(overrides=tiny_overrides(root, **{"data.source": source, "data.format": "alpaca"}))
    assert "init_from" not in finetune_config(cold)["train"]


def test_warm_start_from_another_template_is_refused_in_one_line(nights):
    root, source, _, _ = nights
    summary = run_pipeline(_config(root, source, **{"train.init_from": "champion", "template.name": "alpaca"}),
                           "finetune")
    assert "template 'paper'" in summary["error"] and "'alpaca'" in summary["error"]
    assert "\n" not in summary["error"]
    assert "finetune" not in summary["steps"]


def test_changes_json_reports_rows_quarantine_config_and_decision(nights):
    root, source, first, second = nights
    result = CliRunner().invoke(app, ["changes", "--root", str(root), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["run"]["flow_run_id"] == second["flow_run_id"]
    assert report["against"]["flow_run_id"] == first["flow_run_id"]
    assert list(report["rows"].values()) == [{"rows": 248, "added": 12, "removed": 4, "changed": 3}]
    assert report["quarantine"]["invalid_json"] == {"now": 1, "before": 0, "new": 1}
    assert report["figures"]["ingest.rows"] == {"before": 240, "now": 248, "delta": 8}
    differing = {step["step"]: step for step in report["steps"]}
    assert "ingest" in differing and differing["ingest"]["source"]
    finetune = differing["finetune"]["config"]
    assert any(line.startswith("train.learning_rate: 0.003 -> 0.001") for line in finetune)
    assert any(line.startswith("train.init_from: (none) -> " + first["steps"]["finetune"]["key"]) for line in finetune)
    assert {m["metric"] for m in report["metrics"]} >= {"tuned_val_loss", "tuned_exact_match"}
    assert report["decision"]["promoted"] == second["promotion"]["promoted"]
    text = CliRunner().invoke(app, ["changes", first["flow_run_id"][:8], "--root", str(root)])
    assert text.exit_code == 0 and "Nothing to compare against" in text.output


def test_every_run_publishes_the_changes_markdown_artifact(nights):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey, FlowRunFilter, FlowRunFilterId

    _, _, first, second = nights
    with get_client(sync_client=True) as client:
        published = {run["flow_run_id"]: client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["itune-changes"])),
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run["flow_run_id"]]))) for run in (first, second)}
    assert "Nothing to compare against" in published[first["flow_run_id"]][0].data
    night_two = published[second["flow_run_id"]][0].data
    assert "| 248 | 12 | 4 | 3 |" in night_two and "**Decision:" in night_two


def test_changes_report_names_code_that_differs(nights):
    """Code cannot change between two runs of one test session, so the earlier run's recorded code is edited."""
    from toolkit.changes import step_changes

    root, _, first, second = nights
    chain = {step: (None, layout.read_manifest(second["steps"][step]["artifact"])) for step in ("clean", "tokenize")}
    before = json.loads(json.dumps(chain, default=str))
    before["clean"][1]["key"] = "an-older-build"
    before["clean"][1]["code"]["modules"]["tasks/clean.py"] = "0" * 16
    before["clean"][1]["code"]["libraries"]["pyarrow"] = "1.0.0"
    found = step_changes(before, chain)
    assert [s["step"] for s in found] == ["clean"]
    assert "source module tasks/clean.py changed" in found[0]["code"]
    assert any(line.startswith("library pyarrow: 1.0.0 -> ") for line in found[0]["code"])


def test_changes_without_a_known_run_and_a_corrupt_warm_start_are_one_line(nights):
    root, source, first, _ = nights
    result = CliRunner().invoke(app, ["changes", "no-such-run", "--root", str(root)])
    assert result.exit_code == 1 and "no run 'no-such-run'" in result.output
    cfg = _config(root, source, **{"train.init_from": "nosuchkey"})
    with pytest.raises(WarmStartError, match="no evaluated model 'nosuchkey'"):
        finetune_config(cfg)
    model = first["steps"]["finetune"]["key"]
    weights = layout.model_dir(first["steps"]["finetune"]["artifact"]) / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-16])  # a truncated copy, as a disk-full crash leaves it
    with pytest.raises(WarmStartError, match=f"model {model} .* failed verification"):
        finetune_config(_config(root, source, **{"train.init_from": model}))
