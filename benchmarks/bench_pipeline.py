"""Orchestration overhead and cached-rerun wall time, each against a baseline measured in this run.

    python benchmarks/bench_pipeline.py            # writes the "Orchestration" section of benchmarks/RESULTS.md

1. The seven work functions called in a plain script vs the same work as the Prefect flow (each on a
   fresh artifact root, API already running): per-step overhead = (flow - plain) / 7.
2. `itune run` as a user types it: first run, fully cached rerun, and a rerun with only evaluate's
   config changed (wall time including interpreter start and the local Prefect API).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SETTINGS = ["data.builtin_examples=300", "train.max_steps=4", "train.batch_size=8", "eval.max_examples=8",
            "eval.max_new_tokens=4", "template.val_fraction=0.1", "template.test_fraction=0.1"]


def plain_script(root: Path) -> float:
    """Run the seven work functions with no Prefect; give back seconds."""
    from tasks.clean import STEP as CLEAN
    from tasks.clean import write_clean
    from tasks.config import load_config
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
    started = time.perf_counter()
    c = cfg.step_config
    raw, _ = INGEST.produce(c("ingest"), str(root), [], lambda o, i: write_ingest(cfg.data, o))
    clean, _ = CLEAN.produce(c("clean"), str(root), [raw], lambda o, i: write_clean(cfg.clean, i[0], o))
    valid, _ = VALIDATE.produce(c("validate"), str(root), [clean], lambda o, i: write_validate(cfg.validate_, i[0], o))
    tmpl, _ = TEMPLATE.produce(c("template"), str(root), [valid], lambda o, i: write_template(cfg.template, i[0], o))
    toks, _ = TOKENIZE.produce(c("tokenize"), str(root), [tmpl], lambda o, i: write_tokenize(cfg.tokenize, i[0], o))
    model, _ = FINETUNE.produce(c("finetune"), str(root), [toks], lambda o, i: write_finetune(c("finetune"), i[0], o))
    EVALUATE.produce(c("evaluate"), str(root), [tmpl, toks, model],
                     lambda o, i: write_evaluate_artifact(cfg.eval, i, o))
    return time.perf_counter() - started


def prefect_flow(root: Path) -> float:
    from flows.pipeline import pipeline
    from tasks.config import load_config

    cfg = load_config(overrides=[*SETTINGS, f"artifacts.root={root}"])
    started = time.perf_counter()
    state = pipeline(config=cfg.as_dict(), return_state=True)
    assert state.is_completed(), state
    return time.perf_counter() - started


def cli_wall(root: Path, extra: list[str], home: Path) -> float:
    args = [sys.executable, "-m", "flows.cli", "run", "--json"]
    for item in [*SETTINGS, f"artifacts.root={root}", *extra]:
        args += ["--set", item]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    started = time.perf_counter()
    subprocess.run(args, cwd=REPO, env=env, check=True, capture_output=True)
    return time.perf_counter() - started


def main() -> None:
    from flows.local_api import LocalPrefectAPI

    work = Path(tempfile.mkdtemp(prefix="itune-bench-"))
    api = LocalPrefectAPI()
    os.environ["PREFECT_API_URL"] = api.url
    os.environ["PREFECT_HOME"] = str(work / "home-inproc")
    api.wait_ready()
    plain_script(work / "warmup")  # imports and first-use costs out of both measurements
    plain = [plain_script(work / f"plain{i}") for i in range(2)]
    flow = [prefect_flow(work / f"flow{i}") for i in range(2)]
    api.stop()
    overhead_ms = (min(flow) - min(plain)) / 7 * 1000

    home = work / "home-cli"
    cli_wall(work / "warm-cli", [], home)  # the first start migrates a fresh database
    first = cli_wall(work / "cli", [], home)
    cached = cli_wall(work / "cli", [], home)
    eval_only = cli_wall(work / "cli", ["eval.max_new_tokens=5"], home)

    section = "\n".join([
        "## Orchestration and cached reruns",
        "",
        "Command: `python benchmarks/bench_pipeline.py` (trivial config: 300 built-in rows, 4 training steps).",
        "",
        "| measure | seconds |",
        "|---|---|",
        f"| seven work functions, plain Python (best of 2) | {min(plain):.2f} |",
        f"| same work as the Prefect flow, API already up (best of 2) | {min(flow):.2f} |",
        f"| per-step Prefect overhead (flow - plain) / 7 | {overhead_ms / 1000:.3f} ({overhead_ms:.0f} ms) |",
        f"| `itune run`, first run (fresh root) | {first:.2f} |",
        f"| `itune run`, same command again (all seven Cached) | {cached:.2f} |",
        f"| `itune run`, only evaluate's config changed | {eval_only:.2f} |",
        "",
        f"Ratios: cached rerun / first run = {cached / first:.2f}; goal for a cached run: <= 15 s "
        f"({'met' if cached <= 15 else 'NOT met'}); per-step overhead goal <= 100 ms "
        f"({'met' if overhead_ms <= 100 else 'NOT met'}).",
        "",
    ])
    write_section(section)
    print(section)


def write_section(section: str) -> None:
    """Replace (or append) this benchmark's section of RESULTS.md, leaving the others as they are."""
    results = REPO / "benchmarks" / "RESULTS.md"
    text = results.read_text(encoding="utf-8") if results.exists() else "# Benchmark results\n\n"
    heading = section.splitlines()[0]
    if heading in text:
        start = text.index(heading)
        end = text.find("\n## ", start + len(heading))
        text = text[:start] + section + (text[end + 1:] if end != -1 else "")
    else:
        text = text.rstrip("\n") + "\n\n" + section
    results.write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
