"""Step 4, template: render each pair as S = [BOS, instruction, SEP, response, EOS] text, and split.

Prompt and response are kept apart so tokenize can mask the prompt; a conversation's turns are kept too
(`messages`, JSON), so evaluate can prompt through the model folder's own template. Templates: `paper`, `alpaca`,
`chat` (a Jinja chat template, built-in or `template.chat_template`: a conversation stays one sequence whose
assistant turns are all targets, kept as text `segments` with their `segment_kinds`; an instruction row is a
one-turn conversation) and user templates from `template.custom`. The split comes from a hash of each row's group key
(`toolkit/split_groups.py`: the item a row asks about, so one item asked in several phrasings or templates stays
on one side; rows sharing a passage are joined over the whole table), so adding rows never moves an old row
between train, val and test unless a new row shows that two old groups ask about one passage.
"""

from __future__ import annotations

from collections import deque
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
from prefect import task

from catalog import layout
from catalog.caching import finish_step, step_task_options
from catalog.parquet_writer import DataParts, sits_in_place
from catalog.sections import RunnerConfig, TemplateConfig
from catalog.step import Step
from catalog.store import ArtifactRef
from toolkit.chat_template import chat_template_for, conversation_columns, is_chat, row_messages
from toolkit.row_memo import KEY, MemoIndex, MemoParts, MemoWriter, row_keys, rows_at, with_memo
from toolkit.runner import map_batches
from toolkit.split_groups import BUILTIN_SOURCE, joined_splits, own_splits, table_splits

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


def apply_template(frame: pd.DataFrame, config: TemplateConfig) -> pd.DataFrame:
    """Give back id, split, category, prompt, completion and the raw fields kept for evaluation."""
    parts = template_parts(config)
    messages = frame["messages"] if "messages" in frame else pd.Series("", index=frame.index)
    if is_chat(config):
        rendered = [conversation_columns(row_messages(m, i, x, r), chat_template_for(config), config.train_on)
                    for m, i, x, r in zip(messages, frame["instruction"], frame["input"], frame["response"],
                                          strict=True)]
        prompts, completions, pieces, kinds = (list(column) for column in zip(*rendered, strict=True)) \
            if rendered else ([], [], [], [])
    else:
        prompts = [render_prompt(config.name, i, x, parts)
                   for i, x in zip(frame["instruction"], frame["input"], strict=True)]
        completions = [parts[2].format(response=r) for r in frame["response"]]
        pieces, kinds = [[] for _ in prompts], [[] for _ in prompts]
    return pd.DataFrame({
        "id": frame["id"],
        # write_template decides splits over the whole table first (rows sharing a passage may be far apart).
        "split": frame["split"] if "split" in frame else table_splits(
            [frame], config.split_by, config.val_fraction, config.test_fraction),
        "category": frame["category"],
        "prompt": prompts,
        "completion": completions,
        "instruction": frame["instruction"],
        "input": frame["input"],
        "response": frame["response"],
        "messages": messages,  # evaluate renders its prompts from these through the model folder's template
        "segments": pieces,
        "segment_kinds": kinds,
    })


STEP = Step("template", __name__, libraries=("pyarrow", "pandas", "transformers", "jinja2"))


TEMPLATED_SCHEMA = pa.schema([(name, pa.string()) for name in (
    "id", "split", "category", "prompt", "completion", "instruction", "input", "response", "messages")]
    + [("segments", pa.list_(pa.string())), ("segment_kinds", pa.list_(pa.int8()))])


def template_batch(batch: pa.RecordBatch, config: TemplateConfig) -> pa.Table:
    """Give back one Arrow batch of validated rows rendered (row-local: any runner may run it)."""
    if not batch.num_rows:  # every row of the batch was rendered before; an empty frame has no list dtypes
        return TEMPLATED_SCHEMA.empty_table()
    return pa.Table.from_pandas(apply_template(batch.to_pandas(), config), TEMPLATED_SCHEMA, preserve_index=False)


RENDERED = ["prompt", "completion", "segments", "segment_kinds"]
MEMO_SCHEMA = pa.schema([(KEY, pa.string()), ("builtin", pa.bool_()), ("own_split", pa.string()),
                         ("passage", pa.list_(pa.binary(8)))] + [TEMPLATED_SCHEMA.field(name) for name in RENDERED])


