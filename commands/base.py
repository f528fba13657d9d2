"""What every `itune` command shares: the Typer app, console output, one-line failures, the Prefect API."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # no network here: telemetry only logs errors
os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")

from catalog.config import ConfigError, PipelineConfig, load_config
from commands.local_api import LocalPrefectAPI
from toolkit.registry import Registry

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


def quiet_console_tracebacks() -> None:
    names = ["", "prefect", *[n for n in logging.root.manager.loggerDict if n.startswith("prefect")]]
    for name in names:
        for handler in logging.getLogger(name).handlers:
            if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
                handler.addFilter(_HideTracebacks())


def fail(message: str, code: int = 1) -> None:
    from rich.markup import escape

    # the message may quote library text with brackets ("[/pytorch/.../pair.cc:537]"): never markup
    err.print(f"[bold red]itune:[/] {escape(message)}", highlight=False, soft_wrap=True)
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


ConfigOption = Annotated[Path | None, typer.Option("--config", "-c", help="YAML config (default: the quickstart)")]


SetOption = Annotated[list[str] | None, typer.Option("--set", "-s", help="override a key: eval.max_new_tokens=64")]


RootOption = Annotated[str | None, typer.Option("--root", help="artifact root, a folder or an fsspec URL "
                                                                "(default: the config's artifacts.root)")]


ModelOption = Annotated[str, typer.Option("--model", "-m", help="champion, a registered model key, or a model folder")]


TemplateOption = Annotated[str | None, typer.Option(help="prompt template if the model's lineage does not record one")]


def settings(config: Path | None, set_: list[str] | None, root: str | None) -> tuple[PipelineConfig, Registry]:
    try:
        cfg = load_config(config, set_ or [])
    except ConfigError as exc:
        fail(str(exc), 2)
    return cfg, Registry(root or cfg.artifacts.root)


STATE_COLORS = {"Completed": "green", "Cached": "cyan", "Failed": "red", "Crashed": "red", "Running": "yellow"}


_STATE_MARKS = {"Completed": "✔", "Cached": "↺", "Failed": "✘", "Crashed": "✘", "Running": "▶"}


def step_mark(state: str) -> str:
    """Give back a one-character coloured mark of a step's state ("" for a step the run did not reach)."""
    if not state:
        return "[dim]·[/]"
    return f"[{STATE_COLORS.get(state, 'yellow')}]{_STATE_MARKS.get(state, '?')}[/]"


def colored(state: str) -> str:
    return f"[{STATE_COLORS.get(state, 'white')}]{state}[/]"


def ui_link(flow_run_id: str) -> str:
    return f"{os.environ['PREFECT_API_URL'].rstrip('/').removesuffix('/api')}/runs/flow-run/{flow_run_id}"


def figure(metrics: dict[str, Any], name: str) -> str:
    value = metrics.get(name)
    return f"{value:.4f}" if isinstance(value, int | float) else "-"


def short(metrics: dict[str, Any], name: str, form: str) -> str:
    return form.format(metrics[name]) if isinstance(metrics.get(name), int | float) else "-"


def print_decision(decision: dict[str, Any]) -> None:
    verdict = "[green]promoted to champion[/]" if decision["promoted"] else "[yellow]not promoted[/]"
    out.print(f"promotion: model {decision['candidate']} {verdict} ({decision['how']}); "
              f"champion: {decision['champion']}", highlight=False)
    for reason in decision["reasons"]:
        out.print(f"  - {reason}", highlight=False)
