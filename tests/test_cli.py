"""`itune` as a user runs it: a real process, its own local Prefect API, exit codes and output."""

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO, tiny_overrides


@pytest.fixture(scope="module")
def prefect_home(tmp_path_factory):
    return tmp_path_factory.mktemp("prefect-home")


def _itune(args, prefect_home, cwd):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(prefect_home), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    return subprocess.run([sys.executable, "-m", "commands.app", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


def test_itune_run_json_prints_steps_and_metrics_last(tmp_path, prefect_home):
    args = ["run", "--json"]
    for override in tiny_overrides(tmp_path / "artifacts"):
        args += ["--set", override]
    result = _itune(args, prefect_home, REPO)
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert list(summary["steps"]) == ["ingest", "clean", "validate", "template", "tokenize", "finetune", "evaluate"]
    assert all(info["state"] == "Completed" for info in summary["steps"].values())
    assert summary["steps"]["finetune"]["artifact"].startswith(str(tmp_path / "artifacts"))
    assert "tuned_exact_match" in summary["metrics"] and summary["flow_run_id"]


def test_itune_failure_is_one_line_without_traceback(tmp_path, prefect_home):
    result = _itune(["run", "--set", f"data.source={tmp_path}/absent.jsonl", "--set",
                     f"artifacts.root={tmp_path}/a"], prefect_home, REPO)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout
    errors = [line for line in result.stderr.splitlines() if line.startswith("itune:")]
    assert len(errors) == 1 and "step 'ingest' failed" in errors[0] and "absent.jsonl" in errors[0]


def test_bad_config_key_exits_2_with_a_suggestion(tmp_path, prefect_home):
    result = _itune(["run", "--set", "train.epoch=2"], prefect_home, tmp_path)
    assert result.returncode == 2
    assert "did you mean 'train.epochs'" in result.stderr
