"""`itune server`, `deploy`, `trigger`, `runs` and `lineage`: operating itune on a Prefect server."""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from catalog.config import STEPS, ConfigError, load_config
from commands.base import (
    ConfigOption,
    RootOption,
    SetOption,
    app,
    colored,
    connect,
    err,
    fail,
    out,
    settings,
    short,
    step_mark,
    ui_link,
)
from commands.running import finish, run_pipeline


@app.command()
def server(
    host: Annotated[str, typer.Option(help="address to bind; anything but 127.0.0.1 exposes the API and UI")]
    = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port of the API and UI")] = 4200,
    database_url: Annotated[str | None, typer.Option(
        help="e.g. postgresql+asyncpg://user:pw@127.0.0.1:5432/prefect (default: SQLite in PREFECT_HOME)")] = None,
    ui_api_url: Annotated[str | None, typer.Option(
        help="the API URL browsers use, behind a proxy (default: http://HOST:PORT/api as bound)")] = None,
) -> None:
    """Start the Prefect server (API + UI) that deployments, workers and `itune trigger` share."""
    import shutil

    prefect = shutil.which("prefect", path=str(Path(sys.executable).parent)) or shutil.which("prefect")
    if prefect is None:
        fail("the `prefect` command is not installed in this environment")
    api = (ui_api_url or f"http://{browser_host(host)}:{port}/api").rstrip("/")
    os.execve(prefect, [prefect, "server", "start", "--host", host, "--port", str(port)],
              server_env(dict(os.environ), host, port, api, database_url))


def browser_host(host: str) -> str:
    """Give back the host name a browser reaches a server bound to `host` by (a wildcard means this machine)."""
    import socket

    if host in ("", "0.0.0.0", "::"):
        return socket.getfqdn()
    return f"[{host}]" if ":" in host else host


def server_env(env: dict[str, str], host: str, port: int, api: str, database_url: str | None) -> dict[str, str]:
    """Give back the server's environment: its UI talks to `api`, not to PREFECT_API_URL or the default port.

    Prefect's UI reads its API URL from PREFECT_SERVER_UI_API_URL, else from PREFECT_API_URL, else from
    PREFECT_SERVER_API_HOST/PORT; `prefect server start --port` sets none of them, so the UI of a server on
    any port but 4200 pointed at 4200 (or at whatever API the shell's profile names).
    """
    env.update(PREFECT_SERVER_UI_API_URL=api, PREFECT_UI_URL=api.removesuffix("/api"),
               PREFECT_SERVER_API_HOST=host, PREFECT_SERVER_API_PORT=str(port))
    if database_url:
        env["PREFECT_SERVER_DATABASE_CONNECTION_URL"] = database_url
    err.print(f"Prefect server on {api.removesuffix('/api')} (UI); in other shells: export PREFECT_API_URL={api}",
              highlight=False, soft_wrap=True)
    return env


@app.command()
def deploy(config: ConfigOption = None, set_: SetOption = None,
           pool_type: Annotated[str, typer.Option(help="type of work pools it creates")] = "process") -> None:
    """Create the work pools and deployments (nightly, on-demand, fine-tune on the gpu pool); safe to repeat."""
    try:
        cfg = load_config(config, set_ or [])
    except ConfigError as exc:
        fail(str(exc), 2)
    connect(needs_server=True)
    from deployments.deploy import deploy_all

    with contextlib.redirect_stdout(io.StringIO()):  # Prefect prints a table per deployment; one summary is enough
        done = deploy_all(cfg, pool_type=pool_type)
    table = Table(title=f"itune deployments · {os.environ['PREFECT_API_URL']}")
    for column in ("deployment", "work pool", "schedule"):
        table.add_column(column, no_wrap=True)
    for name in done["deployments"]:
        pool = done["gpu_pool"] if name.startswith("itune-finetune") else done["cpu_pool"]
        table.add_row(name, pool, done["schedule"] if name.endswith("/nightly") else "on demand")
    out.print(table)
    if done["pools_created"]:
        out.print(f"created work pools: {', '.join(done['pools_created'])}", highlight=False)
    out.print(f"start a worker per pool: `prefect worker start --pool {done['cpu_pool']}` and "
              f"`prefect worker start --pool {done['gpu_pool']}`", highlight=False, soft_wrap=True)


