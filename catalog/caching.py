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
from catalog.step import Step
from catalog.store import ArtifactRef, ArtifactStore


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
    }


def asset_key(uri: str) -> str:
    """Give back the Prefect asset key of an artifact: its location as a URI."""
    return uri if "://" in uri else Path(uri).resolve().as_uri()


def _publish_lineage(ref: ArtifactRef, uri: str, upstream_uris: list[str]) -> None:
    """Emit Prefect asset events (this artifact materialized from its upstream ones) and a UI artifact.

    These are the events `prefect.assets.materialize` emits; artifact locations are only known at run
    time (they are content keys), so the events are emitted here rather than declared on the task.
    """
    from prefect.artifacts import create_table_artifact
    from prefect.assets import Asset
    from prefect.context import AssetContext
    from prefect.events import emit_event

    asset = Asset(key=asset_key(uri))
    upstream = [Asset(key=asset_key(uri)) for uri in upstream_uris]
    for parent in upstream:
        emit_event(event="prefect.asset.referenced", resource=AssetContext.asset_as_resource(parent), related=[])
    emit_event(
        event="prefect.asset.materialization.succeeded",
        resource=AssetContext.asset_as_resource(asset),
        related=[AssetContext.asset_as_related(parent) for parent in upstream]
        + [AssetContext.related_materialized_by("itune")],
        payload={"step": ref.step, "key": ref.key, "rows": ref.rows, "sha256": ref.sha256},
    )
    create_table_artifact(
        key=f"itune-{ref.step}",
        table=[{"artifact": asset.key, "key": ref.key, "rows": ref.rows, "sha256": ref.sha256,
                "upstream": ", ".join(a.key for a in upstream)}],
        description=f"itune {ref.step} artifact",
    )


def finish_step(root: str, ref: ArtifactRef, built: bool) -> ArtifactRef:
    """Record the cache entry, lineage and a UI artifact for a step's output, and log what it produced."""
    context = TaskRunContext.get()
    if context is not None and context.result_store is not None:
        context.result_store.write(obj=ref, key=_record_key(root, ref))
    manifest = ref.manifest()
    store = ArtifactStore(root)
    _publish_lineage(ref, store.uri_of(ref.step, ref.key),
                     [store.uri_of(entry["step"], entry["key"]) for entry in manifest.get("inputs", [])])
    how = "built" if built else "reused intact"
    get_run_logger().info("%s %s: %d rows at %s (sha256 %s)", how, ref.step, ref.rows, ref.uri, ref.sha256[:12])
    return ref
