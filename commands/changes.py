"""`itune changes`: what changed in a pipeline run against the previous run, the champion, or another run."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.markdown import Markdown

from commands.base import ConfigOption, RootOption, SetOption, app, fail, out, settings
from toolkit.changes import ChangesError, compare, markdown


@app.command()
def changes(
    run: Annotated[str | None, typer.Argument(help="flow run id or evaluate key (a prefix will do); default: "
                                                   "the newest run in the registry")] = None,
    against: Annotated[str, typer.Option(help="previous (the run before it), champion (the champion it was "
                                              "judged against), or another run")] = "previous",
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object instead of the report")] = False,
    config: ConfigOption = None, set_: SetOption = None, root: RootOption = None,
) -> None:
    """Say what changed in a run: rows per source, quarantine, tokens, splits, config, code, metrics, decision."""
    _, registry = settings(config, set_, root)
    try:
        report = compare(registry.store.location, run, against)
    except ChangesError as exc:
        fail(str(exc))
    if as_json:
        print(json.dumps(report, default=str))
    else:
        out.print(Markdown(markdown(report)))
