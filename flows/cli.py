"""The `itune` command line: run the pipeline and show what each step did."""

from __future__ import annotations

import contextlib
import io
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
from tasks.artifacts import absolute_root
from tasks.config import STEPS, ConfigError, PipelineConfig, load_config
from tasks.registry import METRIC_LABELS, Registry, RegistryError, model_and_template

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


def configured_api_url() -> str | None:
    """Give back the Prefect API URL the user configured (environment, else the active profile), if any.

    Read without importing Prefect (2.6 s here), so a command that needs no server starts fast.
    """
    if os.environ.get("PREFECT_API_URL"):
        return os.environ["PREFECT_API_URL"]
    import tomllib

    home = Path(os.environ.get("PREFECT_HOME", "~/.prefect")).expanduser()
    profiles = Path(os.environ.get("PREFECT_PROFILES_PATH", home / "profiles.toml")).expanduser()
    try:
        data = tomllib.loads(profiles.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError):
        return None
    active = os.environ.get("PREFECT_PROFILE") or data.get("active", "ephemeral")
    return (data.get("profiles", {}).get(active) or {}).get("PREFECT_API_URL") or None


def _check_api_reachable(url: str) -> None:
    """Fail fast with one line when the configured Prefect API does not answer."""
    import httpx

    try:
        httpx.get(url.rstrip("/") + "/health", timeout=5).raise_for_status()
    except httpx.HTTPError as exc:
        fail(f"the Prefect API at {url} is unreachable ({type(exc).__name__}); start it with `itune server` "
             "(or `prefect server start`), or unset PREFECT_API_URL to use a temporary local one")


def connect(needs_server: bool = False) -> LocalPrefectAPI | None:
    """Point this process at a Prefect API: the configured server, or (unless a real server is needed) a
    temporary local API on the profile's database, started now and waited for later."""
    url = configured_api_url()
    if url:
        os.environ["PREFECT_API_URL"] = url
        _check_api_reachable(url)
        return None
    if "prefect" in sys.modules:  # already configured in-process (a test harness, or an embedding program)
        return None
    if needs_server:
        fail("this command needs a running Prefect server that workers also reach: start one with `itune server`, "
             "then `export PREFECT_API_URL=http://127.0.0.1:4200/api`")
    local_api = LocalPrefectAPI()
    os.environ["PREFECT_API_URL"] = local_api.url  # before Prefect is imported: its settings read it once
    return local_api


