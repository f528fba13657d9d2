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
import pyarrow.compute as pc
import pyarrow.parquet as pq
from prefect import task

from catalog import layout
from catalog.caching import finish_step, step_task_options
from catalog.sections import ValidateConfig
from catalog.step import Step
from catalog.store import ArtifactRef
from data_checks.clean_suite import clean_ids_expectations, clean_rows_expectations, clean_summary_expectations
from data_checks.gate import GateFailed, GateReport, raise_if_blocked, run_suites


class ValidationFailed(GateFailed):
    """A blocking expectation on the clean data failed (message: which, observed, wanted, Data Docs link)."""


# Rows per Great Expectations run: the row checks go batch by batch so memory stays bounded at millions of rows.
ROWS_PER_CHECK = 200_000


def _row_batches(data: Path, rows_per_batch: int) -> Iterator[pd.DataFrame]:
    parquet = pq.ParquetFile(data)
    if parquet.metadata.num_rows == 0:  # still one run, so an empty artifact is checked (and fails min_rows)
        yield parquet.schema_arrow.empty_table().to_pandas()
    for batch in parquet.iter_batches(batch_size=rows_per_batch):
        yield batch.to_pandas()


def _mean_chars(data: Path, columns: list[str]) -> dict[str, float]:
    """Mean length in characters of each text column, summed batch by batch in one pass, no frame built."""
    totals, rows = dict.fromkeys(columns, 0), 0
    for batch in pq.ParquetFile(data).iter_batches(columns=columns, batch_size=ROWS_PER_CHECK):
        for column in columns:
            totals[column] += pc.sum(pc.utf8_length(batch.column(column))).as_py() or 0
        rows += batch.num_rows
    return {column: total / rows if rows else 0.0 for column, total in totals.items()}


def check_clean_data(data: Path, stats: dict[str, Any], config: ValidateConfig, docs_dir: Path,
                     rows_per_batch: int = ROWS_PER_CHECK) -> GateReport:
    """Give back the gate report for the clean rows in `data` (a Parquet file) plus the clean step's counts."""
    rows = pq.ParquetFile(data).metadata.num_rows
    means = _mean_chars(data, ["instruction", "response"])
    summary = pd.DataFrame([{
        "rows": rows, "quarantine_ratio": float(stats.get("quarantine_ratio", 0.0)),
        "duplicate_ratio": float(stats.get("duplicate_ratio", 0.0)),
        "mean_instruction_chars": means["instruction"], "mean_response_chars": means["response"],
    }])
    return run_suites(
        {
            "clean_rows": (_row_batches(data, rows_per_batch),
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


def write_validate(config: ValidateConfig, cleaned: Path, out: Path) -> dict[str, Any]:
    """Write the validated rows, report.json and data_docs/; give back counts and the verdict."""
    stats = layout.read_manifest(cleaned)
    report = check_clean_data(layout.data_file(cleaned), stats, config, out / layout.DATA_DOCS)
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
    }


@task(**step_task_options(STEP))
def validate(config: dict[str, Any], root: str, cleaned: ArtifactRef) -> ArtifactRef:
    """Prefect task: the validate artifact; raises ValidationFailed when a blocking check fails."""
    ref, built = STEP.produce(config, root, [cleaned],
                              lambda out, inputs: write_validate(ValidateConfig(**config), inputs[0], out))
    raise_if_blocked(ref, ValidationFailed, "validation failed")
    return finish_step(root, ref, built)
