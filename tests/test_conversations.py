"""Conversations end to end: every assistant turn a target, cuts at turn boundaries, broken ones quarantined,
and a published model folder that transformers alone prompts and stops."""

from __future__ import annotations

import json

import pyarrow.compute as pc
import pytest

from catalog import layout
from catalog.config import TemplateConfig, TokenizeConfig, load_config
from commands.running import run_pipeline
from tests.conftest import tiny_overrides
from tests.conversation_files import write_messages, write_sharegpt
from toolkit.chat_template import CHAT_TEMPLATE, render, segments
from toolkit.conversations import ANSWER, fit_conversation
from toolkit.formats import canonical_rows
from toolkit.tokenizer import IGNORE_INDEX, gpt2_encoder, gpt2_tokenizer

THREE_TURNS = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Capital of France?"},
               {"role": "assistant", "content": "Paris."}, {"role": "user", "content": "And of Italy?"},
               {"role": "assistant", "content": "Rome."}, {"role": "user", "content": "And of Spain?"}]


def _assistant_tokens(chats) -> int:
    encoder = gpt2_encoder()
    return sum(len(encoder.encode(t["content"], add_special_tokens=False).ids)
               for chat in chats for t in chat if t["role"] == "assistant")


def _conversation_run(tmp_path, source, until):
    overrides = tiny_overrides(tmp_path / "artifacts", **{"data.source": str(source), "template.name": "chat",
                                                          "tokenize.max_length": 1024, "model.name": "scratch:tiny"})
    summary = run_pipeline(load_config(overrides=overrides), until)
    assert "error" not in summary, summary.get("error")
    return {step: info["artifact"] for step, info in summary["steps"].items()}


def _target_tokens(tokenized) -> tuple[int, int]:
    """Give back (target tokens, of which answer text: not the end-of-turn token) of a tokenize artifact."""
    labels = pc.list_flatten(layout.read_data(tokenized, ["labels"]).column("labels")).to_numpy()
    targets = labels[labels != IGNORE_INDEX]
    return len(targets), int((targets != gpt2_tokenizer().eos_token_id).sum())


@pytest.mark.usefixtures("prefect_api")
@pytest.mark.parametrize("writer", [write_sharegpt, write_messages], ids=["sharegpt", "messages"])
def test_tokenize_artifact_targets_at_least_90_percent_of_all_assistant_tokens_in_the_file(tmp_path, writer):
    source = tmp_path / "chats.jsonl"
    chats = writer(source)
    artifacts = _conversation_run(tmp_path, source, "tokenize")
    targets, answer_text = _target_tokens(artifacts["tokenize"])
    file_tokens = _assistant_tokens(chats)
    print(f"{writer.__name__}: {len(chats)} conversations, {file_tokens} assistant tokens in the file, "
          f"{targets} target tokens ({answer_text} without end-of-turn): {answer_text / file_tokens:.1%}")
    assert answer_text >= 0.9 * file_tokens
    manifest = layout.read_manifest(artifacts["tokenize"])
    assert manifest["target_tokens"] == targets and manifest["target_tokens_lost_share"] < 0.1
    if writer is write_sharegpt:  # its long-article conversations do not fit 1,024 tokens: split into windows
        assert manifest["conversation_windows"] > manifest["conversations_cut"] > 0
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

        with get_client(sync_client=True) as client:
            reports = client.read_artifacts(artifact_filter=ArtifactFilter(
                key=ArtifactFilterKey(any_=["itune-tokenize-report"])))
        shown = f"| conversations cut at turn boundaries (split) | {manifest['conversations_cut']}: into " \
                f"{manifest['conversation_windows']} windows"
        assert any(shown in str(report.data) for report in reports)


