"""The data steps' fast paths and streaming: each must give what the plain, row-by-row definition gives."""

import itertools
import json
import random
import re

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from catalog import layout
from catalog.config import CleanConfig, DataConfig, TemplateConfig, TokenizeConfig
from tasks.clean import normalize_text, token_count_bounds, token_counts, write_clean
from tasks.ingest import write_ingest
from tasks.template import TEMPLATED_SCHEMA, apply_template, write_template
from tasks.tokenize import fit_example, fit_lengths, tokenize_batch
from toolkit.dedup import Duplicates, lsh_bands, minhash_signatures, shingle_hashes
from toolkit.tokenizer import IGNORE_INDEX, gpt2_tokenizer


def _normalize_by_lines(text: str) -> str:
    """normalize_text as its docstring states it, one line at a time: the reference for the fast path."""
    import html
    import unicodedata

    text = re.sub("[\u200b\u200c\u200d\u2060\ufeff\u00ad]", "", unicodedata.normalize("NFKC", text))
    text = re.sub(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]", "", text.replace("\r\n", "\n"))
    if "<" in text or "&" in text:
        text = html.unescape(re.sub(r"</?(?:p|br|div|span|b|i|em|strong|ul|ol|li|h[1-6])\s*/?>", " ", text,
                                    flags=re.IGNORECASE))
    text = "\n".join(re.sub(r"[ \t\r\f\v]+", " ", line).strip() for line in text.split("\n"))
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def test_normalize_text_fast_path_matches_the_line_by_line_definition():
    pieces = list("ab  \t\r\n\x0b\x0c\x1c\x1f\x85\u2028\u00a0\u3000\u200b\ufb01<>&;é") + [
        "<br>", "&amp;", "&nbsp;", "\r\n", "<p>", "\n\n\n", " \n ", "word"]
    rng = random.Random(0)
    for _ in range(20_000):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 16)))
        assert normalize_text(text) == _normalize_by_lines(text), repr(text)


def test_token_count_bounds_hold_so_untokenized_rows_are_decided_correctly():
    texts = pd.Series(["Hello world", "a  b\tc", "日本語のテキスト", "<|endoftext|>x<|endoftext|>", "!!!???...",
                       "über naïve café", "x" * 300, "1 2 3 4 5 6", "emoji 🙂🙂 mix", "tab\tand\nnewline  text"])
    lower, upper = token_count_bounds(texts)
    exact = token_counts(texts.tolist())
    assert all(lo <= n <= up for lo, n, up in zip(lower, exact, upper, strict=True))


def test_token_limits_give_the_same_reasons_as_counting_every_row(clean_frames):
    rng = random.Random(1)
    words = ["alpha", "beta", "x", "!!", "日本", "1234", "naïve", "<|user|>"]
    rows = [{"instruction": " ".join(rng.choice(words) for _ in range(rng.randint(1, 60))),
             "response": " ".join(rng.choice(words) for _ in range(rng.randint(1, 30)))} for _ in range(300)]
    frame = pd.DataFrame([{"id": str(i), "input": "", "source": "s", "category": "c", "messages": "", **r}
                          for i, r in enumerate(rows)])
    config = CleanConfig(max_prompt_tokens=40, max_response_tokens=20, min_response_tokens=5,
                         drop_exact_duplicates=False, drop_near_duplicates=False)
    _, dropped = clean_frames(frame, config)
    prompts = token_counts([normalize_text(r["instruction"]) + "\n" for r in rows])
    answers = token_counts([normalize_text(r["response"]) for r in rows])
    expected = {}
    for i, (p, a) in enumerate(zip(prompts, answers, strict=True)):
        if p > 40:
            expected[str(i)] = ("prompt_too_many_tokens", f"{p} tokens > 40")
        elif a > 20:
            expected[str(i)] = ("response_too_many_tokens", f"{a} tokens > 20")
        elif a < 5:
            expected[str(i)] = ("response_too_few_tokens", f"{a} tokens < 5")
    assert {r.id: (r.reason, r.detail) for r in dropped.itertuples()} == expected
    assert len(expected) > 50


