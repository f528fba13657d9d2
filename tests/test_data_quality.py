"""Clean, template and tokenize in depth: dedup, token bounds, chat and user templates, packing, the tokenize gate."""

import json

import pandas as pd
import pyarrow.parquet as pq
import pytest

from catalog.config import CleanConfig, ConfigError, TemplateConfig, TokenizeConfig, load_config
from catalog.store import MANIFEST, ArtifactRef
from data_checks.gate import raise_if_blocked
from tasks.clean import write_clean
from tasks.template import apply_template
from tasks.tokenize import TokenizeGateFailed, write_tokenize
from toolkit.tokenizer import IGNORE_INDEX, gpt2_tokenizer

STORY = ("the quick brown fox jumps over the lazy dog while the farmer watches from the old red barn "
         "and the children play in the long green grass beside the quiet river")


def _frame(rows):
    base = {"input": "", "source": "s", "category": "c", "messages": ""}
    rows = [{"id": str(i), **base, **r} for i, r in enumerate(rows)]
    return pd.DataFrame(rows)


def test_clean_drops_near_duplicates_and_token_bounds_with_reasons(tmp_path, clean_frames):
    frame = _frame([
        {"instruction": "Summarise the story.", "input": STORY, "response": "A fox and a farm."},
        {"instruction": "Summarise the story.", "input": STORY, "response": "A fox and a farm!"},
        {"instruction": "Summarise the story.", "input": STORY.upper(), "response": "A FOX AND A FARM."},
        {"instruction": "Count", "input": "", "response": "word " * 40},
        {"instruction": "Write about cats.", "input": "", "response": "Cats sleep a lot and purr when content."},
    ])
    kept, dropped = clean_frames(frame, CleanConfig(max_response_tokens=30))
    reasons = dict(zip(dropped["id"], dropped["reason"], strict=True))
    assert reasons == {"1": "near_duplicate", "2": "exact_duplicate", "3": "response_too_many_tokens"}
    assert dropped.set_index("id").loc["1", "detail"] == "near duplicate of 0"
    assert dropped.set_index("id").loc["3", "detail"] == "40 tokens > 30"
    assert kept["id"].tolist() == ["0", "4"]
    loose, _ = clean_frames(frame, CleanConfig(drop_near_duplicates=False, max_response_tokens=30))
    assert "1" in set(loose["id"])  # only the MinHash check removed it
    ingest = tmp_path / "ingest"
    ingest.mkdir()
    frame.to_parquet(ingest / "data.parquet")
    pd.DataFrame(columns=["file", "row", "field", "code", "reason", "raw"]).to_parquet(ingest / "quarantine.parquet")
    out = tmp_path / "clean"
    out.mkdir()
    stats = write_clean(CleanConfig(max_response_tokens=30), ingest, out)
    assert stats["dropped"] == {"near_duplicate": 1, "exact_duplicate": 1, "response_too_many_tokens": 1}
    assert stats["duplicate_ratio"] == pytest.approx(2 / 5)
    assert len(pd.read_parquet(out / "quarantine.parquet")) == 3


def test_optional_script_filter_drops_mostly_non_latin_rows(clean_frames):
    frame = _frame([{"instruction": "Translate", "response": "Bonjour à tous"},
                    {"instruction": "翻訳してください", "response": "こんにちは世界"}])
    assert len(clean_frames(frame, CleanConfig())[0]) == 2
    kept, dropped = clean_frames(frame, CleanConfig(language="latin"))
    assert kept["id"].tolist() == ["0"] and dropped["reason"].tolist() == ["other_script"]


def test_end_of_text_markers_are_stripped_from_response_ends_and_quarantined_elsewhere(clean_frames):
    frame = _frame([
        {"instruction": "Is it positive?", "response": "positive<|endoftext|>"},  # as every T0 completion ends
        {"instruction": "Say no", "response": "no <|endoftext|><|endoftext|>\n"},
        {"instruction": "Two <|endoftext|> parts", "response": "ok"},
        {"instruction": "Nothing", "response": "<|endoftext|>"},
    ])
    kept, dropped = clean_frames(frame, CleanConfig())
    assert kept["response"].tolist() == ["positive", "no"]
    assert dropped["reason"].tolist() == ["end_of_text_in_text", "empty_response"]
    assert dropped["detail"].iloc[0].startswith("instruction holds <|endoftext|>")


