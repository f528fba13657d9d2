"""Step 7, evaluate: perplexity and task accuracy on held-out data, base beside tuned; then promotion.

PP = exp(L), L the mean cross-entropy over response tokens (prompt masked as in training), and
also over full sequences (prompt + response), labelled as such. Task accuracy: generation on held-out
test instructions, prompted through the chat template the model folder carries, scored by exact match
(normalised) where answers are checkable, by ROUGE-L otherwise, per category. The artifact holds
metrics.json, samples.parquet, report.md and loss_curve.png; the task also publishes them as Prefect
artifacts. `promote` then puts the model before the registry (toolkit/registry.py).
"""

from __future__ import annotations

import base64
import copy
import json
import math
import re
from pathlib import Path
from typing import Any

import pandas as pd
from prefect import task

from catalog import layout
from catalog.caching import finish_step, step_task_options
from catalog.lineage import upstream_config
from catalog.step import Step
from catalog.store import ArtifactRef
from catalog.training_sections import EvalConfig
from toolkit.baselines import base_description, baseline_answers, baseline_scores
from toolkit.chat_template import folder_template, generation_prompt, scored_turns
from toolkit.evaluation_report import CURVE, category_rows, plot_loss_curve, report_markdown
from toolkit.modeling import load_base_model, pad_batch
from toolkit.registry import metric_rows
from toolkit.tokenizer import IGNORE_INDEX, gpt2_tokenizer

_SPACES = re.compile(r"\s+")
# positions per LM-head call: 2,048 x 50,257 fp32 logits are ~400 MB, the most evaluation ever holds
_HEAD_CHUNK = 2048
REPORT, SAMPLES, METRICS = layout.REPORT, layout.SAMPLES, layout.METRICS


def normalize_answer(text: str) -> str:
    """Give back an answer with whitespace collapsed and a trailing full stop dropped (case is kept)."""
    return _SPACES.sub(" ", text).strip().rstrip(".").strip()


def token_losses(model: Any, rows: list[dict[str, Any]], batch_size: int) -> dict[str, float]:
    """Give back mean cross-entropy per response token and per full-sequence token over `rows`.

    Where rows hold several answers (conversations: every assistant turn is a target), the response
    tokens are also split into each row's first answer and its later ones (`first_answer`,
    `later_answers`). One forward per batch serves all; the LM head runs on at most _HEAD_CHUNK
    positions at a time, so a batch's full logits (batch x length x 50,257) never exist at once.
    """
    import torch
    import torch.nn.functional as F

    sums = dict.fromkeys(("response", "full_sequence", "first_answer", "later_answers"), 0.0)
    counts = dict.fromkeys(sums, 0)
    head = model.get_output_embeddings()
    model.eval()
    with torch.no_grad():
        for start in range(0, len(rows), batch_size):
            batch = pad_batch(rows[start:start + batch_size], pad_token_id=0)
            ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
            hidden = model.base_model(input_ids=ids, attention_mask=mask).last_hidden_state[:, :-1]
            real = mask[:, 1:].bool()
            response = labels[:, 1:] != IGNORE_INDEX
            # an answer starts where a response token follows a non-response one: number them along each row
            answer = torch.cumsum((response & ~F.pad(response, (1, 0))[:, :-1]).long(), dim=1)[real]
            targets, is_response = ids[:, 1:][real], response[real]
            states = hidden[real]
            losses = torch.cat([F.cross_entropy(head(states[i:i + _HEAD_CHUNK]).float(), targets[i:i + _HEAD_CHUNK],
                                                reduction="none") for i in range(0, len(targets), _HEAD_CHUNK)])
            sums["full_sequence"] += float(losses.sum())
            counts["full_sequence"] += len(losses)
            for name, chosen in (("response", is_response), ("first_answer", is_response & (answer == 1)),
                                 ("later_answers", is_response & (answer > 1))):
                sums[name] += float(losses[chosen].sum())
                counts[name] += int(chosen.sum())
    shown = [name for name in sums if counts["later_answers"] or name not in ("first_answer", "later_answers")]
    return {name: sums[name] / max(counts[name], 1) for name in shown}


