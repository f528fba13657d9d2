"""The task runs of pipeline flow runs, by step, as the Prefect API reports them."""

from __future__ import annotations

import time
from typing import Any
from uuid import UUID

from catalog.config import STEPS


def task_runs_by_step(flow_run_ids: list[UUID], wait_final_seconds: float = 0.0) -> dict[UUID, dict[str, Any]]:
    """Give back {flow run id: {step: its latest task run}}.

    Task states reach the API as events that may land just after a flow returns: with
    `wait_final_seconds`, wait up to that long for every task run to reach a final state.
    """
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    by_run: dict[UUID, dict[str, Any]] = {run_id: {} for run_id in flow_run_ids}
    if not flow_run_ids:
        return by_run
    deadline = time.monotonic() + wait_final_seconds
    with get_client(sync_client=True) as client:
        while True:
            runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=flow_run_ids)))
            if time.monotonic() >= deadline or all(run.state and run.state.is_final() for run in runs):
                break
            time.sleep(0.2)
    for run in sorted(runs, key=lambda r: r.expected_start_time or r.created or 0):
        step = run.name.rsplit("-", 1)[0]
        if step in STEPS and run.flow_run_id in by_run:
            by_run[run.flow_run_id][step] = run
    return by_run


def state_name(task_run: Any) -> str:
    return task_run.state.name if task_run.state else "Pending"
