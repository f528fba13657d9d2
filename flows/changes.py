"""The pipeline's last report: what changed tonight, as a markdown artifact in the Prefect UI (`itune-changes`)."""

from __future__ import annotations

from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE


@task(name="changes", cache_policy=NO_CACHE, persist_result=False)
def report_changes(root: str, decision: dict[str, Any]) -> dict[str, Any] | None:
    """Prefect task: publish what changed in this run against the previous one; give back the report."""
    from prefect.artifacts import create_markdown_artifact
    from prefect.logging import get_run_logger

    from toolkit.changes import ChangesError, compare, markdown

    try:
        report = compare(root, decision["flow_run_id"], "previous")
    except ChangesError as exc:  # a report that cannot be made must not fail a run that trained and decided
        get_run_logger().warning("no changes report: %s", exc)
        return None
    create_markdown_artifact(markdown(report), key="itune-changes", description="what changed since the previous run")
    return report
