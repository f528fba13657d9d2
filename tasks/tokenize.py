"""Step 5, tokenize: GPT-2 token ids per example, with the prompt masked out of the labels.

Prompt and completion are tokenized separately in batches and joined, so the boundary is exact. A
conversation with several answers is tokenized segment by segment (toolkit/conversations.py): every answer
a target, and over max_length it is cut at turn boundaries (`long_conversations`); the answer tokens lost
to any cut are counted per row (`n_target_lost`) and gated; the conversations cut, the windows they became and
the assistant turns dropped are counted in the manifest and the step's report (toolkit/token_stats.py).
When an example is too long, the response is kept whole where possible and the prompt loses its
middle (its start, the BOS, and its end, the SEP, stay).

With `packing`, train examples are packed in order into blocks of at most max_length tokens; a block
keeps `position_ids` restarting at 0 for each example (and `n_examples`), so a trainer can stop
attention across examples where it supports that. Val and test rows stay one example per row. The
written rows then pass the tokenized Great Expectations suite (data_checks/): a blocking failure
stops the step, with the Data Docs kept in the artifact.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from prefect import task

from catalog import layout
from catalog.caching import finish_step, step_task_options
from catalog.keys import sha256_text
from catalog.parquet_writer import DataParts, sits_in_place
from catalog.sections import RunnerConfig, TokenizeConfig
from catalog.step import Step
from catalog.store import ArtifactRef
from data_checks import gate_process
from data_checks import tokenized_suite as checks
from data_checks.gate import GateFailed, raise_if_blocked
from toolkit.conversations import CUTS, conversation_batch, fit_example  # noqa: F401 - fit_example: tokenize's rule
from toolkit.token_memo import EarlierFigures, InPlace, TokenMemo, batch_figures, rows_in_place
from toolkit.token_stats import decide_packing, publish_report, tokenize_figures
from toolkit.tokenizer import GPT2_VOCAB_SIZE, IGNORE_INDEX, gpt2_encoder

TOKENIZED_SCHEMA = pa.schema([
    ("id", pa.string()), ("split", pa.string()), ("category", pa.string()),
    ("input_ids", pa.list_(pa.int32())), ("labels", pa.list_(pa.int32())),
    ("length", pa.int32()), ("n_target", pa.int32()), ("truncated", pa.bool_()), ("n_target_lost", pa.int32()),
])
PACKED_SCHEMA = TOKENIZED_SCHEMA.append(pa.field("position_ids", pa.list_(pa.int32()))).append(
    pa.field("n_examples", pa.int32()))


class TokenizeGateFailed(GateFailed):
    """A blocking expectation on the tokenized rows failed."""


def fit_lengths(prompt_lengths: np.ndarray, completion_lengths: np.ndarray, max_length: int
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Give back (prompt head, prompt tail, completion kept) token counts per row: fit_example on lengths alone."""
    # an example that fits comes out whole from the same formula: keep_prompt is then the whole prompt
    keep_prompt = np.minimum(prompt_lengths, np.maximum(max_length // 4, max_length - completion_lengths))
    head = keep_prompt // 2
    return head, keep_prompt - head, np.minimum(completion_lengths, max_length - keep_prompt)


def encode_flat(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Give back (every token id of every text, one flat int32 array; the token count of each text)."""
    # the Rust tokenizer directly, without offsets: transformers' wrapper would build per-row dicts and masks
    encodings = gpt2_encoder().encode_batch_fast(texts, add_special_tokens=False)
    ids = [encoding.ids for encoding in encodings]
    lengths = np.fromiter(map(len, ids), np.int64, len(ids))
    return np.fromiter(itertools.chain.from_iterable(ids), np.int32, int(lengths.sum())), lengths


def _segment_indices(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Give back the concatenation of range(start, start + length) for each segment, without a Python loop."""
    ends = np.cumsum(lengths)
    return np.repeat(starts - (ends - lengths), lengths) + np.arange(ends[-1] if len(ends) else 0)


def tokenize_batch(batch: pa.RecordBatch, config: TokenizeConfig) -> pa.RecordBatch:
    """Give back the tokenized rows of one Arrow batch of templated rows (conversations cut at turn boundaries)."""
    return tokenize_counted(batch, config)[0]


def tokenize_counted(batch: pa.RecordBatch, config: TokenizeConfig) -> tuple[pa.RecordBatch, dict[str, int]]:
    """Give back (tokenize_batch's rows, what cutting long conversations did: toolkit.conversations.CUTS)."""
    if "segments" in batch.schema.names:
        several = pc.greater(pc.list_value_length(batch.column("segments")), 0)
        if pc.any(several).as_py():
            single = _tokenize_pairs(batch.filter(pc.invert(several)), config)
            talks, cuts = conversation_batch(batch.filter(several), config.max_length, config.long_conversations,
                                             encode_flat, TOKENIZED_SCHEMA)
            return pa.Table.from_batches([single, talks]).combine_chunks().to_batches()[0], cuts
    return _tokenize_pairs(batch, config), dict.fromkeys(CUTS, 0)


def _tokenize_pairs(batch: pa.RecordBatch, config: TokenizeConfig) -> pa.RecordBatch:
    """Give back the tokenized rows of templated rows tokenized as one prompt and one completion each."""
    prompt_ids, prompt_lengths = encode_flat(batch.column("prompt").to_pylist())
    completion_ids, completion_lengths = encode_flat(batch.column("completion").to_pylist())
    head, tail, kept = fit_lengths(prompt_lengths, completion_lengths, config.max_length)
    # each row is three slices of one source array: prompt head, prompt tail, completion start
    prompt_starts = np.cumsum(prompt_lengths) - prompt_lengths
    completion_starts = len(prompt_ids) + np.cumsum(completion_lengths) - completion_lengths
    starts = np.stack([prompt_starts, prompt_starts + prompt_lengths - tail, completion_starts], axis=1).ravel()
    take = _segment_indices(starts, np.stack([head, tail, kept], axis=1).ravel())
    input_ids = np.concatenate([prompt_ids, completion_ids])[take]
    labels = np.concatenate([np.full(len(prompt_ids), IGNORE_INDEX, np.int32), completion_ids])[take]
    lengths = (head + tail + kept).astype(np.int32)
    offsets = _offsets(lengths)
    return pa.RecordBatch.from_arrays([
        batch.column("id"), batch.column("split"), batch.column("category"),
        pa.ListArray.from_arrays(offsets, pa.array(input_ids)),
        pa.ListArray.from_arrays(offsets, pa.array(labels)),
        pa.array(lengths), pa.array(kept.astype(np.int32)),
        pa.array(prompt_lengths + completion_lengths > config.max_length),
        pa.array((completion_lengths - kept).astype(np.int32)),
    ], schema=TOKENIZED_SCHEMA)


def _offsets(lengths: np.ndarray) -> pa.Array:
    return pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))


def _position_ids(lengths: np.ndarray) -> np.ndarray:
    """Give back 0..n-1 for each length n, one after another."""
    return _segment_indices(np.zeros(len(lengths), np.int64), lengths).astype(np.int32)


def _single_example_rows(rows: pa.Table) -> pa.RecordBatch:
    """Give back tokenized rows in the packed schema, each an example of its own (evaluation rows)."""
    lengths = rows.column("length").to_numpy().astype(np.int64)
    return pa.RecordBatch.from_arrays(
        [rows.column(name).combine_chunks() for name in TOKENIZED_SCHEMA.names]
        + [pa.ListArray.from_arrays(_offsets(lengths), pa.array(_position_ids(lengths))),
           pa.array(np.ones(len(lengths), np.int32))],
        schema=PACKED_SCHEMA)


def block_starts(lengths: np.ndarray, max_length: int) -> list[int]:
    """Give back the first row of each block when rows are packed in order, greedily, up to max_length tokens."""
    starts, used = [0] if len(lengths) else [], 0
    for row, n in enumerate(lengths.tolist()):  # a running sum that restarts: inherently sequential, on ints only
        if used and used + n > max_length:
            starts.append(row)
            used = 0
        used += n
    return starts


def pack_rows(rows: pa.Table, max_length: int, close_last: bool) -> tuple[pa.RecordBatch, pa.Table]:
    """Give back (the blocks packed from `rows` in order, the rows of the last block if it stays open).

    A block concatenates whole examples; each example starts with its prompt (labels -100) and its own
    position ids from 0, so no target crosses an example boundary. Built from Arrow offsets, not per row.
    """
    lengths = rows.column("length").to_numpy().astype(np.int64)
    starts = block_starts(lengths, max_length)
    closed = len(lengths) if close_last or not starts else starts[-1]
    done, carry = rows.slice(0, closed), rows.slice(closed)
    starts = [start for start in starts if start < closed]
    row_lengths = lengths[:closed]
    bounds = np.array([*starts, closed], dtype=np.int64)
    token_bounds = np.concatenate([[0], np.cumsum(row_lengths)])[bounds].astype(np.int32)
    flat = {name: pc.list_flatten(done.column(name)).combine_chunks() for name in ("input_ids", "labels")}
    ids = done.column("id").to_pylist()
    categories = done.column("category").to_pylist()
    pieces = list(zip(bounds[:-1].tolist(), bounds[1:].tolist(), strict=True))
    block_lengths = np.diff(token_bounds)
    n_target = np.add.reduceat(done.column("n_target").to_numpy(), bounds[:-1]) if pieces else np.array([], np.int32)
    lost = np.add.reduceat(done.column("n_target_lost").to_numpy(), bounds[:-1]) if pieces else np.array([], np.int32)
    truncated = np.logical_or.reduceat(done.column("truncated").to_numpy(zero_copy_only=False).astype(bool),
                                       bounds[:-1]) if pieces else np.array([], bool)
    offsets = pa.array(token_bounds - token_bounds[0] if len(token_bounds) else np.zeros(1, np.int32))
    blocks = pa.RecordBatch.from_arrays([
        pa.array(["pack-" + sha256_text(",".join(ids[a:b]))[:16] for a, b in pieces], pa.string()),
        pa.array(["train"] * len(pieces), pa.string()),
        pa.array([categories[a] if len(set(categories[a:b])) == 1 else "mixed" for a, b in pieces], pa.string()),
        pa.ListArray.from_arrays(offsets, flat["input_ids"]), pa.ListArray.from_arrays(offsets, flat["labels"]),
        pa.array(block_lengths.astype(np.int32)), pa.array(n_target.astype(np.int32)), pa.array(truncated),
        pa.array(lost.astype(np.int32)), pa.ListArray.from_arrays(offsets, pa.array(_position_ids(row_lengths))),
        pa.array(np.diff(bounds).astype(np.int32)),
    ], schema=PACKED_SCHEMA)
    return blocks, carry


def _packed_batch(tokenized: pa.RecordBatch, state: dict[str, Any], max_length: int) -> pa.RecordBatch:
    """Give back val/test rows as they are plus the train blocks completed by this batch (the open one carries)."""
    is_train = pc.equal(tokenized.column("split"), "train")
    train = pa.Table.from_batches([tokenized.filter(is_train)])
    state["examples"] = state.get("examples", 0) + train.num_rows
    blocks, state["carry"] = pack_rows(pa.concat_tables([state["carry"], train]) if "carry" in state else train,
                                       max_length, close_last=False)
    rest_rows = _single_example_rows(pa.Table.from_batches([tokenized.filter(pc.invert(is_train))]))
    return pa.Table.from_batches([rest_rows, blocks]).combine_chunks().to_batches()[0] \
        if rest_rows.num_rows + blocks.num_rows else blocks


STEP = Step("tokenize", __name__, libraries=("tokenizers", "transformers", "pyarrow"))


def write_tokenize(config: TokenizeConfig, templated: Path, out: Path, runner: RunnerConfig | None = None,
                   earlier: Path | None = None) -> dict[str, Any]:
    """Stream the templated rows through the tokenizer in Arrow batches, gate them; give back statistics.

    Tokenizing is row-local and runs on `runner`; statistics and packing stay here, batch after batch in order.
    Rows in the memo of `earlier` (a tokenize artifact of the same recipe) are not tokenized again.
    """
    source = layout.DataRows(templated)
    packing, packing_reason = decide_packing(config, templated)
    config = config.model_copy(update={"packing": packing})
    schema = PACKED_SCHEMA if config.packing else TOKENIZED_SCHEMA
    counts = dict.fromkeys(("examples", "truncated", "zero_target", *CUTS), 0)  # taken before packing
    token_range = [GPT2_VOCAB_SIZE, -1, 0, IGNORE_INDEX]  # min id, max id, min label, max label
    state: dict[str, Any] = {}
    memo = TokenMemo(earlier, out, TOKENIZED_SCHEMA)
    in_place, read = rows_in_place(bool(config.packing), templated, earlier, memo.before.bounds[-1]), 0
    figures_before = EarlierFigures(earlier)
    columns = ["id", "split", "category", "prompt", "completion"] + [
        name for name in ("segments", "segment_kinds", "messages") if name in source.schema_arrow.names]
    empty = pa.RecordBatch.from_pylist([], schema=pa.schema([source.schema_arrow.field(name) for name in columns]))

    def batches() -> Any:
        start, settled = 0, in_place
        for part, rows in enumerate(source.part_rows):
            if settled is not None and sits_in_place(settled[start:start + rows], start):
                yield InPlace(start, rows, empty)  # a templated part as it was: its tokenized part is linked
            else:
                yield from source.iter_batches(batch_size=config.batch_size, columns=columns, part=part)
            start += rows

    with DataParts(out, schema, earlier) as writer:
        for tokenized, batch_cuts in memo.tokenized(batches(), tokenize_counted, config, runner):
            figures = figures_before.of(tokenized.start, tokenized.num_rows) if isinstance(tokenized, InPlace) \
                else batch_figures(tokenized)
            for name, count in (*batch_cuts.items(), *((n, figures[n]) for n in ("examples", "truncated",
                                                                                  "zero_target"))):
                counts[name] += int(count)
            if "min_input_ids" in figures:
                token_range = [min(token_range[0], figures["min_input_ids"]),
                               max(token_range[1], figures["max_input_ids"]),
                               min(token_range[2], figures["min_labels"]), max(token_range[3], figures["max_labels"])]
            if isinstance(tokenized, InPlace):
                writer.write_earlier(tokenized.start, tokenized.num_rows)
                read = memo.rows_read
                continue
            if config.packing:
                tokenized = _packed_batch(tokenized, state, config.max_length)
            # a conversation cut into windows shifts every later row: no row after it is known in place
            in_place = in_place if in_place is not None and tokenized.num_rows == memo.rows_read - read else None
            writer.write_table(pa.Table.from_batches([tokenized]),
                               None if in_place is None else in_place[read:memo.rows_read])
            read = memo.rows_read
        if state.get("carry") is not None and state["carry"].num_rows:
            writer.write_batch(pack_rows(state["carry"], config.max_length, close_last=True)[0])
    written_rows = layout.read_data(out, columns=["id", "split", "category", "length", "n_target", "truncated",
                                                  "n_target_lost"])
    written = written_rows.to_pandas()
    stats: dict[str, Any] = {**tokenize_figures(written, counts, config),
                             "min_token_id": token_range[0], "max_token_id": token_range[1],
                             "min_label": token_range[2], "max_label": token_range[3]}
    stats["packing"], stats["packing_reason"] = bool(config.packing), packing_reason
    stats["repeated_ids"] = written_rows.num_rows - pc.count_distinct(written_rows.column("id")).as_py()
    if config.packing:
        train = written[written["split"] == "train"]
        stats["packed_examples"] = state.get("examples", 0)
        stats["packing_efficiency"] = float(train["length"].sum()) / max(len(train) * config.max_length, 1)
    report = gate_process.run(checks.check_tokenized, checks.rows_to_check(written, earlier), stats, config,
                              out / layout.DATA_DOCS)
    (out / layout.GATE_REPORT).write_text(json.dumps(report.as_records(), indent=2), encoding="utf-8")
    return {**stats, **memo.record(), "parts": writer.parts, "parts_linked": writer.linked,
            "passed": not report.blocking_failures, "data_docs": "data_docs/index.html",
            "failure": report.failure_message() if report.blocking_failures else "",
            "warnings": [o.describe() for o in report.warnings]}


@task(**step_task_options(STEP))
def tokenize(config: dict[str, Any], root: str, templated: ArtifactRef, runner: dict[str, Any] | None = None
             ) -> ArtifactRef:
    """Prefect task: the tokenize artifact for this templated data; raises when its gate blocks.

    `runner` says where the batches are tokenized; it is not part of the key (every runner writes the same bytes).
    """
    ref, built = STEP.produce(config, root, [templated], lambda out, inputs: write_tokenize(
        TokenizeConfig(**config), inputs[0], out, runner=RunnerConfig(**runner or {}),
        earlier=STEP.earlier(config, root, [templated])))
    publish_report(ref.manifest(), ref.uri)  # before the gate: a blocked run shows what was measured too
    raise_if_blocked(ref, TokenizeGateFailed, "tokenized data failed its checks")
    return finish_step(root, ref, built)
