"""evaluate prompts each held-out row through the chat template the model folder carries: on built-in and on
conversation data those prompts are the template step's, and a folder whose template was edited prompts otherwise."""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pytest

from catalog import layout
from catalog.config import DataConfig, TemplateConfig, UserTemplate, load_config
from commands.running import run_pipeline
from tasks.evaluate import folder_prompts, write_evaluate
from tasks.template import apply_template, template_parts
from tests.conftest import tiny_overrides
from tests.conversation_files import write_messages, write_sharegpt
from toolkit.chat_template import chat_template_for, save_model_folder_template, scored_turns

CUSTOM = {"qa": UserTemplate(prompt="<|endoftext|>Q: {instruction}\nA:",
                             prompt_with_input="<|endoftext|>Q: {instruction}\nGiven: {input}\nA:",
                             response=" {response}<|endoftext|>")}
CONFIGS = [TemplateConfig(name="paper"), TemplateConfig(name="alpaca"), TemplateConfig(name="chat"),
           TemplateConfig(name="qa", custom=CUSTOM)]


@pytest.fixture(scope="module")
def data(tmp_path_factory, ingest_frames_module):
    """Give back {name: canonical rows} for the built-in tasks and a ShareGPT and a `messages` file."""
    folder = tmp_path_factory.mktemp("sources")
    write_sharegpt(folder / "sharegpt.jsonl")
    write_messages(folder / "messages.jsonl")
    return {"builtin": ingest_frames_module(DataConfig(source="builtin:tasks", builtin_examples=120)),
            "sharegpt": ingest_frames_module(DataConfig(source=str(folder / "sharegpt.jsonl"))),
            "messages": ingest_frames_module(DataConfig(source=str(folder / "messages.jsonl")))}


@pytest.fixture(scope="module")
def ingest_frames_module(tmp_path_factory):
    from tasks.ingest import write_ingest

    def run(config: DataConfig) -> pd.DataFrame:
        out = tmp_path_factory.mktemp("ingest")
        write_ingest(config, out)
        return layout.read_data(out).to_pandas()

    return run


@pytest.mark.parametrize("config", CONFIGS, ids=[c.name for c in CONFIGS])
@pytest.mark.parametrize("source", ["builtin", "sharegpt", "messages"])
def test_folder_template_renders_the_template_steps_prompts_on_builtin_and_conversation_data(tmp_path, data,
                                                                                              source, config):
    from transformers import AutoTokenizer

    rows = apply_template(data[source], config)
    folder = tmp_path / "model"
    save_model_folder_template(folder, chat_template_for(config, template_parts(config)))
    assert (folder / "chat_template.jinja").is_file()
    assert folder_prompts(folder, rows) == rows["prompt"].tolist()
    if source != "builtin":
        assert (rows["messages"] != "").all()
    # transformers alone, from the folder, gives the same text
    tokenizer = AutoTokenizer.from_pretrained(folder)
    for row in rows.head(5).itertuples():
        turns = scored_turns(tokenizer.chat_template, row.messages, row.instruction, row.input)
        assert tokenizer.apply_chat_template(turns, add_generation_prompt=True, tokenize=False) == row.prompt


def test_conversation_prompt_holds_every_turn_before_the_scored_answer(data):
    rows = apply_template(data["messages"], TemplateConfig(name="chat"))
    row = rows[rows["messages"].str.contains('"system"')].iloc[0]
    prompt = _chat_prompt(row)
    assert prompt.startswith("<|endoftext|><|system|>\nYou are a helpful assistant.<|endoftext|><|user|>\n")
    assert prompt.count("<|assistant|>\n") == 3 and prompt.endswith("<|endoftext|><|assistant|>\n")
    assert row["response"] not in prompt


def _chat_prompt(row: pd.Series) -> str:
    """Give back a templated row's generation prompt under the built-in chat template."""
    from toolkit.chat_template import CHAT_TEMPLATE, generation_prompt

    return generation_prompt(scored_turns(CHAT_TEMPLATE, row["messages"], row["instruction"], row["input"]),
                             CHAT_TEMPLATE)


def test_folder_without_a_chat_template_is_a_one_line_error(tmp_path, data):
    rows = apply_template(data["builtin"], TemplateConfig())
    with pytest.raises(ValueError, match="carries no chat template") as caught:
        folder_prompts(tmp_path, rows)
    assert "\n" not in str(caught.value)


@pytest.mark.usefixtures("prefect_api")
def test_evaluate_prompts_through_the_model_folder_and_an_edited_folder_template_changes_them(tmp_path):
    source = tmp_path / "chats.jsonl"
    write_messages(source)  # short conversations, some with a system turn: generation stays quick
    overrides = tiny_overrides(tmp_path / "artifacts", **{"data.source": str(source), "template.name": "chat",
                                                          "tokenize.max_length": 1024})
    cfg = load_config(overrides=overrides)
    summary = run_pipeline(cfg, "evaluate")
    assert "error" not in summary, summary.get("error")
    artifacts = {step: info["artifact"] for step, info in summary["steps"].items()}
    templated = layout.read_data(artifacts["template"]).to_pandas()
    expected = templated[templated["split"] == "test"].set_index("id")["prompt"]
    samples = pd.read_parquet(Path(artifacts["evaluate"]) / layout.SAMPLES)
    assert len(samples) and samples["prompt"].tolist() == expected.head(len(samples)).tolist()

    edited = tmp_path / "edited-finetune"
    shutil.copytree(artifacts["finetune"], edited)
    jinja = layout.model_dir(edited) / "chat_template.jinja"
    jinja.write_text(jinja.read_text(encoding="utf-8").replace("<|assistant|>", "<|bot|>"), encoding="utf-8")
    again, _ = write_evaluate(cfg.eval, artifacts["template"], artifacts["tokenize"], edited)
    assert again["prompt"].str.endswith("<|bot|>\n").all()
    assert not again["prompt"].str.contains("<|assistant|>", regex=False).any()
    assert again["response"].tolist() == samples["response"].tolist()  # the same rows, prompted otherwise
