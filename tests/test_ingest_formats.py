"""Ingest reads every supported format and container into the same canonical rows."""

import gzip
import json

import pandas as pd
import pytest

from catalog.config import DataConfig, SourceSpec
from tasks.ingest import source_fingerprint

ALPACA = [{"instruction": "Add", "input": "1 2", "output": "3"}, {"instruction": "Greet", "input": "", "output": "hi"}]
CHAT = [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"},
        {"from": "human", "value": "Name a colour"}, {"from": "gpt", "value": "Blue"}]


def _rows(tmp_path, ingest_frames, name, records, **config):
    path = tmp_path / name
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    frame, quarantine = ingest_frames(DataConfig(source=str(path), **config))
    assert quarantine.empty, quarantine.to_dict("records")
    return frame


@pytest.mark.parametrize(("records", "expected"), [
    (ALPACA, ("Add", "1 2", "3")),
    ([{"instruction": "Sum", "context": "1 2", "response": "3", "category": "math"}], ("Sum", "1 2", "3")),
    ([{"prompt": "Capital of France?", "completion": " Paris"}], ("Capital of France?", "", " Paris")),
    ([{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}],
     ("Hi", "", "Hello")),
], ids=["alpaca", "dolly", "prompt_completion", "openai_messages"])
def test_formats_are_detected_and_mapped_to_canonical_fields(tmp_path, records, expected, ingest_frames):
    row = _rows(tmp_path, ingest_frames, "data.jsonl", records).iloc[0]
    assert (row["instruction"], row["input"], row["response"]) == expected
    assert len(row["id"]) == 16


def test_self_instruct_gives_one_row_per_instance(tmp_path, ingest_frames):
    task = {"name": "math", "instruction": "Add", "instances": [{"input": "1 2", "output": "3"},
                                                                {"input": "2 2", "output": "4"}]}
    frame = _rows(tmp_path, ingest_frames, "seed.jsonl", [task])
    assert frame[["input", "response", "category"]].values.tolist() == [["1 2", "3", "math"], ["2 2", "4", "math"]]


def test_sharegpt_multi_turn_keeps_the_conversation_and_targets_the_last_answer(tmp_path, ingest_frames):
    row = _rows(tmp_path, ingest_frames, "chat.jsonl", [{"conversations": CHAT}]).iloc[0]
    assert row["instruction"] == "Name a colour" and row["response"] == "Blue"
    turns = json.loads(row["messages"])
    assert [t["role"] for t in turns] == ["system", "user", "assistant", "user", "assistant"]
    assert "user: Hi" in row["input"] and "assistant: Hello" in row["input"]


def test_column_mapping_and_format_override(tmp_path, ingest_frames):
    frame = _rows(tmp_path, ingest_frames, "qa.jsonl", [{"question": "Why?", "answer": "Because.", "topic": "t"}],
                  columns={"instruction": "question", "response": "answer", "category": "topic"})
    assert frame[["instruction", "response", "category"]].values.tolist() == [["Why?", "Because.", "t"]]
    # a file that auto-detects as Dolly (instruction+response) read as prompt/completion when told so
    both = {"prompt": "P", "completion": "C", "instruction": "I", "response": "R"}
    forced = _rows(tmp_path, ingest_frames, "pc.jsonl", [both], format="prompt_completion")
    assert forced[["instruction", "response"]].values.tolist() == [["P", "C"]]


def test_containers_json_csv_parquet_gzip_folder_and_glob_agree(tmp_path, ingest_frames):
    folder = tmp_path / "d"
    folder.mkdir()
    (folder / "a.json").write_text(json.dumps(ALPACA))
    pd.DataFrame(ALPACA).to_csv(folder / "b.csv", index=False)
    pd.DataFrame(ALPACA).to_parquet(folder / "c.parquet")
    (folder / "d.jsonl.gz").write_bytes(gzip.compress("\n".join(json.dumps(r) for r in ALPACA).encode()))
    texts = set()
    for source in ["a.json", "b.csv", "c.parquet", "d.jsonl.gz"]:
        frame, quarantine = ingest_frames(DataConfig(source=str(folder / source)))
        assert quarantine.empty and len(frame) == 2
        texts.add(tuple(frame["id"]))
    assert len(texts) == 1  # same content, same ids, whatever the container
    everything, _ = ingest_frames(DataConfig(source=str(folder)))
    globbed, _ = ingest_frames(DataConfig(source=str(folder / "*.*")))
    assert len(everything) == len(globbed) == 8
    assert everything["source"].str.contains("b.csv:2").any()


def test_datasets_save_to_disk_and_hf_local_folder_take_the_datasets_path(tmp_path, ingest_frames):
    import datasets

    saved = tmp_path / "saved"
    datasets.Dataset.from_list(ALPACA).save_to_disk(str(saved))
    frame, quarantine = ingest_frames(DataConfig(source=str(saved)))
    assert quarantine.empty and frame["response"].tolist() == ["3", "hi"]
    hub_like = tmp_path / "hub_like"
    hub_like.mkdir()
    (hub_like / "train.jsonl").write_text("\n".join(json.dumps(r) for r in ALPACA))
    frame, _ = ingest_frames(DataConfig(source=f"hf:{hub_like}"))  # load_dataset, as for a Hub id
    assert frame["response"].tolist() == ["3", "hi"]
    before = source_fingerprint({"source": f"hf:{hub_like}"})
    (hub_like / "train.jsonl").write_text(json.dumps(ALPACA[0]))
    assert source_fingerprint({"source": f"hf:{hub_like}"}) != before


def test_several_sources_with_caps_and_weights(tmp_path, shared_data, ingest_frames):
    t0 = shared_data / "self-instruct" / "t0_train_50k"
    seed = shared_data / "self-instruct" / "seed_tasks.jsonl"
    glob = str(t0 / "glue_mrpc_*.jsonl")
    config = DataConfig(sources=[SourceSpec(source=str(seed), max_rows=50),
                                 SourceSpec(source=glob, weight=0.5)])
    frame, _ = ingest_frames(config)
    full, _ = ingest_frames(DataConfig(source=glob))
    from_t0 = frame[frame["source"].str.contains("t0_train_50k")]
    assert (frame["source"].str.contains("seed_tasks")).sum() == 50
    assert 0.4 * len(full) < len(from_t0) < 0.6 * len(full)
    again, _ = ingest_frames(config)
    assert again["id"].tolist() == frame["id"].tolist()  # the weighted sample is stable
    assert set(from_t0["id"]) <= set(full["id"])
