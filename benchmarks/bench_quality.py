"""Model quality of the default run: `itune run` on a fresh artifact root, as a newcomer types it.

    python benchmarks/bench_quality.py            # writes the "Model quality" section of benchmarks/RESULTS.md
    python benchmarks/bench_quality.py --only default   # the section then holds that run alone

Runs the default command (first run, fresh root) and the same with `model.name=scratch:mini` at its own
default budget, and records for each: the command, wall time (interpreter start and the local Prefect API
included), the machine's load average around it, optimizer steps, and per family the tuned and base exact
match beside the no-learning baselines, read from the evaluate artifact's metrics.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks._results import write_results  # noqa: E402

RUNS = {"default": [], "scratch:mini": ["model.name=scratch:mini"]}


def run_once(overrides: list[str]) -> dict[str, Any]:
    """Run `itune run` on a fresh root; give back the command, wall seconds, load averages and the metrics."""
    itune = str(Path(sys.executable).with_name("itune"))
    with tempfile.TemporaryDirectory(prefix="itune-quality-") as root:
        command = [itune, "run", "--json", "--set", f"artifacts.root={root}",
                   *[part for value in overrides for part in ("--set", value)]]
        load_before = os.getloadavg()
        started = time.perf_counter()
        done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=3600)
        wall = time.perf_counter() - started
        if done.returncode != 0:
            raise SystemExit(f"{shlex.join(command)} failed:\n{done.stderr[-3000:]}")
        result = json.loads(done.stdout.strip().splitlines()[-1])
        evaluate = Path(result["steps"]["evaluate"]["artifact"].removeprefix("file://"))
        metrics = json.loads((evaluate / "metrics.json").read_text(encoding="utf-8"))
        finetune = Path(result["steps"]["finetune"]["artifact"].removeprefix("file://"))
        manifest = json.loads((finetune / "manifest.json").read_text(encoding="utf-8"))
    shown = ["itune", "run", *[part for value in overrides for part in ("--set", value)]]
    return {"command": shlex.join(shown), "wall": wall, "load": (load_before, os.getloadavg()), "metrics": metrics,
            "train_seconds": manifest.get("train_seconds"), "steps": manifest.get("steps"),
            "parameters": manifest.get("parameters"), "step_seconds": {
                name: step["seconds"] for name, step in result["steps"].items()}}


def section(runs: dict[str, dict[str, Any]]) -> str:
    lines = ["## Model quality", "",
             f"`python benchmarks/bench_quality.py` on {platform.machine()}, {os.cpu_count()} CPU cores, each run on a "
             "fresh artifact root (first run: nothing cached). Exact match on the held-out test split, greedy "
             "decoding of the saved model folder. Baselines need no learning: the most frequent training answer of "
             "the family, and the input copied back. Load average: the 1-minute figure before and after the run "
             "(2 cores: above 2 means the run shared them).", ""]
    for name, run in runs.items():
        m = run["metrics"]
        (before, after) = run["load"]
        lines += [f"### {name}", "", f"`{run['command']}`: **{run['wall']:.0f} s** wall in all "
                  f"(fine-tune {run['train_seconds']:.0f} s for {run['steps']} optimizer steps, "
                  f"{run['parameters']:,} parameters); load average {before[0]:.1f} before, {after[0]:.1f} after.", "",
                  f"Tuned exact match **{m['tuned_exact_match']:.1%}** on {m['examples']} test rows; "
                  f"{m.get('base_model', '')}.", "",
                  "| family | test rows | tuned | base | most frequent answer | input copied back |",
                  "|---|---|---|---|---|---|"]
        for family, row in m["per_category"].items():
            lines.append(f"| {family} | {row['examples']} | {row['tuned']:.1%} | {row['base']:.1%} | "
                         f"{row.get('most_frequent_answer', 0):.1%} | {row.get('copy_input', 0):.1%} |")
        baselines = m.get("baselines", {})
        lines += [f"| **all** | {m['examples']} | **{m['tuned_exact_match']:.1%}** | {m['base_exact_match']:.1%} | "
                  f"{baselines.get('most_frequent_answer', 0):.1%} | {baselines.get('copy_input', 0):.1%} |", "",
                  "Seconds per step: " + ", ".join(f"{k} {v:.1f}" for k, v in run["step_seconds"].items()) + ".", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=sorted(RUNS), help="run one configuration")
    args = parser.parse_args()
    chosen = {args.only: RUNS[args.only]} if args.only else RUNS
    runs = {name: run_once(overrides) for name, overrides in chosen.items()}
    text = section(runs)
    print(text)
    write_results(text)


if __name__ == "__main__":
    main()
