"""Low-rank adapters (LoRA) through peft: train a few parameters, publish a plain merged GPT-2.

The adapter is kept beside the model for whoever wants it; the model folder itself holds merged
weights, so evaluate, generate and promotion load it with plain `from_pretrained`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from catalog.training_sections import LoraSettings

ADAPTER_DIR = "adapter"


def with_lora(model: Any, settings: LoraSettings) -> Any:
    """Give back the model wrapped with trainable LoRA adapters; its own weights are frozen."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                        target_modules=list(settings.target_modules), task_type="CAUSAL_LM",
                        fan_in_fan_out=True)  # GPT-2's projections are Conv1D: weights stored (in, out)
    return get_peft_model(model, config)


def is_lora(model: Any) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


def save_adapter_and_merged(model: Any, artifact: Path, model_dir: Path) -> Any:
    """Save the adapter under `artifact/adapter` and the merged model into `model_dir`; give back the merged model."""
    model.save_pretrained(Path(artifact) / ADAPTER_DIR)
    merged = model.merge_and_unload()
    merged.save_pretrained(model_dir)
    return merged


def trainable_parameters(model: Any) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