@pytest.mark.usefixtures("prefect_api")
def test_published_model_folder_renders_three_turns_and_stops_with_transformers_alone(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = tmp_path / "chats.jsonl"
    write_sharegpt(source)
    folder = layout.model_dir(_conversation_run(tmp_path, source, "finetune")["finetune"])
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    prompt = tokenizer.apply_chat_template(THREE_TURNS, add_generation_prompt=True, tokenize=False)
    assert prompt == render(THREE_TURNS, CHAT_TEMPLATE, add_generation_prompt=True)[0]  # itune's own prompt
    assert prompt.endswith("<|user|>\nAnd of Spain?<|endoftext|><|assistant|>\n")
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id == 50256
    ids = tokenizer.apply_chat_template(THREE_TURNS, add_generation_prompt=True, return_tensors="pt",
                                        return_dict=True)
    output = model.generate(**ids, max_new_tokens=5)
    assert output.shape[1] > ids["input_ids"].shape[1]


def test_every_assistant_turn_and_its_end_of_turn_token_is_a_target_and_the_rest_is_masked():
    turns = THREE_TURNS[:5]
    pieces, kinds = segments(turns, CHAT_TEMPLATE, "all_assistant")
    assert [p for p, k in zip(pieces, kinds, strict=True) if k == ANSWER] == ["Paris.<|endoftext|>",
                                                                              "Rome.<|endoftext|>"]
    encoder = gpt2_encoder()
    ids = [encoder.encode(p, add_special_tokens=False).ids for p in pieces]
    (input_ids, labels, truncated), = fit_conversation(ids, kinds, 1024, "split")[0]
    assert input_ids == encoder.encode("".join(pieces), add_special_tokens=False).ids  # same as one whole text
    answer = gpt2_tokenizer().decode([t for t in labels if t != IGNORE_INDEX])
    assert answer == "Paris.<|endoftext|>Rome.<|endoftext|>" and not truncated
    last_only = segments(turns, CHAT_TEMPLATE, "last_assistant")[1]
    assert [k for k in last_only if k != 1] == [0, 3, 2]  # header, the first answer masked, the last a target


def test_long_conversation_is_cut_at_turn_boundaries_split_keeps_every_answer_truncate_left_keeps_the_system():
    pieces = [[1] * 10, [2] * 30, [3] * 20, [2] * 30, [3] * 20, [2] * 30, [3] * 20, []]
    kinds = [0, 1, 2, 1, 2, 1, 2, 1]
    split, lost, dropped = fit_conversation(pieces, kinds, 70, "split")
    assert lost == dropped == 0 and len(split) == 3 and all(ids[:10] == [1] * 10 for ids, _, _ in split)
    assert all(sum(label != IGNORE_INDEX for label in labels) == 20 for _, labels, _ in split)
    left, lost, dropped = fit_conversation(pieces, kinds, 70, "truncate_left")
    assert lost == 40 and dropped == 2 and len(left) == 1 and left[0][0] == [1] * 10 + [2] * 30 + [3] * 20


def _chat(exchanges: int, filler: int) -> str:
    turns = []
    for number in range(exchanges):
        turns += [{"role": "user", "content": f"Question {number}: " + "tell me more about the river " * filler},
                  {"role": "assistant", "content": f"Answer {number} is short."}]
    return json.dumps(turns)


@pytest.mark.parametrize("mode, windows, dropped", [("split", 3, 0), ("truncate_left", 1, 2)])
def test_tokenize_manifest_and_report_count_the_conversations_cut_their_windows_and_dropped_turns(
        tmp_path, mode, windows, dropped):
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq

    from tasks.template import TEMPLATED_SCHEMA, apply_template
    from tasks.tokenize import write_tokenize
    from toolkit.token_stats import report_markdown

    # one conversation of three 54-token exchanges (no two fit in 64 tokens), one that fits, one instruction row
    frame = pd.DataFrame([{"id": name, "category": "c", "instruction": "q", "input": "", "response": "a",
                           "messages": messages} for name, messages in
                          (("long", _chat(3, 5)), ("short", _chat(2, 0)), ("single", ""))])
    templated, out = tmp_path / "template", tmp_path / "tokenize"
    templated.mkdir()
    out.mkdir()
    pq.write_table(pa.Table.from_pandas(apply_template(frame, TemplateConfig(name="chat")), TEMPLATED_SCHEMA,
                                        preserve_index=False), layout.data_path(templated))
    stats = write_tokenize(TokenizeConfig(max_length=64, long_conversations=mode, packing=False), templated, out)
    assert (stats["conversations_cut"], stats["conversation_windows"], stats["assistant_turns_dropped"]) == (
        1, windows, dropped)
    ids = layout.read_data(out, ["id"]).column("id").to_pylist()
    assert sorted(ids) == sorted(["long", "short", "single"] + [f"long#{n}" for n in range(1, windows)])
    report = report_markdown(stats)
    assert f"| conversations cut at turn boundaries ({mode}) | 1: into {windows} windows, {dropped} assistant " \
           "turns dropped |" in report


BROKEN = {
    "roles_out_of_order": ([{"from": "gpt", "value": "Hello"}, {"from": "human", "value": "Hi"}], "[0]"),
    "two_user_turns": ([{"from": "human", "value": "Hi"}, {"from": "human", "value": "Hey"},
                        {"from": "gpt", "value": "Yo"}], "[1]"),
    "empty_assistant_turn": ([{"from": "human", "value": "Hi"}, {"from": "gpt", "value": " "}], "[1]"),
    "unknown_role": ([{"from": "human", "value": "Hi"}, {"from": "narrator", "value": "Later"}], "[1]"),
    "tool_turn": ([{"from": "human", "value": "Weather?"}, {"from": "function", "value": "{}"},
                   {"from": "gpt", "value": "Sunny"}], "[1]"),
    "no_assistant_turn": ([{"from": "system", "value": "Be kind"}, {"from": "human", "value": "Hi"}], ""),
}


def test_broken_conversations_are_quarantined_with_reason_and_turn_index_beside_real_ones(tmp_path):
    write_sharegpt(tmp_path / "real.jsonl")
    real = json.loads((tmp_path / "real.jsonl").read_text().splitlines()[0])
    records = [real] + [{"conversations": turns} for turns, _ in BROKEN.values()]
    quarantine: list[dict] = []
    rows = list(canonical_rows("chats.jsonl", iter([(n, r, "", "") for n, r in enumerate(records, 1)]), None, {},
                               10**6, quarantine))
    assert len(rows) == 1 and len(json.loads(rows[0]["messages"])) == 6
    codes = {q["code"]: q["field"] for q in quarantine}
    expected = {("roles_out_of_order" if name == "two_user_turns" else name) for name in BROKEN}
    assert set(codes) == expected
    assert codes["tool_turn"] == "conversations[1]" and codes["empty_assistant_turn"] == "conversations[1]"
    assert all("turn" in q["reason"] or q["code"] == "no_assistant_turn" for q in quarantine)


def test_instruction_row_renders_as_a_one_turn_conversation_of_the_same_chat_template():
    import pandas as pd

    from tasks.template import apply_template

    frame = pd.DataFrame([{"id": "a", "category": "c", "instruction": "Add", "input": "1 2", "response": "3",
                           "messages": ""}])
    row = apply_template(frame, TemplateConfig(name="chat")).iloc[0]
    one_turn = [{"role": "user", "content": "Add\n\n1 2"}]
    assert row["prompt"] == render(one_turn, CHAT_TEMPLATE, add_generation_prompt=True)[0]
    assert row["completion"] == "3<|endoftext|>"


def test_user_chat_template_must_mark_answers_and_long_conversation_setting_is_checked():
    with pytest.raises(ValueError, match="generation"):
        TemplateConfig(name="chat", chat_template="{% for m in messages %}{{ m['content'] }}{% endfor %}")
    with pytest.raises(ValueError):
        TokenizeConfig(long_conversations="middle")
