"""LoRA (train.peft=lora) beside full fine-tuning on `scratch:mini`: trainable parameters, speed, memory, val loss.

Run: python benchmarks/bench_lora.py [--steps 60] [--write]

Both runs train itune's `train_model` for the same number of steps on the same built-in task rows (the paper's
template, GPT-2's tokenizer), same seed and batch, each in a fresh process so that its peak resident memory is
its own; val loss = response-token loss on held-out rows at the end. On CPU here, the figures say what LoRA
saves in optimizer state and gradients, not GPU speed. With --write, replaces "## LoRA" in RESULTS.md.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

COMMAND = "python benchmarks/bench_lora.py --write"
PROMPT = "<|endoftext|>Instruction: {instruction}\nInput: {input}\nResponse:"


def task_rows(count: int, seed: int) -> list[dict[str, Any]]:
    """Give back tokenized built-in task rows (prompt labels masked)."""
    from toolkit.builtin_tasks import generate
    from toolkit.tokenizer import IGNORE_INDEX, gpt2_tokenizer

    tokenizer = gpt2_tokenizer()
    rows = []
    for example in generate(count, seed):
        prompt = tokenizer(PROMPT.format(**example)).input_ids
        answer = tokenizer(" " + example["response"] + "<|endoftext|>").input_ids
        rows.append({"input_ids": prompt + answer, "labels": [IGNORE_INDEX] * len(prompt) + answer})
    return rows


def one_run(peft: str, steps: int, queue: Any) -> None:
    import resource

    from transformers import AutoModelForCausalLM

    from catalog.training_sections import ModelConfig, TrainConfig
    from tasks.evaluate import token_losses
    from tasks.finetune import train_model

    train, val = task_rows(2000, seed=1), task_rows(200, seed=2)
    settings = TrainConfig(max_steps=steps, batch_size=16, learning_rate=3e-3 if peft == "none" else 1e-2,
                           save_steps=0, logging_steps=max(steps // 5, 1), peft=peft)
    with tempfile.TemporaryDirectory() as out:
        figures = train_model(train, ModelConfig(name="scratch:mini"), settings, Path(out), Path(out) / "ck")
        model = AutoModelForCausalLM.from_pretrained(Path(out) / "model")
    figures["val_loss"] = token_losses(model, val, 32)["response"]
    figures["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    queue.put(figures)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args(argv)
    context = multiprocessing.get_context("spawn")
    results = {}
    started = time.perf_counter()
    for peft in ("none", "lora"):
        queue = context.Queue()
        process = context.Process(target=one_run, args=(peft, args.steps, queue))
        process.start()
        results[peft] = queue.get()
        process.join()
    wall = time.perf_counter() - started
    lines = ["## LoRA", "", f"Command: `{COMMAND}` ({args.steps} steps each); {platform.machine()} CPU, 2 cores "
             f"shared with other jobs; wall {wall:.0f} s. `scratch:mini` (4 layers, 256 wide), batch 16,",
             "lr 3e-3 full / 1e-2 LoRA (r 8, alpha 16, c_attn c_proj c_fc), the same built-in task rows and seed.", "",
             "| run | trainable parameters | of all | target tokens/s | peak RSS MiB | val loss (response) |",
             "|---|---|---|---|---|---|"]
    for peft, label in (("none", "full fine-tuning"), ("lora", "LoRA (train.peft=lora)")):
        row = results[peft]
        share = row["trainable_parameters"] / row["parameters"]
        speed = row["target_tokens_per_second"]
        lines.append(f"| {label} | {row['trainable_parameters']:,} | {share:.2%} | {speed:,.0f} "
                     f"| {row['peak_rss_mib']:,.0f} | {row['val_loss']:.3f} |")
    lines += ["", "`scratch:mini` starts from random weights, which LoRA keeps frozen: its val loss says what low-rank",
              "updates of an untrained base can do, not what they do on a pretrained GPT-2 (not available offline).",
              "What carries over is the trainable share and the optimizer state it saves."]
    text = "\n".join(lines) + "\n"
    from benchmarks._results import publish

    return publish(text, args.write)


if __name__ == "__main__":
    main()
