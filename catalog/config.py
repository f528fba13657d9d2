"""Typed pipeline configuration: one section per step, defaults = the offline quickstart.

Every key has a default; a YAML file and `--set a.b=c` overrides change them; an unknown key is an
error that names the closest valid key (as nanoGPT's configurator does, with types checked).
"""

from __future__ import annotations

import copy
import difflib
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from catalog.sections import (
    BUILTIN_TEMPLATES,
    CANONICAL_FIELDS,
    ArtifactsConfig,
    CleanConfig,
    ConfigError,
    DataConfig,
    Format,
    RunnerConfig,
    Section,
    SourceSpec,
    TemplateConfig,
    TokenizeConfig,
    UserTemplate,
    ValidateConfig,
)
from catalog.training_sections import (
    DeployConfig,
    EvalConfig,
    ModelConfig,
    PromoteConfig,
    TrainConfig,
)

__all__ = [
    "STEPS",
    "PipelineConfig",
    "build_config",
    "load_config",
    "parse_override",
    "with_overrides",
    "ConfigError",
    "Section",
    "Format",
    "CANONICAL_FIELDS",
    "SourceSpec",
    "DataConfig",
    "ArtifactsConfig",
    "CleanConfig",
    "ValidateConfig",
    "UserTemplate",
    "BUILTIN_TEMPLATES",
    "TemplateConfig",
    "TokenizeConfig",
    "ModelConfig",
    "TrainConfig",
    "EvalConfig",
    "PromoteConfig",
    "DeployConfig",
    "RunnerConfig",
]

STEPS = ("ingest", "clean", "validate", "template", "tokenize", "finetune", "evaluate")


class PipelineConfig(Section):
    data: DataConfig = Field(default_factory=DataConfig)
    artifacts: ArtifactsConfig = Field(default_factory=ArtifactsConfig)
    clean: CleanConfig = Field(default_factory=CleanConfig)
    validate_: ValidateConfig = Field(default_factory=ValidateConfig, alias="validate")
    template: TemplateConfig = Field(default_factory=TemplateConfig)
    tokenize: TokenizeConfig = Field(default_factory=TokenizeConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    promote: PromoteConfig = Field(default_factory=PromoteConfig)
    deploy: DeployConfig = Field(default_factory=DeployConfig)
    runner: RunnerConfig = Field(default_factory=RunnerConfig)

    model_config = ConfigDict(extra="forbid", populate_by_name=True, protected_namespaces=())

    @field_validator("artifacts")
    @classmethod
    def _root_not_empty(cls, value: ArtifactsConfig) -> ArtifactsConfig:
        if not value.root.strip():
            raise ValueError("artifacts.root must not be empty")
        return value

    def section(self, name: str) -> dict[str, Any]:
        """Give back one section as plain JSON-able data (what a step's key is built from)."""
        return getattr(self, "validate_" if name == "validate" else name).model_dump(mode="json")

    def step_config(self, step: str) -> dict[str, Any]:
        """Give back the config a step reads (and is keyed on)."""
        sections = {"ingest": "data", "clean": "clean", "validate": "validate", "template": "template",
                    "tokenize": "tokenize", "evaluate": "eval"}
        if step == "finetune":
            # Where it trains does not change what it trains: a model trained locally is reused on the pool.
            # No warm start keeps the keys models had before init_from existed.
            train = {k: v for k, v in self.section("train").items()
                     if k != "work_pool" and not (k == "init_from" and v is None)}
            return {"model": self.section("model"), "train": train}
        return self.section(sections[step])

    def as_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True)


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"cannot set '{dotted}': '{part}' is not a section")
    node[parts[-1]] = value


def parse_override(assignment: str) -> tuple[str, Any]:
    """Give back (dotted key, typed value) for a `key=value` override; values are read as YAML."""
    if "=" not in assignment:
        raise ConfigError(f"override '{assignment}' must look like key=value, e.g. train.epochs=2")
    key, raw = assignment.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override '{assignment}' has no key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def _closest_key(location: tuple[Any, ...]) -> str:
    """Name the valid key nearest to an unknown one at `location`."""
    model: type[BaseModel] = PipelineConfig
    for part in location[:-1]:
        field = model.model_fields.get("validate_" if part == "validate" else str(part))
        annotation = getattr(field, "annotation", None)
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return ""
        model = annotation
    names = [f.alias or n for n, f in model.model_fields.items()]
    match = difflib.get_close_matches(str(location[-1]), names, n=1, cutoff=0.5)
    if not match:
        return f" (valid keys: {', '.join(names)})"
    prefix = ".".join(str(p) for p in location[:-1])
    return f" (did you mean '{prefix + '.' if prefix else ''}{match[0]}'?)"


def build_config(raw: dict[str, Any]) -> PipelineConfig:
    """Give back a validated config, or raise ConfigError naming the first bad key."""
    try:
        return PipelineConfig.model_validate(raw)
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(p) for p in error["loc"])
        if error["type"] == "extra_forbidden":
            raise ConfigError(f"unknown config key '{where}'{_closest_key(error['loc'])}") from None
        raise ConfigError(f"config key '{where}': {error['msg']} (got {error.get('input')!r})") from None


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> PipelineConfig:
    """Give back the config from a YAML file (or the built-in quickstart) plus `key=value` overrides."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file '{path}' does not exist")
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file '{path}' is not valid YAML: {str(exc).splitlines()[0]}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"config file '{path}' must hold a mapping of sections")
    return with_overrides(raw, overrides)


def with_overrides(raw: dict[str, Any], overrides: list[str] | tuple[str, ...] = ()) -> PipelineConfig:
    """Give back the validated config of `raw` (left unchanged) with `key=value` overrides applied."""
    raw = copy.deepcopy(raw)
    for assignment in overrides:
        key, value = parse_override(assignment)
        _set_dotted(raw, key, value)
    return build_config(raw)
