"""Fine-tune on a work pool for real: a Prefect server, a `gpu` process pool, a worker, the pipeline dispatching."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, tiny_overrides
from tests.servers import prefect_server, workers


def _run(env: dict[str, str], overrides: list[str]) -> dict:
    run = subprocess.run([sys.executable, "-m", "flows.cli", "run", "--until", "finetune", "--json",
                          *[arg for o in overrides for arg in ("--set", o)]],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_pipeline_runs_finetune_as_a_child_flow_on_the_gpu_pool_worker(tmp_path):
    import httpx

    with prefect_server(tmp_path) as env:
        subprocess.run([sys.executable, "-m", "deployments.deploy", "--pool", "gpu"], cwd=REPO, env=env, check=True,
                       capture_output=True, timeout=120)
        with workers(tmp_path, env, ["gpu"]) as logs:
            overrides = tiny_overrides(tmp_path / "artifacts", **{"train.work_pool": "gpu", "train.save_steps": 4})
            summary = _run(env, overrides)
            again = _run(env, overrides)
            worker_log = logs["gpu"].read_text()
        children = httpx.post(f"{env['PREFECT_API_URL']}/flow_runs/filter", json={"flow_runs": {
            "parent_flow_run_id": {"any_": [summary["flow_run_id"]]}}}, timeout=10).json()

    assert summary["steps"]["finetune"]["state"] == "Completed"
    model = Path(summary["steps"]["finetune"]["artifact"])
    assert (model / "model" / "model.safetensors").is_file() and (model / "training_log.jsonl").is_file()
    assert not list(model.parent.glob(".checkpoints-*"))  # published, so the checkpoints are gone
    tuned = [c for c in children if c["deployment_id"]]
    assert len(tuned) == 1, children
    assert tuned[0]["work_pool_name"] == "gpu" and tuned[0]["state"]["type"] == "COMPLETED"
    assert tuned[0]["id"] in worker_log  # the worker, not the pipeline, ran it
    # The second run's child reused the model on the pool; the pipeline says Cached rather than Completed.
    assert again["steps"]["finetune"] == {**summary["steps"]["finetune"], "state": "Cached",
                                          "seconds": again["steps"]["finetune"]["seconds"]}
