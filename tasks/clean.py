"""Step 2, clean: normalise text and drop unusable rows, keeping every dropped row with its reason.

Checks, in order, each row taking the first reason that applies: empty, too long in characters, too
long or too short in GPT-2 tokens, other script (optional), exact duplicate of normalised text, near
duplicate (MinHash/LSH over word 3-grams of the whole row, and the same response). The quarantine holds
the row, a reason code and a detail. A conversation is cleaned turn by turn (a marker closing a turn is
stripped, one inside a turn's text quarantines the row naming the turn) and its instruction, input and
response are taken again from the cleaned turns. The duplicate finder is toolkit/dedup.py; the rules are here.
"""

from __future__ import annotations

import html
import json
import re
import unicodedata
from collections import deque
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from prefect import task

from catalog import layout
from catalog.caching import finish_step, step_task_options
from catalog.parquet_writer import DataParts, EvenRowGroupWriter
from catalog.sections import CleanConfig, RunnerConfig
from catalog.step import Step
from catalog.store import ArtifactRef
from toolkit.conversations import conversation_fields
from toolkit.dedup import (
    TEXT_FIELDS,
    Duplicates,
    fingerprint_columns,
    fingerprint_fields,
    fingerprints_of,
    settled_rows,
)
from toolkit.language import identify_language, latin_share
from toolkit.row_memo import KEY, MemoIndex, MemoWriter, changed_only, row_keys, rows_at, with_memo
from toolkit.runner import map_batches
from toolkit.tokenizer import token_counts

_INVISIBLE = re.compile("[\u200b\u200c\u200d\u2060\ufeff\u00ad]")
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_HTML_TAG = re.compile(r"</?(?:p|br|div|span|b|i|em|strong|ul|ol|li|h[1-6])\s*/?>", re.IGNORECASE)
# only the runs that change: matching every single space between words made this the slowest pass of clean
_SPACE_RUNS = re.compile(r"[\t\r\f\v][ \t\r\f\v]*| [ \t\r\f\v]+")
_BLANK_LINES = re.compile(r"\n{3,}")
_LINE_EDGES = re.compile(" ?\n ?")
# GPT-2's one special token, which the template writes as text; in the data it would end a sequence early
END_OF_TEXT = "<|endoftext|>"
_TRAILING_END_OF_TEXT = re.compile(r"(?:\s*<\|endoftext\|>)+\s*\Z")


def normalize_text(text: str) -> str:
    """Give back text in NFKC with invisible/control characters, simple HTML remnants and extra spaces removed."""
    if not text.isascii():
        text = _INVISIBLE.sub("", unicodedata.normalize("NFKC", text))
    text = _CONTROL.sub("", text.replace("\r\n", "\n"))
    if "<" in text or "&" in text:
        text = html.unescape(_HTML_TAG.sub(" ", text))
    if text.isascii():
        # without Unicode spaces, per-line stripping leaves at most one space at each line end: one pass does it
        text = _SPACE_RUNS.sub(" ", text)
        if " \n" in text or "\n " in text:
            text = _LINE_EDGES.sub("\n", text)
    else:
        text = "\n".join(_SPACE_RUNS.sub(" ", line).strip() for line in text.split("\n"))
    if "\n\n\n" in text:
        text = _BLANK_LINES.sub("\n\n", text)
    return text.strip()


def clean_turns(text: str) -> list[dict[str, str]]:
    """Give back a conversation's turns normalised, each turn's trailing <|endoftext|> markers stripped.

    Exports often close every turn with the marker; the chat template writes its own end of turn.
    """
    return [{**turn, "content": _TRAILING_END_OF_TEXT.sub("", normalize_text(turn["content"]))}
            for turn in json.loads(text)]


def turn_fault(turns: list[dict[str, str]]) -> tuple[str, str]:
    """Give back (reason, detail) for the first cleaned turn that cannot be trained on, or ("", "")."""
    for index, turn in enumerate(turns):
        where = f"messages[{index}] ({turn['role']} turn {index})"
        if END_OF_TEXT in turn["content"]:
            return "end_of_text_in_text", f"{where} holds {END_OF_TEXT} inside its text, which would end the " \
                                          "training sequence there"
        if not turn["content"]:
            return "empty_turn", f"{where} is empty after cleaning"
    return "", ""


