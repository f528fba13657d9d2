"""Step 1, ingest: read a source into the canonical schema, quarantining rows that cannot be read.

Canonical schema: id, instruction, input, response, source, category, messages (JSON text, multi-turn
only). Formats: Alpaca, Dolly, Self-Instruct (`instances`), prompt/completion, ShareGPT, OpenAI
messages, or an explicit column mapping. Containers: .jsonl/.json/.csv/.parquet (optionally .gz), a
folder or a glob of them, a dataset through `datasets` (`hf:<Hub id or local data folder>`, or a folder
written by `save_to_disk`), and the built-in generator `builtin:tasks`. Several sources can be mixed,
each with a row cap and a weight (the share of its rows kept, chosen by id hash so it is stable).

A source that cannot be read at all is one IngestError line naming the file (and line or column);
a record that cannot become a row goes to quarantine with file, row, field, a code and a reason.
"""

from __future__ import annotations

import glob
import gzip
import io
import itertools
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from prefect import task

from catalog import layout
from catalog.caching import finish_step, step_task_options
from catalog.keys import canonical_json, sha256_text
from catalog.sections import DataConfig, SourceSpec
from catalog.step import Step
from catalog.store import ArtifactRef, sha256_file
from toolkit import builtin_tasks

CANONICAL_COLUMNS = ["id", "instruction", "input", "response", "source", "category", "messages"]
DATA_SCHEMA = pa.schema([(column, pa.string()) for column in CANONICAL_COLUMNS])
QUARANTINE_COLUMNS = ["file", "row", "field", "code", "reason", "raw"]
DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
BUILTIN = "builtin:tasks"
HUB = "hf:"
# the fields a record must have in each format (checked once per columnar file, per record otherwise)
REQUIRED = {"alpaca": ("instruction", "output"), "dolly": ("instruction", "response"),
            "prompt_completion": ("prompt", "completion"), "self_instruct": ("instruction", "instances"),
            "sharegpt": ("conversations",), "messages": ("messages",)}


class IngestError(ValueError):
    """A source that cannot be read at all (as opposed to single bad rows, which are quarantined)."""


class BadRow(ValueError):
    """One record that cannot become a canonical row; carries the offending field."""

    def __init__(self, field: str, reason: str, code: str = "bad_field"):
        super().__init__(reason)
        self.field = field
        self.reason = reason
        self.code = code


class _DuplicateKeys(ValueError):
    pass


# ---------------------------------------------------------------- finding and reading files


def resolve_files(source: str) -> list[Path]:
    """Give back the data files a source names: one file, every data file under a folder, or a glob."""
    path = Path(source).expanduser()
    if any(ch in source for ch in "*?["):
        files = [Path(p) for p in sorted(glob.glob(str(path), recursive=True)) if _is_data_file(Path(p))]
        if not files:
            raise IngestError(f"{source}: the glob matches no data files ({', '.join(DATA_SUFFIXES)}, optionally .gz)")
        return files
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and _is_data_file(p))
        if not files:
            raise IngestError(f"{source}: the folder holds no data files ({', '.join(DATA_SUFFIXES)}, optionally .gz)")
        return files
    if not path.exists():
        raise IngestError(f"{source}: no such file or folder")
    if not _is_data_file(path):
        raise IngestError(f"{source}: unsupported file type (expected {', '.join(DATA_SUFFIXES)}, optionally .gz)")
    return [path]


def _base_suffix(path: Path) -> str:
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes = suffixes[:-1]
    return suffixes[-1] if suffixes else ""


def _is_data_file(path: Path) -> bool:
    return _base_suffix(path) in DATA_SUFFIXES


def is_saved_dataset(path: Path) -> bool:
    """Tell whether a folder was written by `datasets`' save_to_disk (read through `datasets`, not as files)."""
    return path.is_dir() and ((path / "state.json").is_file() or (path / "dataset_dict.json").is_file())


def _read_bytes(path: Path) -> bytes:
    raw = path.read_bytes()
    if path.suffix.lower() != ".gz":
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError) as exc:
        raise IngestError(f"{path}: not a readable gzip file ({exc})") from None


