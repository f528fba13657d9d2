"""The `itune` command line: run the pipeline and show what each step did."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # no network here: telemetry only logs errors
os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")

from flows.local_api import LocalPrefectAPI
from tasks.config import STEPS, ConfigError, PipelineConfig, load_config

app = typer.Typer(help="Instruction-tune GPT-2 as a cached, orchestrated Prefect pipeline.", no_args_is_help=True,
                  pretty_exceptions_enable=False, add_completion=False)
out = Console()
err = Console(stderr=True)


@app.callback()
def _main() -> None:
    """itune: ingest, clean, validate, template, tokenize, fine-tune and evaluate GPT-2 on instruction data."""


class _HideTracebacks(logging.Filter):
    """Keeps console logs to one line per event; the full traceback still reaches the Prefect API."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.exc_info = None
        record.exc_text = None
        record.stack_info = None
        return True


def _quiet_console_tracebacks() -> None:
    names = ["", "prefect", *[n for n in logging.root.manager.loggerDict if n.startswith("prefect")]]
    for name in names:
        for handler in logging.getLogger(name).handlers:
            if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
                handler.addFilter(_HideTracebacks())


def fail(message: str, code: int = 1) -> None:
    err.print(f"[bold red]itune:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def _check_api_reachable() -> None:
    """Fail fast with one line when PREFECT_API_URL names a server that does not answer."""
    url = os.environ.get("PREFECT_API_URL")
    if not url:
        return
    import httpx

    try:
        httpx.get(url.rstrip("/") + "/health", timeout=5).raise_for_status()
    except httpx.HTTPError as exc:
        fail(f"the Prefect API at {url} is unreachable ({type(exc).__name__}); start it with `prefect server "
             "start`, or unset PREFECT_API_URL to use a temporary local one")


def _task_runs(flow_run_id: Any) -> dict[str, Any]:
    """Give back the latest task run of each step in a flow run, by step name."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    by_step: dict[str, Any] = {}
    for run in sorted(runs, key=lambda r: r.created or 0):
        by_step[run.task_key.split("-")[0] if run.task_key else run.name.rsplit("-", 1)[0]] = run
    return {step: run for step, run in by_step.items() if step in STEPS}


def _seconds(run: Any) -> float:
    if run.start_time and run.end_time:
        return round((run.end_time - run.start_time).total_seconds(), 2)
    return round(run.total_run_time.total_seconds(), 2) if run.total_run_time else 0.0


def _summarise(state: Any, refs: dict[str, Any]) -> dict[str, Any]:
    runs = _task_runs(state.state_details.flow_run_id)
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
    manifest = json.loads((Path(ref.uri) / "manifest.json").read_text(encoding="utf-8"))
    return manifest.get("metrics", {})


def _print_summary(summary: dict[str, Any], wall: float) -> None:
    table = Table(title=f"itune pipeline · flow run {summary['flow_run_id']}")
    for column in ("step", "state", "rows", "seconds", "artifact"):
        table.add_column(column, justify="right" if column in ("rows", "seconds") else "left")
    colors = {"Completed": "green", "Cached": "cyan", "Failed": "red"}
    for step, info in summary["steps"].items():
        color = colors.get(info["state"], "yellow")
        table.add_row(step, f"[{color}]{info['state']}[/]", str(info["rows"] if info["rows"] is not None else "-"),
                      f"{info['seconds']:.2f}", info["artifact"] or "-")
    out.print(table)
    metrics = summary.get("metrics") or {}
    if metrics:
        results = Table(title="metrics (held-out)")
        for column in ("metric", "base", "tuned"):
            results.add_column(column, justify="left" if column == "metric" else "right")
        for name in ("val_loss", "val_perplexity", "test_loss", "test_perplexity", "exact_match"):
            if f"tuned_{name}" in metrics:
                results.add_row(name, f"{metrics[f'base_{name}']:.4f}", f"{metrics[f'tuned_{name}']:.4f}")
        out.print(results)
    out.print(f"wall time {wall:.1f} s")


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
    if until not in STEPS:
        fail(f"--until must be one of {', '.join(STEPS)} (got '{until}')", 2)
    try:
        cfg = load_config(config, set_ or [])
    except ConfigError as exc:
        fail(str(exc), 2)
    cfg.artifacts.root = str(Path(cfg.artifacts.root).expanduser().resolve())
    _check_api_reachable()
    summary = run_pipeline(cfg, until, debug)
    if as_json:
        sys.stdout.flush()
        print(json.dumps(summary, default=str))
    else:
        _print_summary(summary, time.perf_counter() - started)
    if summary.get("error"):
        fail(summary["error"])


def run_pipeline(cfg: PipelineConfig, until: str, debug: bool = False) -> dict[str, Any]:
    """Run the flow and give back the summary the CLI prints (steps, metrics, and an error line if any)."""
    # Start the local API early only if nothing configured Prefect yet (a test harness or profile may have).
    local_api = None if os.environ.get("PREFECT_API_URL") or "prefect" in sys.modules else LocalPrefectAPI()
    if local_api is not None:
        os.environ["PREFECT_API_URL"] = local_api.url  # before Prefect is imported: its settings read it once
    from flows.pipeline import pipeline

    if local_api is not None:
        local_api.wait_ready()

    if not debug:
        _quiet_console_tracebacks()
    state = pipeline(config=cfg.as_dict(), until=until, return_state=True)
    result = state.result(raise_on_failure=False)
    refs = result if isinstance(result, dict) else {}
    summary = _summarise(state, refs)
    summary["metrics"] = _metrics(refs)
    if state.is_failed() or isinstance(result, BaseException):
        failed = [step for step, info in summary["steps"].items() if info["state"] in ("Failed", "Crashed")]
        step = failed[0] if failed else "pipeline"
        cause = str(result).strip().splitlines()[0] if result else (state.message or "unknown error")
        summary["error"] = f"step '{step}' failed: {type(result).__name__ if result else ''}: {cause}"
        if debug and isinstance(result, BaseException):
            import traceback

            traceback.print_exception(result)
    return summary


def main() -> None:  # pragma: no cover - console script indirection for `python -m flows.cli`
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
