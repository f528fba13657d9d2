"""Map instruction records to the canonical row: Alpaca, Dolly, Self-Instruct (`instances`), prompt/completion,
ShareGPT, OpenAI messages, or an explicit column mapping.

A record that cannot become a row goes to quarantine with its row, field, a code and a reason.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from toolkit.conversations import TurnError, checked_turns, conversation_fields
from toolkit.readers import IngestError, Record

# the fields a record must have in each format (checked once per columnar file, per record otherwise)
REQUIRED = {"alpaca": ("instruction", "output"), "dolly": ("instruction", "response"),
            "prompt_completion": ("prompt", "completion"), "self_instruct": ("instruction", "instances"),
            "sharegpt": ("conversations",), "messages": ("messages",)}


class BadRow(ValueError):
    """One record that cannot become a canonical row; carries the offending field."""

    def __init__(self, field: str, reason: str, code: str = "bad_field"):
        super().__init__(reason)
        self.field = field
        self.reason = reason
        self.code = code



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


def _conversation_rows(turns: Any, field: str, role_key: str, text_key: str) -> list[dict[str, str]]:
    try:
        return checked_turns(turns, role_key, text_key)
    except TurnError as bad:
        where = field if bad.turn is None else f"{field}[{bad.turn}]"
        raise BadRow(where, f"field '{field}': {bad.reason}", bad.code) from None


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
        return [{**conversation_fields(messages), "category": "", "messages": json.dumps(messages)}]
    raise IngestError(f"unknown data format '{fmt}'")


def canonical_rows(label: str, records: Iterator[Record], fmt: str | None, columns: dict[str, str],
                   max_chars: int, quarantine: list[dict[str, Any]]) -> Iterator[dict[str, str]]:
    """Yield the canonical rows (no id yet) of one stream of records; append the records that fail to `quarantine`.

    `fmt` None means detect it from the first record; a columnar file missing a needed column is an IngestError.
    """
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
