"""Deploy itune's fine-tune flow to a Prefect work pool: `python -m deployments.deploy --pool gpu`.

The deployment runs the flow from this checkout (a local source, no image), so a `process` worker
on the same machine, or on one that has the project at the same path, can pick it up.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from uuid import UUID

REPO = Path(__file__).resolve().parents[1]


def ensure_work_pool(pool: str, pool_type: str = "process") -> None:
    """Create the work pool if it does not exist yet (an existing one is left as it is)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists

    with get_client(sync_client=True) as client:
        try:
            client.create_work_pool(WorkPoolCreate(name=pool, type=pool_type))
        except ObjectAlreadyExists:
            pass


def deploy_finetune(pool: str, source: Path = REPO, pool_type: str = "process") -> UUID:
    """Give back the id of the fine-tune deployment on `pool`, creating the pool and deployment as needed."""
    from prefect import flow

    from flows.finetune_flow import deployment_name

    ensure_work_pool(pool, pool_type)
    remote = flow.from_source(source=str(source), entrypoint="flows/finetune_flow.py:finetune_flow")
    return remote.deploy(name=deployment_name(pool).split("/", 1)[1], work_pool_name=pool, build=False, push=False,
                         print_next_steps=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pool", default="gpu", help="work pool name (train.work_pool in the config)")
    parser.add_argument("--type", default="process", help="work pool type when it has to be created")
    args = parser.parse_args()
    deployment = deploy_finetune(args.pool, pool_type=args.type)
    print(f"deployed {deployment}; start a worker with: prefect worker start --pool {args.pool}")


if __name__ == "__main__":
    main()