def test_conversation_turns_lose_their_closing_markers_and_a_marker_inside_a_turn_is_quarantined_by_turn(
        tmp_path, ingest_frames, clean_frames):
    from catalog.config import DataConfig

    eot = "<|endoftext|>"
    chats = [
        [("system", f"Be brief.{eot}"), ("human", f"Capital of France?{eot}"), ("gpt", f"Paris.{eot}"),
         ("human", f"And Italy? {eot}\n"), ("gpt", f"Rome. {eot}{eot}")],  # every turn closed, as some exports do
        [("human", "Hi"), ("gpt", "Hello"), ("human", "Split this"), ("gpt", f"one{eot}two")],
        [("human", f"Tell me{eot} more"), ("gpt", "Sure.")],
        [("human", "Say nothing"), ("gpt", eot)],
    ]
    source = tmp_path / "chats.jsonl"
    source.write_text("".join(json.dumps({"conversations": [{"from": who, "value": text} for who, text in chat]})
                              + "\n" for chat in chats))
    rows, _ = ingest_frames(DataConfig(source=str(source)))
    assert len(rows) == 4
    kept, dropped = clean_frames(rows, CleanConfig())
    assert len(kept) == 1
    turns = json.loads(kept["messages"].iloc[0])
    assert [t["content"] for t in turns] == ["Be brief.", "Capital of France?", "Paris.", "And Italy?", "Rome."]
    row = kept.iloc[0]
    assert (row["instruction"], row["response"]) == ("And Italy?", "Rome.")
    assert eot not in row["input"] and row["input"].endswith("assistant: Paris.")
    why = dict(zip(dropped["instruction"], zip(dropped["reason"], dropped["detail"], strict=True), strict=True))
    assert why["Split this"][0] == why[f"Tell me{eot} more"][0] == "end_of_text_in_text"
    assert why["Split this"][1].startswith("messages[3] (assistant turn 3) holds <|endoftext|> inside its text")
    assert why[f"Tell me{eot} more"][1].startswith("messages[0] (user turn 0) holds")
    assert why["Say nothing"] == ("empty_turn", "messages[1] (assistant turn 1) is empty after cleaning")


def test_language_filter_drops_rows_surely_in_another_language_and_keeps_unsure_ones(clean_frames):
    frame = _frame([
        {"instruction": "Give three tips for staying healthy.", "response": "Eat well, sleep enough and move daily."},
        {"instruction": "Gib drei Tipps, um gesund zu bleiben.", "response": "Iss gut, schlafe genug und bewege dich."},
        {"instruction": "Donne trois conseils pour rester en bonne santé.",
         "response": "Mange bien, dors assez et bouge chaque jour."},
        {"instruction": "Sort: 5 3 9 1", "response": "1 3 5 9"},  # no language to speak of: kept
    ])
    kept, dropped = clean_frames(frame, CleanConfig(language="en"))
    assert kept["id"].tolist() == ["0", "3"]
    assert dropped["reason"].tolist() == ["other_language"] * 2
    assert [detail.split(" ")[0] for detail in dropped["detail"]] == ["de", "fr"]
    assert len(clean_frames(frame, CleanConfig(language="en,de"))[0]) == 3
    with pytest.raises(ValueError, match="clean.language: xx is not"):
        CleanConfig(language="en,xx")


def test_chat_template_renders_all_turns_each_closed_by_the_end_of_turn_token():
    turns = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
             {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Colour?"},
             {"role": "assistant", "content": "Blue"}]
    frame = _frame([{"instruction": "Colour?", "input": "", "response": "Blue", "messages": json.dumps(turns)},
                    {"instruction": "Add", "input": "1 2", "response": "3"}])
    out = apply_template(frame, TemplateConfig(name="chat"))
    assert out["prompt"][0] == ("<|endoftext|><|system|>\nBe brief.<|endoftext|><|user|>\nHi<|endoftext|>"
                                "<|assistant|>\nHello<|endoftext|><|user|>\nColour?<|endoftext|><|assistant|>\n")
    assert out["completion"][0] == "Blue<|endoftext|>"
    assert list(out["segment_kinds"][0]) == [0, 1, 2, 1, 2, 1]  # both answers are targets
    assert out["prompt"][1] == "<|endoftext|><|user|>\nAdd\n\n1 2<|endoftext|><|assistant|>\n"


