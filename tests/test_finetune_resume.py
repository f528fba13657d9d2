"""Checkpoints and exact resume: a training process killed with SIGKILL resumes to the same model."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from catalog.config import ModelConfig, TrainConfig
from tasks.finetune import train_model
from tests.conftest import REPO
from toolkit.checkpoints import CHECKPOINT_MARK, CheckpointError, resumable_checkpoint
from toolkit.tokenizer import IGNORE_INDEX

STEPS = 24
SETTINGS = {"max_steps": STEPS, "batch_size": 4, "save_steps": 6, "logging_steps": 6, "learning_rate": 3e-3,
            "warmup_ratio": 0.1}


def micro_model(folder: Path) -> str:
    """Give back a save_pretrained folder of a GPT-2 with a 600-token vocabulary: steps take milliseconds."""
    from transformers import GPT2Config, GPT2LMHeadModel

    if not (folder / "config.json").is_file():
        config = GPT2Config(vocab_size=600, n_positions=64, n_embd=32, n_layer=2, n_head=2,
                            bos_token_id=0, eos_token_id=0, pad_token_id=0)
        GPT2LMHeadModel(config).save_pretrained(folder)
    return str(folder)


def rows(n: int = 40, shift: int = 0) -> list[dict]:
    out = []
    for i in range(n):
        prompt = [0, 100 + (i + shift) % 7, 200 + i % 3, 300] + [310] * (i % 4)
        answer = [400 + (i + shift) % 7, 500 + i % 3, 0]
        out.append({"input_ids": prompt + answer, "labels": [IGNORE_INDEX] * len(prompt) + answer})
    return out


def _mkdir(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _train_in_subprocess(out: Path, checkpoints: Path, model: str, step_delay: float) -> subprocess.Popen:
    args = json.dumps({"out": str(out), "checkpoints": str(checkpoints), "delay": step_delay, "model": model})
    return subprocess.Popen([sys.executable, "-m", "tests.test_finetune_resume", args], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(folder / "model" / "model.safetensors")


def _marked_steps(checkpoints: Path) -> list[int]:
    return sorted(int(p.parent.name.split("-")[1]) for p in checkpoints.glob(f"checkpoint-*/{CHECKPOINT_MARK}"))


@pytest.mark.slow
def test_sigkilled_training_resumes_from_last_checkpoint_to_the_same_model(tmp_path):
    model = micro_model(tmp_path / "micro")
    victim = _train_in_subprocess(tmp_path / "victim", tmp_path / "checkpoints", model, step_delay=0.3)
    expected = train_model(rows(), ModelConfig(name=model), TrainConfig(**SETTINGS), _mkdir(tmp_path / "reference"),
                           tmp_path / "reference-checkpoints")
    deadline = time.monotonic() + 180
    while not [s for s in _marked_steps(tmp_path / "checkpoints") if s >= 12]:
        assert victim.poll() is None, victim.stderr.read()[-3000:]
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.05)
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    assert victim.returncode == -signal.SIGKILL
    assert not (tmp_path / "victim" / "model").exists()
    killed_at = max(_marked_steps(tmp_path / "checkpoints"))
    assert 12 <= killed_at < STEPS

    # The rerun: same data, same settings, same checkpoint folder, as the pipeline's rerun would do.
    resumed = train_model(rows(), ModelConfig(name=model), TrainConfig(**SETTINGS), tmp_path / "victim",
                          tmp_path / "checkpoints")
    assert resumed["resumed_from_step"] == killed_at and resumed["steps"] == expected["steps"] == STEPS
    assert resumed["final_loss"] == pytest.approx(expected["final_loss"], rel=1e-3)
    log = [json.loads(line) for line in (tmp_path / "victim" / "training_log.jsonl").read_text().splitlines()]
    assert [entry["step"] for entry in log] == [6, 12, 18, 24]  # the loss curve survives the crash whole
    ours, theirs = _weights(tmp_path / "victim"), _weights(tmp_path / "reference")
    assert max(float((ours[k] - theirs[k]).abs().max()) for k in theirs) < 1e-4


def test_half_written_checkpoint_is_never_resumed_from(tmp_path):
    checkpoints = tmp_path / "checkpoints"
    train_model(rows(), ModelConfig(name=micro_model(tmp_path / "micro")),
                TrainConfig(**{**SETTINGS, "max_steps": 6, "save_steps": 3}),
                tmp_path / "out", checkpoints)
    assert _marked_steps(checkpoints) == [3, 6]
    # What a kill during the write of a later checkpoint leaves behind: some files, no mark.
    partial = checkpoints / "checkpoint-9"
    shutil.copytree(checkpoints / "checkpoint-6", partial)
    (partial / CHECKPOINT_MARK).unlink()
    with open(partial / "optimizer.pt", "r+b") as handle:
        handle.truncate(10)
    # A marked checkpoint whose file was cut short after marking is not complete either.
    cut = checkpoints / "checkpoint-7"
    shutil.copytree(checkpoints / "checkpoint-6", cut)
    mark = json.loads((cut / CHECKPOINT_MARK).read_text())
    (cut / CHECKPOINT_MARK).write_text(json.dumps({**mark, "global_step": 7}))
    with open(cut / "model.safetensors", "r+b") as handle:
        handle.truncate(100)
    folder, found = resumable_checkpoint(checkpoints, mark["fingerprint"])
    assert folder.name == "checkpoint-6" and found["final"]
    assert not partial.exists() and not cut.exists()


def test_checkpoint_of_other_data_or_settings_fails_with_a_clear_message(tmp_path):
    checkpoints = tmp_path / "checkpoints"
    settings = TrainConfig(**{**SETTINGS, "max_steps": 4, "save_steps": 2})
    model = ModelConfig(name=micro_model(tmp_path / "micro"))
    train_model(rows(), model, settings, tmp_path / "out", checkpoints)
    with pytest.raises(CheckpointError, match="made for other data or training settings"):
        train_model(rows(shift=1), model, settings, tmp_path / "out2", checkpoints)
    with pytest.raises(CheckpointError, match="delete .*checkpoints to start over"):
        train_model(rows(), model, TrainConfig(**{**SETTINGS, "max_steps": 8, "save_steps": 2}),
                    tmp_path / "out3", checkpoints)


def _main(raw: str) -> None:
    from transformers import TrainerCallback

    args = json.loads(raw)

    class Slow(TrainerCallback):
        """Stretches each step so the test can kill the process between checkpoints."""

        def on_step_end(self, *_, **__):
            time.sleep(args["delay"])

    figures = train_model(rows(), ModelConfig(name=args["model"]), TrainConfig(**SETTINGS), _mkdir(Path(args["out"])),
                          Path(args["checkpoints"]), callbacks=[Slow()])
    print(json.dumps(figures))


if __name__ == "__main__":
    _main(sys.argv[1])
