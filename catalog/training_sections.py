"""Config sections of training, evaluation, promotion, deployment and the batch runner."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, PositiveInt, field_validator

from catalog.sections import Section


class ModelConfig(Section):
    name: str = "scratch:tiny-deep"
    init_seed: int = 0
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout of from-scratch models")
    trust_remote_code: bool = Field(False, description="allow a folder/Hub model to run its own Python code")
    attn_implementation: Literal["auto", "sdpa", "eager"] = Field(
        "auto", description="auto: eager for short bf16 rows on CPU (measured faster there), else sdpa")
    position_init: Literal["random", "sinusoidal"] = Field(
        "sinusoidal", description="from-scratch models: position embeddings start as sines and cosines or random")
    hub_token_secret: str | None = Field(
        None, description="name of a Prefect Secret block holding a Hugging Face Hub token (default: HF_TOKEN)")


class LoraSettings(Section):
    r: PositiveInt = Field(8, description="rank of each low-rank update")
    alpha: float = Field(16.0, gt=0, description="scale: updates are multiplied by alpha / r")
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] = Field(default_factory=lambda: ["c_attn", "c_proj", "c_fc"],
                                      description="GPT-2's attention and MLP projections")


class TrainConfig(Section):
    epochs: float = Field(7.0, gt=0)
    max_steps: int = Field(1200, ge=-1, description="optimizer steps; -1: run the full epochs")
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
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="auto: bf16/fp16 on GPU, bf16 on a CPU with native bf16, else fp32")
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
    peft: Literal["none", "lora"] = Field("none", description="lora: train low-rank adapters (peft), publish merged")
    lora: LoraSettings = Field(default_factory=LoraSettings)
    nproc_per_node: PositiveInt = Field(1, description="training processes per host (torchrun): GPUs, or CPU gloo")
    nnodes: PositiveInt = Field(1, description="hosts training together")
    rdzv_endpoint: str | None = Field(None, description="host:port every host meets at (nnodes > 1)")
    init_from: str | None = Field(
        None, min_length=1, description="warm start: champion or a registered model key; its weights replace "
                                        "model.name's (optimizer state fresh). null: start from model.name")


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
