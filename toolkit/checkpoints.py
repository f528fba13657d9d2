"""Fine-tune's guarantees around training: exact resume from whole checkpoints of the same run, and a
one-line answer when a batch does not fit in memory."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

from catalog.files import verified_listing, write_text_atomically
from catalog.keys import canonical_json, sha256_text
from catalog.training_sections import ModelConfig, TrainConfig

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


def checkpoint_callback(max_seconds: float | None, checkpoint_dir: Path, fingerprint: str,
                        resumed: dict[str, Any] | None) -> Any:
    """Give back the Trainer callback that keeps checkpoints resumable: whole ones marked, none past the end."""
    import time

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
