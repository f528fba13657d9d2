"""Where the data steps' per-batch work runs: in this process (the default) or on a Dask cluster.

A step streams its input in Arrow batches; `map_batches` hands each batch to a row-local function and
gives the results back in input order, so the step writes exactly the bytes it writes in-process (given
the same library versions on the workers). Only a bounded number of batches is out at once, so memory
stays that of a few batches whatever the input. The runner is not part of any step's key: it changes
where the work runs, never what it produces.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

from prefect import task
from prefect.cache_policies import NONE

from catalog.sections import RunnerConfig

T = TypeVar("T")
R = TypeVar("R")


@task(name="batch", task_run_name="{step} batch {index}", cache_policy=NONE, persist_result=False,
      log_prints=False)
def run_batch(fn: Callable[..., Any], batch: Any, args: tuple[Any, ...], step: str, index: int) -> Any:
    """Prefect task: one batch of a step, run on a Dask worker (a task run of its own in the UI)."""
    return fn(batch, *args)


def _reports_to_prefect() -> bool:
    """Whether batches should become Prefect task runs: inside a run, with an API the workers can share."""
    from prefect.context import FlowRunContext, TaskRunContext
    from prefect.settings import PREFECT_API_URL

    # Without an API URL each worker's task engine starts a temporary Prefect server of its own (measured here:
    # 31 s for six trivial batches on 2 workers) and records the runs in a database nobody looks at; outside a
    # run there is nothing to attach them to. Both cases submit the plain function instead.
    return bool(PREFECT_API_URL.value()) and (FlowRunContext.get() is not None or TaskRunContext.get() is not None)


def _dask_task_runner(config: RunnerConfig) -> Any:
    from prefect_dask import DaskTaskRunner

    if config.address:
        return DaskTaskRunner(address=config.address)
    # processes: tokenizing and rendering are Python-heavy and would share one GIL as threads
    return DaskTaskRunner(cluster_kwargs={"n_workers": config.workers, "threads_per_worker": 1,
                                          "processes": True, "dashboard_address": ":0"})


def _map_on_dask(fn: Callable[..., R], batches: Iterable[Any], args: tuple[Any, ...], config: RunnerConfig,
                 step: str) -> Iterator[R]:
    # prefect-dask's task runner owns the cluster (connect to `address`, or start and stop a local one) and its
    # client runs Prefect tasks; it needs no flow, so the work functions can use it when called from plain Python
    with _dask_task_runner(config) as runner:
        client = runner.client
        in_flight = config.batches_in_flight or 2 * max(sum(client.nthreads().values()), 1)
        as_tasks = _reports_to_prefect()
        pending: deque[Any] = deque()
        for index, batch in enumerate(batches):
            if as_tasks:
                pending.append(runner.submit(run_batch, parameters={
                    "fn": fn, "batch": batch, "args": args, "step": step, "index": index}))
            else:
                pending.append(client.submit(fn, batch, *args))
            if len(pending) >= in_flight:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def map_batches(fn: Callable[..., R], batches: Iterable[T], *args: Any, runner: RunnerConfig | None = None,
                step: str = "data") -> Iterator[R]:
    """Yield fn(batch, *args) for each batch, in input order, on the configured runner.

    `fn` must be a module-level function (workers import it by name); `step` names the batches' task runs.
    """
    if runner is None or runner.kind == "local":
        return (fn(batch, *args) for batch in batches)
    return _map_on_dask(fn, batches, args, runner, step)