def _clean_conversations(frame: pd.DataFrame) -> tuple[pd.Series, pd.Series]:
    """Clean the conversation rows' turns in place and give their single-turn fields the cleaned text; give back
    (reason, detail) of each row's first faulty turn ("" for fine rows and instruction rows)."""
    conversation = frame["messages"] != ""
    turns = frame.loc[conversation, "messages"].map(clean_turns)
    frame.loc[conversation, "messages"] = turns.map(json.dumps)
    faults = pd.DataFrame(turns.map(turn_fault).tolist(), index=turns.index, columns=["reason", "detail"])
    fine = turns[faults["reason"] == ""]
    for field, values in pd.DataFrame(fine.map(conversation_fields).tolist(), index=fine.index).items():
        frame.loc[fine.index, field] = values
    return (faults["reason"].reindex(frame.index, fill_value=""), faults["detail"].reindex(frame.index, fill_value=""))


def token_count_bounds(texts: pd.Series) -> tuple[pd.Series, pd.Series]:
    """Give back (lower, upper) bounds of each normalised text's GPT-2 token count, without tokenizing.

    Byte-level BPE gives every token at least one UTF-8 byte, so bytes bound the count from above; the
    pre-tokenizer never joins two whitespace-separated words into one piece and every piece is at least
    one token, so the word count bounds it from below (control characters are gone after normalize_text).
    """
    words = texts.map(lambda text: len(text.split()))
    return words, texts.str.encode("utf-8").str.len()


