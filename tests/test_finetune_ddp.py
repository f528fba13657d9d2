"""Scale out: two CPU processes under torchrun (DDP, gloo) reach the loss of one with the same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.servers import free_port as _free_port
from tests.test_finetune_resume import micro_model, rows

SETTINGS = {"max_steps": 12, "save_steps": 0, "logging_steps": 4, "learning_rate": 3e-3, "warmup_ratio": 0.1}


@pytest.mark.slow
def test_two_process_ddp_matches_one_process_with_the_same_global_batch(tmp_path):
    from catalog.config import ModelConfig, TrainConfig
    from tasks.finetune import train_model

    model = micro_model(tmp_path / "micro")
    single = train_model(rows(), ModelConfig(name=model), TrainConfig(**SETTINGS, batch_size=8),
                         tmp_path / "single", tmp_path / "single-checkpoints")
    args = json.dumps({"model": model, "out": str(tmp_path / "ddp")})
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    command = [torchrun, "--nproc_per_node", "2", "--master_port", str(_free_port()), "-m", "tests.test_finetune_ddp"]
    done = subprocess.run([*command, args], cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-4000:]
    ddp = json.loads((tmp_path / "ddp" / "figures.json").read_text())
    assert ddp["world_size"] == 2 and ddp["steps"] == single["steps"] == 12
    assert ddp["final_loss"] == pytest.approx(single["final_loss"], rel=0.02)
    assert (tmp_path / "ddp" / "model" / "model.safetensors").is_file()


def _main(raw: str) -> None:
    from catalog.config import ModelConfig, TrainConfig
    from tasks.finetune import train_model

    args = json.loads(raw)
    out = Path(args["out"])
    out.mkdir(parents=True, exist_ok=True)
    figures = train_model(rows(), ModelConfig(name=args["model"]), TrainConfig(**SETTINGS, batch_size=4), out,
                          out.parent / "ddp-checkpoints")
    if int(os.environ["RANK"]) == 0:
        (out / "figures.json").write_text(json.dumps(figures))


if __name__ == "__main__":
    _main(sys.argv[1])
