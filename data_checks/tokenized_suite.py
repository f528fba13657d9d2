"""Expectations over the tokenize artifact: schema, no nulls, lengths, targets, vocabulary, splits."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from catalog import layout
from data_checks.gate import GateReport, rows_passed_before, run_suites

if TYPE_CHECKING:
    import pandas as pd

    from catalog.sections import TokenizeConfig

ROW_COLUMNS = ["id", "split", "category", "length", "n_target", "truncated"]


def tokenized_rows_expectations(max_length: int) -> list[Any]:
    """Give back the expectations every tokenized row (or packed block) must meet."""
    import great_expectations.expectations as gxe

    expectations: list[Any] = [gxe.ExpectTableColumnsToMatchSet(column_set=ROW_COLUMNS, exact_match=False)]
    for column in ROW_COLUMNS:
        expectations.append(gxe.ExpectColumnValuesToNotBeNull(column=column))
    expectations += [
        gxe.ExpectColumnValuesToBeOfType(column="id", type_="str"),
        gxe.ExpectColumnValuesToBeInTypeList(column="length", type_list=["int32", "int64"]),
        gxe.ExpectColumnValuesToBeInSet(column="split", value_set=["train", "val", "test"]),
        gxe.ExpectColumnValuesToBeBetween(column="length", min_value=1, max_value=max_length),
        # a row without target tokens teaches nothing and divides by zero in the loss: never allowed
        gxe.ExpectColumnValuesToBeBetween(column="n_target", min_value=1),
    ]
    return expectations


def rows_to_check(written: pd.DataFrame, earlier: Path | None) -> pd.DataFrame:
    """Give back the written rows the row expectations must see: all of them, or, when `earlier` (a tokenize
    artifact of the same recipe) met them on every row, those it did not hold. A row is matched by id and
    split: a packed block's id names the rows packed in it, so an equal id is an equal block."""
    if earlier is None or not rows_passed_before(earlier, "tokenized_rows"):
        return written
    import pyarrow as pa
    import pyarrow.compute as pc

    before = layout.read_data(earlier, columns=["id", "split"])
    before_keys = pc.binary_join_element_wise(before["id"], before["split"], "\x1f").combine_chunks()
    seen = pc.is_in(pc.binary_join_element_wise(pa.array(written["id"], pa.string()),
                                                pa.array(written["split"], pa.string()), "\x1f"), value_set=before_keys)
    return written[~seen.to_numpy(zero_copy_only=False)]


def tokenized_summary_expectations(vocab_size: int, max_truncated_share: float, min_train_rows: int,
                                   min_eval_rows: int, max_target_tokens_lost_share: float = 1.0) -> list[Any]:
    """Give back the expectations over the one-row summary of the tokenize step."""
    import great_expectations.expectations as gxe

    return [
        gxe.ExpectColumnValuesToBeBetween(column="zero_target_rows", min_value=0, max_value=0),
        # ids must be unique over the whole table; the row suite may see only the rows not checked before
        gxe.ExpectColumnValuesToBeBetween(column="repeated_ids", min_value=0, max_value=0),
        gxe.ExpectColumnValuesToBeBetween(column="truncated_share", min_value=0, max_value=max_truncated_share),
        gxe.ExpectColumnValuesToBeBetween(column="target_tokens_lost_share", min_value=0,
                                          max_value=max_target_tokens_lost_share),
        gxe.ExpectColumnValuesToBeBetween(column="min_token_id", min_value=0),
        gxe.ExpectColumnValuesToBeBetween(column="max_token_id", max_value=vocab_size - 1),
        gxe.ExpectColumnValuesToBeBetween(column="min_label", min_value=-100),
        gxe.ExpectColumnValuesToBeBetween(column="max_label", max_value=vocab_size - 1),
        gxe.ExpectColumnValuesToBeBetween(column="train_rows", min_value=min_train_rows),
        gxe.ExpectColumnValuesToBeBetween(column="val_rows", min_value=min_eval_rows),
        gxe.ExpectColumnValuesToBeBetween(column="test_rows", min_value=min_eval_rows),
    ]


def check_tokenized(rows: pd.DataFrame, stats: dict[str, Any], config: TokenizeConfig, docs_dir: Path
                    ) -> GateReport:
    """Give back the gate report of the tokenize step: `rows` (those rows_to_check gave) through the row
    expectations, `stats` (its figures, one row) through the summary ones; Data Docs go to `docs_dir`."""
    import pandas as pd

    from toolkit.tokenizer import GPT2_VOCAB_SIZE

    return run_suites({
        "tokenized_rows": (rows, tokenized_rows_expectations(config.max_length)),
        "tokenized_summary": (pd.DataFrame([stats]), tokenized_summary_expectations(
            GPT2_VOCAB_SIZE, config.max_truncated_share, config.min_train_rows, config.min_eval_rows,
            config.max_target_tokens_lost_share)),
    }, docs_dir, set(config.warn_only))
