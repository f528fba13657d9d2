"""Lineage: manifests chain back to the source, and Prefect records asset events and UI artifacts."""

import time

import pytest

from catalog.caching import asset_key
from catalog.config import load_config
from catalog.lineage import lineage, resolve
from commands.running import run_pipeline
from tests.conftest import tiny_overrides

pytestmark = pytest.mark.usefixtures("prefect_api")


def _materialized_assets(prefix: str, expected: int) -> set[str]:
    from prefect.client.orchestration import get_client
    from prefect.events.filters import EventFilter, EventNameFilter, EventResourceFilter

    wanted = EventFilter(event=EventNameFilter(name=["prefect.asset.materialization.succeeded"]),
                         resource=EventResourceFilter(id_prefix=[prefix]))
    found: set[str] = set()
    deadline = time.monotonic() + 30  # the server persists events in batches
    while time.monotonic() < deadline:
        with get_client(sync_client=True) as client:
            page = client.read_events(filter=wanted, limit=50)
        found = {e.resource.id for e in page.events if e.resource.id.startswith(prefix)}
        if len(found) >= expected:
            break
        time.sleep(1)
    return found


def test_each_step_materializes_an_asset_and_lineage_leads_to_the_source(tmp_path):
    root = tmp_path / "artifacts"
    summary = run_pipeline(load_config(overrides=tiny_overrides(root)), "template")
    assert "error" not in summary, summary.get("error")
    uris = {step: info["artifact"] for step, info in summary["steps"].items()}

    chain = lineage(resolve(uris["template"], root))
    assert [link["step"] for link in chain] == ["template", "validate", "clean", "ingest"]
    assert all(link["verified"] and link["code_version"] for link in chain)
    assert chain[-1]["config"]["source"] == "builtin:tasks"

    assets = _materialized_assets(asset_key(str(root)), expected=4)
    assert assets == {asset_key(uri) for uri in uris.values()}

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        tables = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["itune-ingest"])))
    assert any(asset_key(uris["ingest"]) in str(t.data) for t in tables)
