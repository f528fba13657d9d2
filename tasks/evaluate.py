"""Step 7, evaluate: perplexity on held-out response tokens and task accuracy, base beside tuned.

PP = exp(L), L the mean cross-entropy over response tokens (prompt masked as in training).
Accuracy: greedy generation on held-out test instructions, exact match after normalising spaces.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow.parquet as pq
from prefect import task

from tasks.artifacts import ArtifactRef, Step
from tasks.caching import finish_step, step_task_options
from tasks.config import EvalConfig
from tasks.modeling import IGNORE_INDEX, gpt2_tokenizer, load_base_model, response_token_loss

_SPACES = re.compile(r"\s+")


def normalize_answer(text: str) -> str:
    """Give back an answer with whitespace collapsed and a trailing full stop dropped (case is kept)."""
    return _SPACES.sub(" ", text).strip().rstrip(".").strip()


def response_loss(model: Any, rows: list[dict[str, Any]], batch_size: int) -> float:
    """Give back mean cross-entropy per response token over `rows`, batch by batch."""
    import torch

    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for start in range(0, len(rows), batch_size):
            chunk = rows[start:start + batch_size]
            width = max(len(r["input_ids"]) for r in chunk)
            ids = torch.full((len(chunk), width), 0, dtype=torch.long)
            labels = torch.full((len(chunk), width), IGNORE_INDEX, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for i, r in enumerate(chunk):
                n = len(r["input_ids"])
                ids[i, :n] = torch.tensor(r["input_ids"])
                labels[i, :n] = torch.tensor(r["labels"])
                mask[i, :n] = 1
            batch = {"input_ids": ids, "labels": labels, "attention_mask": mask}
            total += float(response_token_loss(model, batch, reduction="sum"))
            count += int((labels[:, 1:] != IGNORE_INDEX).sum())
    return total / max(count, 1)


def generate_answers(model: Any, prompts: list[str], config: EvalConfig, max_prompt_tokens: int) -> list[str]:
    """Give back greedy completions (text up to EOS) for each prompt."""
    import torch

    tokenizer = gpt2_tokenizer()
    tokenizer.padding_side = "left"
    tokenizer.truncation_side = "left"
    answers: list[str] = []
    model.eval()
    with torch.no_grad():
        for start in range(0, len(prompts), config.batch_size):
            encoded = tokenizer(prompts[start:start + config.batch_size], return_tensors="pt", padding=True,
                                truncation=True, max_length=max_prompt_tokens, add_special_tokens=False)
            output = model.generate(**encoded, max_new_tokens=config.max_new_tokens, do_sample=False,
                                    pad_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
            new_tokens = output[:, encoded["input_ids"].shape[1]:]
            answers += tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
    return answers


def evaluate_model(model: Any, tokenized: pd.DataFrame, test_prompts: pd.DataFrame, config: EvalConfig,
                   max_prompt_tokens: int) -> tuple[dict[str, float], list[str], list[bool]]:
    """Give back (loss/perplexity/accuracy figures, generated answers, exact-match flags) for one model."""
    figures: dict[str, float] = {}
    for split in ("val", "test"):
        rows = tokenized[tokenized["split"] == split].to_dict(orient="records")
        if rows:
            loss = response_loss(model, rows, config.batch_size)
            figures[f"{split}_loss"] = loss
            figures[f"{split}_perplexity"] = math.exp(min(loss, 50))
    answers = generate_answers(model, test_prompts["prompt"].tolist(), config, max_prompt_tokens)
    hits = [normalize_answer(a) == normalize_answer(r) for a, r in zip(answers, test_prompts["response"], strict=True)]
    figures["exact_match"] = sum(hits) / max(len(hits), 1)
    return figures, answers, hits


STEP = Step("evaluate", __file__)


def write_evaluate(config: EvalConfig, templated: Path, tokenized: Path, finetuned: Path) -> tuple[
        pd.DataFrame, dict[str, Any]]:
    """Evaluate base and tuned models; give back (samples frame, metrics)."""
    from transformers import AutoModelForCausalLM

    finetune_manifest = json.loads((finetuned / "manifest.json").read_text(encoding="utf-8"))
    model_config = finetune_manifest["config"]["model"]
    tokens = pq.read_table(tokenized / "data.parquet", columns=["split", "input_ids", "labels"]).to_pandas()
    tokens = tokens[tokens["split"] != "train"]
    prompts = pd.read_parquet(templated / "data.parquet", columns=["split", "category", "prompt", "response",
                                                                     "instruction", "input"])
    test = prompts[prompts["split"] == "test"].head(config.max_examples).reset_index(drop=True)
    tuned = AutoModelForCausalLM.from_pretrained(finetuned / "model", local_files_only=True)
    base = load_base_model(model_config["name"], model_config["init_seed"], model_config.get("dropout", 0.0))
    max_prompt_tokens = tuned.config.n_positions - config.max_new_tokens
    tuned_figures, tuned_answers, tuned_hits = evaluate_model(tuned, tokens, test, config, max_prompt_tokens)
    base_figures, base_answers, base_hits = evaluate_model(base, tokens, test, config, max_prompt_tokens)
    samples = test.assign(base_output=base_answers, tuned_output=tuned_answers, base_correct=base_hits,
                          tuned_correct=tuned_hits)
    per_category = samples.groupby("category")[["base_correct", "tuned_correct"]].mean().round(4)
    metrics = {
        **{f"tuned_{k}": v for k, v in tuned_figures.items()},
        **{f"base_{k}": v for k, v in base_figures.items()},
        "examples": len(test),
        "per_category": per_category.to_dict(orient="index"),
        "train_final_loss": finetune_manifest.get("final_loss"),
    }
    return samples, metrics


def report_markdown(metrics: dict[str, Any], samples: pd.DataFrame) -> str:
    """Give back the evaluation report as markdown: headline table, per category, a few generations."""
    lines = ["# itune evaluation", "", "| metric | base | tuned |", "|---|---|---|"]
    for name in ("val_loss", "val_perplexity", "test_loss", "test_perplexity", "exact_match"):
        if f"tuned_{name}" in metrics:
            lines.append(f"| {name} | {metrics[f'base_{name}']:.4f} | {metrics[f'tuned_{name}']:.4f} |")
    lines += ["", "| category | base exact match | tuned exact match |", "|---|---|---|"]
    for category, row in metrics["per_category"].items():
        lines.append(f"| {category} | {row['base_correct']:.3f} | {row['tuned_correct']:.3f} |")
    lines += ["", "## Sample generations", ""]
    for row in samples.head(5).itertuples():
        lines.append(f"- **{row.instruction}** {row.input} → reference `{row.response}`, base "
                     f"`{row.base_output.strip()[:60]}`, tuned `{row.tuned_output.strip()[:60]}`")
    return "\n".join(lines) + "\n"


def write_evaluate_artifact(config: EvalConfig, inputs: list[Path], out: Path) -> dict[str, Any]:
    samples, metrics = write_evaluate(config, *inputs)
    samples.to_parquet(out / "samples.parquet", index=False)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2), encoding="utf-8")
    (out / "report.md").write_text(report_markdown(metrics, samples), encoding="utf-8")
    return {"rows": len(samples), "metrics": metrics}


@task(**step_task_options(STEP))
def evaluate(config: dict[str, Any], root: str, templated: ArtifactRef, tokenized: ArtifactRef,
             finetuned: ArtifactRef) -> ArtifactRef:
    """Prefect task: the evaluation artifact (metrics, samples, report) for this model and data."""
    ref, built = STEP.produce(config, root, [templated, tokenized, finetuned],
                              lambda out, inputs: write_evaluate_artifact(EvalConfig(**config), inputs, out))
    return finish_step(root, ref, built)
