"""The `itune-lineage` UI artifact: a run's model back to its source files, one page with a link per hop.

Each hop names its artifact (short key, rows, config, code version), the flow run that built it and the
step's own `itune-<step>` artifact; the page ends with the source files and their sha256. A run publishes it
whether its steps ran or were Cached, so any run's page is two clicks from the data its model came from.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from catalog import layout
from catalog.caching import LINEAGE_KEY, artifact_link, run_link
from catalog.config import STEPS
from catalog.keys import flatten
from catalog.lineage import lineage
from catalog.store import ArtifactRef, sha256_file
from tasks.ingest import BUILTIN, source_fingerprint
from toolkit.builtin_tasks import GENERATOR_VERSION
from toolkit.readers import HUB, IngestError, resolve_files

CONFIG_CHARS = 300


def config_summary(config: dict[str, Any] | None) -> str:
    """Give back a step's config as `a.b=value` pairs on one line, cut at CONFIG_CHARS characters."""
    pairs = [f"{name}={value if isinstance(value, str) else json.dumps(value, default=str)}"
             for name, value in flatten(config).items()] if config else []
    text = ", ".join(pairs) or "(none)"
    return text if len(text) <= CONFIG_CHARS else text[:CONFIG_CHARS - 1] + "…"


def _source_lines(source: str, counts: dict[str, Any]) -> list[str]:
    read = f" · {counts['rows_read']} rows read, {counts['rows_kept']} kept" if counts else ""
    if source == BUILTIN:
        return [f"- `{source}`: the built-in generator, version `{GENERATOR_VERSION}`{read}"]
    if source.startswith(HUB) and not Path(source[len(HUB):]).expanduser().exists():
        name = source[len(HUB):]
        return [f"- [`{source}`](https://huggingface.co/datasets/{name}) (Hugging Face Hub dataset){read}"]
    local = Path(source[len(HUB):] if source.startswith(HUB) else source).expanduser()
    try:
        files = sorted(p for p in local.rglob("*") if p.is_file()) if local.is_dir() and source.startswith(HUB) \
            else resolve_files(source)
    except IngestError as exc:
        return [f"- `{source}`: not readable now ({exc}){read}"]
    return [f"- `{source}`{read}"] + [f"  - `{file}` sha256 `{sha256_file(file)}`" for file in files]


def sources_markdown(ingest: dict[str, Any]) -> list[str]:
    """Give back the markdown lines of an ingest artifact's source files, and whether they are unchanged."""
    config = ingest.get("config") or {}
    specs = [spec["source"] for spec in config.get("sources") or []] or [config.get("source", BUILTIN)]
    counts = {entry["source"]: entry for entry in ingest.get("sources") or []}
    lines = ["## Source files", ""]
    for source in specs:
        lines += _source_lines(source, counts.get(source, {}))
    recorded = ingest.get("source_fingerprint")
    if recorded:
        same = source_fingerprint(config) == recorded
        lines += ["", f"Source fingerprint `{recorded[:16]}` recorded by ingest: "
                  + ("the sources above still match it." if same else
                     "**the sources changed since** (the hashes above are today's, not what was ingested).")]
    return lines


def _hop(number: int, link: dict[str, Any], flow_run_id: str | None) -> list[str]:
    built = (link.get("built_by") or {}).get("flow_run_id")
    by = "built outside a Prefect run" if not built else \
        f"built by this run ({run_link(built)})" if built == flow_run_id else \
        f"reused, built by run {run_link(built)}"
    return [f"### {number}. {artifact_link(link['step'], link['key'], flow_run_id)} · {link['rows']} rows", "",
            f"- {by}",
            f"- config: {config_summary(link.get('config'))}",
            f"- code version `{str(link.get('code_version'))[:12]}`",
            f"- location `{link['uri']}`" + ("" if link["verified"] else " (**failed verification**)"), ""]


def lineage_markdown(last: ArtifactRef, flow_run_id: str | None, evaluated: ArtifactRef | None = None) -> str:
    """Give back the lineage page of a run's last artifact (its model when it has one), nearest hop first."""
    chain = sorted(lineage(last.path), key=lambda link: -STEPS.index(link["step"]))
    what = "model" if last.step == "finetune" else f"{last.step} artifact"
    lines = [f"# Lineage of {what} {last.step}/{last.key}", "",
             f"{what.capitalize()} `{last.uri}`, {last.rows} rows"
             + (f", evaluated in {artifact_link('evaluate', evaluated.key, flow_run_id)}" if evaluated else "")
             + (f"; this run: {run_link(flow_run_id)}" if flow_run_id else "") + ".", "",
             " → ".join([what, *(link["step"] for link in chain), "source files"]), ""]
    for number, link in enumerate(chain, start=1):
        lines += _hop(number, link, flow_run_id)
    ingest = next((link for link in chain if link["step"] == "ingest"), None)
    if ingest is not None:
        lines += sources_markdown(layout.read_manifest(Path(ingest["uri"])))
    return "\n".join(lines) + "\n"


def publish_lineage(done: dict[str, ArtifactRef]) -> Any:
    """Publish the run's `itune-lineage` markdown artifact: its model (or last artifact) back to the sources."""
    from prefect.artifacts import create_markdown_artifact
    from prefect.runtime import flow_run

    last = done.get("finetune") or done[next(step for step in reversed(STEPS) if step in done)]
    markdown = lineage_markdown(last, flow_run.id, done.get("evaluate") if last.step == "finetune" else None)
    return create_markdown_artifact(markdown, key=LINEAGE_KEY,
                                    description=f"lineage of {last.step}/{last.key[:8]} back to its source files")
