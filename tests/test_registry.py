"""The model registry and the champion/challenger decision, on synthetic metrics and a real file lock."""

import json
import multiprocessing

import pytest

from catalog.config import PromoteConfig
from toolkit.registry import Registry, RegistryError, decide


def _candidate(key, exact, val_loss=1.0, rouge=0.5):
    return {"model_key": key, "model_uri": f"/models/{key}", "evaluate_key": f"eval-{key}",
            "evaluate_uri": f"/evals/{key}",
            "metrics": {"tuned_exact_match": exact, "tuned_val_loss": val_loss, "tuned_rouge_l": rouge}}


def test_first_model_becomes_champion_and_the_file_says_so(tmp_path):
    registry = Registry(tmp_path)
    decision = registry.consider(_candidate("a", 0.1), PromoteConfig(), flow_run_id="run-1")
    assert decision["promoted"] and decision["how"] == "first"
    on_disk = json.loads((tmp_path / "registry" / "registry.json").read_text())
    assert on_disk["champion"]["model_key"] == "a"
    assert registry.decision_for_run("run-1")["candidate"] == "a"


def test_better_candidate_is_promoted_worse_is_not_and_history_keeps_both(tmp_path):
    registry = Registry(tmp_path)
    registry.consider(_candidate("a", 0.30), PromoteConfig())
    worse = registry.consider(_candidate("b", 0.20), PromoteConfig())
    assert not worse["promoted"] and "does not beat" in worse["reasons"][0]
    assert registry.champion()["model_key"] == "a"
    better = registry.consider(_candidate("c", 0.40), PromoteConfig())
    assert better["promoted"] and better["champion_before"] == "a"
    assert registry.champion()["model_key"] == "c"
    data = registry.load()
    assert [e["candidate"] for e in data["history"]] == ["a", "b", "c"]
    assert set(data["candidates"]) == {"a", "b", "c"}


def test_better_primary_with_a_regression_beyond_tolerance_is_not_promoted():
    champion = _candidate("a", 0.30, val_loss=1.00)["metrics"]
    config = PromoteConfig(tolerances={"tuned_val_loss": 0.05})
    within = decide(_candidate("b", 0.40, val_loss=1.04)["metrics"], champion, config)
    beyond = decide(_candidate("c", 0.40, val_loss=1.20)["metrics"], champion, config)
    assert within.promoted
    assert not beyond.promoted and any("regresses by 0.2000 > tolerance 0.05" in r for r in beyond.reasons)


def test_loss_as_primary_metric_means_lower_is_better_and_min_improvement_counts():
    config = PromoteConfig(primary_metric="tuned_val_loss", tolerances={}, min_improvement=0.1)
    champion = {"tuned_val_loss": 2.0}
    assert decide({"tuned_val_loss": 1.5}, champion, config).promoted
    assert not decide({"tuned_val_loss": 1.95}, champion, config).promoted  # better, not by enough
    assert not decide({"tuned_val_loss": 2.5}, champion, config).promoted


def test_disabled_promotion_and_reevaluated_champion_change_nothing(tmp_path):
    registry = Registry(tmp_path)
    registry.consider(_candidate("a", 0.1), PromoteConfig())
    again = registry.consider(_candidate("a", 0.9), PromoteConfig())
    assert not again["promoted"] and "already the champion" in again["reasons"][0]
    assert registry.champion()["metrics"]["tuned_exact_match"] == 0.9  # figures kept current
    off = registry.consider(_candidate("b", 1.0), PromoteConfig(enabled=False))
    assert not off["promoted"] and registry.champion()["model_key"] == "a"


def test_manual_promotion_is_recorded_as_manual_and_unknown_model_is_an_error(tmp_path):
    registry = Registry(tmp_path)
    registry.consider(_candidate("aaa1", 0.5), PromoteConfig())
    registry.consider(_candidate("bbb2", 0.1), PromoteConfig())
    decision = registry.promote_manual("bbb", "rollback test")
    assert decision["promoted"] and decision["how"] == "manual" and decision["reasons"] == ["rollback test"]
    assert registry.champion()["model_key"] == "bbb2" and registry.champion()["how"] == "manual"
    with pytest.raises(RegistryError, match="no evaluated model 'zzz'"):
        registry.promote_manual("zzz")


def _consider_in_process(root, key):
    Registry(root).consider(_candidate(key, int(key[1:]) / 100), PromoteConfig())


def test_concurrent_writers_lose_no_entry(tmp_path):
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_consider_in_process, args=(str(tmp_path), f"m{i}")) for i in range(6)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
        assert worker.exitcode == 0
    data = Registry(tmp_path).load()
    assert set(data["candidates"]) == {f"m{i}" for i in range(6)}
    assert len(data["history"]) == 6
    assert sum(e["promoted"] for e in data["history"]) >= 1
    assert not list((tmp_path / "registry").glob(".registry.json.*"))  # no temp file left behind
