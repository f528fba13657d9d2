"""Shared fixtures: a real Prefect API (test harness), tiny configs, and the shared real data."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def tiny_overrides(root: Path, **extra: object) -> list[str]:
    """Give back --set overrides for a pipeline that runs in seconds on CPU."""
    values = {
        "artifacts.root": str(root),
        "data.builtin_examples": 300,
        "model.name": "scratch:tiny",  # 2 layers: the quickstart's 4 would only make tests slower
        "train.max_steps": 8,
        "train.batch_size": 16,
        "train.logging_steps": 4,
        "train.eval_rows": 8,  # the val-loss points stay a small share of a few-step run
        "eval.max_examples": 16,
        "eval.max_new_tokens": 8,
        "template.val_fraction": 0.1,
        "template.test_fraction": 0.1,
        **extra,
    }
    return [f"{key}={value}" for key, value in values.items()]


@pytest.fixture(scope="session")
def prefect_api():
    """A real Prefect API on a temporary database for the whole test session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.fail(f"the shared data folder {SHARED_DATA} is missing; clone the project beside ../shared")
    return SHARED_DATA


def _folder(parent: Path, prefix: str) -> Path:
    return Path(tempfile.mkdtemp(prefix=prefix, dir=parent))


@pytest.fixture
def ingest_frames(tmp_path):
    """Give back a function: DataConfig -> (rows, quarantine), as write_ingest wrote them to a fresh folder."""
    import pandas as pd

    from catalog import layout
    from tasks.ingest import write_ingest

    def run(config, **options):
        out = _folder(tmp_path, "ingest")
        write_ingest(config, out, **options)
        return layout.read_data(out).to_pandas(), pd.read_parquet(layout.quarantine_file(out))

    return run


@pytest.fixture
def clean_frames(tmp_path):
    """Give back a function: (ingested rows, CleanConfig) -> (kept rows, dropped rows), as write_clean wrote them."""
    import pandas as pd

    from catalog import layout
    from tasks.clean import write_clean
    from tasks.ingest import QUARANTINE_COLUMNS

    def run(frame, config, **options):
        ingested = _folder(tmp_path, "ingest")
        frame.to_parquet(layout.data_path(ingested), index=False)
        pd.DataFrame(columns=QUARANTINE_COLUMNS).to_parquet(layout.quarantine_file(ingested))
        out = _folder(tmp_path, "clean")
        write_clean(config, ingested, out, **options)
        return layout.read_data(out).to_pandas(), pd.read_parquet(layout.quarantine_file(out))

    return run
