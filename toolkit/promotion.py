"""Champion/challenger as a pipeline task: record an evaluated model in the registry, promote it if it wins.

Beside the registry it writes to; the decision itself is `Registry.consider` (toolkit/registry.py).
"""

from __future__ import annotations

from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from catalog.caching import model_note
from catalog.store import ArtifactRef
from catalog.training_sections import PromoteConfig
from toolkit.registry import Registry, headline_metrics


def decision_markdown(decision: dict[str, Any]) -> str:
    verdict = "promoted to champion" if decision["promoted"] else "not promoted"
    lines = [f"# Model {decision['candidate']}: {verdict} ({decision['how']})", "",
             f"champion now: {decision['champion']} (before: {decision['champion_before']})", ""]
    return "\n".join(lines + [f"- {reason}" for reason in decision["reasons"]]) + "\n"


@task(name="promote", cache_policy=NO_CACHE, persist_result=False)
def promote(config: dict[str, Any], root: str, evaluated: ArtifactRef, finetuned: ArtifactRef) -> dict[str, Any]:
    """Prefect task: record the evaluated model in the registry and promote it if it beats the champion."""
    from prefect.artifacts import create_markdown_artifact
    from prefect.logging import get_run_logger
    from prefect.runtime import flow_run

    manifest = evaluated.manifest()
    candidate = {"model_key": finetuned.key, "model_uri": finetuned.uri, "evaluate_key": evaluated.key,
                 "evaluate_uri": evaluated.uri, "metrics": headline_metrics(manifest["metrics"])}
    decision = Registry(root).consider(candidate, PromoteConfig(**config), flow_run.id)
    get_run_logger().info("model %s %s: %s", finetuned.key, "promoted" if decision["promoted"] else "not promoted",
                          "; ".join(decision["reasons"]))
    create_markdown_artifact(decision_markdown(decision) + model_note(finetuned, flow_run.id), key="itune-promotion",
                             description="promotion decision")
    return decision
