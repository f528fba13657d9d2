"""Step 5, tokenize: GPT-2 token ids per example, with the prompt masked out of the labels.

Prompt and completion are tokenized separately in batches and joined, so the boundary is exact.
When an example is too long, the response is kept whole where possible and the prompt loses its
middle (its start, the BOS, and its end, the SEP, stay).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from prefect import task

from tasks.artifacts import ArtifactRef, Step
from tasks.caching import finish_step, step_task_options
from tasks.config import TokenizeConfig
from tasks.modeling import IGNORE_INDEX, gpt2_tokenizer

TOKENIZED_SCHEMA = pa.schema([
    ("id", pa.string()), ("split", pa.string()), ("category", pa.string()),
    ("input_ids", pa.list_(pa.int32())), ("labels", pa.list_(pa.int32())),
    ("length", pa.int32()), ("n_target", pa.int32()), ("truncated", pa.bool_()),
])


def fit_example(prompt: list[int], completion: list[int], max_length: int) -> tuple[list[int], list[int], bool]:
    """Give back (input_ids, labels, truncated) for one example within max_length tokens."""
    if len(prompt) + len(completion) <= max_length:
        return prompt + completion, [IGNORE_INDEX] * len(prompt) + completion, False
    keep_prompt = min(len(prompt), max(max_length // 4, max_length - len(completion)))
    completion = completion[: max_length - keep_prompt]
    head = keep_prompt // 2
    prompt = prompt[:head] + prompt[len(prompt) - (keep_prompt - head):]
    return prompt + completion, [IGNORE_INDEX] * len(prompt) + completion, True


def tokenize_batch(batch: pa.RecordBatch, config: TokenizeConfig) -> pa.RecordBatch:
    """Give back the tokenized rows of one Arrow batch of templated rows."""
    tokenizer = gpt2_tokenizer()
    prompts = tokenizer(batch.column("prompt").to_pylist(), add_special_tokens=False).input_ids
    completions = tokenizer(batch.column("completion").to_pylist(), add_special_tokens=False).input_ids
    fitted = [fit_example(p, c, config.max_length) for p, c in zip(prompts, completions, strict=True)]
    labels = [f[1] for f in fitted]
    return pa.RecordBatch.from_arrays([
        batch.column("id"), batch.column("split"), batch.column("category"),
        pa.array([f[0] for f in fitted], pa.list_(pa.int32())),
        pa.array(labels, pa.list_(pa.int32())),
        pa.array([len(f[0]) for f in fitted], pa.int32()),
        pa.array([sum(1 for x in lab if x != IGNORE_INDEX) for lab in labels], pa.int32()),
        pa.array([f[2] for f in fitted], pa.bool_()),
    ], schema=TOKENIZED_SCHEMA)


STEP = Step("tokenize", __file__)


def write_tokenize(config: TokenizeConfig, templated: Path, out: Path) -> dict[str, Any]:
    """Stream the templated rows through the tokenizer in Arrow batches; give back token statistics."""
    source = pq.ParquetFile(templated / "data.parquet")
    rows = tokens = targets = truncated = zero_target = 0
    with pq.ParquetWriter(out / "data.parquet", TOKENIZED_SCHEMA) as writer:
        for batch in source.iter_batches(batch_size=config.batch_size,
                                         columns=["id", "split", "category", "prompt", "completion"]):
            tokenized = tokenize_batch(batch, config)
            writer.write_batch(tokenized)
            n_target = tokenized.column("n_target").to_numpy()
            rows += tokenized.num_rows
            tokens += int(tokenized.column("length").to_numpy().sum())
            targets += int(n_target.sum())
            truncated += int(sum(tokenized.column("truncated").to_pylist()))
            zero_target += int((n_target == 0).sum())
    return {"rows": rows, "tokens": tokens, "target_tokens": targets, "truncated_share": truncated / max(rows, 1),
            "zero_target_rows": zero_target}


@task(**step_task_options(STEP))
def tokenize(config: dict[str, Any], root: str, templated: ArtifactRef) -> ArtifactRef:
    """Prefect task: the tokenize artifact for this templated data."""
    ref, built = STEP.produce(config, root, [templated],
                              lambda out, inputs: write_tokenize(TokenizeConfig(**config), inputs[0], out))
    return finish_step(root, ref, built)
