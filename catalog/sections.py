"""Config sections of the data steps (ingest to tokenize), and what every section shares."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveInt, field_validator, model_validator


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
        from toolkit.language import language_codes

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
    train_on: Literal["all_assistant", "last_assistant"] = Field(
        "all_assistant", description="chat: every assistant turn of a conversation is a target, or only the last")
    chat_template: str = Field("", description="chat: a Jinja chat template in transformers' format, assistant "
                               "text inside {% generation %}...{% endgeneration %}; empty: the built-in one")
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
        if self.chat_template and self.name != "chat":
            raise ValueError(f"template.chat_template is used by template.name=chat (name is {self.name})")
        if self.chat_template and not re.search(r"\{%-?\s*generation\s*-?%\}", self.chat_template):
            raise ValueError("template.chat_template must wrap assistant text in {% generation %}...{% endgeneration %}"
                             " so its answers can be trained on")
        if self.val_fraction + self.test_fraction >= 1:
            raise ValueError("val_fraction + test_fraction must leave rows for training")
        return self


class TokenizeConfig(Section):
    max_length: PositiveInt = 128
    batch_size: PositiveInt = 1000
    packing: bool | Literal["auto"] = Field(
        "auto", description="pack train examples into max_length blocks (val/test stay unpacked); auto: when "
                            "padding a random batch to its longest row would waste at least min_packing_waste")
    min_packing_waste: float = Field(0.4, ge=0, le=1, description="auto packing: the padding share that makes it pay")
    max_truncated_share: float = Field(0.5, ge=0, le=1)
    long_conversations: Literal["split", "truncate_left"] = Field(
        "split", description="a conversation over max_length: split into windows of whole turns, each ending with "
                             "an answer; or truncate_left: drop the oldest turns (the system prompt stays)")
    max_target_tokens_lost_share: float = Field(
        0.5, ge=0, le=1, description="gate: share of response/assistant tokens that length cuts may drop")
    min_train_rows: PositiveInt = 1
    min_eval_rows: int = Field(1, ge=0, description="rows each of val and test must have")
    warn_only: list[str] = Field(default_factory=list, description="expectation types that warn instead of block")


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
