"""Out-of-memory guard: a batch that cannot be allocated ends fine-tune with one clear line, not a hang or a trace.

Memory really runs out here: the fine-tune runs in a child process whose address space is capped
(RLIMIT_AS) a little above what the imports take, and the same cap lets a sane batch train.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from catalog.config import ModelConfig, TrainConfig
from catalog.store import MANIFEST, ArtifactRef
from tests.conftest import REPO
from toolkit.tokenizer import GPT2_VOCAB_SIZE, IGNORE_INDEX

ROWS, LENGTH = 4096, 512
# Above the imports: room for the rows, the tiny model, AdamW and a small batch's activations (~0.3 GiB
# measured), far below one activation of 4096 x 512 x 128 floats (1 GiB, and a forward makes several).
HEADROOM = 1536 << 20
EXIT_OUT_OF_MEMORY = 3
TIMEOUT = 300


def tokenized_artifact(root: Path) -> ArtifactRef:
    """Give back a real tokenize artifact of ROWS train examples of LENGTH tokens (prompt masked)."""
    from tasks.tokenize import STEP

    def build(out: Path, _inputs: list[Path]) -> dict:
        ids = [[GPT2_VOCAB_SIZE - 1] + [(7 * i + j) % 50000 + 1 for j in range(LENGTH - 2)] + [GPT2_VOCAB_SIZE - 1]
               for i in range(ROWS)]
        labels = [[IGNORE_INDEX] * (LENGTH - 16) + row[-16:] for row in ids]
        table = pa.table({"id": [f"r{i}" for i in range(ROWS)], "split": ["train"] * ROWS,
                          "input_ids": pa.array(ids, pa.list_(pa.int32())),
                          "labels": pa.array(labels, pa.list_(pa.int32()))})
        pq.write_table(table, out / "data.parquet")
        return {"rows": ROWS}

    ref, _ = STEP.produce({"synthetic": f"{ROWS}x{LENGTH}"}, str(root), [], build)
    return ref


def _finetune_in_capped_process(root: Path, tokenized: ArtifactRef, batch_size: int) -> subprocess.CompletedProcess:
    config = {"model": ModelConfig().model_dump(mode="json"),
              "train": TrainConfig(batch_size=batch_size, max_steps=2, save_steps=1,
                                   logging_steps=1).model_dump(mode="json")}
    args = json.dumps({"root": str(root), "tokenized": tokenized.model_dump(), "config": config,
                       "headroom": HEADROOM})
    # One malloc arena per thread would reserve 64 MiB of address space each and blur the cap.
    # CPU only: a CUDA context reserves far more address space than any cap that would fit here.
    env = {**os.environ, "MALLOC_ARENA_MAX": "2", "OMP_NUM_THREADS": "2", "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run([sys.executable, "-m", "tests.test_finetune_oom", args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=TIMEOUT)


def test_a_batch_that_cannot_fit_fails_with_one_line_naming_a_smaller_batch(tmp_path):
    from tasks.finetune import STEP
    from toolkit.checkpoints import CHECKPOINT_MARK

    tokenized = tokenized_artifact(tmp_path / "artifacts")

    huge = _finetune_in_capped_process(tmp_path / "artifacts", tokenized, batch_size=ROWS)
    assert huge.returncode == EXIT_OUT_OF_MEMORY, huge.stderr[-3000:]
    lines = huge.stdout.strip().splitlines()
    assert len(lines) == 1, huge.stdout
    message = lines[0]
    assert message.startswith("TrainingOutOfMemory: training ran out of CPU memory"), message
    assert "train.batch_size=4096 examples per device of up to 512 tokens" in message
    assert "--set train.batch_size=2048 --set train.gradient_accumulation_steps=2" in message
    assert "same effective batch of 4096" in message
    assert "Traceback" not in huge.stderr
    # Nothing looks finished: no published model, no temp folder left, no checkpoint a rerun would resume.
    finetune_dir = tmp_path / "artifacts" / STEP.name
    assert not list(finetune_dir.glob(f"*/{MANIFEST}"))
    assert not list(finetune_dir.glob(".tmp-*"))
    assert not list((finetune_dir / ".checkpoints").glob(f"checkpoint-*/{CHECKPOINT_MARK}"))

    # The cap is not what failed it: under the same cap the suggested road (a small batch) trains.
    small = _finetune_in_capped_process(tmp_path / "artifacts", tokenized, batch_size=4)
    assert small.returncode == 0, small.stderr[-3000:]
    assert len(list(finetune_dir.glob(f"*/{MANIFEST}"))) == 1


def _main(raw: str) -> None:
    # Everything heavy is imported before the cap, as a real run has it loaded before the first batch.
    import torch  # noqa: F401
    import transformers  # noqa: F401
    from datasets import Dataset  # noqa: F401

    from tasks.finetune import STEP, write_finetune
    from toolkit.checkpoints import TrainingOutOfMemory
    from toolkit.tokenizer import gpt2_tokenizer

    gpt2_tokenizer()
    args = json.loads(raw)
    with open("/proc/self/status", encoding="utf-8") as handle:
        size_kb = next(int(line.split()[1]) for line in handle if line.startswith("VmSize:"))
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (size_kb * 1024 + args["headroom"], hard))

    root, config = args["root"], args["config"]
    tokenized = ArtifactRef(**args["tokenized"])
    checkpoints = Path(root) / STEP.name / ".checkpoints"
    try:
        STEP.produce(config, root, [tokenized],
                     lambda out, inputs: write_finetune(config, inputs[0], out, None, checkpoints, tokenized.sha256))
    except TrainingOutOfMemory as exc:
        # `itune run` prints a failed step as its class and the first line of its message: all of it must be there.
        print(f"{type(exc).__name__}: {exc}")
        sys.exit(EXIT_OUT_OF_MEMORY)


if __name__ == "__main__":
    _main(sys.argv[1])
