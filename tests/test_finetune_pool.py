"""Fine-tune on a work pool for real: a Prefect server, a `gpu` process pool, a worker, the pipeline dispatching."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, tiny_overrides


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start(command: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    # Own session: the server and worker spawn children, and the whole group must go at cleanup.
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def _wait_healthy(url: str, server: subprocess.Popen, log: Path) -> None:
    import httpx

    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert server.poll() is None, log.read_text()[-3000:]
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    pytest.fail(f"prefect server did not start: {log.read_text()[-2000:]}")


@pytest.mark.slow
def test_pipeline_runs_finetune_as_a_child_flow_on_the_gpu_pool_worker(tmp_path):
    import httpx

    url = f"http://127.0.0.1:{_free_port()}/api"
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home"), "PREFECT_API_URL": url,
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_WORKER_QUERY_SECONDS": "1",
           "PREFECT_RESULTS_PERSIST_BY_DEFAULT": "false", "HF_HUB_OFFLINE": "1"}
    env.pop("PREFECT_PROFILE", None)
    prefect = str(Path(sys.executable).with_name("prefect"))
    server = _start([prefect, "server", "start", "--host", "127.0.0.1", "--port", url.split(":")[2].split("/")[0]],
                    env, tmp_path / "server.log")
    worker = None
    try:
        _wait_healthy(url, server, tmp_path / "server.log")
        subprocess.run([sys.executable, "-m", "deployments.deploy", "--pool", "gpu"], cwd=REPO, env=env, check=True,
                       capture_output=True, timeout=120)
        worker = _start([prefect, "worker", "start", "--pool", "gpu", "--type", "process"], env,
                        tmp_path / "worker.log")
        overrides = tiny_overrides(tmp_path / "artifacts", **{"train.work_pool": "gpu", "train.save_steps": 4})
        run = subprocess.run([sys.executable, "-m", "flows.cli", "run", "--until", "finetune", "--json",
                              *[arg for o in overrides for arg in ("--set", o)]],
                             cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:] + (tmp_path / "worker.log").read_text()
        summary = json.loads(run.stdout.strip().splitlines()[-1])
        assert summary["steps"]["finetune"]["state"] == "Completed"
        model = Path(summary["steps"]["finetune"]["artifact"])
        assert (model / "model" / "model.safetensors").is_file() and (model / "training_log.jsonl").is_file()
        assert not list(model.parent.glob(".checkpoints-*"))  # published, so the checkpoints are gone

        children = httpx.post(f"{url}/flow_runs/filter", json={"flow_runs": {
            "parent_flow_run_id": {"any_": [summary["flow_run_id"]]}}}, timeout=10).json()
        tuned = [c for c in children if c["deployment_id"]]
        assert len(tuned) == 1, children
        assert tuned[0]["work_pool_name"] == "gpu" and tuned[0]["state"]["type"] == "COMPLETED"
        assert tuned[0]["id"] in (tmp_path / "worker.log").read_text()  # the worker, not the pipeline, ran it
    finally:
        if worker is not None:
            _stop(worker)
        _stop(server)
