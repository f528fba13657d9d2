"""A temporary local Prefect API for one `itune` command, started before Prefect is even imported.

Prefect's own ephemeral mode starts the same server app, but only after importing its server
package in-process (about 3 s here) and then waiting for it; starting the subprocess first lets
its start-up overlap with importing the pipeline, which is what a cached rerun mostly waits on.
"""

from __future__ import annotations

import atexit
import importlib.util
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path


class LocalAPIError(RuntimeError):
    """The temporary Prefect API did not come up."""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _die_with_parent() -> None:
    """Ask Linux to stop the API when the itune process dies, even by kill -9 (no orphaned servers)."""
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class LocalPrefectAPI:
    """Prefect's server app on 127.0.0.1 in a child process, using the current profile's database."""

    def __init__(self) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}/api"
        self._log = tempfile.TemporaryFile()
        spec = importlib.util.find_spec("prefect")
        assert spec is not None and spec.submodule_search_locations, "prefect is not installed"
        app_dir = Path(list(spec.submodule_search_locations)[0]).parent
        env = {**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "--app-dir", str(app_dir), "--factory",
             "prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port", str(self.port),
             "--log-level", "error", "--lifespan", "on"],
            env=env, stdout=self._log, stderr=subprocess.STDOUT,
            preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
        )
        atexit.register(self.stop)

    def wait_ready(self, timeout: float = 90.0) -> str:
        """Block until the API answers; give back its URL."""
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self._log.seek(0)
                tail = self._log.read().decode("utf-8", "replace").strip().splitlines()[-1:]
                raise LocalAPIError(f"the temporary Prefect API exited with code {self.process.returncode}: "
                                    f"{tail[0] if tail else 'no output'}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return self.url
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise LocalAPIError(f"the temporary Prefect API did not answer within {timeout:.0f} s")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
