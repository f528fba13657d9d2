"""Fine-tune progress: val loss on a fixed val subset every N steps, one console bar, Prefect progress, early stop.

The val loss is the training loss (cross-entropy over response tokens) on the same first `train.eval_rows` val
rows every time, so its points are comparable along the run; they go into the Trainer's log history (and so into
training_log.jsonl and the loss curve), into a Prefect progress artifact and the run log, and into the one
progress bar a terminal shows.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

from toolkit.modeling import pad_batch, response_token_loss
from toolkit.tokenizer import IGNORE_INDEX

EVAL_POINTS = 20  # val-loss points per run when train.eval_every is 0


def eval_interval(max_steps: int, every: int) -> int:
    """Give back how many optimizer steps lie between two val-loss points."""
    return every if every > 0 else max(1, round(max_steps / EVAL_POINTS))


def val_loss(model: Any, rows: list[dict[str, Any]], pad_id: int, batch_size: int = 64) -> float:
    """Give back the mean cross-entropy per response token over `rows` (no gradients; training mode restored)."""
    import torch

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(rows), batch_size):
            batch = {k: v.to(device) for k, v in pad_batch(rows[start:start + batch_size], pad_id).items()}
            total += float(response_token_loss(model, batch, reduction="sum"))
            count += int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    model.train(was_training)
    return total / max(count, 1)


def _clock(seconds: float) -> str:
    minutes, seconds = divmod(int(seconds), 60)
    return f"{minutes}m{seconds:02d}s"


def training_progress(logger: logging.Logger | None, val_rows: list[dict[str, Any]], pad_id: int, every: int,
                      patience: int | None):
    """Give back the Trainer callback that measures val loss, reports progress and stops early when asked."""
    from transformers import TrainerCallback

    class TrainingProgress(TrainerCallback):
        def __init__(self) -> None:
            self.started = time.perf_counter()
            self.first_step = 0
            self.targets_seen = 0
            self.train_loss: float | None = None
            self.val_loss: float | None = None
            self.best: float | None = None
            self.bad_points = 0
            self.every = 1
            self.artifact_id = None
            self.bar = None
            self._redirect = None

        def describe(self, state) -> str:
            done = state.global_step - self.first_step
            elapsed = time.perf_counter() - self.started
            left = elapsed / done * (state.max_steps - state.global_step) if done else 0.0
            losses = " ".join(f"{name} {value:.4f}" for name, value in (("train", self.train_loss),
                                                                       ("val", self.val_loss)) if value is not None)
            return (f"step {state.global_step}/{state.max_steps} {losses} target tokens/s "
                    f"{self.targets_seen / max(elapsed, 1e-9):.0f} left {_clock(left)}")

        def on_train_begin(self, args, state, control, **kwargs):
            self.started, self.first_step = time.perf_counter(), state.global_step
            self.every = eval_interval(state.max_steps, every)
            if not state.is_world_process_zero:
                return
            from prefect.context import TaskRunContext

            if TaskRunContext.get() is not None:
                from prefect.artifacts import create_progress_artifact

                self.artifact_id = create_progress_artifact(
                    100.0 * state.global_step / max(state.max_steps, 1), key="itune-finetune-progress",
                    description=f"fine-tune: step {state.global_step}/{state.max_steps}")
            if sys.stderr.isatty():
                from tqdm.auto import tqdm
                from tqdm.contrib.logging import logging_redirect_tqdm

                self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc="fine-tune", unit="step",
                                dynamic_ncols=True, mininterval=0.5)
                # log lines go above the bar instead of through it
                self._redirect = logging_redirect_tqdm([logging.getLogger("prefect"), logging.getLogger()])
                self._redirect.__enter__()

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.train_loss = float(logs["loss"])

        def on_step_end(self, args, state, control, model=None, **kwargs):
            step = state.global_step
            if val_rows and model is not None and (step % self.every == 0 or step >= state.max_steps):
                self.val_loss = val_loss(model, val_rows, pad_id)
                state.log_history.append({"step": step, "eval_loss": self.val_loss})
                self._after_val(state, control)
            if self.bar is not None:
                self.bar.update(step - self.bar.n)
                self.bar.set_postfix_str(self.describe(state).split(" ", 2)[2], refresh=False)

        def _after_val(self, state, control) -> None:
            line = self.describe(state)
            if state.is_world_process_zero:
                if logger is not None:
                    logger.info(line)
                if self.artifact_id is not None:
                    from prefect.artifacts import update_progress_artifact

                    update_progress_artifact(self.artifact_id, 100.0 * state.global_step / max(state.max_steps, 1),
                                             description=f"fine-tune: {line}")
            if self.best is None or self.val_loss < self.best:
                self.best, self.bad_points = self.val_loss, 0
            else:
                self.bad_points += 1
            if patience is not None and self.bad_points >= patience and state.global_step < state.max_steps:
                if logger is not None:
                    logger.info("early stop at step %d: val loss has not improved on %.4f for %d points",
                                state.global_step, self.best, patience)
                control.should_training_stop = True
                control.should_save = True

        def close(self) -> None:
            if self._redirect is not None:
                self._redirect.__exit__(None, None, None)
                self._redirect = None
            if self.bar is not None:
                self.bar.close()
                self.bar = None

        def on_train_end(self, args, state, control, **kwargs):
            self.close()
            if self.artifact_id is not None:
                from prefect.artifacts import update_progress_artifact

                update_progress_artifact(self.artifact_id, 100.0 * state.global_step / max(state.max_steps, 1),
                                         description=f"fine-tune finished at step {state.global_step}")

    return TrainingProgress()
