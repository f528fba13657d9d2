"""Operating itune on a Prefect server: trigger deployments, follow runs, list them, rerun them, trace lineage.

These are the functions behind `itune trigger`, `itune runs`, `itune rerun` and `itune lineage`; they talk to
whatever Prefect API is configured and print nothing themselves.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from uuid import UUID

from catalog.config import ConfigError, with_overrides
from catalog.store import ArtifactError
from toolkit.registry import Registry, RegistryError

PIPELINE_FLOW = "itune-pipeline"
FINAL_TYPES = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


class OperateError(RuntimeError):
    """A run or deployment that cannot be found or started; the message is one line for the user."""


@dataclass
class RunView:
    """One pipeline run as `itune runs` shows it."""

    id: str
    name: str
    deployment: str | None
    state: str
    started: str
    seconds: float | None
    steps: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    message: str = ""


def _client():
    from prefect.client.orchestration import get_client

    return get_client(sync_client=True)


def step_states(flow_run_ids: list[UUID]) -> dict[UUID, dict[str, str]]:
    """Give back each flow run's steps and their latest state name (Completed, Cached, Failed...)."""
    from toolkit.run_states import state_name, task_runs_by_step

    return {run_id: {step: state_name(run) for step, run in steps.items()}
            for run_id, steps in task_runs_by_step(flow_run_ids).items()}


def find_run(spec: str) -> UUID:
    """Give back the pipeline flow run an id or an id prefix (as `itune runs` shows) names."""
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName

    try:
        return UUID(spec)
    except ValueError:
        pass
    if len(spec) < 4:
        raise OperateError(f"'{spec}' is too short to name a flow run: give at least 4 characters of its id")
    with _client() as client:
        runs = client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=[PIPELINE_FLOW])), limit=200)
    matches = {run.id for run in runs if str(run.id).startswith(spec.lower())}
    if len(matches) != 1:
        raise OperateError(f"'{spec}' matches {len(matches)} of the last {len(runs)} pipeline runs; "
                           "give more of the flow run id (`itune runs`)")
    return matches.pop()


def _metrics_by_run(root: str | None) -> dict[str, dict[str, float]]:
    if not root:
        return {}
    try:
        data = Registry(root).load()
    except (RegistryError, OSError):
        return {}
    return {entry["flow_run_id"]: data["candidates"].get(entry["candidate"], {}).get("metrics", {})
            for entry in data["history"] if entry.get("flow_run_id")}


def _pipeline_runs(client: Any, limit: int, scheduled: bool) -> list[Any]:
    """Give back pipeline flow runs: the next scheduled ones (soonest first), or the others (newest first)."""
    from prefect.client.schemas.filters import (
        FlowFilter,
        FlowFilterName,
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.sorting import FlowRunSort

    types = FlowRunFilterStateType(any_=["SCHEDULED"]) if scheduled else FlowRunFilterStateType(not_any_=["SCHEDULED"])
    return client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=[PIPELINE_FLOW])),
                                 flow_run_filter=FlowRunFilter(state=FlowRunFilterState(type=types)),
                                 sort=FlowRunSort.EXPECTED_START_TIME_ASC if scheduled else FlowRunSort.START_TIME_DESC,
                                 limit=limit)


def recent_runs(limit: int = 10) -> list[RunView]:
    """Give back the newest pipeline runs, newest first, with per-step states and headline metrics."""
    with _client() as client:
        # Scheduled runs are the future, not history: `itune runs` shows the next one on a line of its own.
        runs = _pipeline_runs(client, limit, scheduled=False)
        deployments = {d: client.read_deployment(d).name for d in {r.deployment_id for r in runs if r.deployment_id}}
    states = step_states([run.id for run in runs])
    metrics: dict[str, dict[str, dict[str, float]]] = {}
    views = []
    for run in runs:
        root = ((run.parameters or {}).get("config") or {}).get("artifacts", {}).get("root")
        if root not in metrics:
            metrics[root] = _metrics_by_run(root)
        seconds = run.total_run_time.total_seconds() if run.total_run_time else None
        started = run.start_time or run.expected_start_time
        views.append(RunView(
            id=str(run.id), name=run.name, deployment=deployments.get(run.deployment_id),
            state=run.state.name if run.state else "Pending",
            started=started.strftime("%Y-%m-%d %H:%M:%S") if started else "-", seconds=seconds,
            steps=states.get(run.id, {}), metrics=metrics[root].get(str(run.id), {}),
            message=(run.state.message or "") if run.state else ""))
    return views