def _decode(path: Path, raw: bytes, per_line: bool) -> tuple[str, dict[int, str]]:
    """Give back (text, {line: problem}); a JSONL file keeps its good lines when some are not UTF-8."""
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        return raw.decode("utf-16"), {}
    try:
        return raw.decode("utf-8-sig"), {}
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        if not per_line:
            raise IngestError(
                f"{path}: line {line}: not valid UTF-8 (byte {exc.start}); re-encode the file as UTF-8"
            ) from None
    lines, bad = [], {}
    for number, chunk in enumerate(raw.removeprefix(b"\xef\xbb\xbf").split(b"\n"), start=1):
        try:
            lines.append(chunk.decode("utf-8"))
        except UnicodeDecodeError as exc:
            bad[number] = f"not valid UTF-8 at byte {exc.start} of the line (latin-1?); re-encode the file as UTF-8"
            lines.append("")
    return "\n".join(lines), bad


def _reject_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [k for k, _ in pairs]
    duplicated = sorted({k for k in keys if keys.count(k) > 1})
    if duplicated:
        raise _DuplicateKeys(f"duplicate key(s) {', '.join(duplicated)} in one record")
    return dict(pairs)


Record = tuple[int, "dict[str, Any] | None", str, str]  # (row from 1, record or None, code, problem)


def read_records(path: Path) -> Iterator[Record]:
    """Yield (row number, record or None, code, problem) for each record of one file; rows count from 1."""
    kind = _base_suffix(path)
    if kind == ".parquet":
        try:
            table = pq.read_table(io.BytesIO(_read_bytes(path)))
        except IngestError:
            raise
        except Exception as exc:  # pyarrow raises several types for damaged files
            raise IngestError(f"{path}: unreadable Parquet file ({str(exc).splitlines()[0]})") from None
        if table.num_rows == 0:
            yield 0, None, "empty_file", "the file holds no rows"
        done = 0
        for batch in table.to_batches(max_chunksize=10_000):
            for number, record in enumerate(batch.to_pylist(), start=done + 1):
                yield number, record, "", ""
            done += batch.num_rows
        return
    if kind == ".jsonl" and not _starts_with_utf16_bom(path):
        yield from _jsonl_records(path)
        return
    text, bad_lines = _decode(path, _read_bytes(path), per_line=kind == ".jsonl")
    if not text.strip() and not bad_lines:
        yield 0, None, "empty_file", "the file is empty"
        return
    if kind == ".csv":
        yield from _csv_records(path, text)
    elif kind == ".json":
        try:
            data = json.loads(text, object_pairs_hook=_reject_duplicate_keys)
        except ValueError as exc:
            raise IngestError(f"{path}: invalid JSON ({exc})") from None
        if isinstance(data, dict) and isinstance(data.get("data"), list):
            data = data["data"]
        if not isinstance(data, list):
            raise IngestError(f"{path}: a .json file must hold an array of records (or {{\"data\": [...]}})")
        for number, record in enumerate(data, start=1):
            yield (number, record, "", "") if isinstance(record, dict) else (
                number, None, "not_an_object", "record is not an object")
    else:
        # split on "\n" only: JSON text may hold U+2028 and friends, which splitlines() would cut at
        for number, line in enumerate(text.split("\n"), start=1):
            if number in bad_lines:
                yield number, None, "not_utf8", bad_lines[number]
                continue
            if line.strip():
                yield _json_line_record(number, line)


def _starts_with_utf16_bom(path: Path) -> bool:
    try:
        with _open_binary(path) as stream:
            return stream.read(2) in (b"\xff\xfe", b"\xfe\xff")
    except (OSError, EOFError) as exc:
        raise IngestError(f"{path}: not a readable gzip file ({exc})") from None


def _open_binary(path: Path) -> io.BufferedIOBase:
    return gzip.open(path, "rb") if path.suffix.lower() == ".gz" else path.open("rb")  # type: ignore[return-value]