def check_rows(frame: pd.DataFrame, config: CleanConfig) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Give back (the rows normalised, a frame of each row's first failed check as `reason` and `detail`).

    Every check but the duplicate ones: a row alone decides these, so they run batch by batch. Rows that
    passed have reason "".
    """
    frame = frame.copy().reset_index(drop=True)
    for field in TEXT_FIELDS:
        frame[field] = frame[field].map(normalize_text)
    # prompt/completion sets often end each completion with the marker (T0 does): the template adds its own
    frame["response"] = frame["response"].str.replace(_TRAILING_END_OF_TEXT, "", regex=True)
    turn_reason, turn_detail = _clean_conversations(frame) if "messages" in frame else ("", "")
    reason = pd.Series("", index=frame.index, dtype=object)
    detail = pd.Series("", index=frame.index, dtype=object)

    def mark(mask: Any, why: str, details: Any = "") -> None:
        fresh = (reason == "") & pd.Series(mask, index=frame.index)
        reason[fresh] = why
        detail[fresh] = details[fresh] if isinstance(details, pd.Series) else details

    # first, so a conversation's reason names the turn at fault, not the single-turn field that repeats it
    for why in ("end_of_text_in_text", "empty_turn"):
        mark(turn_reason == why, why, turn_detail)
    for field in TEXT_FIELDS:
        mark(frame[field].str.contains(END_OF_TEXT, regex=False), "end_of_text_in_text",
             f"{field} holds {END_OF_TEXT}, which would end the training sequence there")
    # a conversation's length is settled turn by turn when tokenize cuts it at turn boundaries, not here
    single = (frame["messages"] == "") if "messages" in frame else pd.Series(True, index=frame.index)
    min_chars = max(config.min_chars, 1)
    chars = {field: frame[field].str.len() for field in TEXT_FIELDS}
    mark(chars["instruction"] < min_chars, "empty_instruction")
    mark(chars["response"] < min_chars, "empty_response")
    for field, limit in (("instruction", config.max_instruction_chars), ("input", config.max_instruction_chars),
                         ("response", config.max_response_chars)):
        mark((chars[field] > limit) & single, f"{field}_too_long",
             chars[field].map(lambda n, lim=limit: f"{n} chars > {lim}"))
    if config.max_prompt_tokens or config.max_response_tokens or config.min_response_tokens:
        _mark_token_bounds(frame, reason.where(single, "conversation"), mark, config)
    if config.language == "latin":
        share = (frame["instruction"] + " " + frame["input"] + " " + frame["response"]).map(latin_share)
        mark(share < config.min_script_share, "other_script", share.map(lambda v: f"latin share {v:.2f}"))
    elif config.language != "any":
        wanted = set(config.language.split(","))
        found = (frame["instruction"] + "\n" + frame["input"] + "\n" + frame["response"]).map(identify_language)
        language, confidence = found.str[0], found.str[1].astype(float)
        mark(~language.isin(wanted) & (confidence >= config.min_language_confidence), "other_language",
             language + " (" + confidence.map("{:.2f}".format) + ")")
    return frame, pd.DataFrame({"reason": reason, "detail": detail})

def _mark_token_bounds(frame: pd.DataFrame, reason: pd.Series, mark: Any, config: CleanConfig) -> None:
    # only rows whose bounds leave the answer open are tokenized: the character checks removed the giants,
    # and most rows are far inside the limits
    alive = reason == ""
    counts = {}
    for name, texts, most, least in (
            ("prompt", frame["instruction"] + "\n" + frame["input"], config.max_prompt_tokens, 0),
            ("response", frame["response"], config.max_response_tokens, config.min_response_tokens)):
        lower, upper = token_count_bounds(texts[alive])
        undecided = ((upper > most) if most else pd.Series(False, index=upper.index)) | (lower < least)
        rows = undecided.index[undecided]
        counts[name] = pd.Series(-1, index=frame.index)  # -1: the bounds alone settle this row
        if len(rows):
            counts[name][rows] = token_counts(texts[rows].tolist())
    for name, most in (("prompt", config.max_prompt_tokens), ("response", config.max_response_tokens)):
        if most:
            mark(counts[name] > most, f"{name}_too_many_tokens",
                 counts[name].map(lambda n, m=most: f"{n} tokens > {m}"))
    least = config.min_response_tokens
    mark(counts["response"].between(0, least - 1), "response_too_few_tokens",
         counts["response"].map(lambda n: f"{n} tokens < {least}"))


STEP = Step("clean", __name__, libraries=("pyarrow", "numpy", "tokenizers", "py3langid"),
            on_build="data_checks.gate_process:start")  # a build here: the gates build next, their worker starts


def check_batch(batch: pa.RecordBatch, config: CleanConfig) -> tuple[pd.DataFrame, pd.DataFrame]:
    """check_rows on one Arrow batch (row-local: any runner may run it)."""
    return check_rows(batch.to_pandas(), config)


def write_clean(config: CleanConfig, ingested: Path, out: Path, batch_rows: int = 20_000,
                runner: RunnerConfig | None = None, earlier: Path | None = None) -> dict[str, Any]:
    """Write data.parquet, quarantine.parquet and row_memo.parquet; give back counts (upstream's quarantine too).

    Two passes over Arrow batches, so memory holds a batch plus a hash and a signature per row: the first
    normalises and checks each batch (on `runner`) into a staging file and feeds the duplicate finder here, in
    order; the second splits the staged rows into kept and dropped once the duplicates are known. A row in the memo
    of `earlier` (a clean artifact of the same recipe) takes its checks and fingerprints from there; duplicates
    are decided over all rows again, so the result is that of checking every row.
    """
    source = layout.DataRows(ingested)
    schema = source.schema_arrow.remove_metadata()
    staged_schema = schema.append(pa.field("reason", pa.string())).append(pa.field("detail", pa.string()))
    derived = [name for name in ("instruction", "input", "response", "messages", "reason", "detail")
               if name in staged_schema.names]
    memo_schema = pa.schema([pa.field(KEY, pa.string()), *(staged_schema.field(name) for name in derived),
                             *fingerprint_fields(config.near_duplicate_num_perm)])
    memo = layout.read_memo(earlier)
    in_memo, staging, duplicates = MemoIndex(memo), out / ".checked.arrow", Duplicates(config)
    memo_out, reused = MemoWriter(out, memo_schema, earlier), 0
    pending: deque[tuple[pa.RecordBatch, pa.Array, np.ndarray]] = deque()

    def unseen() -> Any:
        for batch in source.iter_batches(batch_size=batch_rows):
            pending.append((batch, keys := row_keys(batch), positions := in_memo.positions(keys)))
            yield batch.filter(pa.array(positions < 0))

    # Arrow's file format, not Parquet: read once, then deleted, so nothing is gained by encoding it; it is mapped
    # back without a copy (1,000,000 staged rows: 2.4 s to write as Parquet)
    with pa.ipc.new_file(staging, staged_schema) as writer:
        for frame, checked in map_batches(check_batch, unseen(), config, runner=runner, step="clean"):
            batch, keys, positions = pending.popleft()
            fresh = pa.Table.from_pandas(pd.concat([frame, checked], axis=1)[derived], pa.schema(
                [memo_schema.field(name) for name in derived]), preserve_index=False)
            for name, column in fingerprint_columns(*duplicates.fingerprints(
                    frame, (checked["reason"] == "").to_numpy())).items():
                fresh = fresh.append_column(name, column)
            raw = batch.filter(pa.array(positions < 0))
            for name in derived[:-2]:  # the texts as the memo keeps them (reason and detail come last)
                fresh = fresh.set_column(fresh.schema.get_field_index(name), name,
                                         changed_only(fresh.column(name), raw.column(name)))
            stored = with_memo(positions, memo, fresh, memo_schema.names[1:])
            columns = {**stored, **{name: pc.coalesce(stored[name], batch.column(name)) for name in derived[:-2]}}
            duplicates.add_known(batch.column("id"), pc.equal(columns["reason"], "").to_numpy(zero_copy_only=False),
                                 *fingerprints_of(columns))
            writer.write_table(pa.Table.from_arrays(
                [columns[name] if name in columns else batch.column(name) for name in staged_schema.names],
                schema=staged_schema))
            memo_out.write(keys, stored, positions)
            reused += int((positions >= 0).sum())
    memo_out.close()
    staged = pa.ipc.open_file(pa.memory_map(str(staging))).read_all()
    marks = duplicates.finish(lambda rows: rows_at(staged.column("response"), rows).to_pylist(),
                              *settled_rows(ingested, earlier))
    marked = np.array(sorted(marks), np.int64)
    kept, offset, dropped = 0, 0, {}
    with DataParts(out, schema, earlier) as keep, \
            EvenRowGroupWriter(layout.quarantine_file(out), staged_schema) as drop:
        for batch in staged.to_batches(max_chunksize=batch_rows):
            table = pa.Table.from_batches([batch])
            rows = marked[(marked >= offset) & (marked < offset + table.num_rows)].tolist()
            for part, name in enumerate(("reason", "detail") if rows else ()):
                values = table.column(name).to_pylist()
                for row in rows:
                    values[row - offset] = marks[row][part]
                table = table.set_column(table.schema.get_field_index(name), name, pa.array(values, pa.string()))
            offset += table.num_rows
            is_dropped = pc.not_equal(table.column("reason"), "")
            keep.write_table(table.filter(pc.invert(is_dropped)).select(schema.names))
            drop.write_table(table.filter(is_dropped))
            kept += table.num_rows - int(pc.sum(is_dropped).as_py() or 0)
            for entry in pc.value_counts(table.column("reason")).to_pylist():
                if entry["values"]:
                    dropped[entry["values"]] = dropped.get(entry["values"], 0) + entry["counts"]
    staging.unlink()  # the mapped rows stay readable until they are let go
    upstream = pq.ParquetFile(layout.quarantine_file(ingested)).metadata.num_rows
    removed = sum(dropped.values())
    total = kept + removed + upstream
    return {"rows": kept, "dropped": dict(sorted(dropped.items(), key=lambda kv: (-kv[1], kv[0]))),
            "duplicate_ratio": (dropped.get("exact_duplicate", 0) + dropped.get("near_duplicate", 0))
            / max(kept + removed, 1), "quarantined_upstream": upstream,
            "quarantine_ratio": (removed + upstream) / total if total else 0.0, "rows_reused": reused,
            "reused_from": earlier.name if earlier is not None and reused else None, "parts": keep.parts,
            "parts_linked": keep.linked}


@task(**step_task_options(STEP))
def clean(config: dict[str, Any], root: str, ingested: ArtifactRef, runner: dict[str, Any] | None = None
          ) -> ArtifactRef:
    """Prefect task: the clean artifact for this ingest artifact; `runner` (where batches are checked) is not keyed."""
    ref, built = STEP.produce(config, root, [ingested], lambda out, inputs: write_clean(
        CleanConfig(**config), inputs[0], out, runner=RunnerConfig(**runner or {}),
        earlier=STEP.earlier(config, root, [ingested])))
    return finish_step(root, ref, built)