def trigger(deployment: str, overrides: list[str], until: str | None = None) -> tuple[str, str]:
    """Start a run of a deployment with `key=value` overrides; give back (flow run id, its UI-facing name).

    Overrides are checked against the deployment's own config first, so a typo fails here, not on a worker.
    """
    from prefect.exceptions import ObjectNotFound

    with _client() as client:
        try:
            found = client.read_deployment_by_name(deployment)
        except ObjectNotFound:
            raise OperateError(f"no deployment '{deployment}' on this Prefect server; `itune deploy` creates "
                               "itune-pipeline/nightly and itune-pipeline/on-demand") from None
        parameters = dict(found.parameters or {})
        if "config" in parameters:
            try:
                with_overrides(parameters["config"], overrides)
            except ConfigError as exc:
                raise OperateError(str(exc)) from None
            parameters["overrides"] = list(parameters.get("overrides") or []) + list(overrides)
        elif overrides:
            raise OperateError(f"deployment '{deployment}' takes no config, so --set has nothing to change")
        if until is not None:
            parameters["until"] = until
        run = client.create_flow_run_from_deployment(found.id, parameters=parameters)
    return str(run.id), run.name


def watch(flow_run_id: str, on_change: Callable[[str, dict[str, str]], None], poll_seconds: float = 1.0,
          timeout: float | None = None) -> tuple[str, str]:
    """Follow a flow run to its end, calling on_change(state, steps) whenever something moved; give back
    (final state name, its message)."""
    run_id = UUID(flow_run_id)
    seen: tuple[str, dict[str, str]] | None = None
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        with _client() as client:
            run = client.read_flow_run(run_id)
        state = run.state.name if run.state else "Pending"
        now = (state, step_states([run_id])[run_id])
        if now != seen:
            on_change(*now)
            seen = now
        if run.state is not None and run.state.type.value in FINAL_TYPES:
            return state, run.state.message or ""
        if deadline is not None and time.monotonic() > deadline:
            raise OperateError(f"flow run {flow_run_id} still {state} after {timeout:.0f} s")
        time.sleep(poll_seconds)


def rerun_plan(flow_run_id: str) -> dict[str, Any]:
    """Say how to run a pipeline run again with its own parameters: through its deployment, or here."""
    from prefect.exceptions import ObjectNotFound

    with _client() as client:
        try:
            run = client.read_flow_run(find_run(flow_run_id))
        except ObjectNotFound:
            raise OperateError(f"no flow run {flow_run_id} on this Prefect server (`itune runs` lists them)") from None
        flow = client.read_flow(run.flow_id)
        if flow.name != PIPELINE_FLOW:
            raise OperateError(f"flow run {flow_run_id} is a '{flow.name}' run, not an {PIPELINE_FLOW} run")
        deployment = client.read_deployment(run.deployment_id).name if run.deployment_id else None
    return {"deployment": f"{PIPELINE_FLOW}/{deployment}" if deployment else None,
            "deployment_id": run.deployment_id,
            "parameters": dict(run.parameters or {}), "state": run.state.name if run.state else "Pending"}


def rerun_on_deployment(flow_run_id: str, plan: dict[str, Any]) -> tuple[str, str]:
    """Start the same deployment with the same parameters; give back (new flow run id, its name)."""
    with _client() as client:
        run = client.create_flow_run_from_deployment(plan["deployment_id"], parameters=plan["parameters"],
                                                      tags=[f"rerun-of:{flow_run_id}"])
    return str(run.id), run.name


def resolve_artifact(spec: str, root: str | Path) -> Path:
    """Find an artifact folder from `champion`, a registered model key, or what the catalog resolves."""
    from catalog.lineage import resolve

    if not (Path(spec).expanduser() / "manifest.json").is_file():
        try:
            return Registry(root).model_folder(spec).resolve()
        except RegistryError:
            pass
    try:
        return resolve(spec, root)
    except ArtifactError as exc:
        raise OperateError(f"{exc} (or 'champion', a registered model key)") from None


def next_scheduled() -> tuple[str, str] | None:
    """Give back (deployment, expected start) of the next scheduled pipeline run, if any."""
    with _client() as client:
        runs = _pipeline_runs(client, 1, scheduled=True)
        if not runs:
            return None
        name = client.read_deployment(runs[0].deployment_id).name if runs[0].deployment_id else "-"
    return name, runs[0].expected_start_time.isoformat(timespec="minutes") if runs[0].expected_start_time else "-"