def test_minhash_estimates_jaccard_without_bias():
    rng = np.random.default_rng(0)
    hashes, counts, exact = [], [], []
    for _ in range(1500):
        n = int(rng.integers(20, 300))
        shared = int(rng.integers(n // 3, n + 1))
        common = rng.integers(0, 2**64, shared, dtype=np.uint64)
        for _ in range(2):
            hashes.append(np.concatenate([common, rng.integers(0, 2**64, n - shared, dtype=np.uint64)]))
            counts.append(n)
        exact.append(shared / (2 * n - shared))
    signatures = minhash_signatures(np.concatenate(hashes), np.array(counts), 64)
    error = (signatures[0::2] == signatures[1::2]).mean(axis=1) - np.array(exact)
    assert abs(error.mean()) < 0.01 and error.std() < 0.07


def test_shingles_stay_inside_each_text():
    hashes, grams, words = shingle_hashes(["a b c d", "x", "", "A B C d", "e f"])
    assert words.tolist() == [4, 1, 0, 4, 2] and grams.tolist() == [2, 0, 0, 2, 0]
    assert hashes[:2].tolist() == hashes[2:4].tolist()  # case is ignored, and no 3-gram spans two texts
    assert len(set(hashes[:2].tolist())) == 2


@pytest.mark.parametrize(("threshold", "num_perm"), [(0.85, 64), (0.7, 128), (0.95, 32), (0.5, 16)])
def test_lsh_bands_find_pairs_at_the_threshold(threshold, num_perm):
    bands, rows = lsh_bands(threshold, num_perm)
    assert bands * rows <= num_perm
    assert 1 - (1 - threshold ** rows) ** bands >= 0.95
    if rows < num_perm:  # one more row per band would miss too many
        more = rows + 1
        assert 1 - (1 - threshold ** more) ** (num_perm // more) < 0.95


PASSAGE = " ".join(f"w{i}" for i in range(120))


def _near_duplicates(texts, responses, alive):
    """Give back {row: earlier row} as clean's duplicate finder marks near duplicates among the `alive` rows."""
    frame = pd.DataFrame({"id": [str(i) for i in range(len(texts))], "instruction": texts, "input": "",
                          "response": responses})
    duplicates = Duplicates(CleanConfig(drop_exact_duplicates=False))
    duplicates.add(frame, pd.Series(["" if keep else "empty_response" for keep in alive]))
    marks = duplicates.finish(lambda rows: frame["response"].iloc[rows].tolist())
    assert {reason for reason, _ in marks.values()} <= {"near_duplicate"}
    return {row: int(detail.removeprefix("near duplicate of ")) for row, (_, detail) in marks.items()}


def test_near_duplicates_need_the_same_answer_and_name_the_earliest_row():
    texts = [f"question one? {PASSAGE}", f"question two? {PASSAGE}", f"question one, please? {PASSAGE}",
             f"question one? {PASSAGE}", "short text here"]
    responses = ["Paris", "Rome", "paris.", "Paris", "x"]
    found = _near_duplicates(texts, responses, [True] * 5)
    # row 1 asks something else about the same passage and keeps its own answer; 2 and 3 repeat row 0
    assert found == {2: 0, 3: 0}
    assert _near_duplicates(texts, ["Paris"] * 5, [True] * 5) == {1: 0, 2: 0, 3: 0}  # the texts alone match
    assert _near_duplicates(texts, responses, [False, True, True, True, True]) == {3: 2}


def _frame(n, seed=0):
    rng = random.Random(seed)
    vocab = [f"v{i}" for i in range(400)]
    rows = []
    for i in range(n):
        if i > 10 and rng.random() < 0.1:
            rows.append(dict(rows[rng.randrange(i)]))
        elif i > 10 and rng.random() < 0.1:
            near = dict(rows[rng.randrange(i)])
            near["instruction"] += " indeed"
            rows.append(near)
        else:
            rows.append({"instruction": " ".join(rng.choice(vocab) for _ in range(rng.randint(1, 40))),
                         "input": "" if rng.random() < 0.5 else " ".join(rng.choices(vocab, k=rng.randint(1, 9))),
                         "response": " ".join(rng.choice(vocab) for _ in range(rng.randint(0, 25)))})
    from tasks.ingest import row_id

    return pd.DataFrame([{"id": row_id(r["instruction"], r["input"], r["response"]), **r, "source": f"s:{i}",
                          "category": "c", "messages": ""} for i, r in enumerate(rows)])


def test_streamed_clean_equals_clean_in_one_batch_and_is_byte_identical_on_rerun(tmp_path, clean_frames):
    frame = _frame(700)
    ingest = tmp_path / "ingest"
    ingest.mkdir()
    frame.to_parquet(ingest / "data.parquet")
    pd.DataFrame(columns=["file", "row", "field", "code", "reason", "raw"]).to_parquet(ingest / "quarantine.parquet")
    config = CleanConfig(near_duplicate_min_words=8)
    kept, dropped = clean_frames(frame, config, batch_rows=len(frame))
    assert set(dropped["reason"]) >= {"exact_duplicate", "near_duplicate", "empty_response"}
    outputs = []
    for run, batch_rows in enumerate((64, 64, 1000)):
        out = tmp_path / f"clean{run}"
        out.mkdir()
        stats = write_clean(config, ingest, out, batch_rows=batch_rows)
        assert stats["rows"] == len(kept) and sum(stats["dropped"].values()) == len(dropped)
        assert pd.read_parquet(out / "data.parquet").equals(kept)
        assert pd.read_parquet(out / "quarantine.parquet").astype(str).equals(dropped.astype(str))
        assert sorted(p.name for p in out.iterdir()) == ["data.parquet", "quarantine.parquet", "row_memo.parquet"]
        outputs.append([part.read_bytes() for part in [*layout.data_parts(out), out / "quarantine.parquet"]])
    assert outputs[0] == outputs[1]


def test_ingest_batches_keep_caps_and_weights_across_batch_boundaries(tmp_path, ingest_frames):
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps({"instruction": f"do {i}", "output": f"done {i}"}) + "\n" for i in range(50)))
    whole, _ = ingest_frames(DataConfig(source=str(path), max_rows=23))
    for batch_rows in (1, 4, 7, 100):
        out = tmp_path / f"ingest{batch_rows}"
        out.mkdir()
        stats = write_ingest(DataConfig(source=str(path), max_rows=23), out, batch_rows)
        assert pd.read_parquet(out / "data.parquet").equals(whole)
        assert stats["sources"] == [{"source": str(path), "rows_read": 50, "rows_kept": 50}]
    sources = [{"source": str(path), "weight": 0.5, "max_rows": 9}, {"source": str(path), "max_rows": 3}]
    once, _ = ingest_frames(DataConfig(sources=sources), batch_rows=1000)
    small, _ = ingest_frames(DataConfig(sources=sources), batch_rows=2)
    assert once.equals(small) and len(once) == 12


def test_ingest_writes_parquet_in_batches_with_the_canonical_schema(tmp_path, monkeypatch):
    monkeypatch.setattr("catalog.parquet_writer.ROWS_PER_PART", 10_000)
    path = tmp_path / "rows.jsonl.gz"
    import gzip

    lines = [json.dumps({"instruction": f"do {i}", "input": "", "output": f"done {i}"}) for i in range(25_000)]
    path.write_bytes(gzip.compress(("\ufeff" + "\n".join(lines) + "\n{broken\n").encode("utf-8")))
    out = tmp_path / "out"
    out.mkdir()
    stats = write_ingest(DataConfig(source=str(path)), out)
    assert (stats["rows"], stats["quarantined"]) == (25_000, 1)
    parts = [pq.ParquetFile(part) for part in layout.data_parts(out)]
    # written as it streams, in even parts of one row group each, not held as one frame
    assert [(part.metadata.num_rows, part.metadata.num_row_groups) for part in parts] == [(10_000, 1), (10_000, 1),
                                                                                          (5_000, 1)]
    assert parts[0].schema_arrow.names == ["id", "instruction", "input", "response", "source", "category", "messages"]
    assert pd.read_parquet(out / "quarantine.parquet")["row"].tolist() == ["25001"]


def test_streamed_template_equals_apply_template(tmp_path):
    frame = _frame(120)
    validated = tmp_path / "validate"
    validated.mkdir()
    frame.to_parquet(validated / "data.parquet")
    out = tmp_path / "template"
    out.mkdir()
    stats = write_template(TemplateConfig(), validated, out, batch_rows=16)
    expected = pa.Table.from_pandas(apply_template(frame, TemplateConfig()), TEMPLATED_SCHEMA, preserve_index=False)
    assert pq.read_table(out / "data.parquet").equals(expected)
    assert stats["rows"] == 120 and sum(stats["splits"].values()) == 120


def test_fit_lengths_agrees_with_fit_example():
    for prompt_length, completion_length, max_length in itertools.product(range(0, 40, 3), range(0, 40, 3),
                                                                          (1, 4, 16, 33)):
        ids, labels, truncated = fit_example(list(range(prompt_length)), list(range(100, 100 + completion_length)),
                                             max_length)
        head, tail, kept = (int(x[0]) for x in fit_lengths(np.array([prompt_length]), np.array([completion_length]),
                                                            max_length))
        assert ids == list(range(head)) + list(range(prompt_length - tail, prompt_length)) + list(
            range(100, 100 + kept))
        assert sum(x != IGNORE_INDEX for x in labels) == kept
        assert truncated == (prompt_length + completion_length > max_length)


def test_tokenize_batch_equals_fitting_each_example():
    tokenizer = gpt2_tokenizer()
    rng = random.Random(2)
    words = ["the", "Paris", "naïve", "日本", "!!", "12", "<|endoftext|>", "\n"]
    prompts = ["<|endoftext|>Instruction: " + " ".join(rng.choice(words) for _ in range(rng.randint(0, 80)))
               for _ in range(200)]
    completions = [" " + " ".join(rng.choice(words) for _ in range(rng.randint(0, 30))) for _ in range(200)]
    batch = pa.RecordBatch.from_pydict({"id": [str(i) for i in range(200)], "split": ["train"] * 200,
                                        "category": ["c"] * 200, "prompt": prompts, "completion": completions})
    for max_length in (8, 48, 1024):
        rows = tokenize_batch(batch, TokenizeConfig(max_length=max_length)).to_pylist()
        for row, prompt, completion in zip(rows, prompts, completions, strict=True):
            ids, labels, truncated = fit_example(tokenizer(prompt, add_special_tokens=False).input_ids,
                                                 tokenizer(completion, add_special_tokens=False).input_ids, max_length)
            assert (row["input_ids"], row["labels"], row["truncated"]) == (ids, labels, truncated)
            assert row["length"] == len(ids) and row["n_target"] == sum(x != IGNORE_INDEX for x in labels)
    empty = tokenize_batch(batch.slice(0, 0), TokenizeConfig())
    assert empty.num_rows == 0 and empty.schema.field("input_ids").type == pa.list_(pa.int32())


def test_near_duplicates_after_settled_rows_are_those_of_a_full_pass():
    frame = _frame(900, seed=3)
    config = CleanConfig(near_duplicate_min_words=3)

    def finish(settled=0, settled_near=None):
        duplicates = Duplicates(config)
        for start in range(0, len(frame), 128):  # batches as clean hands them over
            part = frame.iloc[start:start + 128].reset_index(drop=True)
            duplicates.add(part, pd.Series([""] * len(part)))
        return duplicates.finish(lambda rows: frame["response"].iloc[rows].tolist(), settled, settled_near)

    full = finish()
    assert sum(reason == "near_duplicate" for reason, _ in full.values()) >= 10
    for settled in (1, 300, 899):
        near = [(frame["id"][row], detail) for row, (reason, detail) in sorted(full.items())
                if reason == "near_duplicate" and row < settled]
        known = pa.table({"id": [i for i, _ in near], "detail": [d for _, d in near]}, schema=pa.schema(
            [("id", pa.string()), ("detail", pa.string())]))
        assert finish(settled, known) == full, settled