def _jsonl_records(path: Path) -> Iterator[Record]:
    """Records of a UTF-8 JSONL file read line by line, so a file of any size costs one line of memory."""
    content = False
    with _open_binary(path) as stream:
        lines = iter(stream)
        number = 0
        while True:
            try:
                raw = next(lines)
            except StopIteration:
                break
            except (OSError, EOFError) as exc:  # a damaged gzip stream shows up part way through
                raise IngestError(f"{path}: not a readable gzip file ({exc})") from None
            number += 1
            raw = raw.removesuffix(b"\n")
            if number == 1:
                raw = raw.removeprefix(b"\xef\xbb\xbf")
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                content = True
                yield number, None, "not_utf8", (f"not valid UTF-8 at byte {exc.start} of the line (latin-1?); "
                                                 "re-encode the file as UTF-8")
                continue
            if not line.strip():
                continue
            content = True
            yield _json_line_record(number, line)
    if not content:
        yield 0, None, "empty_file", "the file is empty"


def _json_line_record(number: int, line: str) -> Record:
    try:
        record = json.loads(line, object_pairs_hook=_reject_duplicate_keys)
    except _DuplicateKeys as exc:
        return number, None, "duplicate_keys", str(exc)
    except ValueError as exc:
        return number, None, "invalid_json", f"invalid JSON: {exc}"
    return (number, record, "", "") if isinstance(record, dict) else (
        number, None, "not_an_object", "record is not an object")


def _csv_records(path: Path, text: str) -> Iterator[Record]:
    import csv

    # The csv module, not pandas: it reports the line of a broken quote and keeps every value as text.
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    try:
        header = next(reader)
    except (csv.Error, StopIteration) as exc:
        raise IngestError(f"{path}: line 1: unreadable CSV header ({exc})") from None
    duplicated = sorted({h for h in header if header.count(h) > 1})
    if duplicated:
        raise IngestError(f"{path}: line 1: duplicate column(s) {', '.join(duplicated)}")
    number = 0
    while True:
        try:
            values = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            raise IngestError(f"{path}: line {reader.line_num}: unreadable CSV ({exc})") from None
        number += 1
        if "\x00" in "".join(values):
            yield number, None, "nul_byte", "NUL byte in the row (binary data?)"
        elif len(values) != len(header):
            yield number, None, "wrong_field_count", f"{len(values)} fields, the header has {len(header)}"
        else:
            yield number, dict(zip(header, values, strict=True)), "", ""


# ---------------------------------------------------------------- formats


def detect_format(record: dict[str, Any]) -> str | None:
    """Give back the instruction format a record's keys say it is in, or None."""
    keys = set(record)
    if "conversations" in keys:
        return "sharegpt"
    if "messages" in keys:
        return "messages"
    if "instances" in keys and "instruction" in keys:
        return "self_instruct"
    if {"prompt", "completion"} <= keys:
        return "prompt_completion"
    if {"instruction", "response"} <= keys:
        return "dolly"
    if {"instruction", "output"} <= keys:
        return "alpaca"
    return None


def _text(record: dict[str, Any], field: str, required: bool = True) -> str:
    value = record.get(field)
    if value is None:
        if required:
            raise BadRow(field, f"field '{field}' is missing or null", "missing_field")
        return ""
    if not isinstance(value, str):
        raise BadRow(field, f"field '{field}' is {type(value).__name__}, expected text", "wrong_type")
    return value


_ROLE_NAMES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant",
               "bing": "assistant", "bard": "assistant", "system": "system", "model": "assistant"}


def _conversation_rows(turns: Any, field: str, role_key: str, text_key: str) -> list[dict[str, str]]:
    if not isinstance(turns, list) or not turns:
        raise BadRow(field, f"field '{field}' must be a non-empty list of turns", "bad_conversation")
    messages = []
    for turn in turns:
        if not isinstance(turn, dict) or not isinstance(turn.get(text_key), str):
            raise BadRow(field, f"a turn in '{field}' lacks text in '{text_key}'", "bad_conversation")
        role = _ROLE_NAMES.get(str(turn.get(role_key, "")).lower())
        if role is None:
            raise BadRow(field, f"a turn in '{field}' has unknown role {turn.get(role_key)!r}", "bad_conversation")
        messages.append({"role": role, "content": turn[text_key]})
    while messages and messages[-1]["role"] != "assistant":
        messages.pop()  # trailing user turns have no answer to learn from
    if not any(m["role"] == "assistant" for m in messages):
        raise BadRow(field, "conversation has no assistant turn", "no_assistant_turn")
    last_user = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=None)
    if last_user is None:
        raise BadRow(field, "conversation has no user turn", "no_user_turn")
    return messages


