"""Operating itune against a real Prefect API: deploy, fail a step, list runs, rerun only what failed, lineage."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from catalog.config import STEPS, load_config
from catalog.step import FAULT_ENV
from commands.app import app
from commands.running import run_pipeline
from deployments.deploy import NIGHTLY, ON_DEMAND, deploy_all
from tests.conftest import tiny_overrides

pytestmark = pytest.mark.usefixtures("prefect_api")


def _cli(*args: str) -> tuple[int, str]:
    """Run an `itune` command in this process (so on the test's Prefect API); give back (exit code, stdout)."""
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.stdout + (result.stderr if result.exit_code else "")


def _last_json(output: str):
    return json.loads(output.strip().splitlines()[-1])


def test_deploy_lays_out_pools_schedule_and_concurrency_and_is_idempotent(tmp_path):
    from prefect.client.orchestration import get_client

    cfg = load_config(overrides=[f"artifacts.root={tmp_path}/a", "deploy.nightly_time=03:30",
                                 "deploy.timezone=Europe/Berlin"])
    first = deploy_all(cfg)
    second = deploy_all(cfg)
    assert second["deployments"] == first["deployments"] and second["pools_created"] == []
    assert set(first["pools_created"]) <= {"cpu", "gpu"}

    with get_client(sync_client=True) as client:
        nightly = client.read_deployment_by_name(NIGHTLY)
        on_demand = client.read_deployment_by_name(ON_DEMAND)
        finetune = client.read_deployment_by_name("itune-finetune/finetune-gpu")
        pools = {pool.name: pool.type for pool in client.read_work_pools()}
    assert pools["cpu"] == "process" and pools["gpu"] == "process"
    assert [(s.schedule.cron, s.schedule.timezone) for s in nightly.schedules] == [("30 3 * * *", "Europe/Berlin")]
    assert on_demand.schedules == [] and nightly.work_pool_name == on_demand.work_pool_name == "cpu"
    assert finetune.work_pool_name == "gpu" and finetune.global_concurrency_limit.limit == 1
    deployed = nightly.parameters["config"]
    assert deployed["train"]["work_pool"] == "gpu" and deployed["artifacts"]["root"] == str(tmp_path / "a")


def test_trigger_refuses_a_bad_key_before_anything_runs(tmp_path):
    deploy_all(load_config(overrides=[f"artifacts.root={tmp_path}/a"]))
    code, output = _cli("trigger", "--set", "train.epoch=2")
    assert code == 2 and "did you mean 'train.epochs'" in output
    code, output = _cli("trigger", "itune-pipeline/absent")
    assert code == 2 and "no deployment 'itune-pipeline/absent'" in output


def test_a_failed_step_is_rerun_alone_with_everything_before_it_cached(tmp_path, monkeypatch):
    cfg = load_config(overrides=tiny_overrides(tmp_path / "artifacts"))
    monkeypatch.setenv(FAULT_ENV, "template")
    failed = run_pipeline(cfg, "evaluate")
    monkeypatch.delenv(FAULT_ENV)
    assert "step 'template' failed" in failed["error"] and "InjectedFault" in failed["error"]
    assert {step: info["state"] for step, info in failed["steps"].items()} == {
        "ingest": "Completed", "clean": "Completed", "validate": "Completed", "template": "Failed"}
    assert not list((tmp_path / "artifacts").glob("template/[!.]*"))  # nothing that looks like a template artifact

    code, output = _cli("rerun", failed["flow_run_id"][:8], "--json")
    assert code == 0, output[-3000:]
    rerun = _last_json(output)
    assert {step: info["state"] for step, info in rerun["steps"].items()} == {
        "ingest": "Cached", "clean": "Cached", "validate": "Cached", "template": "Completed",
        "tokenize": "Completed", "finetune": "Completed", "evaluate": "Completed"}

    code, output = _cli("runs", "--json")
    assert code == 0, output[-3000:]
    runs = {run["id"]: run for run in _last_json(output)}
    assert runs[failed["flow_run_id"]]["state"] == "Failed"
    assert runs[failed["flow_run_id"]]["steps"]["template"] == "Failed"
    latest = runs[rerun["flow_run_id"]]
    assert latest["state"] == "Completed" and tuple(latest["steps"]) == tuple(STEPS)
    assert "tuned_exact_match" in latest["metrics"]

    code, output = _cli("lineage", "champion", "--root", str(tmp_path / "artifacts"), "--json")
    assert code == 0, output[-3000:]
    chain = _last_json(output)
    assert [link["step"] for link in chain] == ["finetune", "tokenize", "template", "validate", "clean", "ingest"]
    assert all(link["verified"] and link["code_version"] and link["config"] for link in chain)
    assert chain[-1]["sources"][0]["source"] == "builtin:tasks"
    code, output = _cli("lineage", "tokenize/" + chain[1]["key"][:6], "--root", str(tmp_path / "artifacts"))
    assert code == 0 and "ingest" in output and "builtin:tasks" in output


def test_rerun_of_an_unknown_run_is_one_line(tmp_path):
    code, output = _cli("rerun", "00000000-0000-0000-0000-000000000000")
    assert code == 2 and "no flow run 00000000-0000-0000-0000-000000000000" in output
