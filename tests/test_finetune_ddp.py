"""Scale out from the pipeline: `train.nproc_per_node=2` trains under torchrun (DDP, gloo on CPU), reaches the loss
of one process at the same global batch, and a rank killed with -9 fails the step in one line; the rerun resumes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, tiny_overrides


def _itune_run(tmp_path, root, home, *extra, wait=True):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false", OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "commands.app", "run", "--until", "finetune"]
    for override in tiny_overrides(root, **dict(item.split("=", 1) for item in extra)):
        command += ["--set", override]
    if wait:
        return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def _finetune_manifest(root):
    return json.loads(next((root / "finetune").glob("[!.]*/manifest.json")).read_text())


@pytest.mark.slow
def test_itune_run_with_two_processes_records_world_size_and_matches_one_process(tmp_path):
    one = _itune_run(tmp_path, tmp_path / "one", tmp_path / "home", "train.batch_size=8", "train.max_steps=8")
    two = _itune_run(tmp_path, tmp_path / "two", tmp_path / "home", "train.batch_size=4", "train.max_steps=8",
                     "train.nproc_per_node=2")
    assert one.returncode == 0 and two.returncode == 0, (one.stderr + two.stderr)[-4000:]
    single, double = _finetune_manifest(tmp_path / "one"), _finetune_manifest(tmp_path / "two")
    assert single["world_size"] == 1 and double["world_size"] == 2 and double["steps"] == single["steps"] == 8
    assert double["final_loss"] == pytest.approx(single["final_loss"], rel=0.02)


def _rank_pid(rank: int) -> int | None:
    """Give back the pid of a live torchrun worker of the given rank started by toolkit.launcher."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"toolkit.launcher" in cmdline and f"RANK={rank}".encode() in environ and b"torch.distributed.run" \
                not in cmdline:
            return int(entry.name)
    return None


@pytest.mark.slow
def test_kill_9_of_one_rank_fails_the_step_in_one_line_and_the_rerun_resumes(tmp_path):
    import signal
    import time

    settings = ("train.batch_size=4", "train.max_steps=24", "train.save_steps=4", "train.nproc_per_node=2")
    running = _itune_run(tmp_path, tmp_path / "a", tmp_path / "home", *settings, wait=False)
    deadline = time.monotonic() + 300
    marks = tmp_path / "a" / "finetune"
    while time.monotonic() < deadline and running.poll() is None:
        if list(marks.glob(".checkpoints-*/checkpoint-*/itune-checkpoint.json")) and (pid := _rank_pid(1)):
            os.kill(pid, signal.SIGKILL)
            break
        time.sleep(0.2)
    stdout, stderr = running.communicate(timeout=300)
    assert running.returncode == 1, stderr[-3000:]
    errors = [line for line in stderr.splitlines() if line.startswith("itune:")]
    assert len(errors) == 1 and "rank 1 died (killed by SIGKILL)" in errors[0], stderr[-3000:]
    rerun = _itune_run(tmp_path, tmp_path / "a", tmp_path / "home", *settings)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    manifest = _finetune_manifest(tmp_path / "a")
    assert manifest["world_size"] == 2 and manifest["steps"] == 24 and manifest["resumed_from_step"] >= 4
