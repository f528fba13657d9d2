"""Benchmark of a nightly run on a grown folder: what 1% new rows cost past Prefect's fixed cost (issue 18).

Run: python benchmarks/bench_incremental.py [--rows 200000] [--files 20] [--new-rows 2000] [--write]
Not a test. A folder of generated rows (benchmarks/bench_data.py's generator) in `--files` files is run to
tokenize with `itune run`, then once more (all Cached: the fixed cost); a file of `--new-rows` arrives and the
same command runs again. The figure is (incremental - fixed) / (first - fixed), goal <= 0.20 at 200,000 rows and
<= 0.10 at 1,000,000. Then a from-scratch run on the grown folder (a fresh root) must give byte-identical data
artifacts. With --write, the "## Incremental data steps" section of benchmarks/RESULTS.md gets one row per size.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks._results import RESULTS, write_results  # noqa: E402
from benchmarks.bench_data import generate_rows  # noqa: E402

DATA_STEPS = ("ingest", "clean", "validate", "template", "tokenize")
SECTION = "## Incremental data steps"


def itune_run(source: Path, root: Path) -> dict[str, Any]:
    """Run `itune run --until tokenize` as a user types it; give back its wall seconds and its --json summary."""
    command = [str(Path(sys.executable).parent / "itune"), "run", "--until", "tokenize", "--json",
               "--set", f"data.source={source}", "--set", f"artifacts.root={root}"]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, check=False, cwd=REPO)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"itune run failed ({done.returncode}): {(done.stdout + done.stderr)[-2000:]}")
    return {"seconds": seconds, **json.loads(done.stdout.strip().splitlines()[-1])}


def artifact_files(root: Path, step: str, key: str) -> dict[str, str]:
    """Give back sha256 of every data file of an artifact (the manifest, with its build time, left out)."""
    folder = root / step / key
    return {str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(folder.rglob("*.parquet")) if path.is_file()}


def measure(rows: int, files: int, new_rows: int, scratch_too: bool = True, repeats: int = 3) -> dict[str, Any]:
    """Give back the figures of one size: first, fixed, incremental and from-scratch runs, and the equality check.

    The machine is shared: the fixed cost is the median of `repeats` all-Cached runs, and the incremental run is
    made `repeats` times, each on its own copy (hard links) of the root as the first night left it, its median taken.
    """
    with tempfile.TemporaryDirectory() as tmp:
        source, root = Path(tmp) / "source", Path(tmp) / "root"
        source.mkdir()
        for part in range(files):
            generate_rows(rows // files, source / f"part-{part:03d}.jsonl", seed=part)
        first = itune_run(source, root)
        fixed_runs = [itune_run(source, root) for _ in range(repeats)]
        not_cached = [s for run in fixed_runs for s, v in run["steps"].items() if v["state"] != "Cached"]
        if not_cached:
            raise RuntimeError(f"the rerun was not all Cached: {not_cached}")
        generate_rows(new_rows, source / f"part-{files:03d}.jsonl", seed=files)
        load_before = os.getloadavg()[0]
        nights = []
        for night in range(repeats):
            copy = Path(tmp) / f"night-{night}"
            shutil.copytree(root, copy, copy_function=os.link)  # the first night's artifacts, as they were
            nights.append(itune_run(source, copy))
        incremental = sorted(nights, key=lambda run: run["seconds"])[len(nights) // 2]
        fixed = sorted(fixed_runs, key=lambda run: run["seconds"])[len(fixed_runs) // 2]
        scratch = itune_run(source, Path(tmp) / "scratch") if scratch_too else None
        same = {step: artifact_files(Path(tmp) / f"night-{nights.index(incremental)}", step,
                                     incremental["steps"][step]["key"])
                == artifact_files(Path(tmp) / "scratch", step, scratch["steps"][step]["key"])
                and incremental["steps"][step]["key"] == scratch["steps"][step]["key"] for step in DATA_STEPS} \
            if scratch else {}
        manifests = {step: json.loads((Path(incremental["steps"][step]["artifact"]) / "manifest.json").read_text())
                     for step in DATA_STEPS}
    ratio = (incremental["seconds"] - fixed["seconds"]) / (first["seconds"] - fixed["seconds"])
    return {"rows": rows, "files": files, "new_rows": new_rows, "first": first["seconds"], "fixed": fixed["seconds"],
            "incremental": incremental["seconds"], "scratch": scratch["seconds"] if scratch else None, "ratio": ratio,
            "fixed_runs": [round(run["seconds"], 1) for run in fixed_runs],
            "incremental_runs": [round(run["seconds"], 1) for run in nights],
            "goal": 0.20 if rows < 1_000_000 else 0.10, "identical": same,
            "steps": {step: incremental["steps"][step]["seconds"] for step in DATA_STEPS},
            "first_steps": {step: first["steps"][step]["seconds"] for step in DATA_STEPS},
            "tokenize_rows": incremental["steps"]["tokenize"]["rows"],
            "linked": {step: [m.get("parts_linked"), m.get("parts")] for step, m in manifests.items()},
            "load": [round(load_before, 1), round(os.getloadavg()[0], 1)]}


def _earlier_rows(sizes: set[int]) -> list[str]:
    """Give back the table rows RESULTS.md holds for other sizes (each size is measured by its own command)."""
    text = RESULTS.read_text(encoding="utf-8") if RESULTS.exists() else ""
    body = text.split(SECTION + "\n", 1)[1].split("\n## ", 1)[0] if SECTION + "\n" in text else ""
    return [line for line in body.splitlines() if re.match(r"^\| [\d,]+ in ", line)
            and int(line[2:].split(" ")[0].replace(",", "")) not in sizes]


def section(results: list[dict[str, Any]], command: str) -> str:
    lines = _earlier_rows({r["rows"] for r in results})
    for r in results:
        steps = ", ".join(f"{step} {r['steps'][step]:.1f} s" for step in DATA_STEPS)
        identical = "not compared" if not r["identical"] else "yes" if all(r["identical"].values()) else \
            "no: " + ", ".join(step for step, same in r["identical"].items() if not same)
        lines.append(f"| {r['rows']:,} in {r['files']} files + {r['new_rows']:,} | {r['first']:.1f} | "
                     f"{r['fixed']:.1f} ({', '.join(map(str, r['fixed_runs']))}) | "
                     f"{r['incremental']:.1f} ({', '.join(map(str, r['incremental_runs']))}) | "
                     f"**{r['ratio']:.2f}** (goal ≤ {r['goal']:.2f}) | "
                     f"{identical} | {steps} | {r['load'][0]} → {r['load'][1]} | `{command}` |")
    table = "\n".join(lines)
    return f"""{SECTION}

