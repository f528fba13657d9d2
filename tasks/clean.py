"""Step 2, clean: normalise text and drop unusable rows, keeping every dropped row with its reason.

Checks, in order, each row taking the first reason that applies: empty, too long in characters, too
long or too short in GPT-2 tokens, other script (optional), exact duplicate of normalised text, near
duplicate (MinHash/LSH over word 3-grams). The quarantine holds the row, a reason code and a detail.
"""

from __future__ import annotations

import html
import json
import re
import unicodedata
import zlib
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


def _normalize_messages(text: str) -> str:
    if not text:
        return text
    turns = json.loads(text)
    return json.dumps([{**t, "content": normalize_text(t["content"])} for t in turns])


def token_counts(texts: list[str], batch: int = 1000) -> list[int]:
    """Give back the GPT-2 token count of each text, tokenizing in batches."""
    from tasks.modeling import gpt2_tokenizer

    tokenizer = gpt2_tokenizer()
    counts: list[int] = []
    for start in range(0, len(texts), batch):
        encoded = tokenizer(texts[start:start + batch], add_special_tokens=False, return_attention_mask=False)
        counts.extend(len(ids) for ids in encoded["input_ids"])
    return counts


def latin_share(text: str) -> float:
    """Give back the share of letters in Latin script (1.0 for text without letters)."""
    letters = [ch for ch in text if ch.isalpha()]
    if not letters:
        return 1.0
    latin = sum(1 for ch in letters if ch < "\u0250" or "\u1e00" <= ch <= "\u1eff")
    return latin / len(letters)


def near_duplicates(texts: list[str], candidates: list[bool], config: CleanConfig) -> dict[int, int]:
    """Give back {row: earlier row it nearly duplicates} for rows in `candidates`, by MinHash/LSH."""
    from datasketch import MinHash, MinHashLSH

    positions, shingle_sets = [], []
    for position, (text, candidate) in enumerate(zip(texts, candidates, strict=True)):
        words = text.lower().split()
        if candidate and len(words) >= config.near_duplicate_min_words:
            positions.append(position)
            shingle_sets.append({" ".join(words[i:i + 3]).encode("utf-8") for i in range(len(words) - 2)})
    # crc32: deterministic across processes (unlike hash()) and fast; 32 bits is what MinHash expects
    hashes = MinHash.bulk(shingle_sets, num_perm=config.near_duplicate_num_perm, hashfunc=zlib.crc32)
    lsh = MinHashLSH(threshold=config.near_duplicate_threshold, num_perm=config.near_duplicate_num_perm)
    found: dict[int, int] = {}
    kept: dict[int, Any] = {}
    for position, minhash in zip(positions, hashes, strict=True):
        # LSH buckets give candidates; the estimated Jaccard decides, so a bucket collision alone drops nothing
        match = next((int(key) for key in lsh.query(minhash)
                      if minhash.jaccard(kept[int(key)]) >= config.near_duplicate_threshold), None)
        if match is None:
            lsh.insert(str(position), minhash)
            kept[position] = minhash
        else:
            found[position] = match
    return found


