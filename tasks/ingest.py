"""Step 1, ingest: read a source into the canonical schema, quarantining rows that cannot be read.

Canonical schema: id, instruction, input, response, source, category, messages (JSON text, multi-turn
only). Formats: Alpaca, Dolly, Self-Instruct (`instances`), prompt/completion, ShareGPT, OpenAI
messages, or an explicit column mapping. Containers: .jsonl/.json/.csv/.parquet (optionally .gz), a
folder or a glob of them, and the built-in generator `builtin:tasks`.
"""

from __future__ import annotations

import glob
import gzip
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
from prefect import task

from tasks import builtin_tasks
from tasks.artifacts import ArtifactRef, Step, canonical_json, sha256_file, sha256_text
from tasks.caching import finish_step, step_task_options
from tasks.config import DataConfig

CANONICAL_COLUMNS = ["id", "instruction", "input", "response", "source", "category", "messages"]
QUARANTINE_COLUMNS = ["file", "row", "field", "reason", "raw"]
DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
BUILTIN = "builtin:tasks"


class IngestError(ValueError):
    """A source that cannot be read at all (as opposed to single bad rows, which are quarantined)."""


class BadRow(ValueError):
    """One record that cannot become a canonical row; carries the offending field."""

    def __init__(self, field: str, reason: str):
        super().__init__(reason)
        self.field = field
        self.reason = reason


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


def _read_bytes(path: Path) -> bytes:
    raw = path.read_bytes()
    return gzip.decompress(raw) if path.suffix.lower() == ".gz" else raw


def _decode(path: Path, raw: bytes) -> str:
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        return raw.decode("utf-16")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise IngestError(
            f"{path}: line {line}: not valid UTF-8 (byte {exc.start}); re-encode the file as UTF-8"
        ) from None


def _reject_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [k for k, _ in pairs]
    duplicated = sorted({k for k in keys if keys.count(k) > 1})
    if duplicated:
        raise ValueError(f"duplicate key(s) {', '.join(duplicated)}")
    return dict(pairs)


def read_records(path: Path) -> Iterator[tuple[int, dict[str, Any] | None, str]]:
    """Yield (row number, record or None, problem) for each record of one file; rows count from 1."""
    kind = _base_suffix(path)
    if kind == ".parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(io.BytesIO(_read_bytes(path)))
        except Exception as exc:  # pyarrow raises several types for damaged files
            raise IngestError(f"{path}: unreadable Parquet file ({str(exc).splitlines()[0]})") from None
        for number, record in enumerate(table.to_pylist(), start=1):
            yield number, record, ""
        return
    text = _decode(path, _read_bytes(path))
    if not text.strip():
        raise IngestError(f"{path}: the file is empty")
    if kind == ".csv":
        try:
            frame = pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False)
        except (pd.errors.ParserError, ValueError) as exc:
            raise IngestError(f"{path}: unreadable CSV ({str(exc).splitlines()[0]})") from None
        for number, record in enumerate(frame.to_dict(orient="records"), start=1):
            yield number, record, ""
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
            yield (number, record, "") if isinstance(record, dict) else (number, None, "record is not an object")
    else:
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line, object_pairs_hook=_reject_duplicate_keys)
            except ValueError as exc:
                yield number, None, f"invalid JSON: {exc}"
                continue
            yield (number, record, "") if isinstance(record, dict) else (number, None, "record is not an object")


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
            raise BadRow(field, f"field '{field}' is missing or null")
        return ""
    if not isinstance(value, str):
        raise BadRow(field, f"field '{field}' is {type(value).__name__}, expected text")
    return value


_ROLE_NAMES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant",
               "bing": "assistant", "bard": "assistant", "system": "system", "model": "assistant"}


