"""The `runner` setting: the data steps' batches on a real local Dask cluster give the local runner's exact bytes."""

import hashlib
import os

import pytest

from catalog.config import STEPS, CleanConfig, DataConfig, RunnerConfig, TemplateConfig, TokenizeConfig, load_config
from catalog.store import ArtifactRef
from tasks.clean import write_clean
from tasks.ingest import write_ingest
from tasks.template import STEP as TEMPLATE_STEP
from tasks.template import write_template
from tasks.tokenize import STEP as TOKENIZE_STEP
from tasks.tokenize import write_tokenize


def _sha256(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _executed(dask_worker):
    return dask_worker.state.executed_count


@pytest.fixture(scope="module")
def cluster():
    """Two worker processes, one thread each: a stand-in for an existing cluster reached by its address."""
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as local, \
            Client(local, set_as_default=False) as client:
        yield local.scheduler_address, client


@pytest.fixture(scope="module")
def dask_runner(cluster):
    # a small bound: many more batches than are ever out at once, so order and the bound are both exercised
    return RunnerConfig(kind="dask", address=cluster[0], batches_in_flight=3)


@pytest.fixture(scope="module")
def ingested(tmp_path_factory, shared_data):
    """2,000 real T0 rows (adversarial QA: long passages, so tokenize truncates some)."""
    out = tmp_path_factory.mktemp("ingest")
    source = shared_data / "self-instruct" / "t0_train_50k" / "ad*.jsonl"
    write_ingest(DataConfig(source=str(source), max_rows=2000), out)
    return out


@pytest.fixture(scope="module")
def templated(tmp_path_factory, ingested):
    out = tmp_path_factory.mktemp("template")
    write_template(TemplateConfig(), ingested, out, batch_rows=500)
    return out


def _run_both(tmp_path, write, dask_runner, files=("data.parquet",)):
    """Run `write(out, runner)` on each runner, check the files have equal bytes; give back each run's statistics."""
    stats = {}
    for runner in (RunnerConfig(), dask_runner):
        out = tmp_path / runner.kind
        out.mkdir()
        stats[runner.kind] = write(out, runner)
    for name in files:
        dask, local = (sorted((tmp_path / run).glob(f"{name}/*.parquet")) or [tmp_path / run / name]
                       for run in ("dask", "local"))
        assert [(p.name, _sha256(p)) for p in dask] == [(p.name, _sha256(p)) for p in local], name
    assert stats["dask"] == stats["local"]
    return stats["local"]


def test_clean_checks_batches_on_the_cluster_and_writes_the_same_bytes(tmp_path, ingested, dask_runner):
    stats = _run_both(tmp_path, lambda out, runner: write_clean(CleanConfig(), ingested, out, 500, runner),
                      dask_runner, files=("data.parquet", "quarantine.parquet"))
    assert stats["rows"] > 1500 and stats["dropped"]


def test_template_runs_on_both_workers_and_writes_the_same_bytes(tmp_path, ingested, dask_runner, cluster):
    client = cluster[1]
    before = client.run(_executed)
    stats = _run_both(tmp_path, lambda out, runner: write_template(TemplateConfig(), ingested, out, 500, runner),
                      dask_runner)
    after = client.run(_executed)
    assert stats["rows"] == 2000
    assert len(after) == 2 and all(after[w] > before[w] for w in after), (before, after)
    assert os.getpid() not in client.run(os.getpid).values()


@pytest.mark.parametrize("packing", [False, True])
def test_tokenize_on_the_cluster_writes_the_same_bytes(tmp_path, templated, dask_runner, packing):
    config = TokenizeConfig(max_length=256, batch_size=250, packing=packing)
    stats = _run_both(tmp_path, lambda out, runner: write_tokenize(config, templated, out, runner), dask_runner)
    assert stats["passed"] and stats["examples"] == 2000
    assert stats["truncated_share"] > 0  # long passages: the truncation path ran on the workers too


def test_runner_is_part_of_no_step_key():
    local = load_config()
    on_dask = load_config(overrides=["runner.kind=dask", "runner.address=tcp://scheduler:8786", "runner.workers=8"])
    assert all(on_dask.step_config(step) == local.step_config(step) for step in STEPS)
    upstream = ArtifactRef(step="validate", key="0" * 64, uri="/nowhere", rows=1, sha256="0" * 64)
    for step in (TEMPLATE_STEP, TOKENIZE_STEP):
        assert step.key(on_dask.step_config(step.name), [upstream]) == step.key(local.step_config(step.name),
                                                                                 [upstream])