def to_canonical(record: dict[str, Any], fmt: str, columns: dict[str, str]) -> list[dict[str, str]]:
    """Give back the canonical rows (text fields only) one record yields in a given format."""
    if columns:
        mapped = {field: record.get(column) for field, column in columns.items()}
        return [{"instruction": _text(mapped, "instruction"), "input": _text(mapped, "input", False),
                 "response": _text(mapped, "response"), "category": _text(mapped, "category", False)}]
    if fmt == "alpaca":
        return [{"instruction": _text(record, "instruction"), "input": _text(record, "input", False),
                 "response": _text(record, "output"), "category": _text(record, "category", False)}]
    if fmt == "dolly":
        return [{"instruction": _text(record, "instruction"), "input": _text(record, "context", False),
                 "response": _text(record, "response"), "category": _text(record, "category", False)}]
    if fmt == "prompt_completion":
        return [{"instruction": _text(record, "prompt"), "input": "", "response": _text(record, "completion"),
                 "category": _text(record, "category", False)}]
    if fmt == "self_instruct":
        instruction = _text(record, "instruction")
        instances = record.get("instances")
        if not isinstance(instances, list) or not instances:
            raise BadRow("instances", "field 'instances' must be a non-empty list", "bad_instances")
        if not all(isinstance(inst, dict) for inst in instances):
            raise BadRow("instances", "every item of 'instances' must be an object", "bad_instances")
        category = str(record.get("name") or record.get("motivation_app") or "")
        return [{"instruction": instruction, "input": _text(inst, "input", False), "response": _text(inst, "output"),
                 "category": category} for inst in instances]
    if fmt in ("sharegpt", "messages"):
        field, role_key, text_key = (("conversations", "from", "value") if fmt == "sharegpt"
                                     else ("messages", "role", "content"))
        messages = _conversation_rows(record.get(field), field, role_key, text_key)
        last_user = max(i for i, m in enumerate(messages) if m["role"] == "user")
        context = "\n".join(f"{m['role']}: {m['content']}" for m in messages[:last_user])
        return [{"instruction": messages[last_user]["content"], "input": context,
                 "response": messages[-1]["content"], "category": "", "messages": json.dumps(messages)}]
    raise IngestError(f"unknown data format '{fmt}'")


def row_id(instruction: str, input_text: str, response: str) -> str:
    """Give back a stable id from a row's content: equal content, equal id, on any machine."""
    return sha256_text(canonical_json([instruction, input_text, response]))[:16]


# ---------------------------------------------------------------- the work function


def _source_specs(config: DataConfig) -> list[SourceSpec]:
    return config.sources or [SourceSpec(source=config.source)]