def _passages(column: pa.ListArray) -> list[tuple[bytes, ...]]:
    """Give back each row's passage digests as tuples (what joined_splits takes), without Arrow's slow to_pylist."""
    digests = np.frombuffer(column.values.buffers()[1], "V8", count=len(column.values),
                            offset=column.values.offset * 8).tolist()
    offsets = column.offsets.to_numpy()
    passages: list[tuple[bytes, ...]] = [()] * len(column)
    for row in np.flatnonzero(np.diff(offsets)).tolist():
        passages[row] = tuple(digests[offsets[row]:offsets[row + 1]])
    return passages


def _own_splits(table: layout.DataRows, config: TemplateConfig, memo: pa.Table | None
                ) -> tuple[list[str], np.ndarray, dict[str, pa.Array]]:
    """Give back (every row's split over the whole table, each row's memo position, what the memo keeps of a row
    for the split): a row seen before takes its own split and passage from the memo, the rest are worked out."""
    needed = [name for name in ("id", "instruction", "input", "response", "source", "messages", config.split_by)
              if name in table.schema_arrow.names]
    if config.split_by not in (*needed, "auto", "instruction_input"):
        needed = None  # so the unknown-column error lists every column
    # a column named by split_by is not in the memo key: such splits are worked out again (cheap: no passages)
    by_column = config.split_by not in ("auto", "instruction_input")
    positions, parts = [], []
    in_memo = MemoIndex(None if by_column else memo)
    # part by part, the texts read only for a part holding rows the memo does not know: the key and source decide
    narrow = needed if memo is None or by_column else [name for name in ("id", "source", "messages")
                                                       if name in table.schema_arrow.names]
    for index in range(len(table.parts)):
        batch = table.read_part(index, narrow)
        keys = row_keys(batch)
        builtin = pc.starts_with(batch.column("source"), BUILTIN_SOURCE).combine_chunks() \
            if "source" in batch.schema.names else pa.array([False] * batch.num_rows)
        where = in_memo.positions(keys)
        if memo is not None and (where >= 0).any():  # the same text from the generator and a file splits apart
            where[(where >= 0) & (rows_at(memo.column("builtin"), np.maximum(where, 0)).to_numpy(
                zero_copy_only=False) != builtin.to_numpy(zero_copy_only=False))] = -1
        unseen = batch if (where < 0).all() and narrow == needed else \
            table.read_part(index, needed).filter(pa.array(where < 0)) if (where < 0).any() else None
        splits, passages = own_splits(unseen.to_pandas(), config.split_by, config.val_fraction,
                                      config.test_fraction) if unseen is not None else ([], [])
        fresh = pa.table({"own_split": pa.array(splits, pa.string()),
                          "passage": pa.array([list(p) for p in passages], pa.list_(pa.binary(8)))})
        parts.append({"key": keys, "builtin": builtin, **with_memo(where, memo, fresh, ["own_split", "passage"])})
        positions.append(where)
    columns = {name: pa.concat_arrays([part[name] for part in parts]) for name in parts[0]} if parts else {}
    own = columns["own_split"].to_pylist() if parts else []
    passages = _passages(columns["passage"]) if parts else []
    return (joined_splits(own, passages, config.val_fraction, config.test_fraction),
            np.concatenate(positions) if positions else np.zeros(0, np.int64), columns)


def _rows_in_place(validated: Path, earlier: Path | None, splits: pa.Array) -> np.ndarray:
    """Give back each row's row in the earlier build's data where it is the same row there (-1: not known): its
    validated part is unchanged and its split stayed, so DataParts links such a part without reading it back."""
    unchanged = layout.rows_in_unchanged_parts(validated, earlier)
    in_place = np.full(len(splits), -1, np.int64)
    if earlier is None or not unchanged.any():
        return in_place
    before = layout.read_data(earlier, columns=["split"]).column("split")
    shared = min(len(before), len(splits))
    same = unchanged[:shared] & pc.equal(splits.slice(0, shared), before.slice(0, shared)).to_numpy()
    in_place[:shared] = np.where(same, np.arange(shared), -1)
    return in_place


