"""Expectations over the clean artifact (schema, no nulls, lengths in bounds, unique ids, ratios) and their run."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from catalog import layout
from data_checks.gate import GateReport, run_suites
from toolkit.row_memo import row_keys

if TYPE_CHECKING:
    from catalog.sections import ValidateConfig

REQUIRED_COLUMNS = ["id", "instruction", "input", "response", "source", "category"]


def clean_rows_expectations(max_instruction_chars: int, max_response_chars: int, has_messages: bool = False
                            ) -> list[Any]:
    """Give back the expectations every clean row must meet; with a `messages` column, the length bounds hold
    for instruction rows only (tokenize cuts a conversation at its turn boundaries instead)."""
    import great_expectations.expectations as gxe

    expectations: list[Any] = [gxe.ExpectTableColumnsToMatchSet(column_set=REQUIRED_COLUMNS, exact_match=False)]
    for column in REQUIRED_COLUMNS:
        expectations.append(gxe.ExpectColumnValuesToNotBeNull(column=column))
        expectations.append(gxe.ExpectColumnValuesToBeOfType(column=column, type_="str"))
    from great_expectations.expectations.row_conditions import Column

    single = {"row_condition": Column("messages") == ""} if has_messages else {}
    expectations += [
        gxe.ExpectColumnValueLengthsToBeBetween(column="instruction", min_value=1, max_value=max_instruction_chars,
                                                **single),
        gxe.ExpectColumnValueLengthsToBeBetween(column="response", min_value=1, max_value=max_response_chars,
                                                **single),
    ]
    return expectations


def clean_ids_expectations() -> list[Any]:
    """Give back the expectations over the whole `id` column (uniqueness cannot be checked batch by batch)."""
    import great_expectations.expectations as gxe

    return [gxe.ExpectColumnValuesToBeUnique(column="id")]


def clean_summary_expectations(min_rows: int, max_quarantine_ratio: float, max_duplicate_ratio: float = 1.0,
                               max_mean_instruction_chars: int | None = None,
                               max_mean_response_chars: int | None = None) -> list[Any]:
    """Give back the expectations over the one-row summary of the clean step (counts, ratios, length means)."""
    import great_expectations.expectations as gxe

    return [
        gxe.ExpectColumnValuesToBeBetween(column="rows", min_value=min_rows),
        gxe.ExpectColumnValuesToBeBetween(column="quarantine_ratio", min_value=0, max_value=max_quarantine_ratio),
        gxe.ExpectColumnValuesToBeBetween(column="duplicate_ratio", min_value=0, max_value=max_duplicate_ratio),
        gxe.ExpectColumnValuesToBeBetween(column="mean_instruction_chars", min_value=1,
                                          max_value=max_mean_instruction_chars),
        gxe.ExpectColumnValuesToBeBetween(column="mean_response_chars", min_value=1,
                                          max_value=max_mean_response_chars),
    ]


# Rows per Great Expectations run: the row checks go batch by batch so memory stays bounded at millions of rows.
ROWS_PER_CHECK = 200_000


def rebatched(tables: Iterable[pa.Table], rows: int) -> Iterator[pa.Table]:
    """Yield the rows of the tables, in order, as contiguous tables of `rows` rows (the last one shorter)."""
    pending: list[pa.Table] = []
    held = 0
    for table in tables:
        pending.append(table)
        held += table.num_rows
        while held >= rows:
            joined = pa.concat_tables(pending)
            yield joined.slice(0, rows).combine_chunks()
            pending, held = [joined.slice(rows)], held - rows
    if held:
        yield pa.concat_tables(pending).combine_chunks()


def _row_batches(cleaned: Path, rows_per_batch: int, seen: pa.Array | None, counts: dict[str, int]
                 ) -> Iterator[pd.DataFrame]:
    """Yield the rows to check in frames: every row, or those whose key is not in `seen` (checked before)."""
    rows = layout.DataRows(cleaned)
    batches = rows.iter_batches(batch_size=rows_per_batch) if seen is None else \
        rebatched(_unseen_rows(rows.parts, seen), rows_per_batch)
    for batch in batches:
        counts["checked"] += batch.num_rows
        if batch.num_rows:
            yield batch.to_pandas()
    if not counts["checked"]:  # still one run, so an empty artifact is checked (and fails min_rows)
        yield rows.schema_arrow.empty_table().to_pandas()


def _unseen_rows(parts: list[Path], seen: pa.Array) -> Iterator[pa.Table]:
    """Yield, part by part, the rows whose key is not in `seen`: the key columns of every part are read and looked
    up at once (Arrow hashes `seen` once per lookup), a whole part only when it holds such a row (on a nightly
    run, the last parts only)."""
    files = [pq.ParquetFile(part) for part in parts]
    key_columns = [name for name in ("id", "messages") if name in files[0].schema_arrow.names] if files else []
    keys = [row_keys(file.read(columns=key_columns)) for file in files]
    unseen = pc.invert(pc.is_in(pa.concat_arrays(keys), value_set=seen)) if keys else pa.array([], pa.bool_())
    start = 0
    for file, part_keys in zip(files, keys, strict=True):
        mask = unseen.slice(start, len(part_keys))
        start += len(part_keys)
        if pc.any(mask).as_py():
            yield file.read().filter(mask)


def _mean_chars(cleaned: Path, columns: list[str]) -> dict[str, float]:
    """Mean length in characters of each text column, summed batch by batch in one pass, no frame built."""
    totals, rows = dict.fromkeys(columns, 0), 0
    for batch in layout.DataRows(cleaned).iter_batches(batch_size=ROWS_PER_CHECK, columns=columns):
        for column in columns:
            totals[column] += pc.sum(pc.utf8_length(batch.column(column))).as_py() or 0
        rows += batch.num_rows
    return {column: total / rows if rows else 0.0 for column, total in totals.items()}


def check_clean_data(cleaned: Path, stats: dict[str, Any], config: ValidateConfig, docs_dir: Path,
                     rows_per_batch: int = ROWS_PER_CHECK, seen: pa.Array | None = None) -> tuple[GateReport, int]:
    """Give back (the gate report for the rows of the clean artifact folder `cleaned` plus the clean step's counts,
    how many rows went through the row expectations).

    `seen`: keys of rows known to meet the row expectations; only the others go through them. Runs where
    data_checks.gate_process puts it: the arguments and the result cross to the worker by pickle.
    """
    counts = {"checked": 0}
    rows = layout.data_rows(cleaned)
    means = _mean_chars(cleaned, ["instruction", "response"])
    summary = pd.DataFrame([{
        "rows": rows, "quarantine_ratio": float(stats.get("quarantine_ratio", 0.0)),
        "duplicate_ratio": float(stats.get("duplicate_ratio", 0.0)),
        "mean_instruction_chars": means["instruction"], "mean_response_chars": means["response"],
    }])
    report = run_suites(
        {
            "clean_rows": (_row_batches(cleaned, rows_per_batch, seen, counts),
                           clean_rows_expectations(config.max_instruction_chars, config.max_response_chars,
                                                   "messages" in layout.data_columns(cleaned))),
            "clean_ids": (layout.read_data(cleaned, columns=["id"]).to_pandas(), clean_ids_expectations()),
            "clean_summary": (summary, clean_summary_expectations(
                config.min_rows, config.max_quarantine_ratio, config.max_duplicate_ratio,
                config.max_mean_instruction_chars, config.max_mean_response_chars)),
        },
        docs_dir,
        set(config.warn_only),
    )
    return report, counts["checked"]