def ingest_source(config: DataConfig) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Give back (canonical rows, quarantined records with file, row, field, code and reason)."""
    quarantine: list[dict[str, Any]] = []
    batches = list(_ingest_batches(config, quarantine, []))
    frame = pa.Table.from_batches(batches, DATA_SCHEMA).to_pandas()
    return frame, pd.DataFrame(quarantine, columns=QUARANTINE_COLUMNS).astype(str)


def _ingest_batches(config: DataConfig, quarantine: list[dict[str, Any]], per_source: list[dict[str, Any]],
                    batch_rows: int = 10_000) -> Iterator[pa.RecordBatch]:
    """Yield the canonical rows in Arrow batches, source after source; fill `quarantine` and `per_source`.

    Rows stream from the files to the batches: memory holds one batch, not the data set.
    """
    remaining = config.max_rows
    for spec in _source_specs(config):
        read = kept = 0
        rows = _spec_rows(spec, config, quarantine)
        while batch := list(itertools.islice(rows, batch_rows)):
            read += len(batch)
            ids = [row_id(row["instruction"], row["input"], row["response"]) for row in batch]
            chosen = list(zip(ids, batch, strict=True))
            if spec.weight < 1:
                chosen = [(i, row) for i, row in chosen if _unit_hash(i) < spec.weight]
            if spec.max_rows is not None:
                chosen = chosen[:max(spec.max_rows - kept, 0)]
            kept += len(chosen)
            if remaining is not None:
                chosen = chosen[:max(remaining, 0)]
                remaining -= len(chosen)
            if chosen:
                yield pa.RecordBatch.from_pydict(
                    {"id": [i for i, _ in chosen],
                     **{c: [str(row.get(c) or "") for _, row in chosen] for c in CANONICAL_COLUMNS[1:]}},
                    schema=DATA_SCHEMA)
        per_source.append({"source": spec.source, "rows_read": read, "rows_kept": kept})


def _spec_rows(spec: SourceSpec, config: DataConfig, quarantine: list[dict[str, Any]]) -> Iterator[dict[str, str]]:
    if spec.source == BUILTIN:
        for number, example in enumerate(builtin_tasks.generate(config.builtin_examples, config.seed), start=1):
            yield {**example, "source": f"{BUILTIN}:{number}", "messages": ""}
        return
    fmt = spec.format or config.format
    columns = config.columns if spec.columns is None else spec.columns
    for label, records in _record_streams(spec.source, config.hub_split):
        yield from _ingest_records(label, records, None if fmt == "auto" else fmt, columns, config.max_record_chars,
                                   quarantine)


def _unit_hash(value: str) -> float:
    # its own salt, so a source's weight sample is independent of the train/val/test split (also by id hash)
    return int(sha256_text("weight:" + value)[:8], 16) / 0xFFFFFFFF


def _record_streams(source: str, hub_split: str) -> Iterator[tuple[str, Iterator[Record]]]:
    """Yield (label, records) per file of a source; a `datasets` dataset is one stream."""
    if source.startswith(HUB) or is_saved_dataset(Path(source).expanduser()):
        yield source, _dataset_records(source, hub_split)
        return
    for path in resolve_files(source):
        yield str(path), read_records(path)


def _dataset_records(source: str, split: str) -> Iterator[Record]:
    """Records of a Hub dataset id, a local data folder given as `hf:<folder>`, or a save_to_disk folder."""
    import datasets

    try:
        if source.startswith(HUB):
            dataset = datasets.load_dataset(source[len(HUB):], split=split)
        else:
            dataset = datasets.load_from_disk(str(Path(source).expanduser()))
            if isinstance(dataset, datasets.DatasetDict):
                dataset = dataset[split]
    except KeyError:
        raise IngestError(f"{source}: no split '{split}' (set data.hub_split)") from None
    except Exception as exc:  # datasets raises many types (network, format, missing files)
        raise IngestError(f"{source}: cannot load with datasets ({str(exc).splitlines()[0][:200]})") from None
    for number, record in enumerate(dataset, start=1):
        yield number, record, "", ""


def _ingest_records(label: str, records: Iterator[Record], fmt: str | None, columns: dict[str, str],
                    max_chars: int, quarantine: list[dict[str, Any]]) -> Iterator[dict[str, str]]:
    default_category = Path(label).name.split(".")[0]
    checked = False

    def reject(number: int, field: str, code: str, reason: str, record: Any = None) -> None:
        raw = "" if record is None else json.dumps(record, default=str)[:2000]
        quarantine.append({"file": label, "row": number, "field": field, "code": code, "reason": reason, "raw": raw})

    for number, record, code, problem in records:
        if record is None:
            reject(number, "", code, problem)
            continue
        if fmt is None and not columns:
            fmt = detect_format(record)
            if fmt is None:
                raise IngestError(
                    f"{label}: row {number}: unknown format (columns: {', '.join(sorted(record))}); "
                    "set data.format or map columns with data.columns.instruction=... and data.columns.response=..."
                )
        if not checked and not label.endswith((".jsonl", ".jsonl.gz", ".json", ".json.gz")):
            # columnar sources share one header: a missing column is a file error, not a per-row one
            needed = list(columns.values()) if columns else REQUIRED[fmt or ""]
            missing = [c for c in needed if c not in record]
            if missing:
                raise IngestError(f"{label}: missing required column(s) {', '.join(missing)} for "
                                  f"{'data.columns' if columns else 'format ' + str(fmt)} "
                                  f"(columns: {', '.join(sorted(record))})")
        checked = True
        try:
            canonical = to_canonical(record, fmt or "", columns)
            for row in canonical:
                for field in ("instruction", "input", "response"):
                    if len(row[field]) > max_chars:
                        raise BadRow(field, f"field '{field}' has {len(row[field]):,} characters "
                                            f"(limit data.max_record_chars={max_chars:,})", "record_too_large")
                    if "\x00" in row[field]:
                        raise BadRow(field, f"NUL byte in field '{field}' (binary data?)", "nul_byte")
        except BadRow as bad:
            reject(number, bad.field, bad.code, bad.reason, record)
            continue
        for row in canonical:
            yield {**row, "category": row["category"] or default_category,
                   "source": f"{label}:{number}", "messages": row.get("messages", "")}


def source_fingerprint(config: dict[str, Any]) -> str:
    """Give back a hash of the sources' content, so changed data makes a new ingest key."""
    specs = config.get("sources") or [{"source": config["source"]}]
    return sha256_text(canonical_json([_one_fingerprint(spec["source"]) for spec in specs]))


