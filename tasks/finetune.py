"""Step 6, fine-tune: data -> tokenizer -> GPT-2 -> response-token loss -> AdamW -> update.

The loop is transformers' Trainer; itune only supplies the loss (the LM head applied only where a
response token is predicted, the same cross-entropy at a fraction of the compute), the batches
(dynamic padding with length grouping) and progress reporting to Prefect.
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
import time
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
from prefect import task

from tasks.artifacts import ArtifactRef, Step
from tasks.caching import finish_step, step_task_options
from tasks.config import ModelConfig, TrainConfig
from tasks.modeling import IGNORE_INDEX, count_parameters, gpt2_tokenizer, load_base_model, response_token_loss

MODEL_DIR = "model"
TRAINING_LOG = "training_log.jsonl"


def _progress_callback(logger: logging.Logger | None, max_seconds: float | None):
    from transformers import TrainerCallback

    class Progress(TrainerCallback):
        """Logs loss, lr and target tokens/s; stops cleanly once the time budget is spent."""

        def __init__(self) -> None:
            self.started = time.perf_counter()
            self.targets_seen = 0

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logger is not None and logs and "loss" in logs:
                rate = self.targets_seen / max(time.perf_counter() - self.started, 1e-9)
                logger.info("step %d/%d loss %.4f lr %.2e target tokens/s %.0f", state.global_step,
                            state.max_steps, logs["loss"], logs.get("learning_rate", 0.0), rate)

        def on_step_end(self, args, state, control, **kwargs):
            if max_seconds is not None and time.perf_counter() - self.started > max_seconds:
                control.should_training_stop = True

    return Progress()


def train_model(train_rows: list[dict[str, Any]], model_config: ModelConfig, train_config: TrainConfig,
                out: Path, work_dir: Path, logger: logging.Logger | None = None) -> dict[str, Any]:
    """Train on tokenized rows and save the model folder into `out`; give back training figures."""
    import torch
    from datasets import Dataset
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments, set_seed
    from transformers.trainer_callback import ProgressCallback

    class ProgressBarOnly(ProgressCallback):
        """The terminal progress bar without the raw log dicts it would print to stdout."""

        def on_log(self, args, state, control, logs=None, **kwargs):
            return None

    class ResponseOnlyTrainer(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss = response_token_loss(model, inputs)
            progress.targets_seen += int((inputs["labels"][:, 1:] != IGNORE_INDEX).sum())
            return (loss, None) if return_outputs else loss

    set_seed(train_config.seed)
    tokenizer = gpt2_tokenizer()
    model = load_base_model(model_config.name, model_config.init_seed, model_config.dropout)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.eos_token_id
    dataset = Dataset.from_list([{"input_ids": r["input_ids"], "labels": r["labels"]} for r in train_rows])
    use_gpu = torch.cuda.is_available()
    args = TrainingArguments(
        output_dir=str(work_dir),
        num_train_epochs=train_config.epochs,
        max_steps=train_config.max_steps,
        per_device_train_batch_size=train_config.batch_size,
        learning_rate=train_config.learning_rate,
        weight_decay=train_config.weight_decay,
        warmup_steps=train_config.warmup_ratio,
        lr_scheduler_type="cosine",
        logging_steps=train_config.logging_steps,
        save_strategy="no",
        report_to="none",
        seed=train_config.seed,
        max_grad_norm=train_config.max_grad_norm,
        train_sampling_strategy="group_by_length" if train_config.group_by_length else "random",
        use_cpu=not use_gpu,
        bf16=use_gpu and torch.cuda.is_bf16_supported(),
        disable_tqdm=False,
    )
    progress = _progress_callback(logger, train_config.max_seconds)
    trainer = ResponseOnlyTrainer(
        model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
        data_collator=DataCollatorForSeq2Seq(tokenizer, padding="longest", label_pad_token_id=IGNORE_INDEX),
        callbacks=[progress],
    )
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(ProgressBarOnly)
    started = time.perf_counter()
    result = trainer.train()
    seconds = time.perf_counter() - started
    model.save_pretrained(out / MODEL_DIR)
    tokenizer.save_pretrained(out / MODEL_DIR)
    history = [entry for entry in trainer.state.log_history if "loss" in entry]
    with open(out / TRAINING_LOG, "w", encoding="utf-8") as handle:
        for entry in history:
            handle.write(json.dumps(entry) + "\n")
    final_loss = history[-1]["loss"] if history else float(result.training_loss)
    return {
        "steps": trainer.state.global_step,
        "train_loss": float(result.training_loss),
        "final_loss": float(final_loss),
        "train_seconds": round(seconds, 2),
        "target_tokens_per_second": round(progress.targets_seen / max(seconds, 1e-9), 1),
        "parameters": count_parameters(model),
        "device": "cuda" if use_gpu else "cpu",
        "final_perplexity_train": math.exp(min(final_loss, 50)),
    }


STEP = Step("finetune", __file__)


def write_finetune(config: dict[str, Any], tokenized: Path, out: Path, logger: logging.Logger | None = None
                   ) -> dict[str, Any]:
    """Train on the train split of a tokenize artifact; give back the figures for the manifest."""
    table = pq.read_table(tokenized / "data.parquet", columns=["split", "input_ids", "labels"])
    rows = [r for r in table.to_pylist() if r["split"] == "train"]
    if not rows:
        raise ValueError(f"{tokenized}: the train split is empty; lower template.val_fraction/test_fraction")
    with tempfile.TemporaryDirectory(prefix=".trainer-", dir=out.parent) as work_dir:
        figures = train_model(rows, ModelConfig(**config["model"]), TrainConfig(**config["train"]), out,
                              Path(work_dir), logger)
    return {"rows": len(rows), **figures}


@task(**step_task_options(STEP))
def finetune(config: dict[str, Any], root: str, tokenized: ArtifactRef) -> ArtifactRef:
    """Prefect task: the fine-tuned model artifact for this tokenized data and config."""
    from prefect.logging import get_run_logger

    logger = get_run_logger()
    ref, built = STEP.produce(config, root, [tokenized],
                              lambda out, inputs: write_finetune(config, inputs[0], out, logger))
    return finish_step(root, ref, built)
