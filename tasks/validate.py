"""Step 3, validate: run the Great Expectations suites over the clean artifact and gate the run.

The artifact holds the validated rows, the check report and the Data Docs HTML, whether the checks
passed or not, so a failed gate can be inspected; a blocking failure then stops the run.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from prefect import task

from catalog import layout
from catalog.caching import finish_step, step_task_options
from catalog.sections import ValidateConfig
from catalog.step import Step
from catalog.store import ArtifactRef
from data_checks.clean_suite import clean_ids_expectations, clean_rows_expectations, clean_summary_expectations
from data_checks.gate import GateFailed, GateReport, raise_if_blocked, rows_passed_before, run_suites
from toolkit.row_memo import row_keys


class ValidationFailed(GateFailed):
    """A blocking expectation on the clean data failed (message: which, observed, wanted, Data Docs link)."""


# Rows per Great Expectations run: the row checks go batch by batch so memory stays bounded at millions of rows.
ROWS_PER_CHECK = 200_000


def _row_batches(data: Path, rows_per_batch: int, seen: pa.Array | None, counts: dict[str, int]
                 ) -> Iterator[pd.DataFrame]:
    """Yield the rows to check in frames: every row, or those whose key is not in `seen` (checked before)."""
    parquet = pq.ParquetFile(data)
    for batch in parquet.iter_batches(batch_size=rows_per_batch):
        if seen is not None:
            batch = batch.filter(pc.invert(pc.is_in(row_keys(batch), value_set=seen)))
        counts["checked"] += batch.num_rows
        if batch.num_rows:
            yield batch.to_pandas()
    if not counts["checked"]:  # still one run, so an empty artifact is checked (and fails min_rows)
        yield parquet.schema_arrow.empty_table().to_pandas()


def _mean_chars(data: Path, columns: list[str]) -> dict[str, float]:
    """Mean length in characters of each text column, summed batch by batch in one pass, no frame built."""
    totals, rows = dict.fromkeys(columns, 0), 0
    for batch in pq.ParquetFile(data).iter_batches(columns=columns, batch_size=ROWS_PER_CHECK):
        for column in columns:
            totals[column] += pc.sum(pc.utf8_length(batch.column(column))).as_py() or 0
        rows += batch.num_rows
    return {column: total / rows if rows else 0.0 for column, total in totals.items()}


def check_clean_data(data: Path, stats: dict[str, Any], config: ValidateConfig, docs_dir: Path,
                     rows_per_batch: int = ROWS_PER_CHECK, seen: pa.Array | None = None,
                     counts: dict[str, int] | None = None) -> GateReport:
    """Give back the gate report for the clean rows in `data` (a Parquet file) plus the clean step's counts.

    `seen`: keys of rows known to meet the row expectations; only the others go through them (`counts["checked"]`).
    """
    rows = pq.ParquetFile(data).metadata.num_rows
    means = _mean_chars(data, ["instruction", "response"])
    summary = pd.DataFrame([{
        "rows": rows, "quarantine_ratio": float(stats.get("quarantine_ratio", 0.0)),
        "duplicate_ratio": float(stats.get("duplicate_ratio", 0.0)),
        "mean_instruction_chars": means["instruction"], "mean_response_chars": means["response"],
    }])
    return run_suites(
        {
            "clean_rows": (_row_batches(data, rows_per_batch, seen, counts if counts is not None else {"checked": 0}),
                           clean_rows_expectations(config.max_instruction_chars, config.max_response_chars,
                                                   "messages" in pq.read_schema(data).names)),
            "clean_ids": (pq.read_table(data, columns=["id"]).to_pandas(), clean_ids_expectations()),
            "clean_summary": (summary, clean_summary_expectations(
                config.min_rows, config.max_quarantine_ratio, config.max_duplicate_ratio,
                config.max_mean_instruction_chars, config.max_mean_response_chars)),
        },
        docs_dir,
        set(config.warn_only),
    )


STEP = Step("validate", __name__, libraries=("great-expectations", "pyarrow"))


def write_validate(config: ValidateConfig, cleaned: Path, out: Path, earlier: Path | None = None) -> dict[str, Any]:
    """Write the validated rows, report.json and data_docs/; give back counts and the verdict.

    With `earlier` (a validate artifact of the same recipe whose rows all met the row expectations), only rows it
    did not hold go through them; the table-wide expectations see the whole table, so the verdict is a full run's.
    """
    stats = layout.read_manifest(cleaned)
    seen = row_keys(pq.read_table(layout.data_file(earlier), columns=[
        name for name in ("id", "messages") if name in layout.data_columns(earlier)])) \
        if earlier is not None and rows_passed_before(earlier, "clean_rows") else None
    counts = {"checked": 0}
    report = check_clean_data(layout.data_file(cleaned), stats, config, out / layout.DATA_DOCS, seen=seen,
                              counts=counts)
    try:
        os.link(layout.data_file(cleaned), layout.data_file(out))  # same bytes; a link saves the copy
    except OSError:
        shutil.copyfile(layout.data_file(cleaned), layout.data_file(out))
    (out / layout.GATE_REPORT).write_text(json.dumps(report.as_records(), indent=2), encoding="utf-8")
    return {
        "rows": pq.ParquetFile(layout.data_file(out)).metadata.num_rows,
        "passed": not report.blocking_failures,
        "failure": report.failure_message() if report.blocking_failures else "",
        "data_docs": "data_docs/index.html",
        "warnings": [o.describe() for o in report.warnings],
        "checks": len(report.outcomes),
        "rows_checked": counts["checked"], "reused_from": earlier.name if seen is not None else None,
    }


@task(**step_task_options(STEP))
def validate(config: dict[str, Any], root: str, cleaned: ArtifactRef) -> ArtifactRef:
    """Prefect task: the validate artifact; raises ValidationFailed when a blocking check fails."""
    ref, built = STEP.produce(config, root, [cleaned], lambda out, inputs: write_validate(
        ValidateConfig(**config), inputs[0], out, earlier=STEP.earlier(config, root, [cleaned])))
    raise_if_blocked(ref, ValidationFailed, "validation failed")
    return finish_step(root, ref, built)
