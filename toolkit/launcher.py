"""Run a work function in several processes with PyTorch's elastic launcher (torchrun), and report failures.

`launch("package.module:function", kwargs, nproc_per_node=N)` starts `python -m torch.distributed.run`,
whose workers call the function with the same keyword arguments (JSON). Rank 0's return value comes
back; a failing rank fails the launch with one line naming the rank and the cause.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
from collections import deque
from pathlib import Path
from typing import Any

RESULT = "result.json"


class LaunchError(RuntimeError):
    """One or more ranks of a distributed launch failed; the message names the first and its cause."""


def launch(entry: str, kwargs: dict[str, Any], nproc_per_node: int, nnodes: int = 1,
           rdzv_endpoint: str | None = None, echo: Any = None) -> Any:
    """Give back what rank 0's `entry(**kwargs)` returned, after all ranks finished.

    `echo(line)` receives the workers' output lines (default: this process's stderr).
    """
    if nnodes > 1 and not rdzv_endpoint:
        raise LaunchError("train.nnodes > 1 needs train.rdzv_endpoint (host:port that every host reaches)")
    with tempfile.TemporaryDirectory(prefix="itune-launch-") as work:
        folder = Path(work)
        (folder / "kwargs.json").write_text(json.dumps(kwargs, default=str), encoding="utf-8")
        command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc_per_node}",
                   f"--nnodes={nnodes}"]
        command += ["--rdzv_backend=c10d", f"--rdzv_endpoint={rdzv_endpoint}"] if nnodes > 1 else ["--standalone"]
        command += ["-m", "toolkit.launcher", entry, str(folder)]
        env = dict(os.environ)
        # CPU workers share the cores: without this each would start a thread per core and they would thrash
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc_per_node)))
        tail: deque[str] = deque(maxlen=200)
        with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                              cwd=Path(__file__).resolve().parents[1]) as process:
            assert process.stdout is not None
            for line in process.stdout:
                tail.append(line.rstrip("\n"))
                (echo or _to_stderr)(line.rstrip("\n"))
            code = process.wait()
        if code != 0:
            raise LaunchError(_failure(folder, list(tail), code))
        return json.loads((folder / RESULT).read_text(encoding="utf-8"))


def _to_stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _failure(folder: Path, tail: list[str], code: int) -> str:
    """Give back one line: the rank that failed first and its cause (its Python error, or how it died).

    torchrun names the first failure it observed ("Root Cause"); the other ranks' errors (a peer's
    connection reset, say) follow from it, so it is preferred over their reports.
    """
    reports = {int(p.stem.split("-")[1]): json.loads(p.read_text(encoding="utf-8"))
               for p in folder.glob("rank-*.json")}
    text = "\n".join(tail)
    root_cause = text.split("Root Cause", 1)[1] if "Root Cause" in text else ""
    rank = re.search(r"rank\s*:\s*(\d+)", root_cause)
    exitcode = re.search(r"exitcode\s*:\s*(-?\d+)", root_cause)
    if rank:
        first = int(rank.group(1))
        number = int(exitcode.group(1)) if exitcode else code
        if number < 0:
            return (f"rank {first} died (killed by {signal.Signals(-number).name}) without a Python error; "
                    "the launcher stopped the other ranks")
        if first in reports:
            return f"rank {first} failed: {reports[first]['error']}"
        return f"rank {first} exited with code {number}"
    if reports:
        first = min(reports)
        return f"rank {first} failed: {reports[first]['error']}"
    return f"the distributed launch failed with exit code {code}: {tail[-1] if tail else 'no output'}"


def _worker(entry: str, folder: Path) -> None:
    rank = int(os.environ.get("RANK", "0"))
    module, _, function = entry.partition(":")
    kwargs = json.loads((folder / "kwargs.json").read_text(encoding="utf-8"))
    try:
        result = getattr(importlib.import_module(module), function)(**kwargs)
    except BaseException as exc:
        cause = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        (folder / f"rank-{rank}.json").write_text(json.dumps({"rank": rank, "error": f"{type(exc).__name__}: {cause}"}))
        raise
    if rank == 0:
        (folder / RESULT).write_text(json.dumps(result, default=str), encoding="utf-8")


if __name__ == "__main__":
    _worker(sys.argv[1], Path(sys.argv[2]))
