"""Step 3, validate: run the Great Expectations suites over the clean artifact and gate the run.

The artifact holds the validated rows, the check report and the Data Docs HTML, whether the checks
passed or not, so a failed gate can be inspected; a blocking failure then stops the run.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from prefect import task

from catalog import layout
from catalog.caching import finish_step, step_task_options
from catalog.parquet_writer import link_data
from catalog.sections import ValidateConfig
from catalog.step import Step
from catalog.store import ArtifactRef
from data_checks import gate_process
from data_checks.clean_suite import check_clean_data
from data_checks.gate import GateFailed, raise_if_blocked, rows_passed_before
from toolkit.row_memo import row_keys


class ValidationFailed(GateFailed):
    """A blocking expectation on the clean data failed (message: which, observed, wanted, Data Docs link)."""


STEP = Step("validate", __name__, libraries=("great-expectations", "pyarrow"))


def write_validate(config: ValidateConfig, cleaned: Path, out: Path, earlier: Path | None = None) -> dict[str, Any]:
    """Write the validated rows, report.json and data_docs/; give back counts and the verdict.

    With `earlier` (a validate artifact of the same recipe whose rows all met the row expectations), only rows it
    did not hold go through them; the table-wide expectations see the whole table, so the verdict is a full run's.
    """
    stats = layout.read_manifest(cleaned)
    seen = row_keys(layout.read_data(earlier, columns=[
        name for name in ("id", "messages") if name in layout.data_columns(earlier)])) \
        if earlier is not None and rows_passed_before(earlier, "clean_rows") else None
    report, checked = gate_process.run(check_clean_data, cleaned, stats, config,
                                       out / layout.DATA_DOCS, seen=seen)
    link_data(cleaned, out)  # the same rows; links save the copy
    (out / layout.GATE_REPORT).write_text(json.dumps(report.as_records(), indent=2), encoding="utf-8")
    return {
        "rows": layout.data_rows(out),
        "passed": not report.blocking_failures,
        "failure": report.failure_message() if report.blocking_failures else "",
        "data_docs": "data_docs/index.html",
        "warnings": [o.describe() for o in report.warnings],
        "checks": len(report.outcomes),
        "rows_checked": checked, "reused_from": earlier.name if seen is not None else None,
    }


@task(**step_task_options(STEP))
def validate(config: dict[str, Any], root: str, cleaned: ArtifactRef) -> ArtifactRef:
    """Prefect task: the validate artifact; raises ValidationFailed when a blocking check fails."""
    ref, built = STEP.produce(config, root, [cleaned], lambda out, inputs: write_validate(
        ValidateConfig(**config), inputs[0], out, earlier=STEP.earlier(config, root, [cleaned])))
    raise_if_blocked(ref, ValidationFailed, "validation failed")
    return finish_step(root, ref, built)
