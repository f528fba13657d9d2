"""Read instruction data files into records: JSONL, JSON, CSV, Parquet (optionally .gz), folders and globs of
them, and datasets through `datasets` (a Hub id, a local data folder, a save_to_disk folder).

A source that cannot be read at all is one IngestError line naming the file (and line or column); a record
that cannot be read (bad JSON, bad UTF-8, a short CSV row) comes back as None with a code and a problem.
"""

from __future__ import annotations

import glob
import gzip
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
HUB = "hf:"


class IngestError(ValueError):
    """A source that cannot be read at all (as opposed to single bad rows, which are quarantined)."""


class _DuplicateKeys(ValueError):
    pass


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



def record_streams(source: str, hub_split: str) -> Iterator[tuple[str, Iterator[Record]]]:
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
