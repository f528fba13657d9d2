"""Lay itune out on a Prefect server: work pools and deployments (`itune deploy`, or `python -m deployments.deploy`).

- `itune-pipeline/nightly`: the whole pipeline on the `cpu` pool, every night (deploy.nightly_time, deploy.timezone);
- `itune-pipeline/on-demand`: the same, unscheduled, for `itune trigger` and `prefect deployment run`;
- `itune-finetune/finetune-<gpu pool>`: the fine-tune flow on the `gpu` pool, deploy.finetune_concurrency at once.

The pipeline deployments carry the config they were deployed with, fine-tune sent to the gpu pool; with
`--set train.init_from=champion` each night continues from the champion of that moment (resolved at run time). Every
deployment runs the flows from this checkout (a local source, no image), so `process` workers on this machine,
or on machines that have the project at the same path, pick them up. Deploying again updates everything in place.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any
from uuid import UUID

from catalog.config import PipelineConfig
from catalog.shared_root import absolute_root

REPO = Path(__file__).resolve().parents[1]
PIPELINE_FLOW = "itune-pipeline"
NIGHTLY = f"{PIPELINE_FLOW}/nightly"
ON_DEMAND = f"{PIPELINE_FLOW}/on-demand"


def ensure_work_pool(pool: str, pool_type: str = "process") -> bool:
    """Create the work pool if it does not exist yet (an existing one is left as it is); say if it was created."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists

    with get_client(sync_client=True) as client:
        try:
            client.create_work_pool(WorkPoolCreate(name=pool, type=pool_type))
        except ObjectAlreadyExists:
            return False
    return True


def deploy_finetune(pool: str, source: Path = REPO, pool_type: str = "process", concurrency: int | None = 1) -> UUID:
    """Give back the id of the fine-tune deployment on `pool`, creating the pool and deployment as needed."""
    from prefect import flow

    from flows.finetune_flow import deployment_name

    ensure_work_pool(pool, pool_type)
    remote = flow.from_source(source=str(source), entrypoint="flows/finetune_flow.py:finetune_flow")
    return remote.deploy(name=deployment_name(pool).split("/", 1)[1], work_pool_name=pool, build=False, push=False,
                         concurrency_limit=concurrency, print_next_steps=False,
                         description="Step 6 alone: the pipeline sends fine-tune here when train.work_pool names "
                                     "this pool.")


def deployed_config(cfg: PipelineConfig) -> dict[str, Any]:
    """Give back the config the pipeline deployments run with: absolute artifact root, fine-tune on the gpu pool."""
    raw = cfg.as_dict()
    raw["artifacts"]["root"] = absolute_root(cfg.artifacts.root)
    raw["train"]["work_pool"] = cfg.train.work_pool or cfg.deploy.gpu_pool
    return raw


def deploy_all(cfg: PipelineConfig, source: Path = REPO, pool_type: str = "process") -> dict[str, Any]:
    """Create or update the pools and the three deployments; give back what was done, for printing."""
    from prefect import flow
    from prefect.schedules import Cron

    settings = cfg.deploy
    config = deployed_config(cfg)
    gpu_pool = config["train"]["work_pool"]
    created = [pool for pool in dict.fromkeys([settings.cpu_pool, gpu_pool]) if ensure_work_pool(pool, pool_type)]
    pipeline = flow.from_source(source=str(source), entrypoint="flows/pipeline.py:pipeline")
    common = {"work_pool_name": settings.cpu_pool, "build": False, "push": False, "print_next_steps": False,
              "parameters": {"config": config, "until": "evaluate", "overrides": []}}
    ids = {
        NIGHTLY: pipeline.deploy(
            name=NIGHTLY.split("/")[1], **common,
            schedules=[Cron(settings.nightly_cron(), timezone=settings.timezone, slug="nightly")],
            description=f"The whole pipeline every night at {settings.nightly_time} {settings.timezone}."),
        ON_DEMAND: pipeline.deploy(
            name=ON_DEMAND.split("/")[1], **common,
            description="The whole pipeline when asked: `itune trigger --set key=value --watch`."),
    }
    from flows.finetune_flow import deployment_name

    ids[deployment_name(gpu_pool)] = deploy_finetune(gpu_pool, source, pool_type, settings.finetune_concurrency)
    return {"deployments": ids, "pools_created": created, "cpu_pool": settings.cpu_pool, "gpu_pool": gpu_pool,
            "schedule": f"{settings.nightly_cron()} ({settings.timezone})"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=None, help="YAML config (default: the quickstart)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="override a key: key=value")
    parser.add_argument("--pool", default=None, help="deploy only the fine-tune flow, to this work pool")
    parser.add_argument("--type", default="process", help="work pool type when a pool has to be created")
    args = parser.parse_args()
    if args.pool:
        print(f"deployed {deploy_finetune(args.pool, pool_type=args.type)}; "
              f"start a worker with: prefect worker start --pool {args.pool}")
        return
    from catalog.config import load_config

    done = deploy_all(load_config(args.config, args.overrides), pool_type=args.type)
    for name, deployment in done["deployments"].items():
        print(f"{name}: {deployment}")


if __name__ == "__main__":
    main()
