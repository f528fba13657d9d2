"""The fine-tune flow: step 6 on its own, deployable to a (GPU) work pool; and the pipeline's way to call it there.

With `train.work_pool` set, the pipeline does not train in-process: it starts this flow's deployment
on that pool with `run_deployment` (the run shows as a child of the pipeline run) and takes back the
artifact reference from the child's JSON result, then verifies it in the catalog.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, task
from prefect.states import Completed

from catalog.store import ArtifactRef, ArtifactStore
from tasks.finetune import finetune as finetune_step

FLOW_NAME = "itune-finetune"


@flow(name=FLOW_NAME, result_serializer="json", persist_result=True, log_prints=False)
def finetune_flow(config: dict[str, Any], root: str, tokenized: dict[str, Any]) -> dict[str, Any]:
    """Give back the fine-tuned model's artifact reference (as JSON data) for a tokenize artifact."""
    return finetune_step(config, root, ArtifactRef(**tokenized)).model_dump(mode="json")


def deployment_name(pool: str) -> str:
    """Give back the full name of the fine-tune deployment on a work pool (one deployment per pool)."""
    return f"{FLOW_NAME}/finetune-{pool}"


# Named `finetune` so the pipeline's summary lists this dispatch as the fine-tune step.
@task(name="finetune", result_serializer="json", persist_result=False)
def finetune(config: dict[str, Any], root: str, tokenized: ArtifactRef, pool: str) -> Any:
    """Prefect task: run the fine-tune deployment on `pool`, wait for it, give back its verified artifact."""
    from prefect.deployments import run_deployment

    run = run_deployment(deployment_name(pool), parameters={
        "config": config, "root": root, "tokenized": tokenized.model_dump(mode="json")}, as_subflow=True)
    if run.state is None or not run.state.is_completed():
        state = run.state.name if run.state else "unknown"
        raise RuntimeError(f"fine-tune on work pool '{pool}' ended {state}: {run.state.message if run.state else ''}"
                           f" (flow run {run.id}); is a worker running? `prefect worker start --pool {pool}`")
    ref = ArtifactRef(**run.state.result())
    ArtifactStore(root).open(ref)  # the pool's worker must have written where this pipeline reads
    if _reused_on_pool(run.id):
        # Say so in this run too: the UI, `itune run` and `itune runs` show the step as Cached, not retrained.
        return Completed(data=ref, name="Cached", message=f"fine-tune on work pool '{pool}' reused an intact model "
                                                          f"(flow run {run.id})")
    return ref


def _reused_on_pool(flow_run_id: Any) -> bool:
    from toolkit.run_states import state_name, task_runs_by_step

    finetune = task_runs_by_step([flow_run_id])[flow_run_id].get("finetune")
    return finetune is not None and state_name(finetune) == "Cached"