def generate_answers(model: Any, prompts: list[str], config: EvalConfig, max_prompt_tokens: int) -> list[str]:
    """Give back completions (text up to EOS, or max_new_tokens) for each prompt, per the eval config."""
    import torch

    tokenizer = copy.deepcopy(gpt2_tokenizer())  # left padding for generation, without changing the shared one
    tokenizer.padding_side = "left"
    tokenizer.truncation_side = "left"
    settings: dict[str, Any] = {"max_new_tokens": config.max_new_tokens, "do_sample": config.do_sample,
                                "pad_token_id": tokenizer.eos_token_id, "eos_token_id": tokenizer.eos_token_id}
    if config.do_sample:
        settings.update(temperature=config.temperature, top_p=config.top_p)
        torch.manual_seed(config.seed)
    if not config.stop_at_eos:
        settings["min_new_tokens"] = config.max_new_tokens  # EOS is masked out until the budget is used
    answers: list[str] = []
    model.eval()
    with torch.no_grad():
        for start in range(0, len(prompts), config.batch_size):
            encoded = tokenizer(prompts[start:start + config.batch_size], return_tensors="pt", padding=True,
                                truncation=True, max_length=max_prompt_tokens, add_special_tokens=False)
            output = model.generate(**encoded, **settings)
            answers += tokenizer.batch_decode(output[:, encoded["input_ids"].shape[1]:], skip_special_tokens=True)
    return answers


def rouge_l(predictions: list[str], references: list[str]) -> list[float]:
    """Give back the ROUGE-L F1 of each prediction against its reference (Google's rouge-score)."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"])
    return [scorer.score(ref, pred)["rougeL"].fmeasure for pred, ref in zip(predictions, references, strict=True)]


def category_scoring(references: pd.DataFrame, config: EvalConfig, checkable: bool) -> dict[str, str]:
    """Give back exact_match or rouge_l per category of `references` (columns category, response).

    Checkable data (the built-in tasks) is exact match throughout; otherwise a category whose answers
    come from a small, repeating set (classification-style) is exact match and the rest ROUGE-L.
    """
    categories = references["category"].fillna("").astype(str)
    if config.scoring != "auto" or checkable:
        return dict.fromkeys(categories.unique(), "exact_match" if checkable else config.scoring)
    scoring = {}
    for category, answers in references["response"].groupby(categories):
        distinct = answers.map(normalize_answer).nunique()
        scoring[category] = "exact_match" if distinct <= config.max_labels and 2 * distinct <= len(answers) \
            else "rouge_l"
    return scoring


def evaluate_model(model: Any, tokenized: pd.DataFrame, test_prompts: pd.DataFrame, config: EvalConfig,
                   max_prompt_tokens: int) -> tuple[dict[str, float], pd.DataFrame]:
    """Give back (loss/perplexity figures, per-example output/exact/rouge_l frame) for one model."""
    figures: dict[str, float] = {}
    for split in ("val", "test"):
        rows = tokenized[tokenized["split"] == split].to_dict(orient="records")
        if rows:
            for kind, loss in token_losses(model, rows, config.batch_size).items():
                suffix = "" if kind == "response" else f"_{kind}"
                figures[f"{split}_loss{suffix}"] = loss
                figures[f"{split}_perplexity{suffix}"] = math.exp(min(loss, 50))
    answers = generate_answers(model, test_prompts["prompt"].tolist(), config, max_prompt_tokens)
    return figures, score_answers(answers, test_prompts["response"].tolist())


def score_answers(answers: list[str], references: list[str]) -> pd.DataFrame:
    """Give back output, exact (normalised exact match) and rouge_l per answer against its reference."""
    return pd.DataFrame({
        "output": answers,
        "exact": [normalize_answer(a) == normalize_answer(r) for a, r in zip(answers, references, strict=True)],
        "rouge_l": rouge_l(answers, references),
    })


def folder_prompts(model_folder: Path, rows: pd.DataFrame) -> list[str]:
    """Give back each row's generation prompt, rendered by the chat template the model folder carries.

    The folder, not the template step, decides the prompt: what is scored is the model as a user with only
    transformers would prompt it.
    """
    template = folder_template(model_folder)
    if template is None:
        raise ValueError(f"{model_folder} carries no chat template (chat_template.jinja); rebuild its fine-tune step")
    return [generation_prompt(scored_turns(template, messages, instruction, input_text), template)
            for messages, instruction, input_text in zip(rows["messages"], rows["instruction"], rows["input"],
                                                         strict=True)]


STEP = Step("evaluate", __name__, libraries=("torch", "transformers", "tokenizers", "rouge-score"))


def write_evaluate(config: EvalConfig, templated: Path, tokenized: Path, finetuned: Path) -> tuple[
        pd.DataFrame, dict[str, Any]]:
    """Evaluate base and tuned models on the same examples; give back (samples frame, metrics)."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # no "Loading weights" bar between the step's log lines
    finetune_manifest = layout.read_manifest(finetuned)
    model_config = layout.trained_model_config(finetuned)
    tokens = layout.read_data(tokenized, columns=["split", "input_ids", "labels"]).to_pandas()
    tokens = tokens[tokens["split"] != "train"]
    prompts = layout.read_data(templated, columns=["split", "category", "response", "instruction", "input",
                                                   "messages"]).to_pandas()
    prompts["category"] = prompts["category"].fillna("").astype(str)
    test = prompts[prompts["split"] == "test"].head(config.max_examples).reset_index(drop=True)
    test.insert(2, "prompt", folder_prompts(layout.model_dir(finetuned), test))
    source = (upstream_config(templated, "ingest") or {}).get("source", "")
    scoring = category_scoring(prompts, config, checkable=str(source).startswith("builtin:"))
    tuned = AutoModelForCausalLM.from_pretrained(layout.model_dir(finetuned), local_files_only=True)
    base = load_base_model(model_config["name"], model_config["init_seed"], model_config.get("dropout", 0.0),
                           hub_token_secret=model_config.get("hub_token_secret"),
                           position_init=model_config.get("position_init", "random"))
    max_prompt_tokens = tuned.config.n_positions - config.max_new_tokens
    samples = test.assign(scoring=test["category"].map(scoring))
    metrics: dict[str, Any] = {}
    for name, model in (("tuned", tuned), ("base", base)):
        figures, scored = evaluate_model(model, tokens, test, config, max_prompt_tokens)
        score = scored["exact"].astype(float).where(samples["scoring"] == "exact_match", scored["rouge_l"])
        samples = samples.assign(**{f"{name}_output": scored["output"], f"{name}_correct": scored["exact"],
                                    f"{name}_rouge_l": scored["rouge_l"], f"{name}_score": score})
        figures.update(exact_match=scored["exact"].mean(), rouge_l=scored["rouge_l"].mean(), task_score=score.mean())
        metrics.update({f"{name}_{k}": float(v) for k, v in figures.items() if not pd.isna(v)})
    per_category = samples.groupby("category").agg(scoring=("scoring", "first"), examples=("scoring", "size"),
                                                   base=("base_score", "mean"), tuned=("tuned_score", "mean"))

    def score(answers: list[str], rows: pd.DataFrame) -> pd.Series:
        scored = score_answers(answers, rows["response"].tolist())
        return scored["exact"].astype(float).where(rows["scoring"] == "exact_match", scored["rouge_l"])

    baselines = baseline_scores(samples, baseline_answers(prompts, test, normalize_answer), score)
    for name, figures in baselines.items():
        per_category[name] = per_category.index.map(figures["per_category"])
    metrics.update(base_model=base_description(model_config["name"]),
                   baselines={name: figures["overall"] for name, figures in baselines.items()})
    metrics.update(examples=len(test), per_category=per_category.round(4).to_dict(orient="index"),
                   train_final_loss=finetune_manifest.get("final_loss"), train_steps=finetune_manifest.get("steps"))
    return samples, metrics


