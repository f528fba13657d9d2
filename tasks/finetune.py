"""Step 6, fine-tune: data -> tokenizer -> GPT-2 -> response-token loss -> AdamW -> update.

The loop is transformers' Trainer; itune only supplies the loss (the LM head applied only where a
response token is predicted, the same cross-entropy at a fraction of the compute), the batches
(dynamic padding with length grouping, or packed blocks), checkpoints that a rerun resumes exactly,
and progress reporting to Prefect.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
from prefect import task

from tasks.artifacts import (
    ArtifactRef,
    ArtifactStore,
    Step,
    canonical_json,
    sha256_text,
    verified_listing,
    write_text_atomically,
)
from tasks.caching import finish_step, step_task_options
from tasks.config import ModelConfig, TrainConfig
from tasks.modeling import (
    IGNORE_INDEX,
    count_parameters,
    gpt2_tokenizer,
    load_base_model,
    pad_batch,
    response_token_loss,
)
from tasks.train_progress import training_progress

MODEL_DIR = "model"
TRAINING_LOG = "training_log.jsonl"
CHECKPOINT_MARK = "itune-checkpoint.json"
# Settings that change what is trained; the others (logging, checkpoint cadence, pool, time budget)
# can differ between a crashed run and its resume without changing the result.
_TRAJECTORY_FREE = {"logging_steps", "save_steps", "work_pool", "max_seconds"}


class CheckpointError(RuntimeError):
    """A checkpoint that must not be resumed from: made for other data or settings, or already past the end."""


class TrainingOutOfMemory(RuntimeError):
    """A training batch did not fit in memory; the one-line message names the settings to lower."""


# CPU allocator failures arrive as plain RuntimeErrors ("DefaultCPUAllocator: can't allocate memory: ...",
# "... not enough memory ..."); only the message tells them apart from other errors.
_OUT_OF_MEMORY_MARKERS = ("out of memory", "can't allocate memory", "not enough memory", "defaultcpuallocator")


def is_out_of_memory(exc: BaseException) -> bool:
    """Tell whether an exception raised while training means an allocation failed."""
    import torch

    if isinstance(exc, torch.OutOfMemoryError | MemoryError):
        return True
    return isinstance(exc, RuntimeError) and any(m in str(exc).lower() for m in _OUT_OF_MEMORY_MARKERS)


def out_of_memory_message(train_config: TrainConfig, max_length: int, device: str, world_size: int) -> str:
    """Give back one line: what did not fit, and the settings that keep the effective batch while fitting."""
    size, accumulation = train_config.batch_size, train_config.gradient_accumulation_steps
    # The smallest factor of the batch size keeps batch x accumulation exactly equal (a plain halving when even).
    factor = next((f for f in range(2, size + 1) if size % f == 0), 1)
    options = []
    if factor > 1:
        options.append(f"--set train.batch_size={size // factor} --set train.gradient_accumulation_steps="
                       f"{accumulation * factor} (same effective batch of {size * accumulation * world_size})")
    if not train_config.gradient_checkpointing:
        options.append("--set train.gradient_checkpointing=true")
    options.append("a smaller tokenize.max_length")
    return (f"training ran out of {device} memory with train.batch_size={size} examples per device of up to "
            f"{max_length} tokens; retry with {', or '.join(options)}")


def run_fingerprint(data: str, model_config: ModelConfig, train_config: TrainConfig, world_size: int) -> str:
    """Give back the identity of one training trajectory: a checkpoint resumes only into the same one."""
    train = {k: v for k, v in train_config.model_dump(mode="json").items() if k not in _TRAJECTORY_FREE}
    payload = {"data": data, "model": model_config.model_dump(mode="json"), "train": train, "world_size": world_size}
    return sha256_text(canonical_json(payload))[:16]


def rows_fingerprint(rows: list[dict[str, Any]]) -> str:
    """Give back a content hash of tokenized rows (for callers that have no artifact sha256 to offer)."""
    digest = hashlib.sha256()
    for row in rows:
        for key in ("input_ids", "labels", "position_ids"):
            digest.update(repr(list(row.get(key) or ())).encode())
    return digest.hexdigest()[:16]


def _fsync_tree(folder: Path) -> None:
    for file in folder.rglob("*"):
        if file.is_file():
            with open(file, "rb") as handle:
                os.fsync(handle.fileno())


def mark_checkpoint_complete(folder: Path, fingerprint: str, step: int, final: bool) -> None:
    """Write the mark that makes a Trainer checkpoint folder resumable, atomically and after its files.

    Trainer writes checkpoint files in place; a kill -9 can leave a folder with some of them. The
    mark lists every file's size and is renamed into place last, so only a whole checkpoint has one.
    """
    _fsync_tree(folder)
    files = {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}
    mark = {"fingerprint": fingerprint, "global_step": step, "final": final, "files": files}
    write_text_atomically(folder / CHECKPOINT_MARK, json.dumps(mark))


def _read_mark(folder: Path) -> dict[str, Any] | None:
    return verified_listing(folder / CHECKPOINT_MARK, lambda file: file.stat().st_size)


def resumable_checkpoint(checkpoint_dir: Path, fingerprint: str) -> tuple[Path, dict[str, Any]] | None:
    """Give back the newest complete checkpoint for this run, after removing half-written ones.

    Raises CheckpointError when the newest complete checkpoint belongs to another run: resuming
    it would silently train the wrong thing.
    """
    if not checkpoint_dir.is_dir():
        return None
    found = []
    for folder in checkpoint_dir.glob("checkpoint-*"):
        mark = _read_mark(folder)
        if mark is None:
            shutil.rmtree(folder, ignore_errors=True)
        else:
            found.append((mark["global_step"], folder, mark))
    if not found:
        return None
    _, folder, mark = max(found, key=lambda item: item[0])
    if mark["fingerprint"] != fingerprint:
        raise CheckpointError(
            f"checkpoint {folder} was made for other data or training settings (run {mark['fingerprint']}, "
            f"this run {fingerprint}); delete {checkpoint_dir} to start over"
        )
    return folder, mark


def _checkpoint_callback(max_seconds: float | None, checkpoint_dir: Path, fingerprint: str,
                         resumed: dict[str, Any] | None):
    from transformers import TrainerCallback

    class Checkpoints(TrainerCallback):
        """Refuses a checkpoint past the end, marks finished checkpoints, stops on the time budget."""

        def __init__(self) -> None:
            self.started = time.perf_counter()

        def on_train_begin(self, args, state, control, **kwargs):
            self.started = time.perf_counter()
            if resumed is not None and resumed["global_step"] >= state.max_steps and not resumed["final"]:
                raise CheckpointError(
                    f"checkpoint at step {resumed['global_step']} is past this run's {state.max_steps} steps; "
                    f"resuming would skip training. Delete {checkpoint_dir} to start over"
                )

        def on_step_end(self, args, state, control, **kwargs):
            if max_seconds is not None and time.perf_counter() - self.started > max_seconds:
                control.should_training_stop = True
                control.should_save = True

        def on_save(self, args, state, control, **kwargs):
            if state.is_world_process_zero:
                final = state.global_step >= state.max_steps or control.should_training_stop
                mark_checkpoint_complete(checkpoint_dir / f"checkpoint-{state.global_step}", fingerprint,
                                         state.global_step, final)

    return Checkpoints()


def _precision(train_config: TrainConfig, use_gpu: bool) -> dict[str, bool]:
    import torch

    if not use_gpu or train_config.precision == "fp32":
        return {}  # CPU autocast gains nothing for GPT-2 here and costs accuracy
    if train_config.precision == "auto":
        return {"bf16": True} if torch.cuda.is_bf16_supported() else {"fp16": True}
    return {train_config.precision: True}


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
    model = load_base_model(model_config.name, model_config.init_seed, model_config.dropout,
                            trust_remote_code=model_config.trust_remote_code,
                            attn_implementation=model_config.attn_implementation,
                            hub_token_secret=model_config.hub_token_secret, position_init=model_config.position_init)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.eos_token_id
    pad_id = model.config.pad_token_id  # the model's own: a small-vocabulary model may not have GPT-2's 50256
    if train_config.torch_compile:
        model.base_model.compile()  # in place, so saved weights keep their plain names
    columns = ["input_ids", "labels"] + (["position_ids"] if train_rows and "position_ids" in train_rows[0] else [])
    dataset = Dataset.from_list([{**{c: r[c] for c in columns}, "length": len(r["input_ids"])} for r in train_rows])
    use_gpu = torch.cuda.is_available()
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
        disable_tqdm=True,  # the one progress bar is tasks/train_progress.py's
        **_precision(train_config, use_gpu),
    )
    val_subset = [{c: r[c] for c in columns if r.get(c) is not None} for r in val_rows[:train_config.eval_rows]]
    progress = training_progress(logger, val_subset, pad_id, train_config.eval_every,
                                 train_config.early_stopping_patience)
    trainer = ResponseOnlyTrainer(
        model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
        data_collator=lambda rows: pad_batch(rows, pad_id),
        callbacks=[_checkpoint_callback(train_config.max_seconds, checkpoint_dir, fingerprint, resumed), progress,
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
        out_of_memory = out_of_memory_message(train_config, max(len(r["input_ids"]) for r in train_rows),
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
    if trainer.is_world_process_zero():
        model.save_pretrained(out / MODEL_DIR)
        tokenizer.save_pretrained(out / MODEL_DIR)
        with open(out / TRAINING_LOG, "w", encoding="utf-8") as handle:
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
        "device": "cuda" if use_gpu else "cpu",
        "world_size": world_size,
        "final_perplexity_train": math.exp(min(final_loss, 50)),
        "final_val_loss": val_losses[-1] if val_losses else None,
        "val_points": len(val_losses),
    }


STEP = Step("finetune", __file__)


def checkpoint_dir_for(config: dict[str, Any], root: str, tokenized: ArtifactRef) -> Path:
    """Give back the stable checkpoint folder of this fine-tune: keyed like the artifact, so a rerun finds it."""
    return ArtifactStore(root).root / STEP.name / f".checkpoints-{STEP.key(config, [tokenized])}"


def write_finetune(config: dict[str, Any], tokenized: Path, out: Path, logger: logging.Logger | None = None,
                   checkpoint_dir: Path | None = None, data_fingerprint: str | None = None,
                   callbacks: list[Any] = ()) -> dict[str, Any]:
    """Train on the train split of a tokenize artifact; give back the figures for the manifest."""
    names = pq.read_schema(tokenized / "data.parquet").names
    columns = ["split", "input_ids", "labels"] + (["position_ids"] if "position_ids" in names else [])
    table = pq.read_table(tokenized / "data.parquet", columns=columns).to_pylist()
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
    return {"rows": len(rows), **figures}


@task(**step_task_options(STEP))
def finetune(config: dict[str, Any], root: str, tokenized: ArtifactRef) -> ArtifactRef:
    """Prefect task: the fine-tuned model artifact for this tokenized data and config."""
    from prefect.logging import get_run_logger

    logger = get_run_logger()
    checkpoints = checkpoint_dir_for(config, root, tokenized)
    ref, built = STEP.produce(
        config, root, [tokenized],
        lambda out, inputs: write_finetune(config, inputs[0], out, logger, checkpoints, tokenized.sha256))
    # Once the model is published the checkpoints have done their job; a crash before this line
    # leaves them for the rerun, which then resumes from the final one.
    shutil.rmtree(checkpoints, ignore_errors=True)
    return finish_step(root, ref, built)
