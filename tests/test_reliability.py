"""Faults a nightly job meets: kill -9 in any step, a dead Prefect API, two runs at once, a full disk, secrets.

Run as a program (`python -m tests.test_reliability run ...`) this module is `itune` with one addition
for the kill test: it stops itself (SIGSTOP) at a chosen point of a chosen step, so that the test's
SIGKILL lands inside that step however fast the step is.
"""

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from benchmarks.bench_faults import (
    ITUNE,
    artifact_problems,
    cli_env,
    intact,
    marked_checkpoints,
    micro_gpt2,
    run_args,
    states,
    summary,
)
from catalog.config import STEPS
from catalog.store import MANIFEST, ArtifactError, ArtifactStore
from tests.conftest import REPO, tiny_overrides
from toolkit.checkpoints import CHECKPOINT_MARK

FREEZE_AT = "ITUNE_TEST_FREEZE_AT"  # read only by this module's __main__, never by itune itself
FREEZE_MARKER = "ITUNE_TEST_FREEZE_MARKER"
SAVE_STEPS = 2


def _settings(root: Path, **extra: object) -> dict[str, str]:
    return dict(override.split("=", 1) for override in tiny_overrides(root, **extra))


@pytest.fixture(scope="module")
def api_url(prefect_api) -> str:
    """The test session's Prefect API, shared by every `itune` subprocess here (none starts its own)."""
    from prefect.settings import PREFECT_API_URL

    return PREFECT_API_URL.value()