def write_evaluate_artifact(config: EvalConfig, inputs: list[Path], out: Path) -> dict[str, Any]:
    samples, metrics = write_evaluate(config, *inputs)
    samples.to_parquet(out / SAMPLES, index=False)
    (out / METRICS).write_text(json.dumps(metrics, indent=2), encoding="utf-8")
    plot_loss_curve(layout.training_log(inputs[2]), metrics, out / CURVE)
    (out / REPORT).write_text(report_markdown(metrics, samples, config.report_samples), encoding="utf-8")
    return {"rows": len(samples), "metrics": metrics}


def publish_report(folder: Path) -> None:
    """Show an evaluation in the Prefect UI: the report with its plot inline, the tables, a link to the PNG."""
    from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact

    metrics = layout.read_metrics(folder)
    # the UI cannot read the artifact folder, so the plot travels inside the markdown as a data URI
    image = "data:image/png;base64," + base64.b64encode((folder / CURVE).read_bytes()).decode("ascii")
    report = (folder / REPORT).read_text(encoding="utf-8").replace(f"]({CURVE})", f"]({image})")
    create_markdown_artifact(report, key="itune-evaluation", description=f"evaluation report, {folder}")
    create_table_artifact(metric_rows(metrics), key="itune-metrics", description="held-out metrics, base vs tuned")
    create_table_artifact(category_rows(metrics), key="itune-per-category", description="task score per category")
    create_link_artifact((folder / CURVE).as_uri(), link_text="loss curve (PNG)", key="itune-loss-curve")


@task(**step_task_options(STEP))
def evaluate(config: dict[str, Any], root: str, templated: ArtifactRef, tokenized: ArtifactRef,
             finetuned: ArtifactRef) -> ArtifactRef:
    """Prefect task: the evaluation artifact (metrics, samples, report, loss curve) for this model and data."""
    ref, built = STEP.produce(config, root, [templated, tokenized, finetuned],
                              lambda out, inputs: write_evaluate_artifact(EvalConfig(**config), inputs, out))
    publish_report(ref.path)
    return finish_step(root, ref, built)
