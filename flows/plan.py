"""What a pipeline run would do now, without running anything: each step Cached or rebuilt, and why.

Keys follow from input keys, config and code alone, so the whole chain is known before any step runs.
"""

from __future__ import annotations

from dataclasses import dataclass

from catalog.config import STEPS, PipelineConfig
from catalog.layout import INPUTS
from catalog.step import Step
from catalog.store import ArtifactStore
from toolkit.warm_start import finetune_config


@dataclass
class StepStatus:
    step: str
    key: str
    cached: bool
    reasons: list[str]


def pipeline_steps() -> dict[str, Step]:
    """Give back each step's catalog identity, by name (importing the step modules, not running them)."""
    from tasks import clean, evaluate, finetune, ingest, template, tokenize, validate

    modules = (ingest, clean, validate, template, tokenize, finetune, evaluate)
    return {module.STEP.name: module.STEP for module in modules}


def plan_pipeline(cfg: PipelineConfig, until: str = "evaluate") -> list[StepStatus]:
    """Give back, step by step up to `until`, whether a run now would reuse the artifact on disk or build it."""
    steps = pipeline_steps()
    store = ArtifactStore(cfg.artifacts.root)
    keys: dict[str, str] = {}
    statuses: list[StepStatus] = []
    for name in STEPS[: STEPS.index(until) + 1]:
        config = finetune_config(cfg) if name == "finetune" else cfg.step_config(name)
        plan = steps[name].plan(config, cfg.artifacts.root, [(i, keys[i]) for i in INPUTS[name]])
        keys[name] = plan.key
        reasons = plan.reasons(store)
        rebuilt_first = [s.step for s in statuses if not s.cached and s.step in INPUTS[name]]
        if rebuilt_first:
            reasons = [f"input {step} is rebuilt first" for step in rebuilt_first] + \
                [r for r in reasons if not r.startswith(tuple(f"input {step} " for step in rebuilt_first))]
        statuses.append(StepStatus(name, plan.key, plan.cached, reasons))
    return statuses