def _one_fingerprint(source: str) -> str:
    if source == BUILTIN:
        return builtin_tasks.GENERATOR_VERSION  # the generator's code is in ingest's code version
    local = Path(source[len(HUB):] if source.startswith(HUB) else source).expanduser()
    if source.startswith(HUB) and not local.exists():
        return "hub:" + source  # a Hub dataset's revision cannot be asked for offline; the id stands in
    try:
        files = sorted(p for p in local.rglob("*") if p.is_file()) if local.is_dir() and (
            source.startswith(HUB) or is_saved_dataset(local)) else resolve_files(source)
    except IngestError:
        return "unresolved:" + source  # ingest itself reports the problem as a step failure
    return sha256_text(canonical_json([[str(f), sha256_file(f)] for f in files]))


STEP = Step("ingest", __name__, libraries=("pyarrow", "pandas", "datasets"), fingerprint=source_fingerprint)


def write_ingest(config: DataConfig, out: Path) -> dict[str, Any]:
    """Write data.parquet (streamed in Arrow batches) and quarantine.parquet; give back the manifest's row counts."""
    quarantine: list[dict[str, Any]] = []
    per_source: list[dict[str, Any]] = []
    rows = 0
    with pq.ParquetWriter(layout.data_file(out), DATA_SCHEMA) as writer:
        for batch in _ingest_batches(config, quarantine, per_source):
            writer.write_batch(batch)
            rows += batch.num_rows
    rejected = pd.DataFrame(quarantine, columns=QUARANTINE_COLUMNS).astype(str)
    if not rows:
        first = ""
        if len(rejected):
            q = rejected.iloc[0]
            first = f"; first: {q['file']}: row {q['row']}: {q['field'] + ': ' if q['field'] else ''}{q['reason']}"
        raise IngestError(f"{config.source if not config.sources else 'data.sources'}: no usable rows "
                          f"({len(rejected)} quarantined{first})")
    rejected.to_parquet(layout.quarantine_file(out), index=False)
    return {"rows": rows, "quarantined": len(rejected),
            "quarantined_by_code": rejected["code"].value_counts().to_dict(), "sources": per_source}


@task(**step_task_options(STEP))
def ingest(config: dict[str, Any], root: str) -> ArtifactRef:
    """Prefect task: the ingest artifact for this source."""
    ref, built = STEP.produce(config, root, [], lambda out, _: write_ingest(DataConfig(**config), out))
    return finish_step(root, ref, built)
