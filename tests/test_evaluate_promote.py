"""Evaluate and promote end to end: real Prefect, real tiny GPT-2 trained on the built-in tasks, the CLI.

Three runs share one artifact root: a barely trained model (the first, so champion), a trained one
(better: promoted), and another barely trained one (worse: kept out, and the run still succeeds).
"""

import json

import pytest
from typer.testing import CliRunner

from catalog.config import load_config
from commands.app import app
from commands.running import run_pipeline
from tests.conftest import tiny_overrides

pytestmark = pytest.mark.usefixtures("prefect_api")

TRAINED_STEPS = 150


def _run(root, **extra):
    settings = {"data.builtin_examples": 600, "eval.max_examples": 40, "train.batch_size": 32,
                "train.logging_steps": 10, **extra}
    summary = run_pipeline(load_config(overrides=tiny_overrides(root, **settings)), "evaluate")
    assert "error" not in summary, summary.get("error")
    return summary


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("promote") / "artifacts"
    first = _run(root, **{"train.max_steps": 2})
    trained = _run(root, **{"train.max_steps": TRAINED_STEPS})
    worse = _run(root, **{"train.max_steps": 2, "train.seed": 1})
    return root, first, trained, worse


def test_tuned_model_beats_base_and_the_report_and_loss_curve_exist(runs):
    _, _, trained, _ = runs
    metrics = trained["metrics"]
    assert metrics["tuned_exact_match"] > metrics["base_exact_match"]
    assert metrics["tuned_val_loss"] < metrics["base_val_loss"]
    assert metrics["tuned_val_loss_full_sequence"] > 0 and "tuned_rouge_l" in metrics
    assert {row["scoring"] for row in metrics["per_category"].values()} == {"exact_match"}  # built-in: checkable
    folder = trained["steps"]["evaluate"]["artifact"]
    with open(f"{folder}/loss_curve.png", "rb") as png:
        assert png.read(8) == b"\x89PNG\r\n\x1a\n"
    with open(f"{folder}/report.md", encoding="utf-8") as handle:
        report = handle.read()
    assert "| exact match (all examples) |" in report and "## Sample generations" in report


def test_first_model_is_champion_better_is_promoted_worse_is_not(runs):
    _, first, trained, worse = runs
    assert first["promotion"]["promoted"] and first["promotion"]["how"] == "first"
    assert trained["promotion"]["promoted"] and trained["promotion"]["how"] == "auto"
    assert trained["promotion"]["champion_before"] == first["steps"]["finetune"]["key"]
    assert not worse["promotion"]["promoted"]
    assert "does not beat" in worse["promotion"]["reasons"][0]
    assert worse["promotion"]["champion"] == trained["steps"]["finetune"]["key"]


def test_models_report_and_manual_promote_commands(runs):
    root, first, trained, worse = runs
    cli = CliRunner()
    listing = cli.invoke(app, ["models", "--root", str(root)])
    assert listing.exit_code == 0, listing.output
    assert all(s["steps"]["finetune"]["key"] in listing.output for s in (first, trained, worse))
    assert "champion" in listing.output

    shown = cli.invoke(app, ["report", trained["flow_run_id"], "--root", str(root)])
    assert shown.exit_code == 0, shown.output
    assert "exact match (all examples)" in shown.output and "promoted to champion" in shown.output
    assert "beside what needs no learning" in shown.output  # per-category no-learning baselines
    assert "base = the untrained starting point" in " ".join(shown.output.split())
    latest = cli.invoke(app, ["report", "--root", str(root)])
    assert "not promoted" in latest.output  # the last run was the worse model

    forced = cli.invoke(app, ["promote", worse["steps"]["finetune"]["key"][:8], "--root", str(root)])
    assert forced.exit_code == 0 and "promoted to champion (manual)" in forced.output
    registry = json.loads((root / "registry" / "registry.json").read_text())
    assert registry["champion"]["model_key"] == worse["steps"]["finetune"]["key"]
    assert registry["history"][-1]["how"] == "manual"
    cli.invoke(app, ["promote", trained["steps"]["finetune"]["key"], "--root", str(root)])


def test_generate_and_chat_answer_with_the_champion(runs):
    root, _, trained, _ = runs
    cli = CliRunner()
    model = f"{trained['steps']['finetune']['artifact']}"
    answer = cli.invoke(app, ["generate", "Add the two numbers.", "--input", "2 3", "--model", model,
                              "--root", str(root)])
    assert answer.exit_code == 0, answer.output
    assert answer.output.count("\n") == 1  # one answer line (a barely trained model may answer with EOS at once)
    chat = cli.invoke(app, ["chat", "--model", model, "--root", str(root)],
                      input="Add the two numbers. || 2 3\nCount the words. || cat dog\n\n")
    assert chat.exit_code == 0, chat.output
    assert "the model folder's chat template" in chat.output
    replies = [line.split("model> ", 1)[1] for line in chat.output.splitlines() if "model> " in line]
    # chat's first turn has no history yet: the same prompt and decoding as generate, so the same answer
    assert len(replies) == 2 and replies[0].strip() == answer.output.strip()
    champion = cli.invoke(app, ["generate", "Write the words in capital letters.", "--input", "cat dog",
                                "--root", str(root)])
    assert champion.exit_code == 0 and champion.output.count("\n") == 1, champion.output
