"""No-learning baselines for evaluate: what a test score would be without learning anything.

Two per category, scored like the models (exact match or ROUGE-L): the most frequent training answer of that
category given to every test row, and the row's input copied back as the answer. Beside them, one line that
says what "base" is: the model before fine-tuning, random weights for a from-scratch GPT-2.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pandas as pd

BASELINES = {"most_frequent_answer": "most frequent training answer", "copy_input": "input copied back"}


def base_description(model_name: str) -> str:
    """Give back one line saying what the "base" column measures for this model source."""
    if model_name.startswith("scratch:"):
        return (f"base = the untrained starting point: random weights of a from-scratch GPT-2 ({model_name}), "
                "so it shows where training began, not what a pretrained model knows")
    return f"base = the pretrained model {model_name} before fine-tuning"


def baseline_answers(prompts: pd.DataFrame, test: pd.DataFrame, normalize: Callable[[str], str]
                     ) -> dict[str, list[str]]:
    """Give back each baseline's answer per test row; `prompts` holds every split (category, response, input)."""
    train = prompts[prompts["split"] == "train"]
    # groupby sorts its keys, so a tie goes to the answer that sorts first: the same on every run
    counts = train.assign(answer=train["response"].map(normalize)).groupby(["category", "answer"]).size()
    frequent = {category: answers.idxmax()[1] for category, answers in counts.groupby(level=0)}
    overall = train["response"].map(normalize).mode().sort_values().iloc[0] if len(train) else ""
    return {"most_frequent_answer": [frequent.get(c, overall) for c in test["category"]],
            "copy_input": test["input"].fillna("").astype(str).tolist()}


def baseline_scores(samples: pd.DataFrame, answers: dict[str, list[str]],
                    score: Callable[[list[str], pd.DataFrame], pd.Series]) -> dict[str, Any]:
    """Give back {baseline: {"overall": score, "per_category": {category: score}}} for the test rows in `samples`.

    `score(answers, samples)` scores one answer per row the way the models are scored.
    """
    result: dict[str, Any] = {}
    for name, predicted in answers.items():
        scores = pd.Series(score(predicted, samples), index=samples.index, dtype=float)
        result[name] = {"overall": round(float(scores.mean()), 4) if len(scores) else 0.0,
                        "per_category": scores.groupby(samples["category"]).mean().round(4).to_dict()}
    return result
