"""`auto` precision and attention: what fine-tune picks on which machine, and what the user can pin."""

from catalog.training_sections import ModelConfig, TrainConfig
from toolkit.compute_recipe import EAGER_MAX_LENGTH, resolved_attention, resolved_precision


def test_auto_attention_is_eager_only_for_short_bf16_rows_on_cpu():
    auto = ModelConfig()
    assert resolved_attention(auto, "bf16", use_gpu=False, longest_row=128) == "eager"
    assert resolved_attention(auto, "bf16", use_gpu=False, longest_row=EAGER_MAX_LENGTH + 1) == "sdpa"
    assert resolved_attention(auto, "fp32", use_gpu=False, longest_row=128) == "sdpa"
    assert resolved_attention(auto, "bf16", use_gpu=True, longest_row=128) == "sdpa"


def test_a_pinned_attention_or_precision_is_kept():
    assert resolved_attention(ModelConfig(attn_implementation="sdpa"), "bf16", False, 32) == "sdpa"
    assert resolved_precision(TrainConfig(precision="fp32"), use_gpu=False) == "fp32"
