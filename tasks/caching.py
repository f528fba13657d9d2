"""Prefect side of the catalog: a cache policy keyed on artifact content, and the thin-task options.

Prefect records a cache entry per (artifact root, step, key, content sha256). The policy only
answers with that entry's name when the artifact on disk is intact, so a deleted or corrupted
artifact is a cache miss and the step runs again, never a cached pointer to bad data.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from prefect.cache_policies import CachePolicy
from prefect.context import TaskRunContext
from prefect.logging import get_run_logger

from tasks.artifacts import ArtifactRef, ArtifactStore, Step, sha256_text


def _record_key(root: str, ref: ArtifactRef) -> str:
    return f"itune/{sha256_text(str(ArtifactStore(root).root))[:12]}/{ref.step}/{ref.key}/{ref.sha256[:16]}"


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


def finish_step(root: str, ref: ArtifactRef, built: bool) -> ArtifactRef:
    """Record the cache entry for a fresh artifact and log what the step produced."""
    context = TaskRunContext.get()
    if context is not None and context.result_store is not None:
        context.result_store.write(obj=ref, key=_record_key(root, ref))
    how = "built" if built else "reused intact"
    get_run_logger().info("%s %s: %d rows at %s (sha256 %s)", how, ref.step, ref.rows, ref.uri, ref.sha256[:12])
    return ref