def _task_runs(flow_run_id: Any) -> dict[str, Any]:
    """Give back the latest task run of each step in a flow run, by step name."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    # Task states reach the API as events that may land just after the flow returns: wait briefly for them.
    deadline = time.monotonic() + 10
    with get_client(sync_client=True) as client:
        while True:
            runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
            if time.monotonic() > deadline or all(run.state and run.state.is_final() for run in runs):
                break
            time.sleep(0.2)
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
    manifest = ref.manifest()
    return manifest.get("metrics", {})


def _print_summary(summary: dict[str, Any], wall: float, title: str | None = None) -> None:
    if summary["steps"]:
        _print_steps(summary)
    metrics = summary.get("metrics") or {}
    if metrics:
        results = Table(title=title or "metrics (held-out)")
        for column in ("metric", "base", "tuned"):
            results.add_column(column, justify="left" if column == "metric" else "right")
        for name, label in METRIC_LABELS:
            if f"tuned_{name}" in metrics and f"base_{name}" in metrics:
                results.add_row(label, f"{metrics[f'base_{name}']:.4f}", f"{metrics[f'tuned_{name}']:.4f}")
        out.print(results)
    if summary.get("promotion"):
        _print_decision(summary["promotion"])
    if wall:
        out.print(f"wall time {wall:.1f} s")


def _print_steps(summary: dict[str, Any]) -> None:
    table = Table(title=f"itune pipeline · flow run {summary['flow_run_id']}")
    for column in ("step", "state", "rows", "seconds", "artifact"):
        table.add_column(column, justify="right" if column in ("rows", "seconds") else "left")
    colors = {"Completed": "green", "Cached": "cyan", "Failed": "red"}
    for step, info in summary["steps"].items():
        color = colors.get(info["state"], "yellow")
        table.add_row(step, f"[{color}]{info['state']}[/]", str(info["rows"] if info["rows"] is not None else "-"),
                      f"{info['seconds']:.2f}", info["artifact"] or "-")
    out.print(table)


def _print_decision(decision: dict[str, Any]) -> None:
    verdict = "[green]promoted to champion[/]" if decision["promoted"] else "[yellow]not promoted[/]"
    out.print(f"promotion: model {decision['candidate']} {verdict} ({decision['how']}); "
              f"champion: {decision['champion']}", highlight=False)
    for reason in decision["reasons"]:
        out.print(f"  - {reason}", highlight=False)


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
    cfg.artifacts.root = absolute_root(cfg.artifacts.root)
    _finish(run_pipeline(cfg, until, debug), as_json, started)


def _finish(summary: dict[str, Any], as_json: bool, started: float) -> None:
    if as_json:
        sys.stdout.flush()
        print(json.dumps(summary, default=str))
    else:
        _print_summary(summary, time.perf_counter() - started)
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
        _quiet_console_tracebacks()
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


ConfigOption = Annotated[Path | None, typer.Option("--config", "-c", help="YAML config (default: the quickstart)")]
SetOption = Annotated[list[str] | None, typer.Option("--set", "-s", help="override a key: eval.max_new_tokens=64")]
RootOption = Annotated[str | None, typer.Option("--root", help="artifact root, a folder or an fsspec URL "
                                                                "(default: the config's artifacts.root)")]
ModelOption = Annotated[str, typer.Option("--model", "-m", help="champion, a registered model key, or a model folder")]
TemplateOption = Annotated[str | None, typer.Option(help="prompt template if the model's lineage does not record one")]


def _settings(config: Path | None, set_: list[str] | None, root: str | None) -> tuple[PipelineConfig, Registry]:
    try:
        cfg = load_config(config, set_ or [])
    except ConfigError as exc:
        fail(str(exc), 2)
    return cfg, Registry(root or cfg.artifacts.root)


def _figure(metrics: dict[str, Any], name: str) -> str:
    value = metrics.get(name)
    return f"{value:.4f}" if isinstance(value, int | float) else "-"


@app.command()
def models(config: ConfigOption = None, set_: SetOption = None, root: RootOption = None) -> None:
    """List the evaluated models (candidates) and the champion, with their metrics."""
    cfg, registry = _settings(config, set_, root)
    try:
        data = registry.load()
    except RegistryError as exc:
        fail(str(exc))
    if not data["candidates"]:
        out.print(f"no evaluated models under {registry.root} yet: `itune run` evaluates one", highlight=False)
        return
    champion = (data["champion"] or {}).get("model_key")
    shown = {"tuned_exact_match": "exact match", "tuned_rouge_l": "ROUGE-L", "tuned_val_loss": "val loss"}
    if cfg.promote.primary_metric not in shown:
        shown = {cfg.promote.primary_metric: cfg.promote.primary_metric, **shown}
    table = Table(title=f"models · {registry.file}")
    table.add_column("")
    table.add_column("model", no_wrap=True)
    table.add_column("evaluated")
    for label in shown.values():
        table.add_column(label, justify="right")
    table.add_column("last decision")
    for key, entry in sorted(data["candidates"].items(), key=lambda item: item[1].get("evaluated_at", "")):
        metrics, last = entry.get("metrics", {}), entry.get("last_decision") or {}
        verdict = ("promoted" if last.get("promoted") else "kept out") + f" ({last.get('how', '-')})" if last else "-"
        table.add_row("[bold green]★[/]" if key == champion else "", key,
                      entry.get("evaluated_at", "-")[:16].replace("T", " "),
                      *(_figure(metrics, name) for name in shown), verdict)
    out.print(table)
    if champion:
        out.print(f"★ champion: {champion} ({data['champion']['how']}) at {data['champion']['model_uri']}",
                  highlight=False)


@app.command("promote")
def promote_model(
    model: Annotated[str, typer.Argument(help="a registered model key (or its prefix) or its artifact folder")],
    reason: Annotated[str, typer.Option(help="why, kept in the registry history")] = "",
    config: ConfigOption = None, set_: SetOption = None, root: RootOption = None,
) -> None:
    """Make a model the champion whatever its metrics (recorded as a manual promotion)."""
    _, registry = _settings(config, set_, root)
    try:
        decision = registry.promote_manual(model, reason)
    except RegistryError as exc:
        fail(str(exc))
    _print_decision(decision)


def _find_evaluation(registry: Registry, spec: str | None) -> tuple[Path, dict[str, Any] | None]:
    """Give back (an intact evaluate artifact folder, the registry decision taken on it) for RUN."""
    from tasks.artifacts import ArtifactStore

    history = registry.load()["history"]
    store = ArtifactStore(registry.root)
    by_run = [e for e in history if spec is not None and e.get("flow_run_id") == spec]
    if spec is None and history:
        key = history[-1]["evaluate_key"]
    elif spec is None:  # evaluated before the registry existed: the newest intact evaluation
        built = [(m["created_at"], m["key"]) for folder in (registry.root / "evaluate").glob("[!.]*")
                 if (m := store.manifest("evaluate", folder.name))]
        key = max(built)[1] if built else fail(f"no evaluation under {registry.root} yet: `itune run` makes one")
    elif by_run:
        key = by_run[-1]["evaluate_key"]
    elif Path(spec).expanduser().is_dir():
        folder = Path(spec).expanduser().resolve()
        store, key = ArtifactStore(folder.parent.parent), folder.name
    else:
        keys = [k.name for k in (registry.root / "evaluate").glob(f"{spec}*")]
        if len(keys) != 1:
            fail(f"'{spec}' is neither a flow run recorded in {registry.file} nor an evaluate artifact key or folder")
        key = keys[0]
    if store.manifest("evaluate", key) is None:
        fail(f"the evaluate artifact {store.path('evaluate', key)} is missing or corrupt; `itune run` rebuilds it")
    decision = by_run[-1] if by_run else next((e for e in reversed(history) if e.get("evaluate_key") == key), None)
    return store.path("evaluate", key), decision


@app.command()
def report(
    run_: Annotated[str | None, typer.Argument(metavar="[RUN]", help="a flow run id, or an evaluate artifact key or "
                                                                    "folder (default: the latest evaluation)")] = None,
    config: ConfigOption = None, set_: SetOption = None, root: RootOption = None,
) -> None:
    """Print an evaluation's summary: metrics, per-category scores, sample generations, promotion."""
    import pandas as pd

    cfg, registry = _settings(config, set_, root)
    folder, decision = _find_evaluation(registry, run_)
    metrics = json.loads((folder / "metrics.json").read_text(encoding="utf-8"))
    _print_summary({"flow_run_id": decision.get("flow_run_id") if decision else "-", "steps": {}, "metrics": metrics,
                    "promotion": decision}, 0.0, title=f"evaluation {folder.name} ({metrics['examples']} examples)")
    categories = Table(title="per category")
    for column in ("category", "scoring", "examples", "base", "tuned"):
        categories.add_column(column, justify="left" if column in ("category", "scoring") else "right")
    for category, row in metrics["per_category"].items():
        categories.add_row(category or "(none)", row["scoring"], str(row["examples"]), f"{row['base']:.3f}",
                           f"{row['tuned']:.3f}")
    out.print(categories)
    samples = Table(title="sample generations", show_lines=True)
    for column in ("instruction", "input", "reference", "base", "tuned"):
        samples.add_column(column, overflow="fold")
    frame = pd.read_parquet(folder / "samples.parquet").head(cfg.eval.report_samples)
    for row in frame.itertuples():
        samples.add_row(*(str(v).strip() for v in (row.instruction, row.input, row.response, row.base_output,
                                                    row.tuned_output)))
    out.print(samples)
    out.print(f"report {folder / 'report.md'}\nloss curve {folder / 'loss_curve.png'}", highlight=False)


