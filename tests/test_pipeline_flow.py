"""The whole flow on a real Prefect API (test harness): states, caching, reruns, failures."""

import json
import time
from pathlib import Path

import pytest

from catalog import layout
from catalog.config import STEPS, load_config
from commands.running import run_pipeline
from tests.conftest import tiny_overrides

pytestmark = pytest.mark.usefixtures("prefect_api")


def _states(summary):
    return {step: info["state"] for step, info in summary["steps"].items()}


def test_first_run_completes_second_is_all_cached_and_epochs_change_reruns_only_last_two(tmp_path):
    overrides = tiny_overrides(tmp_path / "artifacts")
    first = run_pipeline(load_config(overrides=overrides), "evaluate")
    assert "error" not in first, first.get("error")
    assert _states(first) == dict.fromkeys(STEPS, "Completed")
    assert first["metrics"]["tuned_val_loss"] < first["metrics"]["base_val_loss"]
    assert first["steps"]["ingest"]["rows"] == 300

    second = run_pipeline(load_config(overrides=overrides), "evaluate")
    assert _states(second) == dict.fromkeys(STEPS, "Cached")
    artifacts = {step: info["artifact"] for step, info in first["steps"].items()}
    assert {step: info["artifact"] for step, info in second["steps"].items()} == artifacts

    third = run_pipeline(load_config(overrides=[*overrides, "train.epochs=2"]), "evaluate")
    assert _states(third) == {**dict.fromkeys(STEPS[:5], "Cached"), "finetune": "Completed", "evaluate": "Completed"}


def test_deleted_or_corrupted_artifact_reruns_that_step_only(tmp_path):
    overrides = tiny_overrides(tmp_path / "artifacts")
    first = run_pipeline(load_config(overrides=overrides), "tokenize")
    assert list(first["steps"]) == list(STEPS[:5])
    tokenized = first["steps"]["tokenize"]["artifact"]
    with open(layout.data_parts(Path(tokenized))[0], "r+b") as handle:
        handle.truncate(100)
    second = run_pipeline(load_config(overrides=overrides), "tokenize")
    assert _states(second) == {**dict.fromkeys(STEPS[:4], "Cached"), "tokenize": "Completed"}
    assert second["steps"]["tokenize"]["artifact"] == tokenized  # same content key, rebuilt in place


def test_changed_source_data_reruns_everything_downstream(tmp_path):
    source = tmp_path / "data.jsonl"
    rows = [{"instruction": f"Echo {i}", "input": "", "output": str(i)} for i in range(40)]
    source.write_text("\n".join(json.dumps(r) for r in rows))
    overrides = tiny_overrides(tmp_path / "artifacts", **{"data.source": str(source)})
    run_pipeline(load_config(overrides=overrides), "tokenize")
    source.write_text("\n".join(json.dumps(r) for r in rows + [{"instruction": "Echo x", "output": "x"}]))
    again = run_pipeline(load_config(overrides=overrides), "tokenize")
    assert _states(again) == dict.fromkeys(STEPS[:5], "Completed")
    assert again["steps"]["ingest"]["rows"] == 41


def test_failure_names_the_step_and_the_cause(tmp_path):
    overrides = tiny_overrides(tmp_path / "artifacts", **{"data.source": str(tmp_path / "missing.jsonl")})
    summary = run_pipeline(load_config(overrides=overrides), "evaluate")
    assert summary["steps"]["ingest"]["state"] == "Failed"
    assert summary["error"].startswith("step 'ingest' failed")
    assert "missing.jsonl: no such file or folder" in summary["error"]
    assert "\n" not in summary["error"]


def test_dask_runner_runs_batches_as_task_runs_of_the_flow_and_shares_the_local_runs_cache(tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    overrides = tiny_overrides(tmp_path / "artifacts")
    # no address: prefect-dask starts a local cluster of 2 worker processes for the step, and stops it after
    on_dask = run_pipeline(load_config(overrides=[*overrides, "runner.kind=dask", "runner.workers=2"]), "clean")
    assert _states(on_dask) == dict.fromkeys(STEPS[:2], "Completed"), on_dask.get("error")
    of_the_run = FlowRunFilter(id=FlowRunFilterId(any_=[on_dask["flow_run_id"]]))
    deadline = time.monotonic() + 10  # task states reach the API as events, possibly just after the flow returns
    with get_client(sync_client=True) as client:
        while True:
            runs = client.read_task_runs(flow_run_filter=of_the_run)
            batches = [(run.name, run.state_name) for run in runs if run.name.startswith("clean batch")]
            if time.monotonic() > deadline or batches == [("clean batch 0", "Completed")]:
                break
            time.sleep(0.2)
    assert batches == [("clean batch 0", "Completed")]
    local = run_pipeline(load_config(overrides=overrides), "clean")
    assert _states(local) == dict.fromkeys(STEPS[:2], "Cached")
    assert local["steps"]["clean"]["artifact"] == on_dask["steps"]["clean"]["artifact"]
    elsewhere = run_pipeline(load_config(overrides=tiny_overrides(tmp_path / "local-only")), "clean")
    assert _states(elsewhere) == dict.fromkeys(STEPS[:2], "Completed")
    built = [json.loads((Path(run["steps"]["clean"]["artifact"]) / "manifest.json").read_text())["files"]
             for run in (on_dask, elsewhere)]
    assert built[0] == built[1]  # the sha256 of every file: the batches came back through Prefect unchanged
