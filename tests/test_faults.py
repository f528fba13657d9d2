"""Faults on disk and at random moments: corrupted artifacts are rebuilt, a fine-tune killed anywhere resumes."""

import json
import shutil
from pathlib import Path

import pytest

from benchmarks.bench_faults import artifact_problems, cli_env, intact, run_trials
from catalog import layout
from catalog.config import STEPS, load_config
from catalog.store import MANIFEST, ArtifactStore
from commands.running import run_pipeline
from tests.conftest import tiny_overrides

pytestmark = pytest.mark.usefixtures("prefect_api")


def _states(summary: dict) -> dict[str, str]:
    return {step: info["state"] for step, info in summary["steps"].items()}


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[list[str], dict]:
    """A root with ingest..tokenize built once; every damage case below leaves it as it found it."""
    overrides = tiny_overrides(tmp_path_factory.mktemp("corrupt") / "artifacts")
    first = run_pipeline(load_config(overrides=overrides), "tokenize")
    assert "error" not in first, first.get("error")
    return overrides, first


def _data_file(folder: Path) -> Path:
    return layout.data_parts(folder)[0]


def _truncate(folder: Path) -> None:
    data = _data_file(folder)
    with open(data, "r+b") as handle:
        handle.truncate(data.stat().st_size // 2)


def _flip(folder: Path) -> None:
    data = _data_file(folder)
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # same size, footer intact: Parquet may well read it without complaint
    data.write_bytes(bytes(raw))


def _data_name(folder: Path) -> str:
    return _data_file(folder).relative_to(folder).as_posix()


def _tear_manifest(folder: Path) -> None:
    manifest = folder / MANIFEST
    manifest.write_text(manifest.read_text()[:100])


DAMAGES = {
    "truncated parquet": _truncate,
    "flipped byte": _flip,
    "manifest without data": lambda folder: shutil.rmtree(layout.data_path(folder)),
    "data without manifest": lambda folder: (folder / MANIFEST).unlink(),
    "torn manifest": _tear_manifest,
}


@pytest.mark.parametrize("damage", DAMAGES)
def test_corrupted_artifact_is_rebuilt_and_its_reader_gets_the_rebuilt_data(built, damage):
    overrides, first = built
    template, tokenize = (Path(first["steps"][step]["artifact"]) for step in ("template", "tokenize"))
    store = ArtifactStore(template.parent.parent)
    # The data file's hash: tokenize's Data Docs carry a timestamp, so only the data is the same on every build.
    original = {step: store.manifest(step, folder.name)["files"][_data_name(folder)]
                for step, folder in (("template", template), ("tokenize", tokenize))}
    DAMAGES[damage](template)
    assert store.manifest("template", template.name) is None
    # Tokenize must run too: had it read the damaged template, its output would not be the original's.
    (tokenize / MANIFEST).unlink()

    again = run_pipeline(load_config(overrides=overrides), "tokenize")
    assert "error" not in again, again.get("error")
    assert _states(again) == {**dict.fromkeys(STEPS[:3], "Cached"), "template": "Completed", "tokenize": "Completed"}
    for step, folder in (("template", template), ("tokenize", tokenize)):
        assert again["steps"][step]["artifact"] == str(folder)  # the same content key, rebuilt in place
        manifest = store.manifest(step, folder.name)
        assert manifest is not None and manifest["files"][_data_name(folder)] == original[step]
    assert artifact_problems(store.root) == [] and intact(store.root) == dict.fromkeys(STEPS[:5], 1)


@pytest.mark.slow
def test_fine_tune_killed_at_random_moments_resumes_to_the_uninterrupted_model(tmp_path, prefect_api):
    from prefect.settings import PREFECT_API_URL

    # One trial keeps the suite inside its time budget; benchmarks/bench_faults.py runs the same trial 20 times
    # (benchmarks/RESULTS.md, "Reliability").
    env = cli_env(PREFECT_API_URL.value(), tmp_path / "prefect-home")
    reference, trials = run_trials(tmp_path, env, trials=1, seed=1)
    landed = [trial for trial in trials if trial.landed]
    assert len(landed) == 1, [trial.__dict__ for trial in trials]
    assert [trial.problems for trial in landed] == [[]], json.dumps([t.__dict__ for t in landed], default=str)
    assert reference.final_loss > 0
