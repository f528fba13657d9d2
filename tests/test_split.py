"""The template step's split keeps every item on one side: built-in tasks, T0's passages, named groups."""

import json
from collections import Counter

import pandas as pd
import pytest

from catalog.config import TemplateConfig
from tasks.template import apply_template
from toolkit import builtin_tasks
from toolkit.split_groups import passage_sentences


def _builtin_frame(n: int) -> pd.DataFrame:
    rows = [{**row, "id": str(i), "source": f"builtin:tasks:{i}", "messages": ""}
            for i, row in enumerate(builtin_tasks.generate(n, 0), start=1)]
    return pd.DataFrame(rows)


def _item(frame: pd.DataFrame) -> pd.Series:
    def norm(text: str) -> str:
        return " ".join(text.lower().split())

    return frame["input"].map(norm) + " -> " + frame["response"].map(norm)


def test_builtin_split_never_puts_an_item_on_both_sides():
    templated = apply_template(_builtin_frame(4000), TemplateConfig())
    items = _item(templated)
    train = set(items[templated["split"] == "train"])
    held_out = items[templated["split"] != "train"]
    assert len(held_out) > 300
    assert not set(held_out) & train
    # the same item is asked in several phrasings: all of them stay together
    assert items.duplicated(keep=False).sum() > 100


def test_new_rows_never_move_old_ones():
    frame = _builtin_frame(3000)
    before = apply_template(frame.head(1000), TemplateConfig())
    after = apply_template(frame, TemplateConfig())
    assert after.head(1000)["split"].tolist() == before["split"].tolist()


def test_split_by_a_named_column_keeps_each_conversation_together():
    frame = pd.DataFrame({"id": [str(i) for i in range(400)], "instruction": [f"Turn {i}" for i in range(400)],
                          "input": "", "response": "ok", "source": "s", "category": "",
                          "conversation": [i // 4 for i in range(400)]})
    templated = apply_template(frame, TemplateConfig(split_by="conversation"))
    assert templated.groupby(frame["conversation"])["split"].nunique().max() == 1
    assert set(templated["split"]) == {"train", "val", "test"}
    with pytest.raises(ValueError, match="no column 'thread'"):
        apply_template(frame, TemplateConfig(split_by="thread"))


def test_t0_passage_asked_under_many_templates_stays_on_one_side(shared_data):
    rows = []
    for file in sorted((shared_data / "self-instruct" / "t0_train_50k").glob("*.jsonl")):
        for line in file.open(encoding="utf-8"):
            record = json.loads(line)
            rows.append({"instruction": record["prompt"], "input": "", "response": record["completion"],
                         "source": f"{file.stem}:{len(rows)}", "category": file.stem})
    frame = pd.DataFrame(rows).assign(id=lambda f: f.index.astype(str))
    split = apply_template(frame, TemplateConfig())["split"]
    shares = split.value_counts(normalize=True)
    assert 0.03 < shares["val"] < 0.08 and 0.03 < shares["test"] < 0.08
    # A passage shows as its long sentences (20+ words). A template's own wording can be that long too: it is
    # a sentence found in most rows of one template's file, and says nothing of the passage.
    sentences = frame["instruction"].map(passage_sentences)
    template_text = {sentence for _, group in frame.assign(sentences=sentences).groupby("category")["sentences"]
                     for sentence, rows in Counter(s for found in group for s in found).items()
                     if rows > len(group) / 2 and len(group) > 1}
    assert any("condense the article down" in text for text in template_text)  # one such 20-word instruction
    passages = sentences.map(lambda found: found - template_text)
    train = set().union(*passages[split == "train"])
    held_out = passages[split != "train"]
    assert held_out.map(bool).sum() > 1000  # most held-out rows carry a passage to check
    leaked = [i for i in held_out.index if held_out[i] & train]
    assert leaked == []  # none of a held-out row's passage sentences occurs in a train row, whatever wraps it


def test_renderings_that_share_a_passage_only_through_others_stay_together_and_new_rows_join_old_groups():
    words = [f"w{n}" for n in range(400)]

    def sentence(passage: int, part: int) -> str:  # 21 words: a passage sentence, unique to (passage, part)
        return " ".join(words[(passage * 7 + part * 13 + k) % 400] for k in range(20)) + f" p{passage}x{part}."

    rows = []
    for passage in range(300):
        first, second, third = (sentence(passage, part) for part in range(3))
        # Three renderings: the first and last share no sentence, only the middle one links them.
        for text in (f"Read: {first} {second}", f"{second} {third} Question?", f"Summarise. {third}"):
            rows.append({"instruction": text, "input": "", "response": "r", "category": "c", "source": "f"})
    frame = pd.DataFrame(rows).assign(id=lambda f: f.index.astype(str))
    split = apply_template(frame, TemplateConfig())["split"]
    assert set(split) == {"train", "val", "test"}
    assert (split.groupby(frame.index // 3).nunique() == 1).all()

    later = pd.concat([frame, frame.iloc[::3].assign(instruction=lambda f: "Again: " + f["instruction"])],
                      ignore_index=True).assign(id=lambda f: f.index.astype(str))
    grown = apply_template(later, TemplateConfig())["split"]
    assert grown[:len(frame)].tolist() == split.tolist()  # old rows kept their side
    assert grown[len(frame):].tolist() == split.iloc[::3].tolist()  # new renderings joined their passage
