"""Lineage as a user follows it: `itune server` on a random port, two `itune run` in a row, then the Prefect UI
in headless Chromium from the all-Cached run's page to its model's source files, by clicking links only."""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from catalog.config import STEPS
from tests.conftest import REPO, tiny_overrides
from tests.servers import chromium, free_port, prefect_env, start, stop, wait_healthy
from toolkit.builtin_tasks import GENERATOR_VERSION

DEAD_UI = "Can't connect to Server API"


@contextmanager
def itune_server(tmp_path: Path) -> Iterator[dict[str, str]]:
    """`itune server` on a random port, started from a shell whose PREFECT_API_URL names the default server."""
    port = free_port()
    env = prefect_env(tmp_path / "prefect-home", f"http://127.0.0.1:{port}/api")
    server = start([sys.executable, "-m", "commands.app", "server", "--port", str(port)],
                   dict(env, PREFECT_API_URL="http://127.0.0.1:4200/api"), tmp_path / "server.log")
    try:
        wait_healthy(env["PREFECT_API_URL"], server, tmp_path / "server.log")
        yield env
    finally:
        stop(server)


def _page_text(browser, url: str, until: str, timeout: float = 90) -> str:
    from selenium.webdriver.common.by import By

    if url:
        browser.get(url)
    text = ""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and (until not in text or DEAD_UI in text):
        time.sleep(1)
        text = browser.find_element(By.TAG_NAME, "body").text
    return text


def _click(browser, xpath: str) -> None:
    from selenium.webdriver.common.by import By

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        found = [element for element in browser.find_elements(By.XPATH, xpath) if element.is_displayed()]
        if found:
            found[-1].click()  # the innermost element that matches
            return
        time.sleep(1)
    pytest.fail(f"nothing to click at {xpath} on {browser.current_url}")


def _itune_run(env: dict[str, str], root: Path) -> dict:
    import subprocess

    overrides = [arg for o in tiny_overrides(root) for arg in ("--set", o)]
    done = subprocess.run([sys.executable, "-m", "commands.app", "run", *overrides, "--json"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_itune_server_on_a_random_port_serves_a_ui_that_reaches_its_api(tmp_path):
    with itune_server(tmp_path) as env:
        ui = env["PREFECT_API_URL"].removesuffix("/api")
        assert httpx.get(f"{ui}/ui-settings", timeout=10).json()["api_url"] == env["PREFECT_API_URL"]
        browser = chromium()
        try:
            for page, expected in (("/dashboard", "Dashboard"), ("/runs", "Runs"), ("/", "Dashboard")):
                text = _page_text(browser, f"{ui}{page}", expected)
                assert expected in text and DEAD_UI not in text, f"{page}: {text[:1000]}"
        finally:
            browser.quit()


@pytest.mark.slow
def test_an_all_cached_runs_page_reaches_its_models_source_files_in_two_clicks(tmp_path):
    root = tmp_path / "artifacts"
    shots = tmp_path / "screenshots"
    shots.mkdir()
    with itune_server(tmp_path) as env:
        ui = env["PREFECT_API_URL"].removesuffix("/api")
        assert f":{ui.rsplit(':', 1)[1]}/api" in httpx.get(f"{ui}/ui-settings", timeout=10).json()["api_url"]
        _itune_run(env, root)
        again = _itune_run(env, root)
        assert {step: info["state"] for step, info in again["steps"].items()} == {step: "Cached" for step in STEPS}

        artifacts = httpx.post(f"{env['PREFECT_API_URL']}/artifacts/filter", timeout=20, json={
            "artifacts": {"flow_run_id": {"any_": [again["flow_run_id"]]}}}).json()
        lineage = [a for a in artifacts if "lineage" in (a["key"] or "")]
        assert len(lineage) == 1 and lineage[0]["type"] == "markdown"
        markdown = lineage[0]["data"]
        for step in STEPS[:-1]:  # the model's chain; its evaluation is linked in the header
            assert f"[{step} {again['steps'][step]['key'][:8]}](/artifacts/artifact/" in markdown, step
        assert "builtin:tasks" in markdown and GENERATOR_VERSION in markdown and "reused, built by run" in markdown
        tables = {a["key"]: a for a in artifacts if a["type"] == "table"}
        assert {f"itune-{step}" for step in STEPS} <= set(tables)  # published on cache hits too
        assert json.loads(tables["itune-clean"]["data"])[0]["upstream"].startswith("[ingest ")
        promotion = next(a for a in artifacts if a["key"] == "itune-promotion")["data"]
        assert again["steps"]["finetune"]["artifact"] in promotion and lineage[0]["id"] in promotion

        browser = chromium()
        try:
            run_page = f"{ui}/runs/flow-run/{again['flow_run_id']}"
            assert "Artifacts" in _page_text(browser, run_page, "Artifacts")
            browser.save_screenshot(str(shots / "run-page.png"))
            _click(browser, "//*[normalize-space(.)='Artifacts']")  # click 1: the run's Artifacts tab
            _click(browser, "//a[contains(., 'itune-lineage')]")  # click 2: its lineage artifact
            text = _page_text(browser, "", GENERATOR_VERSION)
            assert "Source files" in text and GENERATOR_VERSION in text, text[-2000:]
            assert browser.current_url.endswith(f"/artifacts/artifact/{lineage[0]['id']}")
            browser.save_screenshot(str(shots / "lineage.png"))
            from selenium.webdriver.common.by import By

            sources = browser.find_element(By.XPATH, "//*[normalize-space(.)='Source files']")
            browser.execute_script("arguments[0].scrollIntoView()", sources)
            browser.save_screenshot(str(shots / "lineage-sources.png"))
        finally:
            browser.quit()
    for shot in ("run-page.png", "lineage.png", "lineage-sources.png"):
        assert (shots / shot).stat().st_size > 10_000
    if os.environ.get("ITUNE_UPDATE_DOCS"):  # the README's picture of what a reader should expect
        shutil.copy(shots / "lineage.png", REPO / "docs" / "lineage.png")
