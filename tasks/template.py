"""Step 4, template: render each pair as S = [BOS, instruction, SEP, response, EOS] text, and split.

Prompt and response are kept apart so tokenize can mask the prompt. Templates: `paper`, `alpaca`,
`chat` (whole multi-turn conversations from the `messages` column; the last assistant turn is the
target) and user templates from `template.custom`. The split comes from a hash of each row's group key
(`group_key`: the item a row asks about, so one item asked in several phrasings or templates stays on one
side), so adding rows never moves an old row between train, val and test.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from prefect import task

from tasks.artifacts import ArtifactRef, Step
from tasks.caching import finish_step, step_task_options
from tasks.config import RunnerConfig, TemplateConfig
from tasks.runner import map_batches

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


_SPACES = re.compile(r"\s+")
_SENTENCE_END = re.compile(r"\n|\"|(?<=[.!?:])\s")
_WORD = re.compile(r"\w+")
BUILTIN_SOURCE = "builtin:tasks:"
# A sentence of at least this many words is taken for part of a passage (an article, a context, a review) that
# the data may ask about under several templates or questions: templates' own sentences are shorter.
PASSAGE_WORDS = 20


def _normalised(text: str) -> str:
    return _SPACES.sub(" ", text).strip().lower()


def passage_sentences(text: str) -> set[str]:
    """Give back the long sentences of a text (20+ words; lower case, words only): what marks its passage."""
    found = (" ".join(_WORD.findall(part.lower())) for part in _SENTENCE_END.split(text))
    return {sentence for sentence in found if sentence.count(" ") + 1 >= PASSAGE_WORDS}


def item_key(instruction: str, input_text: str) -> str:
    """Give back the item a user row asks about: its passage when it has one, else instruction + input.

    Prompt/completion data such as T0 renders one passage through many templates (passage first, question
    first, quoted, with choices, with one question or another). What they share whatever wraps the passage is
    its long sentences (sentences end at a line break, a quote or a full stop); of those, the one with the
    smallest hash names the passage, so every rendering of it picks the same one.
    """
    sentences = passage_sentences(instruction + "\n" + input_text)
    if sentences:
        return "passage\x1f" + min(sentences, key=lambda text: hashlib.sha256(text.encode("utf-8")).digest())
    return "item\x1f" + _normalised(instruction) + "\x1f" + _normalised(input_text)


def group_keys(frame: pd.DataFrame, split_by: str) -> list[str]:
    """Give back each row's split group: rows of one group always land in the same split.

    `auto`: built-in tasks by their normalised (input, response), so one item asked in several phrasings is
    held out whole; other data by `item_key`. `instruction_input`: normalised instruction + input. Any other
    value names a column (a conversation or document id, say).
    """
    if split_by not in ("auto", "instruction_input"):
        if split_by not in frame.columns:
            raise ValueError(f"template.split_by: no column '{split_by}' (columns: {', '.join(frame.columns)}; "
                             "or auto, instruction_input)")
        return ["column\x1f" + str(value) for value in frame[split_by]]
    sources = frame["source"] if "source" in frame else pd.Series("", index=frame.index)
    keys = []
    for instruction, input_text, response, source in zip(frame["instruction"], frame["input"], frame["response"],
                                                         sources, strict=True):
        if split_by == "instruction_input":
            keys.append("item\x1f" + _normalised(instruction) + "\x1f" + _normalised(input_text))
        elif str(source).startswith(BUILTIN_SOURCE):
            keys.append("answer\x1f" + _normalised(input_text) + "\x1f" + _normalised(response))
        else:
            keys.append(item_key(instruction, input_text))
    return keys


def split_of(group: str, val_fraction: float, test_fraction: float) -> str:
    """Give back train/val/test for a group key (or an id), from its hash alone."""
    bucket = int(hashlib.sha256(group.encode("utf-8")).hexdigest()[:8], 16) / 0xFFFFFFFF
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
        "split": [split_of(key, config.val_fraction, config.test_fraction)
                  for key in group_keys(frame, config.split_by)],
        "category": frame["category"],
        "prompt": prompts,
        "completion": [parts[2].format(response=r) for r in frame["response"]],
        "instruction": frame["instruction"],
        "input": frame["input"],
        "response": frame["response"],
    })


STEP = Step("template", __file__)


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
    batches = pq.ParquetFile(validated / "data.parquet", pre_buffer=False).iter_batches(batch_size=batch_rows)
    with pq.ParquetWriter(out / "data.parquet", TEMPLATED_SCHEMA) as writer:
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
