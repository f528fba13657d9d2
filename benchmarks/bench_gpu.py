"""GPU training figures of the fine-tune work function: tokens/s, step time, peak memory and MFU.

Run (on a machine with CUDA GPUs, under 8 minutes): python benchmarks/bench_gpu.py [--write]
Run (anywhere, a smoke test of the script itself): python benchmarks/bench_gpu.py --tiny

Cases, each `train_model` (itune's own fine-tune loop: response-token loss, packed blocks with per-example
attention, fused AdamW) on packed blocks of 1,024 tokens whose every token is a target, as in pre-training,
so the usual 6N + 12·L·d·T FLOPs per token counts exactly what runs:
1. GPT-2 124M shape (`scratch:small`), bf16 autocast, SDPA, torch.compile off;
2. the same with torch.compile on;
3. the same weights as a `save_pretrained` folder model (the Hub path), compile on;
4. all GPUs of the machine through `train.nproc_per_node` (torchrun, NCCL), compile on.
Throughput is taken between the 10th step (half way for shorter runs) and the last, so start-up and
compilation do not count.
MFU = achieved FLOPs/s per GPU / the card's dense bf16 peak (table below; unknown cards are reported
without MFU). Not a test: it prints figures and, with --write, replaces "## GPU training" in RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

COMMAND = "python benchmarks/bench_gpu.py --write"
# Dense bf16 tensor-core peaks, FLOP/s, from the vendors' data sheets (SXM parts).
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}


def packed_rows(blocks: int, length: int, seed: int = 0) -> list[dict[str, Any]]:
    """Give back packed blocks of random GPT-2 token ids, 4 examples per block, every token a target."""
    import random

    rng = random.Random(seed)
    rows = []
    for _ in range(blocks):
        ids = [rng.randrange(50256) for _ in range(length)]
        quarter = length // 4
        rows.append({"input_ids": ids, "labels": ids, "position_ids": [i % quarter for i in range(length)]})
    return rows


def train_case(model: str, steps: int, batch_size: int, length: int, compile_model: bool, precision: str,
               out: str) -> dict[str, Any]:
    """Train one case; give back tokens/s per process, step time and peak memory (rank 0's view)."""
    import torch
    from transformers import TrainerCallback

    from catalog.training_sections import ModelConfig, TrainConfig
    from tasks.finetune import train_model

    class StepTimer(TrainerCallback):
        marks: dict[int, float] = {}

        def on_step_end(self, args, state, control, **kwargs):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.marks[state.global_step] = time.perf_counter()

    timer = StepTimer()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rows = packed_rows(steps * batch_size * world, length)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    settings = TrainConfig(max_steps=steps, batch_size=batch_size, learning_rate=6e-4, warmup_ratio=0.0,
                           save_steps=0, logging_steps=max(steps // 4, 1), precision=precision,
                           torch_compile=compile_model)
    figures = train_model(rows, ModelConfig(name=model), settings, Path(out), Path(out) / "checkpoints",
                          callbacks=[timer])
    first = min(10, steps // 2)
    seconds = timer.marks[steps] - timer.marks[first]
    tokens = (steps - first) * batch_size * length
    return {"tokens_per_second": tokens / seconds, "step_ms": 1000 * seconds / (steps - first),
            "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None,
            "parameters": figures["parameters"], "world_size": world, "final_loss": figures["final_loss"]}


def flops_per_token(model: str, length: int) -> float:
    """Training FLOPs per token: 6 x parameters (the tied embedding counted once, as the LM head) + attention."""
    from transformers import AutoConfig

    from toolkit.modeling import parse_scratch

    shape = parse_scratch(model)
    if shape is not None:
        layers, width, _ = shape
        vocab = 50257
    else:
        config = AutoConfig.from_pretrained(model)
        layers, width, vocab = config.n_layer, config.n_embd, config.vocab_size
    parameters = layers * 12 * width * width + vocab * width
    return 6 * parameters + 12 * layers * width * length


def card() -> tuple[str, float | None]:
    import torch

    if not torch.cuda.is_available():
        return "CPU", None
    name = torch.cuda.get_device_name(0)
    return name, next((peak for key, peak in PEAK_BF16.items() if key in name), None)


def run(tiny: bool) -> list[dict[str, Any]]:
    import torch

    from toolkit.launcher import launch
    from toolkit.modeling import load_base_model

    gpus = torch.cuda.device_count()
    model = "scratch:tiny" if tiny else "scratch:small"
    steps, batch, length = (4, 2, 64) if tiny else (60, 16, 1024)
    precision = "fp32" if tiny else "bf16"
    results = []
    with tempfile.TemporaryDirectory() as work:
        folder = Path(work) / "folder-model"
        load_base_model(model, 0).save_pretrained(folder)
        compiled = not tiny  # compiling takes longer than a smoke test's few steps
        cases = [("scratch", model, False, 1), ("scratch", model, compiled, 1),
                 ("save_pretrained folder", str(folder), compiled, 1)]
        if gpus > 1:
            cases.append((f"{gpus} GPUs (nproc_per_node={gpus})", model, True, gpus))
        for case, name, compile_model, nproc in cases:
            label = f"{case}, compile {'on' if compile_model else 'off'}"
            kwargs = {"model": name, "steps": steps, "batch_size": batch, "length": length,
                      "compile_model": compile_model, "precision": precision, "out": str(Path(work) / label)}
            figures = launch("benchmarks.bench_gpu:train_case", kwargs, nproc, echo=lambda line: None) \
                if nproc > 1 else train_case(**kwargs)
            figures.update(case=label, flops_per_token=flops_per_token(model, length))
            results.append(figures)
            print(json.dumps(figures), flush=True)
    return results


def report(results: list[dict[str, Any]], device: str, peak: float | None, wall: float) -> str:
    lines = ["## GPU training", "", f"Command: `{COMMAND}` on {device}; wall time {wall:.0f} s. Packed blocks of",
             "1,024 tokens, bf16 autocast, SDPA, fused AdamW; throughput between step 10 and the last.", "",
             "| case | tokens/s (all GPUs) | step ms | peak GiB (GPU 0) | MFU |", "|---|---|---|---|---|"]
    for row in results:
        total = row["tokens_per_second"] * row["world_size"]
        mfu = f"{row['tokens_per_second'] * row['flops_per_token'] / peak:.1%}" if peak else "-"
        memory = f"{row['peak_memory_gib']:.1f}" if row["peak_memory_gib"] is not None else "-"
        lines.append(f"| {row['case']} | {total:,.0f} | {row['step_ms']:.0f} | {memory} | {mfu} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a tiny model on whatever device is here (smoke test)")
    parser.add_argument("--write", action="store_true", help="replace the GPU section of benchmarks/RESULTS.md")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    device, peak = card()
    text = report(run(args.tiny), device, peak, time.perf_counter() - started)
    from benchmarks._results import publish

    return publish(text, args.write)


if __name__ == "__main__":
    main()
