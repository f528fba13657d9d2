"""`itune run`, `itune status` and `itune rerun`: run the pipeline here and show what each step did or would do."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from catalog.config import STEPS, ConfigError, PipelineConfig, load_config
from catalog.shared_root import absolute_root
from commands.base import (
    ConfigOption,
    SetOption,
    app,
    colored,
    connect,
    fail,
    out,
    print_decision,
    quiet_console_tracebacks,
)
from toolkit.registry import Registry, metric_rows


def _seconds(run: Any) -> float:
    if run.start_time and run.end_time:
        return round((run.end_time - run.start_time).total_seconds(), 2)
    return round(run.total_run_time.total_seconds(), 2) if run.total_run_time else 0.0


def _summarise(state: Any, refs: dict[str, Any]) -> dict[str, Any]:
    from toolkit.run_states import task_runs_by_step

    flow_run_id = state.state_details.flow_run_id
    runs = task_runs_by_step([flow_run_id], wait_final_seconds=10)[flow_run_id]
    steps: dict[str, Any] = {}
    for step in STEPS:
        run = runs.get(step)
        if run is None:
            continue
        ref = refs.get(step)
        steps[step] = {
            "state": run.state.name if run.state else "Unknown",
            "artifact": ref.uri if ref else None,
            "key": ref.key if ref else None,
            "rows": ref.rows if ref else None,
            "seconds": _seconds(run),
        }
    return {"flow_run_id": str(state.state_details.flow_run_id), "steps": steps}


def _metrics(refs: dict[str, Any]) -> dict[str, Any]:
    ref = refs.get("evaluate")
    if ref is None:
        return {}
    manifest = ref.manifest()
    return manifest.get("metrics", {})


def print_summary(summary: dict[str, Any], wall: float, title: str | None = None) -> None:
    if summary["steps"]:
        _print_steps(summary)
    metrics = summary.get("metrics") or {}
    if metrics:
        results = Table(title=title or "metrics (held-out)")
        for column in ("metric", "base", "tuned"):
            results.add_column(column, justify="left" if column == "metric" else "right")
        for row in metric_rows(metrics):
            results.add_row(row["metric"], f"{row['base']:.4f}", f"{row['tuned']:.4f}")
        out.print(results)
    if summary.get("promotion"):
        print_decision(summary["promotion"])
    if wall:
        out.print(f"wall time {wall:.1f} s")


def _print_steps(summary: dict[str, Any]) -> None:
    table = Table(title=f"itune pipeline · flow run {summary['flow_run_id']}")
    for column in ("step", "state", "rows", "seconds", "artifact"):
        table.add_column(column, justify="right" if column in ("rows", "seconds") else "left")
    for step, info in summary["steps"].items():
        table.add_row(step, colored(info["state"]), str(info["rows"] if info["rows"] is not None else "-"),
                      f"{info['seconds']:.2f}", info["artifact"] or "-")
    out.print(table)


@app.command()
def run(
    config: Annotated[Path | None, typer.Option("--config", "-c", help="YAML config (default: the quickstart)")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", "-s", help="override a key: train.epochs=2")] = None,
    until: Annotated[str, typer.Option(help=f"stop after this step ({', '.join(STEPS)})")] = "evaluate",
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object last on stdout")] = False,
    debug: Annotated[bool, typer.Option(help="show full tracebacks")] = False,
) -> None:
    """Run the pipeline; steps whose inputs did not change come from cache."""
    started = time.perf_counter()
    cfg = run_settings(config, set_, until)
    finish(run_pipeline(cfg, until, debug), as_json, started)


def run_settings(config: Path | None, set_: list[str] | None, until: str) -> PipelineConfig:
    """Give back the config a run (or its plan) uses up to step `until`; a bad setting exits 2 with one line."""
    if until not in STEPS:
        fail(f"--until must be one of {', '.join(STEPS)} (got '{until}')", 2)
    try:
        cfg = load_config(config, set_ or [])
    except ConfigError as exc:
        fail(str(exc), 2)
    cfg.artifacts.root = absolute_root(cfg.artifacts.root)
    return cfg


def finish(summary: dict[str, Any], as_json: bool, started: float) -> None:
    if as_json:
        sys.stdout.flush()
        print(json.dumps(summary, default=str))
    else:
        print_summary(summary, time.perf_counter() - started)
    if summary.get("error"):
        fail(summary["error"])


def run_pipeline(cfg: PipelineConfig, until: str, debug: bool = False, overrides: list[str] | None = None
                 ) -> dict[str, Any]:
    """Run the flow and give back the summary the CLI prints (steps, metrics, and an error line if any)."""
    local_api = connect()
    from flows.pipeline import pipeline

    if local_api is not None:
        local_api.wait_ready()

    if not debug:
        quiet_console_tracebacks()
    state = pipeline(config=cfg.as_dict(), until=until, overrides=overrides or [], return_state=True)
    result = state.result(raise_on_failure=False)
    refs = result if isinstance(result, dict) else {}
    summary = _summarise(state, refs)
    summary["metrics"] = _metrics(refs)
    summary["promotion"] = Registry(cfg.artifacts.root).decision_for_run(summary["flow_run_id"]) \
        if "evaluate" in refs else None
    if state.is_failed() or isinstance(result, BaseException):
        failed = [step for step, info in summary["steps"].items() if info["state"] in ("Failed", "Crashed")]
        step = failed[0] if failed else "pipeline"
        cause = str(result).strip().splitlines()[0] if result else (state.message or "unknown error")
        summary["error"] = f"step '{step}' failed: {type(result).__name__ if result else ''}: {cause}"
        if debug and isinstance(result, BaseException):
            import traceback

            traceback.print_exception(result)
    return summary


@app.command()
def status(
    config: ConfigOption = None, set_: SetOption = None,
    until: Annotated[str, typer.Option(help=f"last step to plan ({', '.join(STEPS)})")] = "evaluate",
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object instead of a table")] = False,
) -> None:
    """Say, without running, which steps a run would reuse (Cached) and which it would rebuild, and why."""
    cfg = run_settings(config, set_, until)
    from flows.plan import plan_pipeline

    try:
        plan = plan_pipeline(cfg, until)
    except Exception as exc:  # an unreadable source or root: one line, as `itune run` would say it
        fail(f"cannot plan the run: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
    if as_json:
        print(json.dumps({"root": cfg.artifacts.root, "steps": {s.step: {"state": "Cached" if s.cached else "rebuild",
                          "key": s.key, "reasons": s.reasons} for s in plan}}))
        return
    table = Table(title=f"itune status · {cfg.artifacts.root}")
    for column in ("step", "would be", "key", "why"):
        table.add_column(column, overflow="fold")
    for entry in plan:
        state = "[cyan]Cached[/]" if entry.cached else "[yellow]rebuilt[/]"
        table.add_row(entry.step, state, entry.key, "\n".join(entry.reasons) or "-")
    out.print(table)
