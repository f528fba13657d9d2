"""The pipeline flow: ingest -> clean -> validate -> template -> tokenize -> finetune -> evaluate (-> promote)."""

from __future__ import annotations

from typing import Any

from prefect import flow
from prefect.logging import get_run_logger

from catalog.config import STEPS, with_overrides
from catalog.store import ArtifactRef
from flows.changes import report_changes
from flows.finetune_flow import finetune as finetune_on_pool
from flows.lineage_artifact import publish_lineage
from tasks.clean import clean
from tasks.evaluate import evaluate
from tasks.finetune import finetune
from tasks.ingest import ingest
from tasks.template import template
from tasks.tokenize import tokenize
from tasks.validate import validate
from toolkit.promotion import promote
from toolkit.warm_start import finetune_config


@flow(name="itune-pipeline", log_prints=False)
def pipeline(config: dict[str, Any], until: str = "evaluate", overrides: list[str] | None = None
             ) -> dict[str, ArtifactRef]:
    """Run the steps in order up to `until`; give back each finished step's artifact reference.

    `overrides` (`key=value`, as `itune run --set`) are applied on top of `config`, so a triggered run
    shows in the UI exactly what it changed from its deployment's config.
    """
    cfg = with_overrides(config, overrides or [])
    root = cfg.artifacts.root
    # a parameter of its own, not part of step_config: where batches run never changes a step's key
    runner = cfg.section("runner")
    done: dict[str, ArtifactRef] = {}
    last = STEPS.index(until)

    def keep(step: str, ref: ArtifactRef) -> bool:
        done[step] = ref
        if STEPS.index(step) < last:
            return True
        publish_lineage(done)  # the run's model (or last artifact) back to its sources, whether built or Cached
        return False

    raw = ingest(cfg.step_config("ingest"), root)
    if not keep("ingest", raw):
        return done
    cleaned = clean(cfg.step_config("clean"), root, raw, runner)
    if not keep("clean", cleaned):
        return done
    validated = validate(cfg.step_config("validate"), root, cleaned)
    if not keep("validate", validated):
        return done
    templated = template(cfg.step_config("template"), root, validated, runner)
    if not keep("template", templated):
        return done
    tokenized = tokenize(cfg.step_config("tokenize"), root, templated, runner)
    if not keep("tokenize", tokenized):
        return done
    # train.init_from=champion becomes the champion's key here, before fine-tune's key is computed
    training = finetune_config(cfg, get_run_logger().info)
    if cfg.train.work_pool:  # the dispatch may end in a Cached state of its own: take the reference from it
        model = finetune_on_pool(training, root, tokenized, cfg.train.work_pool, return_state=True).result()
    else:
        model = finetune(training, root, tokenized)
    if not keep("finetune", model):
        return done
    evaluated = evaluate(cfg.step_config("evaluate"), root, templated, tokenized, model)
    keep("evaluate", evaluated)
    decision = promote(cfg.section("promote"), root, evaluated, model)  # champion/challenger, kept in the registry
    report_changes(root, decision)  # what changed since the previous run, in the UI
    return done