def _responder(cfg: PipelineConfig, registry: Registry, model: str, template: str | None):
    """Give back (reply(instruction, input) -> text, description) for a model, prompted as in its training."""
    try:
        model_dir, trained_with = model_and_template(registry.model_folder(model))
    except RegistryError as exc:
        fail(str(exc))
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from tasks.config import TemplateConfig
    from tasks.evaluate import generate_answers
    from tasks.template import render_chat, render_prompt, template_parts

    hf_logging.set_verbosity_error()  # the terminal shows the answer, not loader progress bars and hints
    hf_logging.disable_progress_bar()
    if trained_with and template and template != trained_with["name"]:
        err.print(f"note: {model_dir} was trained with the '{trained_with['name']}' template; using it",
                  highlight=False)
    try:
        chosen = TemplateConfig(**(trained_with or {"name": template or "paper"}))
    except ValueError as exc:
        fail(f"template: {str(exc).splitlines()[-1].strip()}", 2)
    name = chosen.name
    network = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True)
    budget = network.config.n_positions - cfg.eval.max_new_tokens

    def reply(instruction: str, input_text: str = "") -> str:
        prompt = render_chat("", instruction, input_text) if name == "chat" else \
            render_prompt(name, instruction, input_text, parts=template_parts(chosen))
        return generate_answers(network, [prompt], cfg.eval, budget)[0].strip()

    return reply, f"{model_dir} (template '{name}')"


