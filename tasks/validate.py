"""Step 3, validate: run the Great Expectations suites over the clean artifact and gate the run.

The artifact holds the validated rows, the check report and the Data Docs HTML, whether the checks
passed or not, so a failed gate can be inspected; a blocking failure then stops the run.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pandas as pd
from prefect import task

from data_checks.clean_suite import clean_rows_expectations, clean_summary_expectations
from data_checks.gate import GateFailed, GateReport, run_suites
from tasks.artifacts import ArtifactRef, ArtifactStore, Step
from tasks.caching import finish_step, step_task_options
from tasks.config import ValidateConfig


class ValidationFailed(GateFailed):
    """A blocking expectation on the clean data failed (message: which, observed, wanted, Data Docs link)."""


def check_clean_data(frame: pd.DataFrame, stats: dict[str, Any], config: ValidateConfig, docs_dir: Path) -> GateReport:
    """Give back the gate report for clean rows plus the clean step's summary counts."""
    summary = pd.DataFrame([{
        "rows": len(frame), "quarantine_ratio": float(stats.get("quarantine_ratio", 0.0)),
        "duplicate_ratio": float(stats.get("duplicate_ratio", 0.0)),
        "mean_instruction_chars": float(frame["instruction"].str.len().mean()) if len(frame) else 0.0,
        "mean_response_chars": float(frame["response"].str.len().mean()) if len(frame) else 0.0,
    }])
    return run_suites(
        {
            "clean_rows": (frame, clean_rows_expectations(config.max_instruction_chars, config.max_response_chars)),
            "clean_summary": (summary, clean_summary_expectations(
                config.min_rows, config.max_quarantine_ratio, config.max_duplicate_ratio,
                config.max_mean_instruction_chars, config.max_mean_response_chars)),
        },
        docs_dir,
        set(config.warn_only),
    )


STEP = Step("validate", __file__)


def write_validate(config: ValidateConfig, cleaned: Path, out: Path) -> dict[str, Any]:
    """Write the validated rows, report.json and data_docs/; give back counts and the verdict."""
    frame = pd.read_parquet(cleaned / "data.parquet")
    stats = json.loads((cleaned / "manifest.json").read_text(encoding="utf-8"))
    report = check_clean_data(frame, stats, config, out / "data_docs")
    try:
        os.link(cleaned / "data.parquet", out / "data.parquet")  # same bytes; a link saves the copy
    except OSError:
        shutil.copyfile(cleaned / "data.parquet", out / "data.parquet")
    (out / "report.json").write_text(json.dumps(report.as_records(), indent=2), encoding="utf-8")
    return {
        "rows": len(frame),
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
    manifest = ArtifactStore(root).manifest(ref.step, ref.key) or {}
    if not manifest.get("passed", False):
        docs = Path(ref.uri) / "data_docs" / "index.html"
        raise ValidationFailed(f"{manifest.get('failure', 'validation failed')}. Data Docs: {docs.as_uri()}")
    return finish_step(root, ref, built)
