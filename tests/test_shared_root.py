"""An fsspec URL as the artifact root: machines with separate local mirrors share artifacts and the registry.

The shared storage is fsspec's in-memory filesystem (real fsspec calls, the protocol S3 and GCS
implement); each "machine" is a separate mirror folder set through ITUNE_MIRROR.
"""

import json
import uuid

import fsspec
import pytest

from catalog.config import STEPS, load_config
from catalog.shared_root import MIRROR_ENV
from catalog.step import Step
from catalog.store import MANIFEST, ArtifactStore, sha256_file
from commands.running import run_pipeline
from tests.conftest import tiny_overrides
from toolkit.registry import Registry


@pytest.fixture
def shared_url():
    url = f"memory://itune-{uuid.uuid4().hex[:8]}"
    yield url
    fs, path = fsspec.core.url_to_fs(url)
    fs.rm(path, recursive=True)


def _states(summary):
    return {step: info["state"] for step, info in summary["steps"].items()}


@pytest.mark.usefixtures("prefect_api")
def test_a_second_machine_reuses_every_artifact_and_the_champion_from_the_shared_root(tmp_path, monkeypatch,
                                                                                      shared_url):
    overrides = tiny_overrides(tmp_path / "unused", **{"artifacts.root": shared_url})
    monkeypatch.setenv(MIRROR_ENV, str(tmp_path / "machine-a"))
    first = run_pipeline(load_config(overrides=overrides), "evaluate")
    assert _states(first) == dict.fromkeys(STEPS, "Completed"), first.get("error")
    fs, base = fsspec.core.url_to_fs(shared_url)
    for step, info in first["steps"].items():
        manifest = json.loads(fs.cat_file(f"{base}/{step}/{info['key']}/{MANIFEST}"))
        assert manifest["rows"] == info["rows"]

    monkeypatch.setenv(MIRROR_ENV, str(tmp_path / "machine-b"))
    second = run_pipeline(load_config(overrides=overrides), "evaluate")
    assert _states(second) == dict.fromkeys(STEPS, "Cached")
    mirror_b = ArtifactStore(shared_url).root
    mirror_a = tmp_path / "machine-a" / mirror_b.name
    for step, info in second["steps"].items():
        assert info["artifact"] == first["steps"][step]["artifact"] == f"{shared_url}/{step}/{info['key']}"
        fetched, built = mirror_b / step / info["key"], mirror_a / step / info["key"]
        files = json.loads((built / MANIFEST).read_text())["files"]
        assert {name: sha256_file(fetched / name) for name in files} == files

    registry = Registry(shared_url)
    assert registry.champion()["model_key"] == first["steps"]["finetune"]["key"]
    model = registry.model_folder("champion")
    assert model.is_relative_to(tmp_path / "machine-b") and (model / "model" / "config.json").is_file()


def _write(rows):
    def build(out, inputs):
        (out / "data.txt").write_text("\n".join(rows))
        return {"rows": len(rows)}
    return build


def test_a_tampered_or_half_uploaded_shared_copy_is_never_read_and_a_rebuild_repairs_it(tmp_path, monkeypatch,
                                                                                         shared_url):
    step = Step("clean", "tests.test_shared_root")
    monkeypatch.setenv(MIRROR_ENV, str(tmp_path / "machine-a"))
    built, fresh = step.produce({}, shared_url, [], _write(["a", "b"]))
    assert fresh
    fs, base = fsspec.core.url_to_fs(shared_url)
    shared_file = f"{base}/clean/{built.key}/data.txt"
    fs.pipe_file(shared_file, b"tampered")

    monkeypatch.setenv(MIRROR_ENV, str(tmp_path / "machine-b"))
    assert ArtifactStore(shared_url).manifest("clean", built.key) is None
    assert not ArtifactStore(shared_url).path("clean", built.key).exists()
    rebuilt, fresh = step.produce({}, shared_url, [], _write(["a", "b"]))
    assert fresh and rebuilt.sha256 == built.sha256
    assert fs.cat_file(shared_file) == b"a\nb"

    fs.rm(f"{base}/clean/{built.key}/{MANIFEST}")  # as if the upload stopped before its last file
    monkeypatch.setenv(MIRROR_ENV, str(tmp_path / "machine-c"))
    assert ArtifactStore(shared_url).manifest("clean", built.key) is None