def test_user_template_from_config_and_placeholder_errors():
    cfg = load_config(overrides=["template.name=qa", "template.custom.qa.prompt=Q: {instruction} A:"])
    out = apply_template(_frame([{"instruction": "Why?", "response": "Because."}]), cfg.template)
    assert out["prompt"][0] == "Q: Why? A:" and out["completion"][0] == " Because.<|endoftext|>"
    with pytest.raises(ConfigError, match=r"lacks the placeholder\(s\) \{response\}"):
        load_config(overrides=["template.name=qa", "template.custom.qa.prompt=Do {instruction}",
                               "template.custom.qa.response=no placeholder"])
    with pytest.raises(ConfigError, match=r"unknown placeholder\(s\) \{instrction\}"):
        load_config(overrides=["template.name=qa", "template.custom.qa.prompt={instruction} {instrction}"])
    with pytest.raises(ConfigError, match="unknown template 'nope'"):
        load_config(overrides=["template.name=nope"])


def _templated(tmp_path, n, completion=" ok<|endoftext|>"):
    rows = [{"id": f"r{i}", "split": ["train", "train", "train", "val", "test"][i % 5], "category": "c",
             "prompt": f"<|endoftext|>Instruction: item {i}\nResponse:", "completion": completion} for i in range(n)]
    folder = tmp_path / "template"
    folder.mkdir()
    pd.DataFrame(rows).to_parquet(folder / "data.parquet")
    return folder


def test_token_counts_are_untouched_by_an_earlier_truncating_tokenizer_call_in_the_same_process():
    from tasks.clean import token_counts
    from tasks.tokenize import encode_flat

    text = "one two three four five six seven eight"
    before = token_counts([text])
    # what evaluate's batched generation does; transformers leaves these settings on its Rust backend
    gpt2_tokenizer()([text, "a"], padding=True, truncation=True, max_length=2)
    assert token_counts([text]) == before == [8]
    assert encode_flat([text])[1].tolist() == [8]


def test_packing_fills_blocks_and_keeps_example_boundaries(tmp_path):
    templated = _templated(tmp_path, 50)
    out = tmp_path / "tokenize"
    out.mkdir()
    stats = write_tokenize(TokenizeConfig(max_length=64, batch_size=16, packing=True), templated, out)
    assert stats["passed"], stats["failure"]
    table = pq.read_table(out / "data.parquet").to_pandas()
    train, held_out = table[table["split"] == "train"], table[table["split"] != "train"]
    assert (held_out["n_examples"] == 1).all() and len(held_out) == 20  # evaluation rows stay one per row
    assert train["n_examples"].sum() == stats["packed_examples"] == 30
    assert len(train) < 30 and (train["length"] <= 64).all()
    tokenizer = gpt2_tokenizer()
    block = train.iloc[0]
    starts = [i for i, p in enumerate(block["position_ids"]) if p == 0]
    assert len(starts) == block["n_examples"] > 1
    for start in starts:  # every example starts with BOS, masked out: no target crosses a boundary
        assert block["input_ids"][start] == tokenizer.eos_token_id and block["labels"][start] == IGNORE_INDEX
    assert stats["packing_efficiency"] > 0.8
    assert stats["packing_efficiency"] == pytest.approx(train["length"].sum() / (len(train) * 64))
    one_batch = tmp_path / "one-batch"
    one_batch.mkdir()
    write_tokenize(TokenizeConfig(max_length=64, batch_size=1000, packing=True), templated, one_batch)
    # blocks left open at a batch's end carry into the next: the blocks do not depend on the batch size
    whole = pq.read_table(one_batch / "data.parquet").to_pandas()
    assert whole[whole["split"] == "train"].reset_index(drop=True).equals(train.reset_index(drop=True))


def test_tokenize_gate_blocks_rows_without_target_tokens(tmp_path):
    templated = _templated(tmp_path, 10, completion="")
    out = tmp_path / "tokenize"
    out.mkdir()
    stats = write_tokenize(TokenizeConfig(max_length=64), templated, out)
    assert not stats["passed"] and stats["zero_target_rows"] == 10
    assert "expect_column_values_to_be_between on 'n_target'" in stats["failure"]
    assert "\n" not in stats["failure"]
    assert (out / "data_docs" / "index.html").is_file()
    (out / MANIFEST).write_text(json.dumps(stats))  # the fields of the manifest the step writes around these stats
    ref = ArtifactRef(step="tokenize", key="0" * 64, uri=str(out), rows=stats["rows"], sha256="0" * 64)
    with pytest.raises(TokenizeGateFailed) as blocked:
        raise_if_blocked(ref, TokenizeGateFailed, "tokenized data failed its checks")
    assert str(blocked.value) == f"{stats['failure']}. Data Docs: {(out / 'data_docs' / 'index.html').as_uri()}"