Each row's command is in its last column ({os.cpu_count()} CPU cores shared with other jobs). Generated Alpaca-style
JSONL (bench_data.py's generator, one seed per file), `itune run --until tokenize` with the default config on a
fresh root (first), the same command again (all Cached: the fixed cost of starting Python, the local Prefect API
and checking every artifact; the median of the runs in brackets), a new file of 1% more rows, the same command
again (incremental: the median of as many runs, each on a copy of the first night's root). Ratio =
(incremental - fixed) / (first - fixed). Identical: a from-scratch run on the grown folder (fresh root) gives the
same keys and byte-identical Parquet files (data, quarantine, row memos) in all five data steps (`--no-scratch`
skips that run: "not compared"). Per step: the incremental run's Prefect task seconds. Load: the 1-minute load
average before and after the incremental run.

| source | first s | fixed s | incremental s | ratio | identical | incremental per step | load | command |
|---|---|---|---|---|---|---|---|---|
{table}
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="200000", help="comma-separated sizes of the first folder")
    parser.add_argument("--files", type=int, default=20)
    parser.add_argument("--new-share", type=float, default=0.01, help="the new file's rows, as a share of the first")
    parser.add_argument("--no-scratch", action="store_true", help="skip the from-scratch run and the comparison")
    parser.add_argument("--repeats", type=int, default=3, help="all-Cached runs and incremental runs, medians taken")
    parser.add_argument("--write", action="store_true", help="write the figures into benchmarks/RESULTS.md")
    args = parser.parse_args()
    results = []
    for rows in (int(n) for n in args.rows.split(",")):
        result = measure(rows, args.files, round(rows * args.new_share), not args.no_scratch, args.repeats)
        print(json.dumps(result), flush=True)
        results.append(result)
    command = "python " + " ".join(re.sub(r"^.*benchmarks/", "benchmarks/", a) for a in sys.argv)
    text = section(results, command)
    print(text)
    if args.write:
        write_results(text)


if __name__ == "__main__":
    main()