def _conversation_rows(turns: Any, field: str, role_key: str, text_key: str) -> list[dict[str, str]]:
    if not isinstance(turns, list) or not turns:
        raise BadRow(field, f"field '{field}' must be a non-empty list of turns")
    messages = []
    for turn in turns:
        if not isinstance(turn, dict) or not isinstance(turn.get(text_key), str):
            raise BadRow(field, f"a turn in '{field}' lacks text in '{text_key}'")
        role = _ROLE_NAMES.get(str(turn.get(role_key, "")).lower())
        if role is None:
            raise BadRow(field, f"a turn in '{field}' has unknown role {turn.get(role_key)!r}")
        messages.append({"role": role, "content": turn[text_key]})
    while messages and messages[-1]["role"] != "assistant":
        messages.pop()  # trailing user turns have no answer to learn from
    if not any(m["role"] == "assistant" for m in messages):
        raise BadRow(field, "conversation has no assistant turn")
    last_user = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=None)
    if last_user is None:
        raise BadRow(field, "conversation has no user turn")
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
            raise BadRow("instances", "field 'instances' must be a non-empty list")
        category = str(record.get("name") or record.get("motivation_app") or "")
        return [{"instruction": instruction, "input": _text(inst, "input", False), "response": _text(inst, "output"),
                 "category": category} for inst in instances if isinstance(inst, dict)]
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


def ingest_source(config: DataConfig) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Give back (canonical rows, quarantined records with file, row, field and reason)."""
    rows: list[dict[str, str]] = []
    quarantine: list[dict[str, Any]] = []
    if config.source == BUILTIN:
        for number, example in enumerate(builtin_tasks.generate(config.builtin_examples, config.seed), start=1):
            rows.append({**example, "source": f"{BUILTIN}:{number}", "messages": ""})
    else:
        for path in resolve_files(config.source):
            _ingest_file(path, config, rows, quarantine)
    if config.max_rows is not None:
        rows = rows[: config.max_rows]
    frame = pd.DataFrame(rows, columns=[c for c in CANONICAL_COLUMNS if c != "id"]).fillna("")
    texts = zip(frame["instruction"], frame["input"], frame["response"], strict=True)
    frame.insert(0, "id", [row_id(*text) for text in texts])
    return frame.astype(str), pd.DataFrame(quarantine, columns=QUARANTINE_COLUMNS).astype(str)


def _ingest_file(path: Path, config: DataConfig, rows: list[dict[str, str]], quarantine: list[dict[str, Any]]) -> None:
    fmt = None if config.format == "auto" else config.format
    default_category = path.name.split(".")[0]
    produced = 0
    for number, record, problem in read_records(path):
        if record is None:
            quarantine.append({"file": str(path), "row": number, "field": "", "reason": problem, "raw": ""})
            continue
        if fmt is None and not config.columns:
            fmt = detect_format(record)
            if fmt is None:
                raise IngestError(
                    f"{path}: row {number}: unknown format (columns: {', '.join(sorted(record))}); "
                    "set data.format or map columns with data.columns.instruction=... and data.columns.response=..."
                )
        try:
            canonical = to_canonical(record, fmt or "", config.columns)
        except BadRow as bad:
            quarantine.append({"file": str(path), "row": number, "field": bad.field, "reason": bad.reason,
                               "raw": json.dumps(record, default=str)[:2000]})
            continue
        for row in canonical:
            rows.append({**row, "category": row["category"] or default_category,
                         "source": f"{path}:{number}", "messages": row.get("messages", "")})
            produced += 1
    if produced == 0 and not quarantine:
        raise IngestError(f"{path}: no records found")


def source_fingerprint(config: dict[str, Any]) -> str:
    """Give back a hash of the source content, so changed data makes a new ingest key."""
    source = config["source"]
    if source == BUILTIN:
        return builtin_tasks.GENERATOR_VERSION + ":" + sha256_file(Path(builtin_tasks.__file__))[:12]
    try:
        files = resolve_files(source)
    except IngestError:
        return "unresolved:" + source  # ingest itself reports the problem as a step failure
    return sha256_text(canonical_json([[str(f), sha256_file(f)] for f in files]))


STEP = Step("ingest", __file__, fingerprint=source_fingerprint)


def write_ingest(config: DataConfig, out: Path) -> dict[str, Any]:
    """Write data.parquet and quarantine.parquet; give back the manifest's row counts."""
    frame, quarantine = ingest_source(config)
    if frame.empty:
        raise IngestError(f"{config.source}: no usable rows ({len(quarantine)} quarantined)")
    frame.to_parquet(out / "data.parquet", index=False)
    quarantine.to_parquet(out / "quarantine.parquet", index=False)
    return {"rows": len(frame), "quarantined": len(quarantine)}


@task(**step_task_options(STEP))
def ingest(config: dict[str, Any], root: str) -> ArtifactRef:
    """Prefect task: the ingest artifact for this source."""
    ref, built = STEP.produce(config, root, [], lambda out, _: write_ingest(DataConfig(**config), out))
    return finish_step(root, ref, built)
