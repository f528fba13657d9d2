"""Prefect side of the catalog: a cache policy keyed on artifact content, and the thin-task options.

Prefect records a cache entry per (artifact root, step, key, content sha256). The policy only
answers with that entry's name when the artifact on disk is intact, so a deleted or corrupted
artifact is a cache miss and the step runs again, never a cached pointer to bad data.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect.cache_policies import CachePolicy
from prefect.context import TaskRunContext
from prefect.logging import get_run_logger

from catalog.keys import sha256_text
from catalog.step import Step, current_run_ids
from catalog.store import ArtifactRef, ArtifactStore

LINEAGE_KEY = "itune-lineage"


def _record_key(root: str, ref: ArtifactRef) -> str:
    return f"itune/{sha256_text(ArtifactStore(root).location)[:12]}/{ref.step}/{ref.key}/{ref.sha256[:16]}"


@dataclass
class ArtifactCache(CachePolicy):
    """Cache hit exactly when the step's artifact for these inputs is present and verified."""

    step: Step | None = None

    def compute_key(self, task_ctx: TaskRunContext, inputs: dict[str, Any], flow_parameters: dict[str, Any],
                    **kwargs: Any) -> str | None:
        assert self.step is not None
        refs = [value for value in inputs.values() if isinstance(value, ArtifactRef)]
        key = self.step.key(inputs["config"], refs)
        store = ArtifactStore(inputs["root"])
        manifest = store.manifest(self.step.name, key)
        if manifest is None:
            return None  # nothing valid on disk: run, and record the entry once the artifact exists
        return _record_key(inputs["root"], store.ref(self.step.name, key, manifest))


def step_task_options(step: Step) -> dict[str, Any]:
    """Give back the @task options every step shares: name, artifact cache, JSON (never pickle) results."""
    return {
        "name": step.name,
        "cache_policy": ArtifactCache(step=step),
        "result_serializer": "json",
        "persist_result": True,
        "log_prints": False,
        # a Cached task never runs its body: the hook is what still shows the reused artifact on the run
        "on_completion": [publish_reuse],
    }


def asset_key(uri: str) -> str:
    """Give back the Prefect asset key of an artifact: its location as a URI."""
    return uri if "://" in uri else Path(uri).resolve().as_uri()


def ui_link(path: str) -> str:
    """Give back a link to a Prefect UI page: under PREFECT_UI_URL when set, else relative to the UI showing it.

    Relative by default because the API a run talked to (a temporary local one, a port that changed) is often
    not where its pages are read later; any UI on the same database resolves `/runs/...` itself.
    """
    from prefect.settings import get_current_settings

    settings = get_current_settings()
    base = settings.ui_url if "ui_url" in settings.model_fields_set and settings.ui_url else ""
    return f"{base.rstrip('/')}{path}"


def run_link(flow_run_id: Any, text: str | None = None) -> str:
    """Give back a markdown link to a flow run's page, named by the id's first characters."""
    return f"[{text or str(flow_run_id)[:8]}]({ui_link(f'/runs/flow-run/{flow_run_id}')})"


def find_ui_artifact(key: str, containing: str, flow_run_id: Any = None) -> Any:
    """Give back the id of the newest UI artifact with this key whose data names `containing` (this run's first)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey
    from prefect.client.schemas.sorting import ArtifactSort

    by_key = ArtifactFilterKey(any_=[key])
    filters = [ArtifactFilter(key=by_key, flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))] \
        if flow_run_id else []
    with get_client(sync_client=True) as client:
        for wanted in [*filters, ArtifactFilter(key=by_key)]:  # a child run (fine-tune on a pool) has its own
            found = client.read_artifacts(artifact_filter=wanted, sort=ArtifactSort.CREATED_DESC, limit=50)
            match = next((artifact.id for artifact in found if containing in str(artifact.data)), None)
            if match:
                return match
    return None


def artifact_link(step: str, key: str, flow_run_id: Any = None, text: str | None = None) -> str:
    """Give back a markdown link to the step's `itune-<step>` UI artifact for this key (its history if none)."""
    found = find_ui_artifact(f"itune-{step}", key, flow_run_id)
    page = f"/artifacts/artifact/{found}" if found else f"/artifacts/key/itune-{step}"
    return f"[{text or f'{step} {key[:8]}'}]({ui_link(page)})"


