"""Benchmark of the data steps on the real 55k-row T0 set: ingest -> tokenize wall time, tokenizer ratio, memory.

Run: python benchmarks/bench_data.py [--source DIR] [--write]
Not a test: it prints figures and, with --write, replaces the "## Data steps" section of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")

from tasks.clean import write_clean  # noqa: E402
from tasks.config import CleanConfig, DataConfig, TemplateConfig, TokenizeConfig, ValidateConfig  # noqa: E402
from tasks.ingest import write_ingest  # noqa: E402
from tasks.modeling import gpt2_tokenizer  # noqa: E402
from tasks.template import write_template  # noqa: E402
from tasks.tokenize import tokenize_batch, write_tokenize  # noqa: E402
from tasks.validate import write_validate  # noqa: E402

DEFAULT_SOURCE = REPO.parent / "shared" / "data" / "self-instruct" / "t0_train_50k"
COMMAND = "python benchmarks/bench_data.py --write"


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def run(source: Path, max_length: int) -> dict:
    gpt2_tokenizer()  # built once up front, so no step is charged for it
    figures: dict = {"steps": {}}
    with tempfile.TemporaryDirectory() as tmp:
        folders = {name: Path(tmp) / name for name in ("ingest", "clean", "validate", "template", "tokenize")}
        for folder in folders.values():
            folder.mkdir()
        tokenize_config = TokenizeConfig(max_length=max_length)
        steps = [
            ("ingest", lambda: write_ingest(DataConfig(source=str(source)), folders["ingest"])),
            ("clean", lambda: write_clean(CleanConfig(), folders["ingest"], folders["clean"])),
            ("validate", lambda: write_validate(ValidateConfig(warn_only=[]), folders["clean"], folders["validate"])),
            ("template", lambda: write_template(TemplateConfig(), folders["validate"], folders["template"])),
            ("tokenize", lambda: write_tokenize(tokenize_config, folders["template"], folders["tokenize"])),
        ]
        started = time.perf_counter()
        for name, step in steps:
            t0 = time.perf_counter()
            stats = step()
            seconds = time.perf_counter() - t0
            (folders[name] / "manifest.json").write_text(json.dumps(stats, default=str))
            figures["steps"][name] = {"seconds": round(seconds, 2), "rows": stats.get("rows")}
            if name == "clean":
                figures["clean_dropped"] = stats["dropped"]
            if name in ("validate", "tokenize"):
                figures[f"{name}_passed"] = stats["passed"]
                figures[f"{name}_failure"] = stats.get("failure", "")
            if name == "tokenize":
                figures["tokens"] = stats["tokens"]
                figures["truncated_share"] = round(stats["truncated_share"], 4)
        figures["total_seconds"] = round(time.perf_counter() - started, 2)
        figures["rows_read"] = figures["steps"]["ingest"]["rows"]
        figures["rows_per_second"] = round(figures["rows_read"] / figures["total_seconds"], 1)

        # the same texts, same process: tokenize's batch loop vs the bare batched tokenizer
        table = pq.read_table(folders["template"] / "data.parquet",
                              columns=["id", "split", "category", "prompt", "completion"])
        batches = table.to_batches(max_chunksize=tokenize_config.batch_size)
        tokenizer = gpt2_tokenizer()
        t0 = time.perf_counter()
        for batch in batches:
            tokenizer(batch.column("prompt").to_pylist(), add_special_tokens=False)
            tokenizer(batch.column("completion").to_pylist(), add_special_tokens=False)
        bare = time.perf_counter() - t0
        t0 = time.perf_counter()
        for batch in batches:
            tokenize_batch(batch, tokenize_config)
        loop = time.perf_counter() - t0
        step = figures["steps"]["tokenize"]["seconds"]
        figures["bare_tokenizer_seconds"] = round(bare, 2)
        figures["tokenize_loop_seconds"] = round(loop, 2)
        figures["ratio_loop_vs_bare"] = round(bare / loop, 3)
        figures["ratio_step_vs_bare"] = round(bare / step, 3)
        figures["template_rows"] = table.num_rows
    figures["peak_rss_mb"] = round(peak_rss_mb(), 1)
    return figures


def section(f: dict, max_length: int) -> str:
    steps = "\n".join(f"| {name} | {s['rows']:,} | {s['seconds']:.1f} |" for name, s in f["steps"].items())
    dropped = ", ".join(f"{k} {v:,}" for k, v in sorted(f["clean_dropped"].items(), key=lambda kv: -kv[1]))
    return f"""## Data steps

Command: `{COMMAND}` (T0 set, ../shared/data/self-instruct/t0_train_50k, 294 files; default config,
tokenize.max_length={max_length}; work functions without Prefect; {os.cpu_count()} CPU cores,
Python {platform.python_version()}).

| step | rows out | seconds |
|---|---|---|
{steps}

- ingest → tokenize: **{f['total_seconds']:.1f} s** for {f['rows_read']:,} rows read
  = **{f['rows_per_second']:,.0f} rows/s** (GE gates included: validate passed={f['validate_passed']},
  tokenize gate passed={f['tokenize_passed']}).
- clean dropped: {dropped}.
- tokenize: {f['tokens']:,} tokens, truncated share {f['truncated_share']:.2%}.
- tokenizer throughput on the same {f['template_rows']:,} templated rows, same process: bare batched tokenizer
  {f['bare_tokenizer_seconds']:.1f} s; tokenize's batch loop (tokenize + fit + Arrow) {f['tokenize_loop_seconds']:.1f} s
  → **{f['ratio_loop_vs_bare']:.2f}x** of the bare tokenizer (goal ≥ 0.8x); the whole step, Parquet writing and
  its Great Expectations gate included, {f['ratio_step_vs_bare']:.2f}x.
- peak memory (ru_maxrss of the process): **{f['peak_rss_mb']:,.0f} MB**.
"""


def write_results(text: str) -> None:
    path = REPO / "benchmarks" / "RESULTS.md"
    old = path.read_text(encoding="utf-8") if path.exists() else "# Benchmarks\n"
    start = old.find("## Data steps")
    if start == -1:
        new = old.rstrip("\n") + "\n\n" + text
    else:
        end = old.find("\n## ", start + 1)
        new = old[:start] + text + (old[end + 1:] if end != -1 else "")
    path.write_text(new, encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=DEFAULT_SOURCE)
    parser.add_argument("--max-length", type=int, default=TokenizeConfig().max_length)
    parser.add_argument("--write", action="store_true", help="write the figures into benchmarks/RESULTS.md")
    args = parser.parse_args()
    figures = run(args.source, args.max_length)
    print(json.dumps(figures, indent=2, default=str))
    if args.write:
        write_results(section(figures, args.max_length))


if __name__ == "__main__":
    main()