@app.command()
def generate(
    instruction: Annotated[str, typer.Argument(help="what the model should do")],
    input_: Annotated[str, typer.Option("--input", "-i", help="the input the instruction works on")] = "",
    model: ModelOption = "champion", template: TemplateOption = None,
    config: ConfigOption = None, set_: SetOption = None, root: RootOption = None,
) -> None:
    """Print a model's response to one instruction (generation settings from the eval config)."""
    cfg, registry = _settings(config, set_, root)
    reply, _ = _responder(cfg, registry, model, template)
    print(reply(instruction, input_))


@app.command()
def chat(model: ModelOption = "champion", template: TemplateOption = None, config: ConfigOption = None,
         set_: SetOption = None, root: RootOption = None) -> None:
    """Talk to a model: one instruction per line (`instruction || input` to add an input); empty line ends."""
    cfg, registry = _settings(config, set_, root)
    reply, description = _responder(cfg, registry, model, template)
    out.print(f"chatting with {description}; an empty line or Ctrl-D ends", highlight=False)
    while True:
        sys.stdout.write("you> ")
        sys.stdout.flush()
        line = sys.stdin.readline()
        if not line.strip() or line.strip() in ("exit", "quit"):
            break
        instruction, _, input_text = line.strip().partition(" || ")
        print(f"model> {reply(instruction.strip(), input_text.strip())}", flush=True)


STATE_COLORS = {"Completed": "green", "Cached": "cyan", "Failed": "red", "Crashed": "red", "Running": "yellow"}


def _short(metrics: dict[str, Any], name: str, form: str) -> str:
    return form.format(metrics[name]) if isinstance(metrics.get(name), int | float) else "-"


_STEP_MARKS = {"Completed": "[green]✔[/]", "Cached": "[cyan]↺[/]", "Failed": "[red]✘[/]", "Crashed": "[red]✘[/]",
               "Running": "[yellow]▶[/]", "": "[dim]·[/]"}


def _colored(state: str) -> str:
    return f"[{STATE_COLORS.get(state, 'white')}]{state}[/]"


def _ui_link(flow_run_id: str) -> str:
    return f"{os.environ['PREFECT_API_URL'].rstrip('/').removesuffix('/api')}/runs/flow-run/{flow_run_id}"