def clean_rows(frame: pd.DataFrame, config: CleanConfig) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Give back (kept rows, dropped rows with `reason` and `detail`); every input row lands in exactly one."""
    frame = frame.copy().reset_index(drop=True)
    for field in TEXT_FIELDS:
        frame[field] = frame[field].map(normalize_text)
    if "messages" in frame:
        frame["messages"] = frame["messages"].map(_normalize_messages)
    reason = pd.Series("", index=frame.index)
    detail = pd.Series("", index=frame.index)

    def mark(mask: Any, why: str, details: Any = "") -> None:
        fresh = (reason == "") & pd.Series(mask, index=frame.index)
        reason[fresh] = why
        detail[fresh] = details[fresh] if isinstance(details, pd.Series) else details

    min_chars = max(config.min_chars, 1)
    chars = {field: frame[field].str.len() for field in TEXT_FIELDS}
    mark(chars["instruction"] < min_chars, "empty_instruction")
    mark(chars["response"] < min_chars, "empty_response")
    for field, limit in (("instruction", config.max_instruction_chars), ("input", config.max_instruction_chars),
                         ("response", config.max_response_chars)):
        mark(chars[field] > limit, f"{field}_too_long", chars[field].map(lambda n, lim=limit: f"{n} chars > {lim}"))
    if config.max_prompt_tokens or config.max_response_tokens or config.min_response_tokens:
        _mark_token_bounds(frame, reason, mark, config)
    if config.language == "latin":
        share = (frame["instruction"] + " " + frame["input"] + " " + frame["response"]).map(latin_share)
        mark(share < config.min_script_share, "other_script", share.map(lambda v: f"latin share {v:.2f}"))
    normalized = (frame["instruction"].str.lower() + "\x1f" + frame["input"].str.lower() + "\x1f"
                  + frame["response"].str.lower())
    if config.drop_exact_duplicates:
        first_id = frame.groupby(normalized, sort=False)["id"].transform("first")
        mark(normalized.duplicated(keep="first"), "exact_duplicate", "duplicate of " + first_id)
    if config.drop_near_duplicates:
        found = near_duplicates(normalized.str.replace("\x1f", " ").tolist(), list(reason == ""), config)
        mask = pd.Series(False, index=frame.index)
        mask[list(found)] = True
        of = pd.Series("", index=frame.index)
        of[list(found)] = ["near duplicate of " + frame["id"][j] for j in found.values()]
        mark(mask, "near_duplicate", of)
    dropped = frame[reason != ""].assign(reason=reason[reason != ""], detail=detail[reason != ""])
    return frame[reason == ""].reset_index(drop=True), dropped.reset_index(drop=True)


def _mark_token_bounds(frame: pd.DataFrame, reason: pd.Series, mark: Any, config: CleanConfig) -> None:
    # only rows still in the running are tokenized: the character checks already removed the giants
    alive = frame.index[reason == ""]
    prompt_tokens = pd.Series(0, index=frame.index)
    response_tokens = pd.Series(0, index=frame.index)
    prompts = (frame.loc[alive, "instruction"] + "\n" + frame.loc[alive, "input"]).tolist()
    prompt_tokens[alive] = token_counts(prompts)
    response_tokens[alive] = token_counts(frame.loc[alive, "response"].tolist())
    alive_mask = reason == ""
    if config.max_prompt_tokens:
        mark(alive_mask & (prompt_tokens > config.max_prompt_tokens), "prompt_too_many_tokens",
             prompt_tokens.map(lambda n: f"{n} tokens > {config.max_prompt_tokens}"))
    if config.max_response_tokens:
        mark(alive_mask & (response_tokens > config.max_response_tokens), "response_too_many_tokens",
             response_tokens.map(lambda n: f"{n} tokens > {config.max_response_tokens}"))
    mark(alive_mask & (response_tokens < config.min_response_tokens), "response_too_few_tokens",
         response_tokens.map(lambda n: f"{n} tokens < {config.min_response_tokens}"))


STEP = Step("clean", __file__)


def write_clean(config: CleanConfig, ingested: Path, out: Path) -> dict[str, Any]:
    """Write data.parquet and quarantine.parquet (upstream quarantine carried along); give back counts."""
    kept, dropped = clean_rows(pd.read_parquet(ingested / "data.parquet"), config)
    upstream = pd.read_parquet(ingested / "quarantine.parquet")
    kept.to_parquet(out / "data.parquet", index=False)
    dropped.to_parquet(out / "quarantine.parquet", index=False)
    total = len(kept) + len(dropped) + len(upstream)
    duplicates = int(dropped["reason"].isin(["exact_duplicate", "near_duplicate"]).sum())
    return {
        "rows": len(kept),
        "dropped": dropped["reason"].value_counts().to_dict(),
        "duplicate_ratio": duplicates / max(len(kept) + len(dropped), 1),
        "quarantined_upstream": len(upstream),
        "quarantine_ratio": (len(dropped) + len(upstream)) / total if total else 0.0,
    }


@task(**step_task_options(STEP))
def clean(config: dict[str, Any], root: str, ingested: ArtifactRef) -> ArtifactRef:
    """Prefect task: the clean artifact for this ingest artifact."""
    ref, built = STEP.produce(config, root, [ingested],
                              lambda out, inputs: write_clean(CleanConfig(**config), inputs[0], out))
    return finish_step(root, ref, built)