def _follow(flow_run_id: str, as_json: bool) -> dict[str, Any]:
    from commands.operate import watch

    shown: dict[str, str] = {}

    def show(state: str, steps: dict[str, str]) -> None:
        changed = [f"  {step:<9} {colored(now)}" for step, now in steps.items() if shown.get(step) != now]
        if shown.get("") != state:
            changed.append(f"flow run {colored(state)}")
        shown.update(steps)
        shown[""] = state
        if changed and not as_json:
            out.print("\n".join(changed), highlight=False)

    state, message = watch(flow_run_id, show)
    steps = {step: shown[step] for step in STEPS if step in shown}
    return {"flow_run_id": flow_run_id, "state": state, "steps": steps,
            **({"error": f"flow run {flow_run_id} ended {state}: {message}"} if state != "Completed" else {})}


@app.command()
def trigger(
    deployment: Annotated[str, typer.Argument(help="FLOW/DEPLOYMENT")] = "itune-pipeline/on-demand",
    set_: SetOption = None,
    until: Annotated[str | None, typer.Option(help="stop after this step")] = None,
    watch_: Annotated[bool, typer.Option("--watch", "-w", help="follow the run and exit with its outcome")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object last on stdout")] = False,
) -> None:
    """Run a deployment on its work pool with `--set key=value` overrides (a worker must be running)."""
    if until is not None and until not in STEPS:
        fail(f"--until must be one of {', '.join(STEPS)} (got '{until}')", 2)
    connect(needs_server=True)
    from commands.operate import OperateError
    from commands.operate import trigger as start_run

    try:
        flow_run_id, name = start_run(deployment, set_ or [], until)
    except OperateError as exc:
        fail(str(exc), 2)
    _report_started(f"started {deployment}", flow_run_id, name, watch_, as_json)


def _report_started(what: str, flow_run_id: str, name: str, watch: bool, as_json: bool) -> None:
    """Say a deployment run was created; with watch, follow it and exit with its outcome."""
    if not as_json:
        out.print(f"{what} as flow run '{name}' ({flow_run_id})\n  {ui_link(flow_run_id)}", highlight=False)
    result = _follow(flow_run_id, as_json) if watch else {"flow_run_id": flow_run_id, "state": "Scheduled"}
    if as_json:
        print(json.dumps(result))
    if result.get("error"):
        fail(result["error"])


@app.command()
def runs(limit: Annotated[int, typer.Option(help="how many of the newest runs")] = 10,
         as_json: Annotated[bool, typer.Option("--json", help="print JSON instead of a table")] = False) -> None:
    """List recent pipeline runs: state of each step (Completed/Cached/Failed) and headline metrics."""
    local_api = connect()
    from commands.operate import next_scheduled, recent_runs

    if local_api is not None:
        local_api.wait_ready()
    views = recent_runs(limit)
    if as_json:
        from dataclasses import asdict

        print(json.dumps([asdict(view) for view in views]))
        return
    upcoming = next_scheduled()
    if not views:
        out.print("no pipeline runs on this Prefect API yet: `itune run` or `itune trigger` starts one")
    else:
        from rich import box

        table = Table(title="itune pipeline runs, newest first", box=box.SIMPLE_HEAD, pad_edge=False)
        for column in ("run", "started", "by", "state", "steps", "exact", "loss", "s"):
            table.add_column(column, justify="right" if column in ("exact", "loss", "s") else "left", no_wrap=True)
        for view in views:
            marks = "".join(step_mark(view.steps.get(step, "")) for step in STEPS)
            table.add_row(view.id[:8], view.started[5:16], view.deployment or "cli", colored(view.state), marks,
                          short(view.metrics, "tuned_exact_match", "{:.1%}"),
                          short(view.metrics, "tuned_val_loss", "{:.3f}"),
                          f"{view.seconds:.0f}" if view.seconds is not None else "-")
        out.print(table)
        out.print(f"steps: {' '.join(STEPS)} · [green]✔[/] ran [cyan]↺[/] cached [red]✘[/] failed [dim]·[/] not "
                  "reached\n`itune rerun RUN` runs one again (the first characters of its id are enough)",
                  highlight=False)
    if upcoming:
        out.print(f"next scheduled: {upcoming[0]} at {upcoming[1]}", highlight=False)


@app.command("lineage")
def lineage_of(
    artifact: Annotated[str, typer.Argument(help="an artifact folder, 'champion', a model key, or STEP/KEY")],
    config: ConfigOption = None, set_: SetOption = None, root: RootOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the chain as JSON")] = False,
) -> None:
    """Print an artifact's chain back to its source files: each step's key, config and code version."""
    from rich.tree import Tree

    from catalog.lineage import lineage
    from commands.operate import OperateError, resolve_artifact

    cfg, registry = settings(config, set_, root)
    try:
        chain = lineage(resolve_artifact(artifact, registry.root))
    except OperateError as exc:
        fail(str(exc), 2)
    except (OSError, ValueError) as exc:
        fail(f"cannot read the lineage of '{artifact}': {exc}")
    if as_json:
        print(json.dumps(chain, default=str))
        return
    nodes: dict[str, Tree] = {}
    tree: Tree | None = None
    for link in chain:
        ok = {True: "[green]verified[/]", False: "[red]CORRUPT[/]", None: "[yellow]outside root[/]"}[link["verified"]]
        label = (f"[bold]{link['step']}[/] {link['key']}  rows {link['rows']}  code {str(link['code_version'])[:12]}"
                 f"  {str(link['created_at'])[:19]}  {ok}\n[dim]{link['uri']}[/]\n"
                 f"config {json.dumps(link['config'], sort_keys=True)}")
        for source in link.get("sources", []):
            label += f"\nsource {source['source']}: {source['rows_read']} rows read, {source['rows_kept']} kept"
        parent = next((nodes[uri] for uri in nodes if link["uri"] in _inputs_of(chain, uri)), None)
        node = parent.add(label) if parent is not None else Tree(label)
        tree = tree or node
        nodes.setdefault(link["uri"], node)
    out.print(tree, highlight=False)


def _inputs_of(chain: list[dict[str, Any]], uri: str) -> list[str]:
    return next((link["inputs"] for link in chain if link["uri"] == uri), [])


@app.command()
def rerun(
    run_id: Annotated[str, typer.Argument(metavar="RUN_ID", help="a pipeline flow run id (`itune runs`)")],
    watch_: Annotated[bool, typer.Option("--watch", "-w", help="deployment runs: follow to the end")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object last on stdout")] = False,
    debug: Annotated[bool, typer.Option(help="show full tracebacks")] = False,
) -> None:
    """Run a pipeline run again with its parameters: intact artifacts are Cached, fine-tune resumes."""
    started = time.perf_counter()
    local_api = connect()
    from commands.operate import OperateError, rerun_on_deployment, rerun_plan

    if local_api is not None:
        local_api.wait_ready()
    try:
        plan = rerun_plan(run_id)
        if plan["deployment"]:
            new_id, name = rerun_on_deployment(run_id, plan)
            _report_started(f"started {plan['deployment']} again", new_id, name, watch_, as_json)
            return
        from catalog.config import with_overrides

        params = plan["parameters"]
        cfg = with_overrides(params["config"], params.get("overrides") or [])
    except (OperateError, ConfigError) as exc:
        fail(str(exc), 2)
    if not as_json:
        out.print(f"running {run_id} ({plan['state']}) again here with its parameters", highlight=False)
    finish(run_pipeline(cfg, params.get("until") or "evaluate", debug), as_json, started)