@pytest.fixture(scope="module")
def prefect_home(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("prefect-home-reliability")


@pytest.fixture(scope="module")
def micro_model(tmp_path_factory) -> str:
    return micro_gpt2(tmp_path_factory.mktemp("models") / "micro-gpt2")


def _freeze_at(step: str, marker: Path) -> None:
    """Stop this process when `step` is about to make its work count, after writing `marker`.

    A data step stops as it opens its manifest: every data file is in its temp folder, nothing is
    published. Fine-tune stops as it marks its second checkpoint complete: the first checkpoint is
    resumable, the second has all its files but no mark yet.
    """
    if step == "finetune":
        wanted = (f"{os.sep}finetune{os.sep}.checkpoints-",
                  f"{os.sep}checkpoint-{2 * SAVE_STEPS}{os.sep}.{CHECKPOINT_MARK}.")
    else:
        wanted = (f"{os.sep}{step}{os.sep}.tmp-", f"{os.sep}.{MANIFEST}.")
    frozen = False

    def hook(event: str, args: tuple) -> None:
        nonlocal frozen
        if frozen or event != "open" or not isinstance(args[0], str | os.PathLike):
            return
        path = os.fspath(args[0])
        if isinstance(path, str) and all(part in path for part in wanted):
            frozen = True  # before writing the marker: that write is an "open" event too
            marker.write_text(path)
            os.kill(os.getpid(), signal.SIGSTOP)

    sys.addaudithook(hook)


@pytest.fixture(scope="module")
def shared_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("kill-9") / "artifacts"


@pytest.mark.parametrize("victim", STEPS)
def test_kill_9_in_any_step_then_rerun_completes_with_finished_steps_cached(tmp_path, api_url, prefect_home,
                                                                           micro_model, shared_root, victim):
    # One root for all seven cases keeps them within minutes: each starts by removing its victim's step, the
    # ones after it and the one before it, so the killed run itself builds at least one step that the rerun
    # must find Cached, whatever order the cases run in.
    root = shared_root
    index = STEPS.index(victim)
    for step in STEPS[max(index - 1, 0):]:
        shutil.rmtree(root / step, ignore_errors=True)
    args = run_args(victim, _settings(root, **{"model.name": micro_model, "train.save_steps": SAVE_STEPS,
                                               "train.logging_steps": SAVE_STEPS, "eval.max_examples": 4}))
    env = cli_env(api_url, prefect_home)
    marker = tmp_path / "frozen-at"
    with open(tmp_path / "killed.log", "w") as log:
        killed = subprocess.Popen([sys.executable, "-m", "tests.test_reliability", *args], cwd=REPO, stdout=log,
                                  stderr=subprocess.STDOUT, start_new_session=True,
                                  env={**env, FREEZE_AT: victim, FREEZE_MARKER: str(marker)})
        deadline = time.monotonic() + 300
        while not marker.exists() and killed.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        os.killpg(killed.pid, signal.SIGKILL)
        killed.wait()
    assert marker.exists(), f"never caught {victim} at work:\n{(tmp_path / 'killed.log').read_text()[-3000:]}"
    finished = list(STEPS[:index])
    assert artifact_problems(root) == []  # no key folder of any step is half there
    assert intact(root) == dict.fromkeys(finished, 1)  # the victim left nothing that passes for its artifact
    assert list((root / victim).glob(".tmp-*")), "the killed writer's temp folder should still be there"
    if victim == "finetune":
        assert marked_checkpoints(root) == [SAVE_STEPS]

    rerun = subprocess.run([*ITUNE, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert states(rerun.stdout) == {**dict.fromkeys(finished, "Cached"), victim: "Completed"}
    assert artifact_problems(root) == []
    assert not list((root / victim).glob(".tmp-*")), "the rerun should have removed the dead writer's temp folder"
    assert intact(root) == dict.fromkeys([*finished, victim], 1)
    published = Path(summary(rerun.stdout)["steps"][victim]["artifact"])
    assert published.parent == root / victim and not published.name.startswith(".")
    if victim == "finetune":
        manifest = json.loads((published / MANIFEST).read_text())
        # The unmarked second checkpoint had every file yet is never trusted: resume from the first.
        assert manifest["resumed_from_step"] == SAVE_STEPS
        assert not list(root.glob("finetune/.checkpoints-*"))


def test_dead_prefect_api_is_one_clear_line_and_writes_nothing(tmp_path, prefect_home):
    root = tmp_path / "artifacts"
    result = subprocess.run([*ITUNE, *run_args("evaluate", _settings(root))], cwd=REPO, capture_output=True,
                            text=True, timeout=120, env=cli_env("http://127.0.0.1:9/api", prefect_home))
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and "unreachable" in errors[0] and "127.0.0.1:9" in errors[0]
    assert not root.exists()


def test_two_runs_at_once_on_one_root_both_succeed_and_nothing_is_clobbered(tmp_path, api_url):
    root = tmp_path / "artifacts"
    args = [*ITUNE, *run_args("tokenize", _settings(root))]
    # Separate Prefect homes: neither run can answer from the other's cache records, both build.
    runs = [subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env=cli_env(api_url, tmp_path / f"home{i}")) for i in range(2)]
    outputs = [run.communicate(timeout=600) for run in runs]
    assert [run.returncode for run in runs] == [0, 0], [err[-1500:] for _, err in outputs]
    artifacts = [{s: i["artifact"] for s, i in summary(out)["steps"].items()} for out, _ in outputs]
    assert artifacts[0] == artifacts[1]
    assert intact(root) == dict.fromkeys(STEPS[:5], 1) and artifact_problems(root) == []
    assert not [p for p in root.glob("*/.tmp-*")]


def test_disk_full_while_writing_leaves_nothing_that_looks_complete(tmp_path):
    root = tmp_path / "artifacts"
    script = (
        "import resource, signal\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (20000, 20000))\n"
        "from catalog.config import DataConfig\n"
        "from tasks.ingest import STEP, write_ingest\n"
        "config = DataConfig(builtin_examples=3000).model_dump(mode='json')\n"
        f"STEP.produce(config, {str(root)!r}, [], lambda out, _: write_ingest(DataConfig(**config), out))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "File too large" in result.stderr or "No space" in result.stderr
    assert intact(root) == {} and artifact_problems(root) == []
    assert not [p for p in root.glob("*/.tmp-*")]
    assert resource.getrlimit(resource.RLIMIT_FSIZE)[0] == resource.RLIM_INFINITY  # the limit stayed in the child


def test_artifact_names_cannot_leave_the_root(tmp_path):
    store = ArtifactStore(tmp_path)
    for step, key in [("..", "x"), ("ingest", "../../etc"), ("/abs", "k"), ("ingest", "")]:
        with pytest.raises(ArtifactError, match="would leave the artifact root"):
            store.path(step, key)


def _prefect_records(flow_run_id: str) -> tuple[list[str], list[str]]:
    """Give back (log messages, UI artifact contents) the Prefect API keeps for a flow run."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, LogFilter, LogFilterFlowRunId

    logs: list = []
    with get_client(sync_client=True) as client:
        while page := client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])),
                                       offset=len(logs)):
            logs += page
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
    return [log.message for log in logs], [json.dumps(a.data, default=str) + (a.description or "") for a in artifacts]


def test_a_hub_token_from_env_or_a_secret_block_never_reaches_artifacts_or_logs(tmp_path, api_url, prefect_home,
                                                                               micro_model):
    from prefect.blocks.system import Secret

    env_token, block_token = "hf_plantedEnvToken0123456789", "hf_plantedBlockToken9876543210"
    block = f"itune-hub-token-{uuid.uuid4().hex[:8]}"
    root = tmp_path / "artifacts"
    # model.name is a save_pretrained folder: loaded through from_pretrained with the token, no network needed.
    args = [*ITUNE, *run_args("evaluate", _settings(root, **{"model.name": micro_model,
                                                             "model.hub_token_secret": block}))]
    env = cli_env(api_url, prefect_home, HF_TOKEN=env_token, HUGGING_FACE_HUB_TOKEN=env_token)

    # Before the block exists, the run stops at fine-tune naming the block: proof the token is read from it.
    missing = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert missing.returncode == 1, ("the run never read model.hub_token_secret: tasks/finetune.py and "
                                     "tasks/evaluate.py must pass it to load_base_model(hub_token_secret=...)")
    assert f"Secret block '{block}'" in missing.stderr and "no such block" in missing.stderr, missing.stderr[-2000:]

    Secret(value=block_token).save(block)
    result = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert states(result.stdout)["finetune"] == "Completed"
    logs, ui_artifacts = _prefect_records(summary(result.stdout)["flow_run_id"])
    assert any("built finetune" in message for message in logs)  # the logs were captured: the check below bites
    places = {"stdout": result.stdout, "stderr": result.stderr, "Prefect logs": "\n".join(logs),
              "Prefect artifacts": "\n".join(ui_artifacts)}
    places |= {str(p): p.read_bytes().decode("latin-1") for folder in (root, prefect_home) for p in folder.rglob("*")
               if p.is_file() and not p.name.endswith(".db")}
    for token in (env_token, block_token):
        leaks = [where for where, text in places.items() if token in text]
        assert not leaks, f"token leaked into {leaks}"
    manifest = json.loads(next(root.glob(f"finetune/[!.]*/{MANIFEST}")).read_text())
    assert manifest["config"]["model"]["hub_token_secret"] == block  # the block's name is recorded, its value nowhere


if __name__ == "__main__":
    _freeze_at(os.environ[FREEZE_AT], Path(os.environ[FREEZE_MARKER]))
    from commands.app import app

    app(prog_name="itune")
