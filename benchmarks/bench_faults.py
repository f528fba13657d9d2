"""Fine-tune killed with SIGKILL at random moments, then rerun: how many trials end with the uninterrupted model?

    python benchmarks/bench_faults.py --trials 20 --write   # replaces the "## Reliability" section of RESULTS.md

One artifact root with ingest..tokenize built is prepared once, and one uninterrupted fine-tune of it
gives the reference model and how long training takes (from Trainer starting its first checkpoint to
the published model). Each trial copies the prepared root, starts `itune run --json --until finetune`
in its own process group, waits until training has begun, sleeps a random fraction of the reference's
training time, sends SIGKILL to the group, checks that nothing under the root looks complete without
verifying, runs the same command again, and compares the model it publishes with the reference (final
training loss within the tolerance of tests/test_finetune_resume.py, same weights). The kill window
leaves out fine-tune's start-up (imports, model loading), which writes nothing but its temp folder:
there every kill would retrain from step 0. tests/test_faults.py runs the same trials, fewer of them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks._results import write_results  # noqa: E402
from catalog.config import STEPS  # noqa: E402
from catalog.store import MANIFEST, ArtifactStore  # noqa: E402
from toolkit.checkpoints import CHECKPOINT_MARK  # noqa: E402

COMMAND = "python benchmarks/bench_faults.py --trials 20 --write"
ITUNE = [sys.executable, "-m", "commands.app"]
# A checkpoint every 2 of 16 steps, so most kills land between checkpoints; save_steps is a multiple of
# logging_steps so that a resumed run logs its loss over the same windows as an uninterrupted one.
SETTINGS: dict[str, Any] = {
    "data.builtin_examples": 300,
    "template.val_fraction": 0.1,
    "template.test_fraction": 0.1,
    "train.max_steps": 16,
    "train.batch_size": 8,
    "train.save_steps": 2,
    "train.logging_steps": 2,
}
LOSS_REL_TOLERANCE = 1e-3  # tests/test_finetune_resume.py: final_loss == approx(reference, rel=1e-3)
WEIGHT_TOLERANCE = 1e-4  # the same test's largest allowed weight difference


def micro_gpt2(folder: Path) -> str:
    """Give back a save_pretrained folder of a one-layer, 32-wide GPT-2 with the real 50,257-token vocabulary.

    Loaded the way a Hub model is (a folder, `from_pretrained`), and a fine-tune step of it costs a
    fraction of scratch:tiny's, which keeps many kill-and-rerun trials within minutes on 2 cores.
    """
    from transformers import GPT2Config, GPT2LMHeadModel

    if not (folder / "config.json").is_file():
        config = GPT2Config(vocab_size=50257, n_positions=256, n_embd=32, n_layer=1, n_head=2,
                            bos_token_id=50256, eos_token_id=50256, pad_token_id=50256)
        GPT2LMHeadModel(config).save_pretrained(folder)
    return str(folder)


def snapshot_code(target: Path) -> Path:
    """Copy the pipeline's code to `target` and give it back: runs started there keep their step keys
    even if someone edits the checkout while a long benchmark runs (a step's key hashes its source)."""
    for package in ("flows", "tasks", "data_checks", "deployments", "configs"):
        if (REPO / package).is_dir():
            shutil.copytree(REPO / package, target / package, ignore=shutil.ignore_patterns("__pycache__"))
    return target


def cli_env(api_url: str, prefect_home: Path, **extra: str) -> dict[str, str]:
    """Give back the environment of an `itune` subprocess that talks to an already running Prefect API."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_API_URL=api_url, PREFECT_HOME=str(prefect_home), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               GX_ANALYTICS_ENABLED="false", HF_HUB_OFFLINE="1", **extra)
    return env


def run_args(until: str, settings: dict[str, Any]) -> list[str]:
    """Give back the arguments after the program name of `itune run --json --until UNTIL --set KEY=VALUE ...`."""
    args = ["run", "--json", "--until", until]
    for key, value in settings.items():
        args += ["--set", f"{key}={value}"]
    return args


def summary(stdout: str) -> dict[str, Any]:
    """Give back the JSON object `itune run --json` prints last."""
    return json.loads(stdout.strip().splitlines()[-1])


def states(stdout: str) -> dict[str, str]:
    return {step: info["state"] for step, info in summary(stdout)["steps"].items()}


def artifact_problems(root: Path) -> list[str]:
    """Name every folder in an artifact's place (<root>/<step>/<key>) that does not verify.

    Temp folders (`.tmp-*`) and checkpoints (`.checkpoints-*`) are never looked up as artifacts, so a
    killed writer may leave them; a key folder that fails verification would be a half-written artifact.
    """
    store = ArtifactStore(root)
    return [str(folder) for step in STEPS for folder in sorted((root / step).glob("[!.]*"))
            if store.manifest(step, folder.name) is None]


def intact(root: Path) -> dict[str, int]:
    """Give back how many verified artifacts each step has under `root`."""
    store = ArtifactStore(root)
    counts: dict[str, int] = {}
    for manifest in root.glob(f"*/[!.]*/{MANIFEST}"):
        step = manifest.parent.parent.name
        if step in STEPS and store.manifest(step, manifest.parent.name) is not None:
            counts[step] = counts.get(step, 0) + 1
    return counts


def marked_checkpoints(root: Path) -> list[int]:
    """Give back the steps of the complete (marked) fine-tune checkpoints under `root`."""
    return sorted(int(mark.parent.name.split("-")[1])
                  for mark in root.glob(f"finetune/.checkpoints-*/checkpoint-*/{CHECKPOINT_MARK}"))


def _training(root: Path) -> bool:
    """Tell whether fine-tune has trained its first steps: Trainer has begun writing the first checkpoint."""
    return any(root.glob("finetune/.checkpoints-*/checkpoint-*"))


def _finetune_published(root: Path) -> bool:
    return any((root / "finetune").glob(f"[!.]*/{MANIFEST}"))


def _wait_for(condition, process: subprocess.Popen, timeout: float) -> bool:
    """Poll `condition` until it holds (True) or the process ends or time runs out (False)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None or time.monotonic() > deadline:
            return condition()
        time.sleep(0.01)
    return True


@dataclass
class Reference:
    """An uninterrupted fine-tune of the prepared root: what every trial must end with."""

    code: Path  # where the runs start (the checkout, or a snapshot of it)
    settings: dict[str, Any]
    prepared: Path
    final_loss: float
    weights: Path
    training_seconds: float  # from the first checkpoint folder appearing to the model's manifest
    run_seconds: float  # the whole uninterrupted `itune run --until finetune` on the prepared root


@dataclass
class Trial:
    delay: float
    landed: bool = False  # the kill hit a running fine-tune (not one that had already published)
    checkpoints_at_kill: list[int] = field(default_factory=list)
    resumed_from: int | None = None
    loss_rel_error: float | None = None
    weight_error: float | None = None
    rerun_seconds: float | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def good(self) -> bool:
        return self.landed and not self.problems


def _published_finetune(root: Path) -> tuple[dict[str, Any], Path]:
    [manifest] = list(root.glob(f"finetune/[!.]*/{MANIFEST}"))
    return json.loads(manifest.read_text(encoding="utf-8")), manifest.parent


def _max_weight_difference(ours: Path, theirs: Path) -> float:
    import numpy as np
    from safetensors.numpy import load_file

    a, b = load_file(ours / "model" / "model.safetensors"), load_file(theirs / "model" / "model.safetensors")
    if a.keys() != b.keys():
        return float("inf")
    return max(float(np.abs(a[k].astype(np.float64) - b[k]).max()) for k in a)


def prepare(work: Path, env: dict[str, str], code: Path = REPO, timeout: float = 900) -> Reference:
    """Build ingest..tokenize once, then fine-tune a copy uninterrupted, timing its training."""
    settings = {**SETTINGS, "model.name": micro_gpt2(work / "micro-gpt2")}
    prepared = work / "prepared"
    build = [*ITUNE, *run_args("tokenize", {**settings, "artifacts.root": prepared})]
    done = subprocess.run(build, cwd=code, env=env, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"preparing {prepared} failed: {done.stderr[-2000:]}")
    reference = work / "reference"
    shutil.copytree(prepared, reference)
    finetune = [*ITUNE, *run_args("finetune", {**settings, "artifacts.root": reference})]
    process = subprocess.Popen(finetune, cwd=code, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                               text=True)
    launched = time.monotonic()
    _wait_for(lambda: _training(reference), process, timeout)
    started = time.monotonic()
    _wait_for(lambda: _finetune_published(reference), process, timeout)
    seconds = time.monotonic() - started
    out, _ = process.communicate(timeout=timeout)
    if process.returncode != 0:
        raise RuntimeError(f"the reference fine-tune failed: {out[-2000:]}")
    manifest, folder = _published_finetune(reference)
    return Reference(code, settings, prepared, float(manifest["final_loss"]), folder, seconds,
                     time.monotonic() - launched)


def kill_trial(root: Path, env: dict[str, str], reference: Reference, delay: float, timeout: float = 900) -> Trial:
    """Kill a fine-tune on a copy of the prepared root `delay` s into training, rerun, check the result."""
    trial = Trial(delay=round(delay, 3))
    shutil.copytree(reference.prepared, root)
    args = [*ITUNE, *run_args("finetune", {**reference.settings, "artifacts.root": root})]
    process = subprocess.Popen(args, cwd=reference.code, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    try:
        if not _wait_for(lambda: _training(root), process, timeout):
            trial.problems.append(f"fine-tune never started training (exit code {process.poll()})")
            return trial
        time.sleep(delay)
        trial.landed = process.poll() is None and not _finetune_published(root)
        trial.checkpoints_at_kill = marked_checkpoints(root)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    if not trial.landed:
        return trial
    trial.problems += [f"after the kill: {p} does not verify" for p in artifact_problems(root)]
    if intact(root).get("finetune"):
        trial.problems.append("after the kill: a fine-tune artifact verifies although the run was killed")

    started = time.monotonic()
    rerun = subprocess.run(args, cwd=reference.code, env=env, capture_output=True, text=True, timeout=timeout)
    trial.rerun_seconds = round(time.monotonic() - started, 1)
    if rerun.returncode != 0:
        trial.problems.append(f"rerun exit code {rerun.returncode}: {rerun.stderr.strip()[-500:]}")
        return trial
    expected = {**dict.fromkeys(STEPS[:5], "Cached"), "finetune": "Completed"}
    if states(rerun.stdout) != expected:
        trial.problems.append(f"rerun states {states(rerun.stdout)}")
    trial.problems += [f"after the rerun: {p} does not verify" for p in artifact_problems(root)]
    if list(root.glob("finetune/.checkpoints-*")):
        trial.problems.append("checkpoints were left after the model was published")
    manifest, folder = _published_finetune(root)
    trial.resumed_from = manifest.get("resumed_from_step")
    trial.loss_rel_error = abs(manifest["final_loss"] - reference.final_loss) / abs(reference.final_loss)
    trial.weight_error = _max_weight_difference(folder, reference.weights)
    if trial.loss_rel_error > LOSS_REL_TOLERANCE:
        trial.problems.append(f"final loss {manifest['final_loss']} vs reference {reference.final_loss}")
    if trial.weight_error > WEIGHT_TOLERANCE:
        trial.problems.append(f"weights differ from the reference by up to {trial.weight_error:.2e}")
    return trial


def run_trials(work: Path, env: dict[str, str], trials: int, seed: int = 0, code: Path = REPO,
               log=lambda trial: None) -> tuple[Reference, list[Trial]]:
    """Give back the reference and `trials` kill trials whose kills landed (a kill that comes too late is redrawn)."""
    reference = prepare(work, env, code)
    rng = random.Random(seed)
    done: list[Trial] = []
    attempts = 0
    while len([t for t in done if t.landed]) < trials and attempts < 2 * trials:
        attempts += 1
        root = work / f"trial-{attempts:02d}"
        # Up to 90% of the reference's training time: later kills mostly find the model already published.
        trial = kill_trial(root, env, reference, rng.uniform(0, 0.9) * reference.training_seconds)
        done.append(trial)
        log(trial)
        if trial.good:
            shutil.rmtree(root, ignore_errors=True)
    return reference, done


def section(reference: Reference, trials: list[Trial], seconds: float) -> str:
    landed = [t for t in trials if t.landed]
    good = [t for t in landed if t.good]
    rebuilt = [t for t in landed if t.loss_rel_error is not None]  # the rerun published a model
    resumed = [t for t in rebuilt if t.resumed_from]
    lines = [
        "## Reliability",
        "",
        f"Command: `{COMMAND}` (Python {platform.python_version()}, {os.cpu_count()} CPU cores shared with "
        f"other jobs, load average {os.getloadavg()[0]:.1f} at the end; {seconds / 60:.1f} min in all).",
        "",
        f"A micro GPT-2 (1 layer, 32 wide, the real 50,257-token vocabulary, loaded from a save_pretrained "
        f"folder) fine-tuned for {SETTINGS['train.max_steps']} steps of batch {SETTINGS['train.batch_size']} "
        f"with a checkpoint every {SETTINGS['train.save_steps']} steps, on 300 built-in examples; the process "
        f"group is killed with SIGKILL at a random moment in the first 90% of training (from Trainer starting "
        f"its first checkpoint to the published model: {reference.training_seconds:.1f} s uninterrupted), then "
        "the same `itune run` is started again:",
        "",
        "| | trials |",
        "|---|---|",
        f"| kills that hit a running fine-tune | {len(landed)} |",
        f"| **good outcomes**: rerun exits 0, ingest..tokenize Cached, the model equals the uninterrupted one, "
        f"nothing half-written | **{len(good)}/{len(landed)}** |",
        f"| the rerun resumed from a checkpoint (from step {_spread([t.resumed_from for t in resumed])}) "
        f"| {len(resumed)} |",
        f"| killed before the first checkpoint was complete: retrained from step 0 | {len(rebuilt) - len(resumed)} |",
        f"| draws redone because the model was already published when the kill came | {len(trials) - len(landed)} |",
        "",
        f"- kill moments: {_spread([round(t.delay, 1) for t in landed])} s into training; newest "
        f"complete checkpoint when killed: step {_spread([max(t.checkpoints_at_kill, default=0) for t in landed])} "
        "(0: none yet).",
    ]
    if rebuilt:
        lines += [
            f"- largest difference from the uninterrupted model: final training loss "
            f"{max(t.loss_rel_error for t in rebuilt):.1e} relative (tolerance {LOSS_REL_TOLERANCE:g}, as in "
            f"tests/test_finetune_resume.py), weights {max(t.weight_error for t in rebuilt):.1e} "
            f"(tolerance {WEIGHT_TOLERANCE:g}).",
            f"- rerun after a kill: median {statistics.median(t.rerun_seconds for t in rebuilt):.1f} s wall time; "
            f"the uninterrupted run of the same command took {reference.run_seconds:.1f} s.",
        ]
    for t in landed:
        if not t.good:
            lines.append(f"- FAILED: kill {t.delay} s into fine-tune: {'; '.join(t.problems)}")
    lines += [
        "- checked after each kill: every `<root>/<step>/<key>/` folder verifies (manifest present, every "
        "listed file's sha256 matches) and no fine-tune artifact exists; after each rerun the same, and the "
        "checkpoint folder is gone once the model is published.",
        "- `python -m pytest tests/test_faults.py` runs the same trial once; `tests/test_reliability.py` "
        "kills each of the seven steps at a fixed point.",
    ]
    return "\n".join(lines) + "\n"


def _spread(values: list[Any]) -> str:
    numbers = sorted(v for v in values if v is not None)
    if not numbers:
        return "-"
    return str(numbers[0]) if numbers[0] == numbers[-1] else f"{numbers[0]}–{numbers[-1]}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", type=Path, help="work folder to keep (default: a temporary one)")
    parser.add_argument("--write", action="store_true", help="write the figures into benchmarks/RESULTS.md")
    args = parser.parse_args()
    work = args.keep or Path(tempfile.mkdtemp(prefix="itune-faults-"))
    work.mkdir(parents=True, exist_ok=True)
    # A private Prefect home and one API for all runs: each `itune run` would otherwise start its own.
    os.environ["PREFECT_HOME"] = str(work / "prefect-home")
    from commands.local_api import LocalPrefectAPI

    api = LocalPrefectAPI()
    api.wait_ready()
    env = cli_env(api.url, work / "prefect-home")
    started = time.monotonic()

    def log(trial: Trial) -> None:
        print(json.dumps({k: v for k, v in trial.__dict__.items()}, default=str), flush=True)

    try:
        reference, trials = run_trials(work, env, args.trials, args.seed, snapshot_code(work / "code"), log)
    finally:
        api.stop()
    seconds = time.monotonic() - started
    text = section(reference, trials, seconds)
    print(text)
    if args.write:
        write_results(text)
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    sys.exit(0 if all(t.good for t in trials if t.landed) else 1)


if __name__ == "__main__":
    main()
