"""What `auto` means on this machine: the precision and the attention kernel fine-tune runs with.

Both are measured choices, not guesses; the fine-tune manifest records what was used.
"""

from __future__ import annotations

from catalog.training_sections import ModelConfig, TrainConfig

# On a 2-core AVX512-BF16 CPU, a tiny GPT-2's forward+backward in bf16 autocast (batch x length):
# eager attention 0.69x SDPA's time at 32 x 32, 0.65x at 16 x 128, 1.04x at 4 x 512 (torch 2.13's
# CPU flash kernel is slow backwards in bf16 at short lengths); in fp32 the two are within 10% up to 128.
EAGER_MAX_LENGTH = 256


def cpu_has_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX): where bf16 autocast pays."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            flags = next((line for line in handle if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolved_precision(train_config: TrainConfig, use_gpu: bool) -> str:
    """Give back the precision training runs in: `train.precision`, with `auto` decided for this machine."""
    import torch

    if train_config.precision != "auto":
        return train_config.precision
    if use_gpu:
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    # Measured on a 2-core AVX512-BF16 CPU: the 50,257-wide LM head's products run 3.7x faster in bf16
    # and a tiny GPT-2's optimizer step 1.5x faster; without native bf16, autocast only adds casts.
    return "bf16" if cpu_has_bf16() else "fp32"


def resolved_attention(model_config: ModelConfig, precision: str, use_gpu: bool, longest_row: int) -> str:
    """Give back the attention kernel: `model.attn_implementation`, with `auto` decided for this run."""
    if model_config.attn_implementation != "auto":
        return model_config.attn_implementation
    short_bf16_on_cpu = not use_gpu and precision == "bf16" and longest_row <= EAGER_MAX_LENGTH
    return "eager" if short_bf16_on_cpu else "sdpa"
