"""Step 2, clean: normalise text and drop unusable rows, keeping every dropped row with its reason."""

from __future__ import annotations

import html
import re
import unicodedata
from pathlib import Path
from typing import Any

import pandas as pd
from prefect import task

from tasks.artifacts import ArtifactRef, Step
from tasks.caching import finish_step, step_task_options
from tasks.config import CleanConfig

TEXT_FIELDS = ("instruction", "input", "response")
_INVISIBLE = re.compile("[\u200b\u200c\u200d\u2060\ufeff\u00ad]")
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_HTML_TAG = re.compile(r"</?(?:p|br|div|span|b|i|em|strong|ul|ol|li|h[1-6])\s*/?>", re.IGNORECASE)
_SPACES = re.compile(r"[ \t\r\f\v]+")
_BLANK_LINES = re.compile(r"\n{3,}")


def normalize_text(text: str) -> str:
    """Give back text in NFKC with invisible/control characters, simple HTML remnants and extra spaces removed."""
    text = unicodedata.normalize("NFKC", text)
    text = _INVISIBLE.sub("", text)
    text = _CONTROL.sub("", text.replace("\r\n", "\n"))
    if "<" in text or "&" in text:
        text = html.unescape(_HTML_TAG.sub(" ", text))
    lines = [_SPACES.sub(" ", line).strip() for line in text.split("\n")]
    return _BLANK_LINES.sub("\n\n", "\n".join(lines)).strip()


def clean_rows(frame: pd.DataFrame, config: CleanConfig) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Give back (kept rows, dropped rows with a `reason` column); every input row lands in exactly one."""
    frame = frame.copy()
    for field in TEXT_FIELDS:
        frame[field] = frame[field].map(normalize_text)
    reason = pd.Series("", index=frame.index)

    def mark(mask: pd.Series, why: str) -> None:
        reason[(reason == "") & mask] = why

    min_chars = max(config.min_chars, 1)
    mark(frame["instruction"].str.len() < min_chars, "empty_instruction")
    mark(frame["response"].str.len() < min_chars, "empty_response")
    mark(frame["instruction"].str.len() > config.max_instruction_chars, "instruction_too_long")
    mark(frame["input"].str.len() > config.max_instruction_chars, "input_too_long")
    mark(frame["response"].str.len() > config.max_response_chars, "response_too_long")
    if config.drop_exact_duplicates:
        normalized = (frame["instruction"].str.lower() + "\x1f" + frame["input"].str.lower() + "\x1f"
                      + frame["response"].str.lower())
        mark(normalized.duplicated(keep="first") & (reason == ""), "exact_duplicate")
    dropped = frame[reason != ""].assign(reason=reason[reason != ""])
    return frame[reason == ""].reset_index(drop=True), dropped.reset_index(drop=True)


STEP = Step("clean", __file__)


def write_clean(config: CleanConfig, ingested: Path, out: Path) -> dict[str, Any]:
    """Write data.parquet and quarantine.parquet (upstream quarantine carried along); give back counts."""
    kept, dropped = clean_rows(pd.read_parquet(ingested / "data.parquet"), config)
    upstream = pd.read_parquet(ingested / "quarantine.parquet")
    kept.to_parquet(out / "data.parquet", index=False)
    dropped.to_parquet(out / "quarantine.parquet", index=False)
    total = len(kept) + len(dropped) + len(upstream)
    return {
        "rows": len(kept),
        "dropped": dropped["reason"].value_counts().to_dict(),
        "quarantined_upstream": len(upstream),
        "quarantine_ratio": (len(dropped) + len(upstream)) / total if total else 0.0,
    }


@task(**step_task_options(STEP))
def clean(config: dict[str, Any], root: str, ingested: ArtifactRef) -> ArtifactRef:
    """Prefect task: the clean artifact for this ingest artifact."""
    ref, built = STEP.produce(config, root, [ingested],
                              lambda out, inputs: write_clean(CleanConfig(**config), inputs[0], out))
    return finish_step(root, ref, built)
