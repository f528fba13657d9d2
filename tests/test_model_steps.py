"""Fine-tune and evaluate work functions on a real tiny GPT-2, a few real training steps on CPU."""

import json
import math

import pytest
import torch

from catalog.config import EvalConfig, ModelConfig, TrainConfig
from tasks.evaluate import normalize_answer, token_losses
from tasks.finetune import train_model
from toolkit.modeling import ModelSourceError, load_base_model, response_token_loss
from toolkit.tokenizer import IGNORE_INDEX


def _rows(n=24):
    rows = []
    for i in range(n):
        prompt = [50256, 100 + i % 5, 200, 300]
        answer = [400 + i % 5, 50256]
        rows.append({"input_ids": prompt + answer, "labels": [IGNORE_INDEX] * len(prompt) + answer})
    return rows


def test_response_token_loss_equals_full_logits_loss():
    model = load_base_model("scratch:tiny", 0, dropout=0.1).eval()
    rows = _rows(4)
    batch = {"input_ids": torch.tensor([r["input_ids"] for r in rows]),
             "labels": torch.tensor([r["labels"] for r in rows])}
    batch["attention_mask"] = torch.ones_like(batch["input_ids"])
    reference = model(**batch).loss
    assert torch.allclose(response_token_loss(model, batch), reference, atol=1e-5)


def test_training_lowers_loss_and_saves_a_loadable_model(tmp_path):
    from transformers import AutoModelForCausalLM

    rows = _rows()
    base = load_base_model("scratch:tiny", 0)
    before = token_losses(base, rows, 8)["response"]
    figures = train_model(rows, ModelConfig(), TrainConfig(max_steps=30, batch_size=8, logging_steps=5),
                          tmp_path, tmp_path / "work")
    assert figures["steps"] == 30
    tuned = AutoModelForCausalLM.from_pretrained(tmp_path / "model", local_files_only=True)
    after = token_losses(tuned, rows, 8)["response"]
    assert after < before - 2.0
    assert (tmp_path / "model" / "model.safetensors").is_file()
    assert (tmp_path / "model" / "tokenizer.json").is_file()
    log = [json.loads(line) for line in (tmp_path / "training_log.jsonl").read_text().splitlines()]
    assert len(log) >= 5 and all("loss" in entry for entry in log)


def test_perplexity_is_exp_of_mean_response_token_loss():
    model = load_base_model("scratch:tiny", 0)
    loss = token_losses(model, _rows(6), 4)["response"]
    assert math.isclose(loss, math.log(50257), rel_tol=0.05)  # an untrained model is near uniform


def test_local_save_pretrained_folder_loads_as_model_source(tmp_path):
    load_base_model("scratch:tiny", 3).save_pretrained(tmp_path / "local")
    model = load_base_model(str(tmp_path / "local"))
    assert model.config.n_layer == 2


def test_unreachable_hub_model_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelSourceError, match="neither a local folder nor reachable"):
        load_base_model("no-such-org/no-such-model")


def test_exact_match_normalises_spaces_and_full_stop_but_keeps_case():
    assert normalize_answer("  1 2   3. ") == "1 2 3"
    assert normalize_answer("CAT") != normalize_answer("cat")
    assert EvalConfig().max_new_tokens > 0


def test_lora_trains_adapters_only_and_publishes_a_plain_merged_model(tmp_path):
    from transformers import AutoModelForCausalLM

    settings = TrainConfig(max_steps=6, batch_size=8, learning_rate=1e-2, save_steps=0, logging_steps=2, peft="lora")
    model = ModelConfig(name="scratch:tiny", position_init="random")  # the same start as load_base_model's below
    figures = train_model(_rows(), model, settings, tmp_path, tmp_path / "checkpoints")
    assert 0 < figures["trainable_parameters"] < figures["parameters"] / 50 and figures["peft"] == "lora"
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    assert type(merged).__name__ == "GPT2LMHeadModel"
    assert not any("lora" in name for name, _ in merged.named_parameters())
    base = load_base_model("scratch:tiny", 0)
    changed = [name for name, p in merged.named_parameters() if not torch.equal(p, dict(base.named_parameters())[name])]
    assert changed and all(any(m in name for m in ("c_attn", "c_proj", "c_fc")) for name in changed)


def test_val_loss_is_measured_on_a_fixed_subset_about_twenty_times(tmp_path):
    val = _rows(6)
    figures = train_model(_rows(), ModelConfig(), TrainConfig(max_steps=40, batch_size=8, logging_steps=5),
                          tmp_path, tmp_path / "work", val_rows=val)
    log = [json.loads(line) for line in (tmp_path / "training_log.jsonl").read_text().splitlines()]
    points = [entry for entry in log if "eval_loss" in entry]
    assert [entry["step"] for entry in points] == list(range(2, 41, 2))
    assert figures["val_points"] == 20 and figures["final_val_loss"] == points[-1]["eval_loss"]
    assert points[-1]["eval_loss"] < points[0]["eval_loss"] - 2.0
    from transformers import AutoModelForCausalLM

    tuned = AutoModelForCausalLM.from_pretrained(tmp_path / "model", local_files_only=True)
    assert math.isclose(token_losses(tuned, val, 8)["response"], points[-1]["eval_loss"], rel_tol=1e-4)


def test_early_stopping_ends_training_when_val_loss_stops_improving(tmp_path):
    # val answers the training never shows: once the train answers are learned, val loss only rises
    val = [{**row, "input_ids": row["input_ids"][:-2] + [900, 50256], "labels": row["labels"][:-2] + [900, 50256]}
           for row in _rows(6)]
    figures = train_model(_rows(), ModelConfig(), TrainConfig(max_steps=200, batch_size=8, eval_every=5,
                                                              early_stopping_patience=2),
                          tmp_path, tmp_path / "work", val_rows=val)
    assert figures["steps"] < 200 and figures["steps"] % 5 == 0