def write_template(config: TemplateConfig, validated: Path, out: Path, batch_rows: int = 20_000,
                   runner: RunnerConfig | None = None, earlier: Path | None = None) -> dict[str, Any]:
    """Render the validated rows in Arrow batches into data.parquet (and row_memo.parquet); give back counts per split.

    A row in the memo of `earlier` (a template artifact of the same recipe) is not rendered again; the splits
    are decided over the whole table again, so a new row joining an old passage moves its group as a full run would.
    """
    table = layout.DataRows(validated)
    memo = layout.read_memo(earlier, [KEY, "builtin", "own_split", "passage"])
    row_splits, positions, kept = _own_splits(table, config, memo)
    row_splits = pa.array(row_splits, pa.string())
    in_place, rendered_before = _rows_in_place(validated, earlier, row_splits), MemoParts(earlier)
    pending: deque[tuple[int, int, pa.RecordBatch | None]] = deque()

    def unseen() -> Any:
        start = 0
        for part, rows in enumerate(table.part_rows):
            span = slice(start, start + rows)
            if sits_in_place(in_place[span], start) and sits_in_place(positions[span], start):
                # the earlier build's rows and memo rows in their places: linked (or copied), neither read nor rendered
                pending.append((start, rows, None))
                yield pa.record_batch({"id": pa.array([], pa.string())})
                start += rows
                continue
            for batch in table.iter_batches(batch_rows, part=part):
                pending.append((start, batch.num_rows, batch))
                fresh = pa.array(positions[start:start + batch.num_rows] < 0)
                yield batch.append_column("split", row_splits.slice(start, batch.num_rows)).filter(fresh)
                start += batch.num_rows

    splits: dict[str, int] = {}
    memo_out = MemoWriter(out, MEMO_SCHEMA, earlier)
    with DataParts(out, TEMPLATED_SCHEMA, earlier) as writer:
        for rendered in map_batches(template_batch, unseen(), config, runner=runner, step="template"):
            start, rows, batch = pending.popleft()
            for entry in row_splits.slice(start, rows).value_counts().to_pylist():
                splits[entry["values"]] = splits.get(entry["values"], 0) + entry["counts"]
            if batch is None:
                writer.write_earlier(start, rows)
                memo_out.write_earlier(start, rows)
                continue
            where = positions[start:start + rows]
            seen = where >= 0
            before = rendered_before.rows(where[seen], RENDERED) if seen.any() else None
            columns = {**with_memo(np.where(seen, np.cumsum(seen) - 1, -1), before, rendered, RENDERED),
                       **{name: batch.column(name).cast(TEMPLATED_SCHEMA.field(name).type)
                          for name in TEMPLATED_SCHEMA.names if name in batch.schema.names},
                       "split": row_splits.slice(start, rows)}
            templated = pa.Table.from_arrays([columns[name] if name in columns else pa.array([""] * rows)
                                              for name in TEMPLATED_SCHEMA.names], schema=TEMPLATED_SCHEMA)
            writer.write_table(templated, in_place[start:start + rows])
            memo_out.write(kept["key"].slice(start, rows), {
                **{name: kept[name].slice(start, rows) for name in ("builtin", "own_split", "passage")},
                **columns}, where)
    memo_out.close()
    parts = template_parts(config)
    return {"rows": int(len(positions)), "splits": dict(sorted(splits.items(), key=lambda kv: (-kv[1], kv[0]))),
            "template": list(parts), "chat_template": chat_template_for(config, parts),
            "rows_reused": int((positions >= 0).sum()), "parts": writer.parts, "parts_linked": writer.linked,
            "reused_from": earlier.name if earlier is not None and (positions >= 0).any() else None}


@task(**step_task_options(STEP))
def template(config: dict[str, Any], root: str, validated: ArtifactRef, runner: dict[str, Any] | None = None
             ) -> ArtifactRef:
    """Prefect task: the template artifact for this validated data; `runner` (where batches render) is not keyed."""
    ref, built = STEP.produce(config, root, [validated], lambda out, inputs: write_template(
        TemplateConfig(**config), inputs[0], out, runner=RunnerConfig(**runner or {}),
        earlier=STEP.earlier(config, root, [validated])))
    return finish_step(root, ref, built)
