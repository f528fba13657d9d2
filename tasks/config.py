"""Typed pipeline configuration: one section per step, defaults = the offline quickstart.

Every key has a default; a YAML file and `--set a.b=c` overrides change them; an unknown key is an
error that names the closest valid key (as nanoGPT's configurator does, with types checked).
"""

from __future__ import annotations

import copy
import difflib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PositiveInt, ValidationError, field_validator, model_validator

STEPS = ("ingest", "clean", "validate", "template", "tokenize", "finetune", "evaluate")


class ConfigError(ValueError):
    """A configuration problem, reported to the user as one line."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


Format = Literal["alpaca", "dolly", "self_instruct", "prompt_completion", "sharegpt", "messages"]
CANONICAL_FIELDS = ("instruction", "input", "response", "category")


def _check_columns(columns: dict[str, str] | None) -> dict[str, str] | None:
    if not columns:
        return columns
    unknown = sorted(set(columns) - set(CANONICAL_FIELDS))
    if unknown:
        raise ValueError(f"columns maps unknown field(s) {', '.join(unknown)}; "
                         f"map any of {', '.join(CANONICAL_FIELDS)}")
    missing = [f for f in ("instruction", "response") if f not in columns]
    if missing:
        raise ValueError(f"columns must map {' and '.join(missing)} (e.g. columns.{missing[0]}=<your column>)")
    return columns


class SourceSpec(Section):
    """One of several sources: where it is, how to read it, and how much of it to keep."""

    source: str
    format: Literal["auto", Format] | None = Field(None, description="None: data.format")
    columns: dict[str, str] | None = Field(None, description="None: data.columns")
    max_rows: PositiveInt | None = Field(None, description="cap on the rows this source contributes")
    weight: float = Field(1.0, gt=0, le=1, description="share of this source's rows kept, chosen by id hash")

    _columns = field_validator("columns")(_check_columns)


class DataConfig(Section):
    source: str = "builtin:tasks"
    sources: list[SourceSpec] = Field(default_factory=list, description="several sources; replaces data.source")
    format: Literal["auto", Format] = "auto"
    columns: dict[str, str] = Field(default_factory=dict)
    max_rows: PositiveInt | None = None
    max_record_chars: PositiveInt = Field(1_000_000, description="longer fields are quarantined at ingest")
    hub_split: str = Field("train", description="split read from a `hf:<dataset id>` source")
    builtin_examples: PositiveInt = 4000
    seed: int = 0

    _columns = field_validator("columns")(_check_columns)


class ArtifactsConfig(Section):
    root: str = "itune-artifacts"


class CleanConfig(Section):
    min_chars: int = Field(1, ge=0)
    max_instruction_chars: PositiveInt = 4000
    max_response_chars: PositiveInt = 4000
    min_response_tokens: int = Field(1, ge=0)
    max_prompt_tokens: PositiveInt | None = Field(2048, description="instruction + input, GPT-2 tokens")
    max_response_tokens: PositiveInt | None = Field(1024, description="GPT-2 tokens")
    drop_exact_duplicates: bool = True
    drop_near_duplicates: bool = True
    near_duplicate_threshold: float = Field(0.85, gt=0, le=1, description="estimated Jaccard of word 3-grams")
    near_duplicate_num_perm: int = Field(64, ge=16, le=512)
    near_duplicate_min_words: PositiveInt = Field(
        16, description="shorter rows only get the exact check: MinHash of a handful of words is noise")
    language: str = Field("any", description="any; latin (a script check); or ISO 639-1 codes to keep, e.g. 'en' "
                          "or 'en,de' (a language identifier)")
    min_script_share: float = Field(0.8, ge=0, le=1)
    min_language_confidence: float = Field(
        0.9, ge=0, le=1, description="drop a row only when identified as another language at least this surely")

    @field_validator("language")
    @classmethod
    def _known_language(cls, value: str) -> str:
        if value in ("any", "latin"):
            return value
        from tasks.clean import language_codes

        codes = [code.strip().lower() for code in value.split(",") if code.strip()]
        unknown = sorted(set(codes) - language_codes())
        if not codes or unknown:
            raise ValueError(f"clean.language: {', '.join(unknown) or 'nothing'} is not 'any', 'latin' or an ISO "
                             "639-1 code the identifier knows (e.g. en, de, fr, es, zh, ja)")
        return ",".join(codes)


class ValidateConfig(Section):
    max_quarantine_ratio: float = Field(0.5, ge=0, le=1)
    max_duplicate_ratio: float = Field(0.5, ge=0, le=1, description="exact + near duplicates / rows read")
    min_rows: PositiveInt = 10
    max_instruction_chars: PositiveInt = 4000
    max_response_chars: PositiveInt = 4000
    max_mean_instruction_chars: PositiveInt = 2000
    max_mean_response_chars: PositiveInt = 2000
    warn_only: list[str] = Field(default_factory=list, description="expectation types that warn instead of block")


class UserTemplate(Section):
    """A template written in the config: placeholders {instruction}, {input}, {response}."""

    prompt: str
    prompt_with_input: str | None = Field(None, description="used when a row has an input; None: prompt")
    response: str = " {response}<|endoftext|>"

    @model_validator(mode="after")
    def _placeholders(self) -> UserTemplate:
        import string

        wanted = {"prompt": {"instruction"}, "prompt_with_input": {"instruction", "input"}, "response": {"response"}}
        allowed = {"prompt": {"instruction", "input"}, "prompt_with_input": {"instruction", "input"},
                   "response": {"response"}}
        for part, needed in wanted.items():
            text = getattr(self, part)
            if text is None:
                continue
            try:
                found = {name for _, name, _, _ in string.Formatter().parse(text) if name is not None}
            except ValueError as exc:
                raise ValueError(f"template {part} is not a valid format string ({exc})") from None
            if needed - found:
                raise ValueError(f"template {part} lacks the placeholder(s) "
                                 f"{', '.join('{' + n + '}' for n in sorted(needed - found))}")
            if found - allowed[part]:
                raise ValueError(f"template {part} has unknown placeholder(s) "
                                 f"{', '.join('{' + n + '}' for n in sorted(found - allowed[part]))}")
        return self


BUILTIN_TEMPLATES = ("paper", "alpaca", "chat")


class TemplateConfig(Section):
    name: str = Field("paper", description="paper, alpaca, chat, or a key of template.custom")
    custom: dict[str, UserTemplate] = Field(default_factory=dict)
    val_fraction: float = Field(0.05, ge=0, lt=1)
    test_fraction: float = Field(0.05, ge=0, lt=1)
    split_by: str = Field("auto", min_length=1, description=(
        "what a split keeps together: auto (built-in tasks: input + response; other data: a passage's main "
        "sentence, else instruction + input), instruction_input, or a column name such as a document id"))

    @model_validator(mode="after")
    def _known_name(self) -> TemplateConfig:
        if self.name not in BUILTIN_TEMPLATES and self.name not in self.custom:
            names = ", ".join([*BUILTIN_TEMPLATES, *self.custom])
            raise ValueError(f"unknown template '{self.name}' (choose from {names}, or define template.custom."
                             f"{self.name}.prompt/response)")
        if self.val_fraction + self.test_fraction >= 1:
            raise ValueError("val_fraction + test_fraction must leave rows for training")
        return self


class TokenizeConfig(Section):
    max_length: PositiveInt = 128
    batch_size: PositiveInt = 1000
    packing: bool = Field(False, description="pack train examples into max_length blocks (val/test stay unpacked)")
    max_truncated_share: float = Field(0.5, ge=0, le=1)
    min_train_rows: PositiveInt = 1
    min_eval_rows: int = Field(1, ge=0, description="rows each of val and test must have")
    warn_only: list[str] = Field(default_factory=list, description="expectation types that warn instead of block")


class ModelConfig(Section):
    name: str = "scratch:tiny-deep"
    init_seed: int = 0
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout of from-scratch models")
    trust_remote_code: bool = Field(False, description="allow a folder/Hub model to run its own Python code")
    attn_implementation: Literal["sdpa", "eager"] = "sdpa"
    position_init: Literal["random", "sinusoidal"] = Field(
        "sinusoidal", description="from-scratch models: position embeddings start as sines and cosines or random")
    hub_token_secret: str | None = Field(
        None, description="name of a Prefect Secret block holding a Hugging Face Hub token (default: HF_TOKEN)")


class TrainConfig(Section):
    epochs: float = Field(7.0, gt=0)
    max_steps: int = Field(800, ge=-1, description="optimizer steps; -1: run the full epochs")
    max_seconds: float | None = Field(None, gt=0, description="stop early after this much training time")
    batch_size: PositiveInt = 32
    learning_rate: float = Field(3e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    adam_beta2: float = Field(0.98, gt=0, lt=1)
    warmup_ratio: float = Field(0.05, ge=0, lt=1)
    lr_scheduler: Literal["cosine", "linear", "constant_with_warmup"] = "cosine"
    gradient_accumulation_steps: PositiveInt = 1
    max_grad_norm: float = Field(1.0, gt=0)
    group_by_length: bool = Field(False, description="batch similar lengths together (less padding)")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field("auto", description="auto: bf16/fp16 on GPU, else fp32")
    gradient_checkpointing: bool = False
    torch_compile: bool = False
    seed: int = 0
    logging_steps: PositiveInt = 25
    eval_every: int = Field(0, ge=0, description="val loss every N optimizer steps; 0: about 20 points per run")
    eval_rows: PositiveInt = Field(128, description="the fixed val subset the val loss is measured on (first rows)")
    early_stopping_patience: PositiveInt | None = Field(
        None, description="stop after this many val-loss points without a new best (None: never)")
    save_steps: int = Field(200, ge=0, description="checkpoint every N steps (0: only the final model)")
    work_pool: str | None = Field(None, description="run fine-tune as a deployment on this Prefect work pool")


class EvalConfig(Section):
    max_examples: PositiveInt = 200
    max_new_tokens: PositiveInt = 24
    batch_size: PositiveInt = 64
    do_sample: bool = Field(False, description="false: greedy decoding")
    temperature: float = Field(1.0, gt=0, description="sampling only")
    top_p: float = Field(1.0, gt=0, le=1, description="sampling only")
    seed: int = 0
    stop_at_eos: bool = Field(True, description="false: always generate max_new_tokens (EOS suppressed)")
    scoring: Literal["auto", "exact_match", "rouge_l"] = Field(
        "auto", description="auto: exact match for checkable categories, ROUGE-L for free text")
    max_labels: PositiveInt = Field(20, description="auto: a category with at most this many distinct answers "
                                                    "(each seen at least twice on average) is classification-style")
    report_samples: PositiveInt = 5


class PromoteConfig(Section):
    enabled: bool = True
    primary_metric: str = Field("tuned_exact_match", description="losses/perplexities: lower is better; else higher")
    min_improvement: float = Field(0.0, ge=0, description="the candidate must beat the champion by more than this")
    tolerances: dict[str, float] = Field(
        default_factory=lambda: {"tuned_val_loss": 0.05, "tuned_rouge_l": 0.02},
        description="largest allowed regression (absolute) per other metric")


class DeployConfig(Section):
    """How `itune deploy` lays the pipeline out on a Prefect server (not part of any step's key)."""

    cpu_pool: str = Field("cpu", min_length=1, description="work pool of the pipeline deployments")
    gpu_pool: str = Field("gpu", min_length=1, description="work pool of the fine-tune deployment")
    nightly_time: str = Field("02:00", pattern=r"^([01]\d|2[0-3]):[0-5]\d$", description="HH:MM of the nightly run")
    timezone: str = Field("UTC", description="IANA time zone of nightly_time, e.g. Europe/Berlin")
    finetune_concurrency: PositiveInt = Field(1, description="fine-tune runs at once on the gpu pool")

    @field_validator("nightly_time", mode="before")
    @classmethod
    def _unquoted_time(cls, value: Any) -> Any:
        # YAML 1.1 reads an unquoted 12:30 as the base-60 integer 750; give the user back the time they wrote.
        if isinstance(value, int) and not isinstance(value, bool):
            return f"{value // 60:02d}:{value % 60:02d}"
        return value

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise ValueError(f"unknown time zone '{value}' (use an IANA name such as Europe/Berlin)") from exc
        return value

    def nightly_cron(self) -> str:
        hour, minute = self.nightly_time.split(":")
        return f"{int(minute)} {int(hour)} * * *"


class RunnerConfig(Section):
    """Where the data steps run their per-batch work; in no step's key (every runner writes the same bytes)."""

    kind: Literal["local", "dask"] = Field("local", description="local: in this process; dask: on a Dask cluster")
    address: str | None = Field(
        None, description="scheduler of an existing Dask cluster, e.g. tcp://scheduler:8786; None: a local one")
    workers: PositiveInt = Field(2, description="worker processes of the local cluster started when address is None")
    batches_in_flight: PositiveInt | None = Field(
        None, description="batches handed out and not yet written back; None: two per worker thread")

    @model_validator(mode="after")
    def _address_needs_dask(self) -> RunnerConfig:
        if self.address is not None and self.kind != "dask":
            raise ValueError(f"runner.address is only used with runner.kind=dask (kind is {self.kind})")
        return self


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
            train = {k: v for k, v in self.section("train").items() if k != "work_pool"}
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
