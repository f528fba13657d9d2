"""Expectations over the clean artifact: schema, no nulls, lengths in bounds, unique ids, ratios."""

from __future__ import annotations

from typing import Any

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
