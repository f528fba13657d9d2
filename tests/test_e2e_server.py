"""The nightly set-up as an operator builds it: Prefect on PostgreSQL, `itune deploy`, a worker per pool,
`itune trigger --watch`, then the run checked through the API and in the Prefect UI in a real browser."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from catalog.caching import asset_key
from catalog.config import STEPS
from tests.conftest import REPO, tiny_overrides
from tests.servers import PREFECT, chromium, postgres, prefect_server, workers

# Screenshots are kept for people to look at after the run (CI keeps the folder).
SCREENSHOTS = Path(os.environ.get("ITUNE_TEST_ARTIFACTS", REPO / "test-artifacts"))


def _itune(env: dict[str, str], *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "commands.app", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


def _post(env: dict[str, str], path: str, body: dict) -> list | dict:
    import httpx

    response = httpx.post(f"{env['PREFECT_API_URL']}{path}", json=body, timeout=20)
    response.raise_for_status()
    return response.json()


def _materialized(env: dict[str, str], prefix: str, expected: int) -> set[str]:
    wanted = {"filter": {"event": {"name": ["prefect.asset.materialization.succeeded"]},
                         "resource": {"id_prefix": [prefix]}}, "limit": 50}
    found: set[str] = set()
    deadline = time.monotonic() + 60  # the server writes events in batches
    while len(found) < expected and time.monotonic() < deadline:
        found = {event["resource"]["prefect.resource.id"] for event in _post(env, "/events/filter", wanted)["events"]}
        time.sleep(1)
    return found


def _steps_in_the_ui(url: str, screenshot: Path) -> str:
    from selenium.webdriver.common.by import By

    browser = chromium()
    try:
        browser.get(url)
        text = ""
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            tabs = [tab for tab in browser.find_elements(By.XPATH, "//*[normalize-space(.)='Task Runs']")
                    if tab.is_displayed()]
            if tabs:
                tabs[-1].click()  # the innermost element that holds the tab's label
                time.sleep(1)
                text = browser.find_element(By.TAG_NAME, "body").text
                if all(f"{step}-" in text for step in STEPS):
                    break
            time.sleep(1)
        screenshot.parent.mkdir(parents=True, exist_ok=True)
        browser.save_screenshot(str(screenshot))
        return text
    finally:
        browser.quit()


@pytest.mark.slow
def test_deploy_trigger_watch_on_postgres_with_cpu_and_gpu_workers_and_the_ui(tmp_path):
    root = tmp_path / "artifacts"
    with postgres() as database_url, prefect_server(tmp_path, database_url) as env:
        deployed = _itune(env, "deploy", "--set", f"artifacts.root={root}", timeout=180)
        assert deployed.returncode == 0, deployed.stderr[-3000:]
        assert "itune-pipeline/nightly" in deployed.stdout and "0 2 * * * (UTC)" in deployed.stdout

        with workers(tmp_path, env, ["cpu", "gpu"]) as logs:
            overrides = [arg for o in tiny_overrides(root) for arg in ("--set", o)]
            run = _itune(env, "trigger", "itune-pipeline/on-demand", *overrides, "--watch", "--json")
            assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:] + logs["cpu"].read_text()[-3000:]
            outcome = json.loads(run.stdout.strip().splitlines()[-1])
            assert outcome["state"] == "Completed"
            assert outcome["steps"] == {step: "Completed" for step in STEPS}

            # Prefect's own command runs the same deployment; with the same overrides every step is reused,
            # fine-tune included (its child run on the gpu pool finds the model and the pipeline says Cached).
            plain = subprocess.run([PREFECT, "deployment", "run", "itune-pipeline/on-demand", "--param",
                                    f"overrides={json.dumps(tiny_overrides(root))}", "--watch"],
                                   cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
            assert plain.returncode == 0, plain.stdout[-2000:] + plain.stderr[-2000:]
            gpu_log = logs["gpu"].read_text()

        finished = _post(env, "/flow_runs/filter", {"flows": {"name": {"any_": ["itune-pipeline"]}}, "flow_runs": {
            "state": {"type": {"any_": ["COMPLETED", "FAILED", "CRASHED"]}}}})
        again = next(run for run in finished if run["id"] != outcome["flow_run_id"])
        assert len(finished) == 2 and again["state"]["type"] == "COMPLETED"
        reused = _post(env, "/task_runs/filter", {"flow_runs": {"id": {"any_": [again["id"]]}}})
        assert {run["name"].rsplit("-", 1)[0]: run["state"]["name"] for run in reused
                if run["name"].rsplit("-", 1)[0] in STEPS} == {step: "Cached" for step in STEPS}

        children = _post(env, "/flow_runs/filter", {"flow_runs": {
            "parent_flow_run_id": {"any_": [outcome["flow_run_id"]]}}})
        tuned = [child for child in children if child["deployment_id"]]
        assert [child["work_pool_name"] for child in tuned] == ["gpu"] and tuned[0]["id"] in gpu_log
        model = next(root.glob("finetune/[!.]*"))  # written by the gpu worker where the pipeline reads it
        assert (model / "model" / "model.safetensors").is_file() and (model / "manifest.json").is_file()
        assert not list(root.glob("finetune/.checkpoints-*"))  # published, so the checkpoints are gone

        assets = _materialized(env, asset_key(str(root)), expected=len(STEPS))
        assert {uri.split("/")[-2] for uri in assets} == set(STEPS), assets

        ui = env["PREFECT_API_URL"].removesuffix("/api")
        text = _steps_in_the_ui(f"{ui}/runs/flow-run/{outcome['flow_run_id']}", SCREENSHOTS / "flow-run.png")
        assert all(f"{step}-" in text for step in STEPS), text[-2000:]
        assert (SCREENSHOTS / "flow-run.png").stat().st_size > 10_000
