"""Orchestration overhead and cached-rerun wall time, each against a baseline measured in this run.

    python benchmarks/bench_pipeline.py            # writes the "Orchestration" section of benchmarks/RESULTS.md

1. The seven work functions called in a plain script vs the same work as the Prefect flow (each on a
   fresh artifact root, API already running): per-step overhead = (flow - plain) / 7.
2. `itune run` as a user types it: first run, fully cached rerun, and a rerun with only evaluate's
   config changed (wall time including interpreter start and the local Prefect API).
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks._results import write_results  # noqa: E402

SETTINGS = ["data.builtin_examples=300", "train.max_steps=4", "train.batch_size=8", "eval.max_examples=8",
            "eval.max_new_tokens=4", "template.val_fraction=0.1", "template.test_fraction=0.1"]


def plain_script(root: Path) -> dict[str, float]:
    """Run the seven work functions with no Prefect; give back each step's seconds."""
    from catalog.config import load_config
    from tasks.clean import STEP as CLEAN
    from tasks.clean import write_clean
    from tasks.evaluate import STEP as EVALUATE
    from tasks.evaluate import write_evaluate_artifact
    from tasks.finetune import STEP as FINETUNE
    from tasks.finetune import write_finetune
    from tasks.ingest import STEP as INGEST
    from tasks.ingest import write_ingest
    from tasks.template import STEP as TEMPLATE
    from tasks.template import write_template
    from tasks.tokenize import STEP as TOKENIZE
    from tasks.tokenize import write_tokenize
    from tasks.validate import STEP as VALIDATE
    from tasks.validate import write_validate

    cfg = load_config(overrides=[*SETTINGS, f"artifacts.root={root}"])
    c, seconds, refs = cfg.step_config, {}, {}

    def timed(step: str, produce, inputs: list, build) -> None:
        started = time.perf_counter()
        refs[step], _ = produce(c(step), str(root), [refs[name] for name in inputs], build)
        seconds[step] = time.perf_counter() - started

    timed("ingest", INGEST.produce, [], lambda o, i: write_ingest(cfg.data, o))
    timed("clean", CLEAN.produce, ["ingest"], lambda o, i: write_clean(cfg.clean, i[0], o))
    timed("validate", VALIDATE.produce, ["clean"], lambda o, i: write_validate(cfg.validate_, i[0], o))
    timed("template", TEMPLATE.produce, ["validate"], lambda o, i: write_template(cfg.template, i[0], o))
    timed("tokenize", TOKENIZE.produce, ["template"], lambda o, i: write_tokenize(cfg.tokenize, i[0], o))
    timed("finetune", FINETUNE.produce, ["tokenize"], lambda o, i: write_finetune(c("finetune"), i[0], o))
    timed("evaluate", EVALUATE.produce, ["template", "tokenize", "finetune"],
          lambda o, i: write_evaluate_artifact(cfg.eval, i, o))
    return seconds


def prefect_flow(root: Path) -> tuple[float, dict[str, float]]:
    """Run the Prefect flow; give back (seconds, each step's share of the flow's wall time).

    A step's share runs from the end of the step before it (the flow's start for ingest) to its own end, so
    it holds everything Prefect does around the work: task run creation, cache policy, result storage.
    """
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    from catalog.config import STEPS, load_config
    from flows.pipeline import pipeline

    cfg = load_config(overrides=[*SETTINGS, f"artifacts.root={root}"])
    started = time.perf_counter()
    state = pipeline(config=cfg.as_dict(), return_state=True)
    seconds = time.perf_counter() - started
    assert state.is_completed(), state
    with get_client(sync_client=True) as client:
        flow_run = client.read_flow_run(state.state_details.flow_run_id)
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run.id])))
    ends = {run.name.rsplit("-", 1)[0]: run.end_time for run in runs}
    shares, previous = {}, flow_run.start_time
    for step in STEPS:
        shares[step] = (ends[step] - previous).total_seconds()
        previous = ends[step]
    return seconds, shares


def cli_wall(root: Path, extra: list[str], home: Path) -> float:
    args = [sys.executable, "-m", "commands.app", "run", "--json"]
    for item in [*SETTINGS, f"artifacts.root={root}", *extra]:
        args += ["--set", item]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    started = time.perf_counter()
    subprocess.run(args, cwd=REPO, env=env, check=True, capture_output=True)
    return time.perf_counter() - started


def main() -> None:
    from commands.local_api import LocalPrefectAPI

    work = Path(tempfile.mkdtemp(prefix="itune-bench-"))
    api = LocalPrefectAPI()
    os.environ["PREFECT_API_URL"] = api.url
    os.environ["PREFECT_HOME"] = str(work / "home-inproc")
    api.wait_ready()
    plain_script(work / "warmup")  # imports and first-use costs out of both measurements
    plains = [plain_script(work / f"plain{i}") for i in range(3)]
    flows = [prefect_flow(work / f"flow{i}") for i in range(3)]
    api.stop()
    plain = {step: statistics.median(run[step] for run in plains) for step in plains[0]}
    share = {step: statistics.median(run[1][step] for run in flows) for step in plain}
    overhead_ms = {step: (share[step] - plain[step]) * 1000 for step in plain}
    median_ms = statistics.median(overhead_ms.values())
    flow_total = statistics.median(run[0] for run in flows)

    home = work / "home-cli"
    cli_wall(work / "warm-cli", [], home)  # the first start migrates a fresh database
    first = cli_wall(work / "cli", [], home)
    cached = cli_wall(work / "cli", [], home)
    eval_only = cli_wall(work / "cli", ["eval.max_new_tokens=5"], home)

    rows = [f"| {step} | {plain[step]:.3f} | {share[step]:.3f} | {overhead_ms[step]:.0f} |" for step in plain]
    section = "\n".join([
        "## Orchestration and cached reruns",
        "",
        "Command: `python benchmarks/bench_pipeline.py` (trivial config: 300 built-in rows, 4 training steps; "
        "2 CPU cores shared with other work; medians of 3 runs each, fresh artifact roots).",
        "",
        "| step | plain Python (s) | in the Prefect flow (s) | Prefect overhead (ms) |",
        "|---|---|---|---|",
        *rows,
        f"| **whole pipeline** | {sum(plain.values()):.2f} | {flow_total:.2f} | "
        f"{(flow_total - sum(plain.values())) * 1000:.0f} |",
        "",
        f"Median per-step Prefect overhead: **{median_ms:.0f} ms** (goal <= 100 ms: "
        f"{'met' if median_ms <= 100 else 'NOT met'}); the flow takes {flow_total / sum(plain.values()):.2f}x "
        "the plain script. A step's time in the flow runs from the previous step's end to its own end "
        "(task run creation, cache-policy check, result and lineage records included).",
        "",
        "| `itune run` as typed, interpreter and local Prefect API start included | seconds |",
        "|---|---|",
        f"| first run (fresh root) | {first:.2f} |",
        f"| same command again (all seven Cached) | {cached:.2f} |",
        f"| only evaluate's config changed (evaluate reruns, six Cached) | {eval_only:.2f} |",
        "",
        f"Cached rerun = {cached / first:.2f}x the first run; goal <= 15 s: {'met' if cached <= 15 else 'NOT met'}.",
        "",
    ])
    write_results(section)
    print(section)


if __name__ == "__main__":
    main()
