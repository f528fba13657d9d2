"""Real servers for end-to-end tests: `prefect server start`, Prefect workers, PostgreSQL, headless Chromium.

Each runs as its own process group on 127.0.0.1 and is stopped with its children when the test ends.
"""

from __future__ import annotations

import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.conftest import REPO

PREFECT = str(Path(sys.executable).with_name("prefect"))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start(command: list[str], env: dict[str, str], log: Path, user: str | None = None) -> subprocess.Popen:
    # Own session: servers and workers spawn children, and the whole group must go at cleanup.
    if user:
        command = ["runuser", "-u", user, "--", *command]
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def wait_healthy(url: str, server: subprocess.Popen, log: Path, timeout: float = 180) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert server.poll() is None, log.read_text()[-3000:]
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    pytest.fail(f"prefect server did not start: {log.read_text()[-2000:]}")


def prefect_env(home: Path, url: str) -> dict[str, str]:
    """Environment for CLI, server and worker processes that share one Prefect server."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(home), PREFECT_API_URL=url, PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PREFECT_WORKER_QUERY_SECONDS="1", PREFECT_RESULTS_PERSIST_BY_DEFAULT="false", HF_HUB_OFFLINE="1")
    return env


@contextmanager
def prefect_server(tmp_path: Path, database_url: str | None = None) -> Iterator[dict[str, str]]:
    """A `prefect server start` on 127.0.0.1 (SQLite in a temporary home, or the given database); yields the env
    that points processes at it."""
    url = f"http://127.0.0.1:{free_port()}/api"
    env = prefect_env(tmp_path / "prefect-home", url)
    server_env = dict(env, PREFECT_SERVER_DATABASE_CONNECTION_URL=database_url) if database_url else env
    port = url.split(":")[2].split("/")[0]
    server = start([PREFECT, "server", "start", "--host", "127.0.0.1", "--port", port], server_env,
                   tmp_path / "server.log")
    try:
        wait_healthy(url, server, tmp_path / "server.log")
        yield env
    finally:
        stop(server)


@contextmanager
def workers(tmp_path: Path, env: dict[str, str], pools: list[str]) -> Iterator[dict[str, Path]]:
    """One process worker per pool; yields each pool's worker log."""
    logs = {pool: tmp_path / f"worker-{pool}.log" for pool in pools}
    running = [start([PREFECT, "worker", "start", "--pool", pool, "--type", "process"], env, logs[pool])
               for pool in pools]
    try:
        yield logs
    finally:
        for process in running:
            stop(process)


def _postgres_bin(name: str) -> str:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}")) or [shutil.which(name) or ""]
    if not found[-1]:
        pytest.fail(f"PostgreSQL's {name} is not installed: `apt-get install postgresql` (.ci/run does it)")
    return found[-1]


@contextmanager
def postgres() -> Iterator[str]:
    """A throw-away PostgreSQL cluster on 127.0.0.1; yields an async SQLAlchemy URL for Prefect."""
    # PostgreSQL refuses to run as root: as root, the cluster belongs to Debian's `postgres` user.
    user = "postgres" if os.geteuid() == 0 else None
    data = Path(tempfile.mkdtemp(prefix="itune-pg-"))
    if user:
        shutil.chown(data, user)
    port = free_port()

    def as_owner(*command: str) -> None:
        prefix = ["runuser", "-u", user, "--"] if user else []
        subprocess.run([*prefix, *command], check=True, capture_output=True, timeout=120, cwd=data)

    as_owner(_postgres_bin("initdb"), "-D", str(data / "db"), "-U", "prefect", "--auth=trust", "-E", "UTF8")
    as_owner(_postgres_bin("pg_ctl"), "-D", str(data / "db"), "-l", str(data / "log"), "-w", "-t", "60", "-o",
             f"-p {port} -k {data} -c listen_addresses=127.0.0.1", "start")
    try:
        as_owner(_postgres_bin("createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "prefect", "prefect")
        yield f"postgresql+asyncpg://prefect@127.0.0.1:{port}/prefect"
    finally:
        as_owner(_postgres_bin("pg_ctl"), "-D", str(data / "db"), "-m", "fast", "-w", "stop")
        shutil.rmtree(data, ignore_errors=True)


def chromium():
    """Headless Chromium from Debian's packages, driven by Selenium with Debian's chromedriver (no downloads)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    browser, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not browser or not driver:
        pytest.fail("chromium and chromedriver are not installed: `apt-get install chromium chromium-driver` "
                    "(.ci/run does it)")
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--window-size=1600,1100"):
        options.add_argument(argument)
    return webdriver.Chrome(service=Service(driver), options=options)
