"""Where a warm-started fine-tune's weights come from: the verified model artifact `train.init_from` names.

Kept apart from toolkit/warm_start.py (the registry lookups and the guard, which run in the flow) so
that fine-tune's code version, and with it every model's key, does not follow the registry's code.
"""

from __future__ import annotations

from typing import Any

from catalog import layout
from catalog.store import ArtifactStore


class WarmStartError(ValueError):
    """A warm start that cannot be done: unknown, missing or corrupt model, or one trained otherwise."""


def verified_model(key: str, root: str, spec: str | None = None) -> Any:
    """Give back the artifact folder of fine-tune model `key` under `root`, checked intact."""
    store = ArtifactStore(root)
    folder = store.path("finetune", key)
    if store.manifest("finetune", key) is None or not (layout.model_dir(folder) / "config.json").is_file():
        raise WarmStartError(f"train.init_from={spec or key}: model {key} at {folder} is missing or failed "
                             "verification (corrupt); pick another with train.init_from=<key> or set it to null")
    return folder


def for_training(config: dict[str, Any], root: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Give back (the config to train with: `model.name` the warm start's model folder, what the manifest records).

    `config` is fine-tune's step config as the flow resolved it: `train.init_from` a model key, or absent.
    """
    key = config["train"].get("init_from")
    if not key:
        return config, {"init_from": None}
    model = layout.model_dir(verified_model(key, root))
    return ({**config, "model": {**config["model"], "name": str(model)}},
            {"init_from": {"model_key": key, "model_folder": str(model)}})
