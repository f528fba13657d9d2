"""Step 6, fine-tune: data -> tokenizer -> GPT-2 -> response-token loss -> AdamW -> update.

The loop is transformers' Trainer; itune only supplies the loss (the LM head applied only where a
response token is predicted, the same cross-entropy at a fraction of the compute), the batches
(dynamic padding with length grouping, or packed blocks), checkpoints that a rerun resumes exactly,
and progress reporting to Prefect.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from prefect import task

from catalog import layout
from catalog.caching import finish_step, step_task_options
from catalog.lineage import upstream_manifest
from catalog.step import Step
from catalog.store import ArtifactRef, ArtifactStore
from catalog.training_sections import ModelConfig, TrainConfig
from toolkit.chat_template import save_model_folder_template
from toolkit.checkpoints import (
    TrainingOutOfMemory,
    checkpoint_callback,
    is_out_of_memory,
    out_of_memory_message,
    resumable_checkpoint,
    rows_fingerprint,
    run_fingerprint,
)
from toolkit.compute_recipe import resolved_attention, resolved_precision
from toolkit.init_weights import for_training
from toolkit.lora import is_lora, save_adapter_and_merged, trainable_parameters, with_lora
from toolkit.modeling import count_parameters, load_base_model, pad_batch, response_token_loss
from toolkit.tokenizer import IGNORE_INDEX, gpt2_tokenizer
from toolkit.train_progress import training_progress


def train_model(train_rows: list[dict[str, Any]], model_config: ModelConfig, train_config: TrainConfig,
                out: Path, checkpoint_dir: Path, logger: logging.Logger | None = None,
                data_fingerprint: str | None = None, callbacks: list[Any] = (),
                val_rows: list[dict[str, Any]] = ()) -> dict[str, Any]:
    """Train on tokenized rows and save the model folder into `out`; give back training figures.

    Checkpoints go to `checkpoint_dir`; when it holds a complete checkpoint of this same run,
    training resumes from it (weights, optimizer, scheduler, RNG and data position). The val loss is
    measured on the first `train_config.eval_rows` of `val_rows` every `eval_every` steps.
    """
    import torch
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments, set_seed
    from transformers.trainer_callback import PrinterCallback
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # "Writing model shards" at every checkpoint; our bar says enough

    class ResponseOnlyTrainer(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if num_items_in_batch is None:
                loss = response_token_loss(model, inputs)
            else:
                # Sum over this micro-batch / target tokens of the whole (accumulated, all-process)
                # batch: every target token weighs the same, however accumulation and DDP split it.
                loss = response_token_loss(model, inputs, reduction="sum") / num_items_in_batch
                if self.args.average_tokens_across_devices and self.args.world_size > 1:
                    loss = loss * self.args.world_size  # DDP averages gradients over processes
            progress.targets_seen += int((inputs["labels"][:, 1:] != IGNORE_INDEX).sum())
            return (loss, None) if return_outputs else loss

    set_seed(train_config.seed)
    tokenizer = gpt2_tokenizer()
    use_gpu = torch.cuda.is_available()
    precision = resolved_precision(train_config, use_gpu)
    longest = max(len(r["input_ids"]) for r in train_rows)
    attention = resolved_attention(model_config, precision, use_gpu, longest)
    model = load_base_model(model_config.name, model_config.init_seed, model_config.dropout,
                            trust_remote_code=model_config.trust_remote_code, attn_implementation=attention,
                            hub_token_secret=model_config.hub_token_secret, position_init=model_config.position_init)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.eos_token_id
    pad_id = model.config.pad_token_id  # the model's own: a small-vocabulary model may not have GPT-2's 50256
    if train_config.peft == "lora":
        model = with_lora(model, train_config.lora)
    if train_config.torch_compile:
        model.base_model.compile()  # in place, so saved weights keep their plain names
    columns = ["input_ids", "labels"] + (["position_ids"] if train_rows and "position_ids" in train_rows[0] else [])
    dataset = Dataset.from_list([{**{c: r[c] for c in columns}, "length": len(r["input_ids"])} for r in train_rows])
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    fingerprint = run_fingerprint(data_fingerprint or rows_fingerprint(train_rows), model_config, train_config,
                                  world_size)
    found = resumable_checkpoint(checkpoint_dir, fingerprint)
    resume_from, resumed = (found[0], found[1]) if found else (None, None)
    if resume_from is not None and logger is not None:
        logger.info("resuming from %s (step %d)", resume_from, resumed["global_step"])
    args = TrainingArguments(
        output_dir=str(checkpoint_dir),
        num_train_epochs=train_config.epochs,
        max_steps=train_config.max_steps,
        per_device_train_batch_size=train_config.batch_size,
        gradient_accumulation_steps=train_config.gradient_accumulation_steps,
        learning_rate=train_config.learning_rate,
        weight_decay=train_config.weight_decay,
        adam_beta2=train_config.adam_beta2,
        optim="adamw_torch_fused",  # one kernel per step on CUDA and CPU (torch >= 2.4)
        warmup_steps=train_config.warmup_ratio,  # transformers 5: a value below 1 is a ratio of all steps
        lr_scheduler_type=train_config.lr_scheduler,
        logging_steps=train_config.logging_steps,
        save_strategy="steps" if train_config.save_steps else "no",
        save_steps=train_config.save_steps or 1,
        save_total_limit=2,
        report_to="none",
        seed=train_config.seed,
        data_seed=train_config.seed,
        max_grad_norm=train_config.max_grad_norm,
        train_sampling_strategy="group_by_length" if train_config.group_by_length else "random",
        length_column_name="length",
        remove_unused_columns=False,
        activation_checkpointing=train_config.gradient_checkpointing,
        use_cpu=not use_gpu,
        ddp_backend="gloo" if world_size > 1 and not use_gpu else None,
        ddp_find_unused_parameters=False,  # every parameter gets a gradient: no extra graph walk per step
        disable_tqdm=True,  # the one progress bar is toolkit/train_progress.py's
        **({} if precision == "fp32" else {precision: True}),
    )
    val_subset = [{c: r[c] for c in columns if r.get(c) is not None} for r in val_rows[:train_config.eval_rows]]
    progress = training_progress(logger, val_subset, pad_id, train_config.eval_every,
                                 train_config.early_stopping_patience)
    trainer = ResponseOnlyTrainer(
        model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
        data_collator=lambda rows: pad_batch(rows, pad_id),
        callbacks=[checkpoint_callback(train_config.max_seconds, checkpoint_dir, fingerprint, resumed), progress,
                   *callbacks],
    )
    trainer.remove_callback(PrinterCallback)  # with tqdm off, Trainer would print every log dict to stdout
    started = time.perf_counter()
    out_of_memory = None
    try:
        result = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    except (RuntimeError, MemoryError) as exc:
        if not is_out_of_memory(exc):
            raise
        out_of_memory = out_of_memory_message(train_config, longest,
                                              "GPU" if use_gpu else "CPU", world_size)
    finally:
        progress.close()
    if out_of_memory is not None:
        # Raised outside the except block, so the new error holds no reference to the failed step's
        # tensors, and a long-lived worker gets its memory back.
        del trainer, model
        if use_gpu:
            torch.cuda.empty_cache()
        raise TrainingOutOfMemory(out_of_memory)
    seconds = time.perf_counter() - started
    history = [entry for entry in trainer.state.log_history if "loss" in entry or "eval_loss" in entry]
    trainable = trainable_parameters(model)
    if trainer.is_world_process_zero():
        if is_lora(model):  # the adapter kept beside a plain merged model that from_pretrained loads
            model = save_adapter_and_merged(model, out, layout.model_dir(out))
        else:
            model.save_pretrained(layout.model_dir(out))
        tokenizer.save_pretrained(layout.model_dir(out))
        with open(layout.training_log(out), "w", encoding="utf-8") as handle:
            for entry in history:
                handle.write(json.dumps(entry) + "\n")
    train_losses = [entry["loss"] for entry in history if "loss" in entry]
    val_losses = [entry["eval_loss"] for entry in history if "eval_loss" in entry]
    final_loss = train_losses[-1] if train_losses else float(result.training_loss)
    return {
        "steps": trainer.state.global_step,
        "resumed_from_step": resumed["global_step"] if resumed else None,
        "train_loss": float(result.training_loss),
        "final_loss": float(final_loss),
        "train_seconds": round(seconds, 2),
        "target_tokens_per_second": round(progress.targets_seen / max(seconds, 1e-9), 1),
        "parameters": count_parameters(model),
        "trainable_parameters": trainable,
        "peft": train_config.peft,
        "device": "cuda" if use_gpu else "cpu",
        "world_size": world_size,
        "precision": precision,
        "attention": attention,
        "final_perplexity_train": math.exp(min(final_loss, 50)),
        "final_val_loss": val_losses[-1] if val_losses else None,
        "val_points": len(val_losses),
    }


STEP = Step("finetune", __name__, libraries=("torch", "transformers", "accelerate", "safetensors"))


def checkpoint_dir_for(config: dict[str, Any], root: str, tokenized: ArtifactRef) -> Path:
    """Give back the stable checkpoint folder of this fine-tune: keyed like the artifact, so a rerun finds it."""
    return ArtifactStore(root).root / STEP.name / f".checkpoints-{STEP.key(config, [tokenized])}"


def write_finetune(config: dict[str, Any], tokenized: Path, out: Path, logger: logging.Logger | None = None,
                   checkpoint_dir: Path | None = None, data_fingerprint: str | None = None,
                   callbacks: list[Any] = ()) -> dict[str, Any]:
    """Train on the train split of a tokenize artifact; give back the figures for the manifest."""
    tokenized, out = Path(tokenized), Path(out)
    checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
    names = layout.data_columns(tokenized)
    columns = ["split", "input_ids", "labels"] + (["position_ids"] if "position_ids" in names else [])
    table = layout.read_data(tokenized, columns=columns).to_pylist()
    rows = [r for r in table if r["split"] == "train"]
    val_rows = [r for r in table if r["split"] == "val"]
    if not rows:
        raise ValueError(f"{tokenized}: the train split is empty; lower template.val_fraction/test_fraction")
    model_config, train_config = ModelConfig(**config["model"]), TrainConfig(**config["train"])
    if checkpoint_dir is not None:
        figures = train_model(rows, model_config, train_config, out, checkpoint_dir, logger, data_fingerprint,
                              callbacks, val_rows)
    else:
        with tempfile.TemporaryDirectory(prefix=".trainer-", dir=out.parent) as work_dir:
            figures = train_model(rows, model_config, train_config, out, Path(work_dir), logger, data_fingerprint,
                                  callbacks, val_rows)
    template = (upstream_manifest(tokenized, "template") or {}).get("chat_template")
    if template and int(os.environ.get("RANK", "0")) == 0:  # the folder prompts itself: transformers alone suffices
        save_model_folder_template(layout.model_dir(out), template)
    return {"rows": len(rows), **figures}


def write_finetune_in_processes(config: dict[str, Any], tokenized: Path, out: Path, logger: logging.Logger,
                                checkpoint_dir: Path, data_fingerprint: str) -> dict[str, Any]:
    """Train with train.nproc_per_node processes (x train.nnodes hosts) under torchrun; rank 0 writes `out`."""
    from toolkit.launcher import launch

    train = TrainConfig(**config["train"])
    logger.info("launching %d training processes per host on %d host(s) (torch.distributed.run)",
                train.nproc_per_node, train.nnodes)
    kwargs = {"config": config, "tokenized": str(tokenized), "out": str(out), "checkpoint_dir": str(checkpoint_dir),
              "data_fingerprint": data_fingerprint}
    return launch("tasks.finetune:write_finetune", kwargs, train.nproc_per_node, train.nnodes, train.rdzv_endpoint,
                  echo=logger.info)


@task(**step_task_options(STEP))
def finetune(config: dict[str, Any], root: str, tokenized: ArtifactRef) -> ArtifactRef:
    """Prefect task: the fine-tuned model artifact for this tokenized data and config."""
    from prefect.logging import get_run_logger

    logger = get_run_logger()
    checkpoints = checkpoint_dir_for(config, root, tokenized)
    train = TrainConfig(**config["train"])
    write = write_finetune_in_processes if train.nproc_per_node * train.nnodes > 1 else write_finetune

    def build(out: Path, inputs: list[Path]) -> dict[str, Any]:
        start_from, recorded = for_training(config, root)  # weights of train.init_from, if set
        return {**write(start_from, inputs[0], out, logger, checkpoints, tokenized.sha256), **recorded}

    ref, built = STEP.produce(config, root, [tokenized], build)
    # Once the model is published the checkpoints have done their job; a crash before this line
    # leaves them for the rerun, which then resumes from the final one.
    shutil.rmtree(checkpoints, ignore_errors=True)
    return finish_step(root, ref, built)
