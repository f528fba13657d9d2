"""Great Expectations in a worker process of its own, importing while the steps before the gates work.

Importing Great Expectations costs about 3 s of CPU (its expectation registry, scipy, sqlalchemy), paid by every
run that builds a gated step: on a nightly run with 1% new rows, a fifth of what the data steps cost. A thread
could not hide it, since an import holds the GIL against the step running beside it. So when ingest or clean
starts building, `start()` spawns one worker that imports it on another core; validate and tokenize then hand
their checks to it with `run()`. Where Great Expectations is imported in this process already (a second run in
one process, the test suite) or no worker was started, the checks run here, with the same result either way.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import threading
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, TypeVar

Result = TypeVar("Result")
_worker: ProcessPoolExecutor | None = None
_lock = threading.Lock()


def _import_great_expectations() -> None:
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    import great_expectations  # noqa: F401 - the import is the work


def _exit_with(parent: int) -> None:
    """In the worker: end it once the process that started it is gone (killed with -9, it cannot say so)."""
    import time

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(0)

    threading.Thread(target=watch, name="gate-worker-parent-watch", daemon=True).start()


def start() -> None:
    """Start the worker and its import, once per process; nothing when this process has imported it already."""
    global _worker
    with _lock:
        if _worker is not None or "great_expectations" in sys.modules:
            return
        # spawn, not fork: the flow process runs Prefect's threads, and a fork copies their locks mid-use
        _worker = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"),
                                      initializer=_exit_with, initargs=(os.getpid(),))
        _worker.submit(_import_great_expectations)


def run(function: Callable[..., Result], *args: Any, **kwargs: Any) -> Result:
    """Give back `function(*args, **kwargs)` computed in the worker when one was started, else here.

    `function` must be importable by name and its arguments and result picklable. A worker that died (out of
    memory, killed) is not retried: the checks run here instead.
    """
    global _worker
    with _lock:
        worker = _worker
    if worker is not None:
        try:
            return worker.submit(function, *args, **kwargs).result()
        except BrokenProcessPool:
            with _lock:
                _worker = None
    return function(*args, **kwargs)
