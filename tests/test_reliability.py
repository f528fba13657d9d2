"""Faults a nightly job meets: kill -9 mid-run, a dead Prefect API, two runs at once, a full disk, secrets."""

import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tasks.artifacts import MANIFEST, ArtifactError, ArtifactStore
from tests.conftest import REPO, tiny_overrides

STEPS = ["ingest", "clean", "validate", "template", "tokenize", "finetune", "evaluate"]


def _env(prefect_home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(prefect_home), PREFECT_SERVER_ANALYTICS_ENABLED="false", **extra)
    return env


def _run_args(root: Path, until: str = "evaluate", **extra: object) -> list[str]:
    args = [sys.executable, "-m", "flows.cli", "run", "--json", "--until", until]
    for override in tiny_overrides(root, **extra):
        args += ["--set", override]
    return args


def _complete_artifacts(root: Path) -> dict[str, int]:
    """Give back, per step, how many artifacts verify; raise if anything looks complete but is not."""
    store = ArtifactStore(root)
    counts: dict[str, int] = {}
    for manifest in root.glob(f"*/*/{MANIFEST}"):
        step, key = manifest.parent.parent.name, manifest.parent.name
        assert store.manifest(step, key) is not None, f"{manifest.parent} has a manifest but does not verify"
        counts[step] = counts.get(step, 0) + 1
    return counts


@pytest.fixture(scope="module")
def prefect_home(tmp_path_factory):
    return tmp_path_factory.mktemp("prefect-home-reliability")


@pytest.mark.parametrize("victim", ["validate", "finetune"])
def test_kill_9_during_a_step_then_rerun_completes_with_finished_steps_cached(tmp_path, prefect_home, victim):
    root = tmp_path / "artifacts"
    args = _run_args(root, until="finetune", **{"train.max_steps": 40})
    process = subprocess.Popen(args, cwd=REPO, env=_env(prefect_home), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 300
    started = False
    # validate runs silently for seconds (importing Great Expectations) right after clean is built
    marker = "step 8/40" if victim == "finetune" else f"built {STEPS[STEPS.index(victim) - 1]}"
    for line in process.stderr:
        if marker in line:
            started = True
            time.sleep(1.0)
            break
        if time.monotonic() > deadline:
            break
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert started, f"never saw {victim} start"
    before = _complete_artifacts(root)
    assert victim not in before  # killed mid-step: nothing of it looks complete

    rerun = subprocess.run(args, cwd=REPO, env=_env(prefect_home), capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    states = {s: i["state"] for s, i in json.loads(rerun.stdout.strip().splitlines()[-1])["steps"].items()}
    finished = STEPS[: STEPS.index(victim)]
    assert all(states[s] == "Cached" for s in finished if s in before), states
    assert states[victim] == "Completed"
    assert _complete_artifacts(root)[victim] == 1


def test_dead_prefect_api_is_one_clear_line_and_writes_nothing(tmp_path, prefect_home):
    root = tmp_path / "artifacts"
    result = subprocess.run(_run_args(root), cwd=REPO, capture_output=True, text=True, timeout=120,
                            env=_env(prefect_home, PREFECT_API_URL="http://127.0.0.1:9/api"))
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and "unreachable" in errors[0] and "127.0.0.1:9" in errors[0]
    assert not root.exists()


def test_two_runs_at_once_on_one_root_both_succeed_and_nothing_is_clobbered(tmp_path):
    root = tmp_path / "artifacts"
    runs = [subprocess.Popen(_run_args(root, until="tokenize"), cwd=REPO, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=_env(tmp_path / f"home{i}"))
            for i in range(2)]
    outputs = [run.communicate(timeout=600) for run in runs]
    assert [run.returncode for run in runs] == [0, 0], [err[-1500:] for _, err in outputs]
    summaries = [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]
    artifacts = [{s: i["artifact"] for s, i in summary["steps"].items()} for summary in summaries]
    assert artifacts[0] == artifacts[1]
    assert _complete_artifacts(root) == dict.fromkeys(STEPS[:5], 1)
    assert not [p for p in root.glob("*/.tmp-*")]


def test_disk_full_while_writing_leaves_nothing_that_looks_complete(tmp_path):
    root = tmp_path / "artifacts"
    script = (
        "import resource, signal\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (20000, 20000))\n"
        "from tasks.config import DataConfig\n"
        "from tasks.ingest import STEP, write_ingest\n"
        "config = DataConfig(builtin_examples=3000).model_dump(mode='json')\n"
        f"STEP.produce(config, {str(root)!r}, [], lambda out, _: write_ingest(DataConfig(**config), out))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "File too large" in result.stderr or "No space" in result.stderr
    assert _complete_artifacts(root) == {}
    assert not [p for p in root.glob("*/.tmp-*")]
    assert resource.getrlimit(resource.RLIMIT_FSIZE)[0] == resource.RLIM_INFINITY  # the limit stayed in the child


def test_artifact_names_cannot_leave_the_root(tmp_path):
    store = ArtifactStore(tmp_path)
    for step, key in [("..", "x"), ("ingest", "../../etc"), ("/abs", "k"), ("ingest", "")]:
        with pytest.raises(ArtifactError, match="would leave the artifact root"):
            store.path(step, key)


def test_a_planted_hub_token_never_reaches_artifacts_or_logs(tmp_path, prefect_home):
    token = "hf_plantedSecretToken0123456789"
    root = tmp_path / "artifacts"
    result = subprocess.run(_run_args(root), cwd=REPO, capture_output=True, text=True, timeout=600,
                            env=_env(prefect_home, HF_TOKEN=token, HUGGING_FACE_HUB_TOKEN=token))
    assert result.returncode == 0, result.stderr[-2000:]
    assert token not in result.stdout and token not in result.stderr
    for path in root.rglob("*"):
        if path.is_file():
            assert token.encode() not in path.read_bytes(), f"token leaked into {path}"
