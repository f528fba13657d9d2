"""Step 1, ingest: read a source into the canonical schema, quarantining rows that cannot be read.

Canonical schema: id, instruction, input, response, source, category, messages (JSON text, multi-turn
only). Formats: Alpaca, Dolly, Self-Instruct (`instances`), prompt/completion, ShareGPT, OpenAI
messages, or an explicit column mapping. Containers: .jsonl/.json/.csv/.parquet (optionally .gz), a
folder or a glob of them, a dataset through `datasets` (`hf:<Hub id or local data folder>`, or a folder
written by `save_to_disk`), and the built-in generator `builtin:tasks`. Several sources can be mixed,
each with a row cap and a weight (the share of its rows kept, chosen by id hash so it is stable).

A source that cannot be read at all is one IngestError line naming the file (and line or column);
a record that cannot become a row goes to quarantine with file, row, field, a code and a reason.
Reading files is toolkit/readers.py's job, mapping formats to the canonical row toolkit/formats.py's;
this step mixes the sources, gives each row its id and writes the artifact.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
from prefect import task

from catalog import layout
from catalog.caching import finish_step, step_task_options
from catalog.keys import canonical_json, sha256_text
from catalog.parquet_writer import DataParts
from catalog.sections import DataConfig, SourceSpec
from catalog.step import Step
from catalog.store import ArtifactRef, sha256_file
from toolkit import builtin_tasks
from toolkit.formats import canonical_rows
from toolkit.readers import HUB, IngestError, is_saved_dataset, read_records, record_streams, resolve_files
from toolkit.source_files import EarlierRows, SourceFiles

CANONICAL_COLUMNS = ["id", "instruction", "input", "response", "source", "category", "messages"]
DATA_SCHEMA = pa.schema([(column, pa.string()) for column in CANONICAL_COLUMNS])
QUARANTINE_COLUMNS = ["file", "row", "field", "code", "reason", "raw"]
BUILTIN = "builtin:tasks"


def row_id(instruction: str, input_text: str, response: str) -> str:
    """Give back a stable id from a row's content: equal content, equal id, on any machine."""
    return sha256_text(canonical_json([instruction, input_text, response]))[:16]


# ---------------------------------------------------------------- the work function


def _source_specs(config: DataConfig) -> list[SourceSpec]:
    return config.sources or [SourceSpec(source=config.source)]


def _ingest_batches(config: DataConfig, quarantine: list[dict[str, Any]], per_source: list[dict[str, Any]],
                    batch_rows: int = 10_000, files: SourceFiles | None = None
                    ) -> Iterator[pa.RecordBatch | pa.Table | EarlierRows]:
    """Yield the canonical rows in Arrow batches, source after source; fill `quarantine` and `per_source`.

    Rows stream from the files to the batches: memory holds one batch (or one file), not the data set. A source
    of files taking every row goes file by file through `files`, which names an unchanged file's rows in the
    earlier artifact (EarlierRows) instead of reading them.
    """
    remaining = config.max_rows
    for number, spec in enumerate(_source_specs(config)):
        if files is not None and _takes_whole_files(spec, config):
            read = 0
            def reader(label: str, _: int, rejected: list[dict[str, Any]], spec: SourceSpec = spec) -> pa.Table:
                return file_rows(label, spec, config, rejected)
            # not cut into batches here: a file read is in memory already, and DataParts cuts its parts
            for rows in files.tables(number, spec.source, reader, quarantine):
                read += rows.num_rows
                yield rows
            per_source.append({"source": spec.source, "rows_read": read, "rows_kept": read})
            continue
        read = kept = 0
        rows = _spec_rows(spec, config, quarantine)
        while batch := list(itertools.islice(rows, batch_rows)):
            read += len(batch)
            chosen = list(zip(_ids(batch), batch, strict=True))
            if spec.weight < 1:
                chosen = [(i, row) for i, row in chosen if _unit_hash(i) < spec.weight]
            if spec.max_rows is not None:
                chosen = chosen[:max(spec.max_rows - kept, 0)]
            kept += len(chosen)
            if remaining is not None:
                chosen = chosen[:max(remaining, 0)]
                remaining -= len(chosen)
            if chosen:
                if files is not None:
                    files.rows_before += len(chosen)
                yield _record_batch([i for i, _ in chosen], [row for _, row in chosen])
        per_source.append({"source": spec.source, "rows_read": read, "rows_kept": kept})


def _takes_whole_files(spec: SourceSpec, config: DataConfig) -> bool:
    """Whether a source is files whose every row is kept: then each file's rows can be reused while it is unchanged."""
    local = Path(spec.source).expanduser()
    return (spec.source != BUILTIN and not spec.source.startswith(HUB) and not is_saved_dataset(local)
            and spec.weight >= 1 and spec.max_rows is None and config.max_rows is None)


def _ids(rows: list[dict[str, str]]) -> list[str]:
    return [row_id(row["instruction"], row["input"], row["response"]) for row in rows]