def model_note(model: ArtifactRef, flow_run_id: Any) -> str:
    """Give back a markdown line naming a model by its URI, with a link to this run's lineage artifact of it."""
    found = find_ui_artifact(LINEAGE_KEY, model.key, flow_run_id)
    page = f"/artifacts/artifact/{found}" if found else f"/artifacts/key/{LINEAGE_KEY}"
    return f"\nmodel `{model.uri}` · [its lineage back to the source files]({ui_link(page)})\n"


def _publish_lineage(store: ArtifactStore, ref: ArtifactRef, manifest: dict[str, Any], reused: bool) -> None:
    """Emit Prefect asset events for a step's artifact and publish its `itune-<step>` table artifact.

    Built: the materialization event (from its upstream assets, naming the flow run and step). Reused (a cache
    hit or an intact artifact found): a reference event, so the asset's feed lists every run that used it.
    Artifact locations are content keys known only at run time, hence events here rather than task assets.
    """
    from prefect.artifacts import create_table_artifact
    from prefect.assets import Asset
    from prefect.context import AssetContext
    from prefect.events import emit_event

    ids = current_run_ids() or {}
    flow_run_id, task_run_id = ids.get("flow_run_id"), ids.get("task_run_id")
    uri = store.uri_of(ref.step, ref.key)
    asset = AssetContext.asset_as_resource(Asset(key=asset_key(uri)))
    inputs = manifest.get("inputs", [])
    upstream = [Asset(key=asset_key(store.uri_of(entry["step"], entry["key"]))) for entry in inputs]
    run = [{"prefect.resource.id": f"prefect.flow-run.{flow_run_id}", "prefect.resource.role": "flow-run"}] \
        if flow_run_id else []
    step = {"prefect.resource.id": f"itune.step.{ref.step}", "prefect.resource.role": "step",
            "prefect.resource.name": ref.step}
    built_by = (manifest.get("built_by") or {}).get("flow_run_id")
    payload = {"step": ref.step, "key": ref.key, "rows": ref.rows, "sha256": ref.sha256,
               "flow_run_id": flow_run_id, "task_run_id": task_run_id, "built_by_flow_run_id": built_by}
    if reused:
        emit_event(event="prefect.asset.referenced", resource=asset, related=[*run, step], payload=payload)
    else:
        for parent in upstream:
            emit_event(event="prefect.asset.referenced", resource=AssetContext.asset_as_resource(parent),
                       related=[*run, step])
        emit_event(event="prefect.asset.materialization.succeeded", resource=asset,
                   related=[AssetContext.asset_as_related(parent) for parent in upstream]
                   + [AssetContext.related_materialized_by("itune"), *run, step], payload=payload)
    sources = [source["source"] for source in manifest.get("sources") or []]
    origin = ", ".join(artifact_link(entry["step"], entry["key"], flow_run_id) for entry in inputs) \
        or "source: " + ", ".join(f"`{source}`" for source in sources)
    if not reused:
        how = note = "built by this run"
    elif built_by:  # the table links the builder's run page; the description can only name it
        how, note = f"reused, built by run {run_link(built_by)}", f"reused, built by run {str(built_by)[:8]}"
    else:
        how = note = "reused"
    create_table_artifact(
        key=f"itune-{ref.step}",
        table=[{"upstream": origin, "key": ref.key, "rows": ref.rows, "sha256": ref.sha256[:12], "run": how,
                "artifact": asset["prefect.resource.id"]}],
        description=f"itune {ref.step} {ref.key[:8]}: {note}",
    )


def finish_step(root: str, ref: ArtifactRef, built: bool) -> ArtifactRef:
    """Record the cache entry, lineage and a UI artifact for a step's output, and log what it produced."""
    context = TaskRunContext.get()
    if context is not None and context.result_store is not None:
        context.result_store.write(obj=ref, key=_record_key(root, ref))
    _publish_lineage(ArtifactStore(root), ref, ref.manifest(), reused=not built)
    how = "built" if built else "reused intact"
    get_run_logger().info("%s %s: %d rows at %s (sha256 %s)", how, ref.step, ref.rows, ref.uri, ref.sha256[:12])
    return ref


def publish_reuse(task: Any, task_run: Any, state: Any) -> None:
    """Task hook: on a cache hit, still publish the step's reference event and its table artifact on this run."""
    if state.name != "Cached":
        return  # a run that did the work published from finish_step
    ref = state.result(raise_on_failure=False)
    context = TaskRunContext.get()
    if not isinstance(ref, ArtifactRef) or context is None:
        return
    _publish_lineage(ArtifactStore(context.parameters["root"]), ref, ref.manifest(), reused=True)
