"""Packed examples keep to themselves: inside a packed block each example sees only its own tokens."""

import pytest
import torch

from toolkit.modeling import load_base_model, pad_batch, response_token_loss
from toolkit.tokenizer import IGNORE_INDEX

FIRST = [50256, 40, 588, 262, 3290, 13]
SECOND = [50256, 818, 257, 640, 5041, 25, 1450, 50256]


def _example(ids):
    return {"input_ids": ids, "labels": [IGNORE_INDEX] * 3 + ids[3:], "position_ids": list(range(len(ids)))}


def _packed(*examples):
    return {key: sum((example[key] for example in examples), []) for key in ("input_ids", "labels", "position_ids")}


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_an_example_inside_a_packed_block_has_the_logits_it_has_alone(attention):
    model = load_base_model("scratch:tiny", 0, attn_implementation=attention).eval()
    alone = pad_batch([_example(SECOND)], pad_token_id=50256)
    packed = pad_batch([_packed(_example(FIRST), _example(SECOND))], pad_token_id=50256)
    assert "attention_mask" not in packed  # the boundaries come from the restarting position ids
    with torch.no_grad():
        by_itself = model(**{k: v for k, v in alone.items() if k != "labels"}, use_cache=False).logits[0]
        in_block = model(**{k: v for k, v in packed.items() if k != "labels"}, use_cache=False).logits[0]
        leaky = model(input_ids=packed["input_ids"], attention_mask=torch.ones_like(packed["input_ids"]),
                      position_ids=packed["position_ids"], use_cache=False).logits[0]
    second = slice(len(FIRST), len(FIRST) + len(SECOND))
    assert torch.allclose(in_block[second], by_itself, atol=1e-5)
    # the old all-ones mask let the second example attend to the first: the test can tell the difference
    assert not torch.allclose(leaky[second], by_itself, atol=1e-3)


def test_the_loss_of_a_packed_block_is_the_loss_of_its_examples_alone():
    model = load_base_model("scratch:tiny", 0).eval()
    first, second = _example(FIRST), _example(SECOND)
    with torch.no_grad():
        packed = response_token_loss(model, pad_batch([_packed(first, second)], 50256), reduction="sum")
        apart = sum(response_token_loss(model, pad_batch([row], 50256), reduction="sum") for row in (first, second))
    assert torch.allclose(packed, apart, atol=1e-4)


def test_right_padding_of_packed_rows_changes_no_real_token():
    model = load_base_model("scratch:tiny", 0).eval()
    short, full = _example(FIRST), _packed(_example(FIRST), _example(SECOND))
    with torch.no_grad():
        batch = pad_batch([short, full], 50256)
        padded = model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False).logits[0, :len(FIRST)]
        alone = pad_batch([short], 50256)
        single = model(**{k: v for k, v in alone.items() if k != "labels"}, use_cache=False).logits[0]
    assert torch.allclose(padded, single, atol=1e-5)


def _templated(folder, completions):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from catalog import layout

    folder.mkdir()
    rows = [{"split": "train", "prompt": "Instruction: answer.\nResponse:", "completion": text} for text in completions]
    pq.write_table(pa.Table.from_pylist(rows), layout.data_path(folder))
    return folder


def test_auto_packing_packs_rows_of_varied_length_and_leaves_even_ones_alone(tmp_path):
    from catalog.sections import TokenizeConfig
    from tasks.tokenize import decide_packing

    config = TokenizeConfig(max_length=512)
    varied = _templated(tmp_path / "varied", ["short"] * 90 + ["long " * 400] * 10)
    even = _templated(tmp_path / "even", [f"answer number {i}" for i in range(100)])
    assert decide_packing(config, varied)[0] is True
    packed, reason = decide_packing(config, even)
    assert packed is False and "not packed" in reason
    assert decide_packing(TokenizeConfig(packing=False), varied) == (False, "tokenize.packing=false")