@app.command()
def server(
    host: Annotated[str, typer.Option(help="address to bind; anything but 127.0.0.1 exposes the API and UI")]
    = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port of the API and UI")] = 4200,
    database_url: Annotated[str | None, typer.Option(
        help="e.g. postgresql+asyncpg://user:pw@127.0.0.1:5432/prefect (default: SQLite in PREFECT_HOME)")] = None,
) -> None:
    """Start the Prefect server (API + UI) that deployments, workers and `itune trigger` share."""
    import shutil

    env = dict(os.environ)
    if database_url:
        env["PREFECT_SERVER_DATABASE_CONNECTION_URL"] = database_url
    prefect = shutil.which("prefect", path=str(Path(sys.executable).parent)) or shutil.which("prefect")
    if prefect is None:
        fail("the `prefect` command is not installed in this environment")
    err.print(f"Prefect server on http://{host}:{port} (UI); in other shells: "
              f"export PREFECT_API_URL=http://{host}:{port}/api", highlight=False)
    os.execve(prefect, [prefect, "server", "start", "--host", host, "--port", str(port)], env)


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
    from flows.operate import watch

    shown: dict[str, str] = {}

    def show(state: str, steps: dict[str, str]) -> None:
        changed = [f"  {step:<9} {_colored(now)}" for step, now in steps.items() if shown.get(step) != now]
        if shown.get("") != state:
            changed.append(f"flow run {_colored(state)}")
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
    from flows.operate import OperateError
    from flows.operate import trigger as start_run

    try:
        flow_run_id, name = start_run(deployment, set_ or [], until)
    except OperateError as exc:
        fail(str(exc), 2)
    _report_started(f"started {deployment}", flow_run_id, name, watch_, as_json)


def _report_started(what: str, flow_run_id: str, name: str, watch: bool, as_json: bool) -> None:
    """Say a deployment run was created; with watch, follow it and exit with its outcome."""
    if not as_json:
        out.print(f"{what} as flow run '{name}' ({flow_run_id})\n  {_ui_link(flow_run_id)}", highlight=False)
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
    from flows.operate import next_scheduled, recent_runs

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
            marks = "".join(_STEP_MARKS.get(view.steps.get(step, ""), "[yellow]?[/]") for step in STEPS)
            table.add_row(view.id[:8], view.started[5:16], view.deployment or "cli", _colored(view.state), marks,
                          _short(view.metrics, "tuned_exact_match", "{:.1%}"),
                          _short(view.metrics, "tuned_val_loss", "{:.3f}"),
                          f"{view.seconds:.0f}" if view.seconds is not None else "-")
        out.print(table)
        out.print(f"steps: {' '.join(STEPS)} · [green]✔[/] ran [cyan]↺[/] cached [red]✘[/] failed [dim]·[/] not "
                  "reached\n`itune rerun RUN` runs one again (the first characters of its id are enough)",
                  highlight=False)
    if upcoming:
        out.print(f"next scheduled: {upcoming[0]} at {upcoming[1]}", highlight=False)


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
    from flows.operate import OperateError, rerun_on_deployment, rerun_plan

    if local_api is not None:
        local_api.wait_ready()
    try:
        plan = rerun_plan(run_id)
        if plan["deployment"]:
            new_id, name = rerun_on_deployment(run_id, plan)
            _report_started(f"started {plan['deployment']} again", new_id, name, watch_, as_json)
            return
        from tasks.config import with_overrides

        params = plan["parameters"]
        cfg = with_overrides(params["config"], params.get("overrides") or [])
    except (OperateError, ConfigError) as exc:
        fail(str(exc), 2)
    if not as_json:
        out.print(f"running {run_id} ({plan['state']}) again here with its parameters", highlight=False)
    _finish(run_pipeline(cfg, params.get("until") or "evaluate", debug), as_json, started)


@app.command("lineage")
def lineage_of(
    artifact: Annotated[str, typer.Argument(help="an artifact folder, 'champion', a model key, or STEP/KEY")],
    config: ConfigOption = None, set_: SetOption = None, root: RootOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the chain as JSON")] = False,
) -> None:
    """Print an artifact's chain back to its source files: each step's key, config and code version."""
    from rich.tree import Tree

    from flows.operate import OperateError, lineage, resolve_artifact

    cfg, registry = _settings(config, set_, root)
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


def main() -> None:  # pragma: no cover - console script indirection for `python -m flows.cli`
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