def _record_batch(ids: list[str], rows: list[dict[str, str]]) -> pa.RecordBatch:
    return pa.RecordBatch.from_pydict(
        {"id": ids, **{c: [str(row.get(c) or "") for row in rows] for c in CANONICAL_COLUMNS[1:]}},
        schema=DATA_SCHEMA)


def file_rows(label: str, spec: SourceSpec, config: DataConfig, quarantine: list[dict[str, Any]]) -> pa.Table:
    """Give back the canonical rows of one file of a source as a table, appending its bad records to `quarantine`."""
    fmt = spec.format or config.format
    rows = list(canonical_rows(label, read_records(Path(label)), None if fmt == "auto" else fmt,
                               config.columns if spec.columns is None else spec.columns, config.max_record_chars,
                               quarantine))
    return pa.Table.from_batches([_record_batch(_ids(rows), rows)])


def _spec_rows(spec: SourceSpec, config: DataConfig, quarantine: list[dict[str, Any]]) -> Iterator[dict[str, str]]:
    if spec.source == BUILTIN:
        for number, example in enumerate(builtin_tasks.generate(config.builtin_examples, config.seed), start=1):
            yield {**example, "source": f"{BUILTIN}:{number}", "messages": ""}
        return
    fmt = spec.format or config.format
    columns = config.columns if spec.columns is None else spec.columns
    for label, records in record_streams(spec.source, config.hub_split):
        yield from canonical_rows(label, records, None if fmt == "auto" else fmt, columns, config.max_record_chars,
                                  quarantine)


def _unit_hash(value: str) -> float:
    # its own salt, so a source's weight sample is independent of the train/val/test split (also by id hash)
    return int(sha256_text("weight:" + value)[:8], 16) / 0xFFFFFFFF


def source_fingerprint(config: dict[str, Any]) -> str:
    """Give back a hash of the sources' content, so changed data makes a new ingest key."""
    specs = config.get("sources") or [{"source": config["source"]}]
    return sha256_text(canonical_json([_one_fingerprint(spec["source"]) for spec in specs]))


def _one_fingerprint(source: str) -> str:
    if source == BUILTIN:
        return builtin_tasks.GENERATOR_VERSION  # the generator's code is in ingest's code version
    local = Path(source[len(HUB):] if source.startswith(HUB) else source).expanduser()
    if source.startswith(HUB) and not local.exists():
        return "hub:" + source  # a Hub dataset's revision cannot be asked for offline; the id stands in
    try:
        files = sorted(p for p in local.rglob("*") if p.is_file()) if local.is_dir() and (
            source.startswith(HUB) or is_saved_dataset(local)) else resolve_files(source)
    except IngestError:
        return "unresolved:" + source  # ingest itself reports the problem as a step failure
    return sha256_text(canonical_json([[str(f), sha256_file(f)] for f in files]))


STEP = Step("ingest", __name__, libraries=("pyarrow", "pandas", "datasets"), fingerprint=source_fingerprint,
            on_build="data_checks.gate_process:start")  # a build here: the gates build next, their worker starts


def write_ingest(config: DataConfig, out: Path, batch_rows: int = 10_000, earlier: Path | None = None
                 ) -> dict[str, Any]:
    """Write data.parquet (streamed in Arrow batches) and quarantine.parquet; give back the manifest's row counts.

    `earlier`: an ingest artifact of the same config, whose rows of files unchanged since are reused (and whose
    data parts are linked where they hold the same rows).
    """
    quarantine: list[dict[str, Any]] = []
    per_source: list[dict[str, Any]] = []
    files = SourceFiles(earlier)
    rows = 0
    with DataParts(out, DATA_SCHEMA, earlier) as writer:
        for batch in _ingest_batches(config, quarantine, per_source, batch_rows, files):
            if isinstance(batch, EarlierRows):
                writer.write_earlier(batch.start, batch.num_rows)
            else:
                writer.write_table(pa.Table.from_batches([batch]) if isinstance(batch, pa.RecordBatch) else batch)
            rows += batch.num_rows
    rejected = pd.DataFrame(quarantine, columns=QUARANTINE_COLUMNS).astype(str)
    if not rows:
        first = ""
        if len(rejected):
            q = rejected.iloc[0]
            first = f"; first: {q['file']}: row {q['row']}: {q['field'] + ': ' if q['field'] else ''}{q['reason']}"
        raise IngestError(f"{config.source if not config.sources else 'data.sources'}: no usable rows "
                          f"({len(rejected)} quarantined{first})")
    rejected.to_parquet(layout.quarantine_file(out), index=False)
    return {"rows": rows, "quarantined": len(rejected), "parts": writer.parts, "parts_linked": writer.linked,
            "quarantined_by_code": rejected["code"].value_counts().to_dict(), "sources": per_source,
            **files.record()}


@task(**step_task_options(STEP))
def ingest(config: dict[str, Any], root: str) -> ArtifactRef:
    """Prefect task: the ingest artifact for this source."""
    ref, built = STEP.produce(config, root, [], lambda out, _: write_ingest(
        DataConfig(**config), out, earlier=STEP.earlier(config, root, [])))
    return finish_step(root, ref, built)
