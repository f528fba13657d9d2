"""The `runner` setting on real data: clean, template and tokenize of T0 in-process vs on a 2-worker Dask cluster.

    python benchmarks/bench_runner.py --write      # writes the "Runner" section of benchmarks/RESULTS.md

The cluster is started once (as an existing cluster would be) and reached by its address. Rounds are
interleaved and the best of each kept, since the machine is shared; every dask artifact is checked
byte for byte against the local one.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks._results import write_results  # noqa: E402
from benchmarks.bench_data import DEFAULT_SOURCE, run_step  # noqa: E402
from catalog.config import CleanConfig, RunnerConfig, TemplateConfig, TokenizeConfig  # noqa: E402
from tasks.clean import write_clean  # noqa: E402
from tasks.template import write_template  # noqa: E402
from tasks.tokenize import write_tokenize  # noqa: E402
from toolkit.tokenizer import gpt2_encoder  # noqa: E402

STEPS = {
    "clean": ("ingest", lambda runner, src, out: write_clean(CleanConfig(), src, out, runner=runner)),
    "template": ("validate", lambda runner, src, out: write_template(TemplateConfig(), src, out, runner=runner)),
    "tokenize": ("template", lambda runner, src, out: write_tokenize(TokenizeConfig(), src, out, runner=runner)),
}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def measure(source: Path, rounds: int, workers: int) -> dict[str, Any]:
    from distributed import LocalCluster

    gpt2_encoder()
    work = Path(tempfile.mkdtemp(prefix="itune-bench-runner-"))
    try:
        folders = {name: work / name for name in ("ingest", "clean", "validate", "template", "tokenize")}
        for name in folders:
            run_step(name, source, folders, TokenizeConfig().max_length)
        seconds: dict[str, dict[str, list[float]]] = {step: {"local": [], "dask": []} for step in STEPS}
        identical = {}
        with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster:
            runners = {"local": RunnerConfig(), "dask": RunnerConfig(kind="dask", address=cluster.scheduler_address)}
            for round_ in range(rounds + 1):  # round 0 warms the workers (imports, tokenizer); not counted
                for step, (upstream, write) in STEPS.items():
                    outputs = {}
                    for kind, runner in runners.items():
                        out = work / f"{step}-{kind}-{round_}"
                        out.mkdir()
                        started = time.perf_counter()
                        write(runner, folders[upstream], out)
                        if round_:
                            seconds[step][kind].append(time.perf_counter() - started)
                        outputs[kind] = out
                    identical[step] = all(_sha256(outputs["local"] / f.name) == _sha256(outputs["dask"] / f.name)
                                          for f in outputs["local"].glob("*.parquet"))
                    for out in outputs.values():
                        shutil.rmtree(out)
        rows = json.loads((folders["template"] / "manifest.json").read_text())["rows"]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    best = {step: {kind: min(times) for kind, times in by_kind.items()} for step, by_kind in seconds.items()}
    return {"rows": rows, "rounds": rounds, "workers": workers, "best": best, "identical": identical,
            "load_average": round(os.getloadavg()[0], 1)}


def section(f: dict[str, Any], source: Path) -> str:
    lines = [f"| {step} | {b['local']:.1f} | {b['dask']:.1f} | {b['local'] / b['dask']:.2f}x | "
             f"{'yes' if f['identical'][step] else 'NO'} |" for step, b in f["best"].items()]
    return "\n".join([
        "## Runner",
        "",
        f"Command: `python benchmarks/bench_runner.py --write` (T0 set, {source.name}; {f['rows']:,} clean rows; "
        f"a LocalCluster of {f['workers']} worker processes, 1 thread each, started once and reached by address; "
        f"best of {f['rounds']} interleaved rounds after a warm-up round; {os.cpu_count()} CPU cores, load "
        f"{f['load_average']} at the end).",
        "",
        "| step | local runner (s) | dask runner (s) | local / dask | same bytes |",
        "|---|---|---|---|---|",
        *lines,
        "",
        "On one 2-core machine the cluster's workers share the cores the local runner already uses (the Rust "
        "tokenizer is multi-threaded), so this measures what moving batches to workers costs or saves here; the "
        "gain comes with workers on other machines. Only the per-batch work moves (clean's row checks, template, "
        "tokenize); reading, duplicate finding, packing, gates and writing stay in the pipeline's process.",
        "",
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=DEFAULT_SOURCE)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--write", action="store_true", help="write the figures into benchmarks/RESULTS.md")
    args = parser.parse_args()
    figures = measure(args.source, args.rounds, args.workers)
    print(json.dumps(figures, indent=2))
    text = section(figures, args.source)
    print(text)
    if args.write:
        write_results(text)


if __name__ == "__main__":
    main()
