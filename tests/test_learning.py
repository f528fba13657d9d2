"""The trainer learns: one built-in family from scratch, judged on held-out items by greedy decoding.

A small budget (400 steps of 16 rows on the quickstart's model shape) and a bar well above what no learning
gets, so a regression in the loss, the batches, the optimizer settings or the position init fails here.
"""

import pandas as pd

from catalog.config import EvalConfig, ModelConfig, TemplateConfig, TrainConfig
from tasks.evaluate import generate_answers, normalize_answer
from tasks.finetune import train_model
from tasks.template import apply_template
from toolkit import builtin_tasks
from toolkit.tokenizer import IGNORE_INDEX, gpt2_encoder


def test_trainer_learns_one_family_to_eighty_percent_on_held_out_items(tmp_path):
    from transformers import AutoModelForCausalLM

    rows = [row for row in builtin_tasks.generate(9000, 0) if row["category"] == "largest_number"]
    frame = pd.DataFrame([{**row, "id": str(i), "source": f"builtin:tasks:{i}"} for i, row in enumerate(rows)])
    templated = apply_template(frame, TemplateConfig(val_fraction=0.1, test_fraction=0.1))
    encoder = gpt2_encoder()
    train = []
    for row in templated[templated["split"] == "train"].itertuples():
        prompt, completion = encoder.encode(row.prompt).ids, encoder.encode(row.completion).ids
        train.append({"input_ids": prompt + completion, "labels": [IGNORE_INDEX] * len(prompt) + completion})
    test = templated[templated["split"] == "test"]
    assert len(train) > 800 and len(test) > 100
    train_model(train, ModelConfig(), TrainConfig(max_steps=400, batch_size=16, save_steps=0), tmp_path,
                tmp_path / "work")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "model", local_files_only=True)
    answers = generate_answers(model, test["prompt"].tolist(), EvalConfig(max_new_tokens=4), 1000)
    exact = [normalize_answer(a) == normalize_answer(r) for a, r in zip(answers, test["response"], strict=True)]
    most_frequent = test["response"].value_counts(normalize=True).iloc[0]
    assert most_frequent < 0.5
    assert sum(exact) / len(exact) >= 0.8
