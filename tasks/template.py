"""Step 4, template: render each pair as S = [BOS, instruction, SEP, response, EOS] text, and split.

Prompt and response are kept apart so tokenize can mask the prompt. Templates: `paper`, `alpaca`,
`chat` (whole multi-turn conversations from the `messages` column; the last assistant turn is the
target) and user templates from `template.custom`. The split comes from a hash of `id`, so adding
rows never moves an old row between train, val and test.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from prefect import task

from catalog import layout
from catalog.caching import finish_step, step_task_options
from catalog.sections import RunnerConfig, TemplateConfig
from catalog.step import Step
from catalog.store import ArtifactRef
from toolkit.runner import map_batches

BOS = EOS = "<|endoftext|>"

# name -> (prompt without input, prompt with input, response). The paper's SEP is "Response:".
TEMPLATES: dict[str, tuple[str, str, str]] = {
    "paper": (
        BOS + "Instruction: {instruction}\nResponse:",
        BOS + "Instruction: {instruction}\nInput: {input}\nResponse:",
        " {response}" + EOS,
    ),
    "alpaca": (
        BOS + "### Instruction:\n{instruction}\n\n### Response:\n",
        BOS + "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n",
        "{response}" + EOS,
    ),
}


CHAT_TURN = "<|{role}|>\n{content}\n"


def template_parts(config: TemplateConfig) -> tuple[str, str, str]:
    """Give back (prompt, prompt with input, response) format strings of the configured template."""
    if config.name in config.custom:
        user = config.custom[config.name]
        return user.prompt, user.prompt_with_input or user.prompt, user.response
    if config.name == "chat":
        return "", "", "{response}" + EOS
    return TEMPLATES[config.name]


def render_prompt(template: str, instruction: str, input_text: str = "", parts: tuple[str, str, str] | None = None
                  ) -> str:
    """Give back the prompt text for one instruction (what generation is conditioned on)."""
    without_input, with_input, _ = parts or TEMPLATES[template]
    return (with_input if input_text else without_input).format(instruction=instruction, input=input_text)


def render_chat(messages: str, instruction: str, input_text: str) -> str:
    """Give back the chat prompt: every turn before the last assistant turn, then the assistant tag."""
    turns = json.loads(messages)[:-1] if messages else [
        {"role": "user", "content": instruction + ("\n\n" + input_text if input_text else "")}]
    return BOS + "".join(CHAT_TURN.format(**turn) for turn in turns) + "<|assistant|>\n"


def split_of(row_id: str, val_fraction: float, test_fraction: float) -> str:
    """Give back train/val/test for an id, from its hash alone."""
    bucket = int(hashlib.sha256(row_id.encode("utf-8")).hexdigest()[:8], 16) / 0xFFFFFFFF
    if bucket < val_fraction:
        return "val"
    if bucket < val_fraction + test_fraction:
        return "test"
    return "train"


def apply_template(frame: pd.DataFrame, config: TemplateConfig) -> pd.DataFrame:
    """Give back id, split, category, prompt, completion and the raw fields kept for evaluation."""
    parts = template_parts(config)
    if config.name == "chat":
        messages = frame["messages"] if "messages" in frame else pd.Series("", index=frame.index)
        prompts = [render_chat(m, i, x) for m, i, x in zip(messages, frame["instruction"], frame["input"],
                                                            strict=True)]
    else:
        prompts = [render_prompt(config.name, i, x, parts)
                   for i, x in zip(frame["instruction"], frame["input"], strict=True)]
    return pd.DataFrame({
        "id": frame["id"],
        "split": [split_of(i, config.val_fraction, config.test_fraction) for i in frame["id"]],
        "category": frame["category"],
        "prompt": prompts,
        "completion": [parts[2].format(response=r) for r in frame["response"]],
        "instruction": frame["instruction"],
        "input": frame["input"],
        "response": frame["response"],
    })


STEP = Step("template", __name__, libraries=("pyarrow", "pandas"))


TEMPLATED_SCHEMA = pa.schema([(name, pa.string()) for name in (
    "id", "split", "category", "prompt", "completion", "instruction", "input", "response")])


def template_batch(batch: pa.RecordBatch, config: TemplateConfig) -> pa.Table:
    """Give back one Arrow batch of validated rows rendered (row-local: any runner may run it)."""
    return pa.Table.from_pandas(apply_template(batch.to_pandas(), config), TEMPLATED_SCHEMA, preserve_index=False)


def write_template(config: TemplateConfig, validated: Path, out: Path, batch_rows: int = 20_000,
                   runner: RunnerConfig | None = None) -> dict[str, Any]:
    """Render the validated rows in Arrow batches into data.parquet; give back counts per split."""
    splits: dict[str, int] = {}
    rows = 0
    batches = pq.ParquetFile(layout.data_file(validated), pre_buffer=False).iter_batches(batch_size=batch_rows)
    with pq.ParquetWriter(layout.data_file(out), TEMPLATED_SCHEMA) as writer:
        for templated in map_batches(template_batch, batches, config, runner=runner, step="template"):
            writer.write_table(templated)
            rows += templated.num_rows
            for entry in templated.column("split").value_counts().to_pylist():
                splits[entry["values"]] = splits.get(entry["values"], 0) + entry["counts"]
    return {"rows": rows, "splits": dict(sorted(splits.items(), key=lambda kv: (-kv[1], kv[0]))),
            "template": list(template_parts(config))}


@task(**step_task_options(STEP))
def template(config: dict[str, Any], root: str, validated: ArtifactRef, runner: dict[str, Any] | None = None
             ) -> ArtifactRef:
    """Prefect task: the template artifact for this validated data; `runner` (where batches render) is not keyed."""
    ref, built = STEP.produce(config, root, [validated], lambda out, inputs: write_template(
        TemplateConfig(**config), inputs[0], out, runner=RunnerConfig(**runner or {})))
    return finish_step(root, ref, built)
