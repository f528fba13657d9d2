"""Evaluate's pieces on a real tiny GPT-2 and real frames: losses, scoring choice, ROUGE-L, report, plot."""

import json

import pandas as pd
import pytest
import torch

from catalog.config import EvalConfig
from tasks.evaluate import category_scoring, normalize_answer, rouge_l, token_losses
from toolkit.baselines import base_description, baseline_answers, baseline_scores
from toolkit.evaluation_report import plot_loss_curve, report_markdown
from toolkit.modeling import load_base_model
from toolkit.tokenizer import IGNORE_INDEX


def _rows():
    # different lengths, so padding is in play
    prompts = [[50256, 101, 102, 103], [50256, 104, 105], [50256, 106, 107, 108, 109]]
    answers = [[201, 50256], [202, 203, 204, 50256], [205, 50256]]
    return [{"input_ids": p + a, "labels": [IGNORE_INDEX] * len(p) + a} for p, a in zip(prompts, answers, strict=True)]


def test_response_and_full_sequence_losses_match_the_full_logits_reference():
    model = load_base_model("scratch:tiny", 0).eval()
    rows = _rows()
    losses = token_losses(model, rows, batch_size=2)
    response_sum = full_sum = 0.0
    response_count = full_count = 0
    with torch.no_grad():
        for row in rows:  # one row at a time: no padding, plain Hugging Face loss
            ids = torch.tensor([row["input_ids"]])
            n_response = sum(label != IGNORE_INDEX for label in row["labels"][1:])
            response_sum += float(model(ids, labels=torch.tensor([row["labels"]])).loss) * n_response
            full_sum += float(model(ids, labels=ids).loss) * (ids.shape[1] - 1)
            response_count += n_response
            full_count += ids.shape[1] - 1
    assert losses["response"] == pytest.approx(response_sum / response_count, rel=1e-4)
    assert losses["full_sequence"] == pytest.approx(full_sum / full_count, rel=1e-4)


def test_scoring_is_exact_for_checkable_or_classification_data_and_rouge_for_free_text():
    frame = pd.DataFrame({
        "category": ["sentiment"] * 6 + ["open_qa"] * 3,
        "response": ["positive", "negative", "positive", "negative", "positive", "neutral",
                     "Paris is the capital.", "It rains a lot in autumn.", "Use a wooden spoon."],
    })
    assert category_scoring(frame, EvalConfig(), checkable=False) == {"sentiment": "exact_match", "open_qa": "rouge_l"}
    assert set(category_scoring(frame, EvalConfig(), checkable=True).values()) == {"exact_match"}
    assert set(category_scoring(frame, EvalConfig(scoring="rouge_l"), checkable=False).values()) == {"rouge_l"}


def test_rouge_l_rewards_overlap_and_order():
    scores = rouge_l(["the cat sat", "sat cat the", "dog"], ["the cat sat"] * 3)
    assert scores[0] == pytest.approx(1.0)
    assert 0 < scores[1] < 1 and scores[2] == 0


def test_report_and_loss_curve_show_what_was_measured(tmp_path):
    log = tmp_path / "training_log.jsonl"
    log.write_text("\n".join(json.dumps({"step": s, "loss": 10 - s / 10}) for s in range(10, 60, 10)))
    metrics = {"examples": 2, "base_val_loss": 10.8, "tuned_val_loss": 4.2, "base_val_perplexity": 49000.0,
               "tuned_val_perplexity": 66.7, "base_exact_match": 0.0, "tuned_exact_match": 0.5, "train_steps": 50,
               "per_category": {"add": {"scoring": "exact_match", "examples": 2, "base": 0.0, "tuned": 0.5}}}
    samples = pd.DataFrame({"instruction": ["Add the two numbers."] * 2, "input": ["1 2", "3 4"],
                            "response": ["3", "7"], "base_output": ["cat", "dog"], "tuned_output": ["3", "8"]})
    report = report_markdown(metrics, samples)
    assert "| val loss (response tokens) | 10.8000 | 4.2000 |" in report
    assert "| add | exact_match | 2 | 0.000 | 0.500 |\n" in report
    with_baselines = report_markdown({**metrics, "base_model": "base = random weights",
                                      "baselines": {"most_frequent_answer": 0.5, "copy_input": 0.0},
                                      "per_category": {"add": {**metrics["per_category"]["add"],
                                                               "most_frequent_answer": 0.5, "copy_input": 0.0}}},
                                     samples)
    assert "| tuned | most frequent training answer | input copied back |" in with_baselines
    assert "| add | exact_match | 2 | 0.000 | 0.500 | 0.500 | 0.000 |" in with_baselines
    assert "base = random weights; no-learning baselines: most frequent training answer 0.500" in with_baselines
    assert "| Add the two numbers. | 3 4 | 7 | dog | 8 |" in report
    plot_loss_curve(log, metrics, tmp_path / "curve.png")
    assert (tmp_path / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_baselines_score_the_most_frequent_training_answer_and_the_copied_input():
    prompts = pd.DataFrame({"split": ["train"] * 4 + ["test"] * 3,
                            "category": ["count", "count", "count", "echo", "count", "echo", "echo"],
                            "input": ["a b", "a", "c d", "x", "e f", "y", "z"],
                            "response": ["2", "1", "2", "x", "2", "y", "q"]})
    test = prompts[prompts["split"] == "test"].reset_index(drop=True)
    answers = baseline_answers(prompts, test, normalize_answer)
    assert answers == {"most_frequent_answer": ["2", "x", "x"], "copy_input": ["e f", "y", "z"]}

    def exact(predicted, rows):
        return pd.Series([float(p == r) for p, r in zip(predicted, rows["response"], strict=True)])

    scores = baseline_scores(test, answers, exact)
    assert scores["most_frequent_answer"] == {"overall": 0.3333, "per_category": {"count": 1.0, "echo": 0.0}}
    assert scores["copy_input"]["per_category"] == {"count": 0.0, "echo": 0.5}
    assert "random weights" in base_description("scratch:tiny") and "pretrained" in base_description("gpt2")


def test_conversation_rows_get_first_and_later_answer_losses_that_make_up_the_response_loss():
    model = load_base_model("scratch:tiny", 0)
    # one conversation: a user turn, an answer, a user turn, an answer (all answers are targets)
    ids = [50256, 10, 11, 12, 20, 21, 50256, 13, 14, 30, 31, 32, 50256]
    labels = [IGNORE_INDEX] * 4 + [20, 21, 50256] + [IGNORE_INDEX] * 2 + [30, 31, 32, 50256]
    losses = token_losses(model, [{"input_ids": ids, "labels": labels}], 4)
    assert {"first_answer", "later_answers"} <= set(losses)
    # 3 target tokens in the first answer, 4 in the later one (each answer's first token follows a prompt token)
    assert abs(losses["response"] - (3 * losses["first_answer"] + 4 * losses["later_answers"]) / 7) < 1e-4
    single = token_losses(model, [{"input_ids": ids[:7], "labels": labels[:7]}], 4)
    assert set(single) == {"response", "full_sequence"}
