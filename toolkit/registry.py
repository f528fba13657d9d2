"""The model registry: every evaluated model (a candidate), the current champion, and each decision.

`<root>/registry/registry.json` is rewritten whole through a temp file and a rename, under a file
lock, so two runs finishing at once neither lose each other's entries nor leave a torn file for a
reader. A candidate becomes champion when it beats the champion on the primary metric and regresses
no other watched metric beyond its tolerance; the first model becomes champion. Pure: no Prefect,
no torch, so the CLI reads it in a blink.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from filelock import FileLock

from catalog.files import write_text_atomically
from catalog.store import ArtifactStore, local_folder
from catalog.training_sections import PromoteConfig

REGISTRY_DIR = "registry"
REGISTRY_FILE = "registry.json"
LOCK_TIMEOUT_S = 120

# (metric name without base_/tuned_, label): the rows of every metrics table, in order.
METRIC_LABELS: list[tuple[str, str]] = [
    ("val_loss", "val loss (response tokens)"),
    ("val_perplexity", "val perplexity (response tokens)"),
    ("test_loss", "test loss (response tokens)"),
    ("test_perplexity", "test perplexity (response tokens)"),
    ("val_loss_full_sequence", "val loss (full sequence)"),
    ("val_perplexity_full_sequence", "val perplexity (full sequence)"),
    ("test_loss_full_sequence", "test loss (full sequence)"),
    ("test_perplexity_full_sequence", "test perplexity (full sequence)"),
    ("val_loss_first_answer", "val loss (first answer of each conversation)"),
    ("val_loss_later_answers", "val loss (later answers of each conversation)"),
    ("test_loss_first_answer", "test loss (first answer of each conversation)"),
    ("test_loss_later_answers", "test loss (later answers of each conversation)"),
    ("exact_match", "exact match (all examples)"),
    ("rouge_l", "ROUGE-L F1 (all examples)"),
    ("task_score", "task score (per-category scoring)"),
]


def metric_rows(metrics: dict[str, Any]) -> list[dict[str, Any]]:
    """Give back the headline table: one row per metric measured, base beside tuned."""
    return [{"metric": label, "base": round(metrics[f"base_{name}"], 4), "tuned": round(metrics[f"tuned_{name}"], 4)}
            for name, label in METRIC_LABELS if f"tuned_{name}" in metrics and f"base_{name}" in metrics]


class RegistryError(RuntimeError):
    """A registry lookup that cannot be answered (unknown model, no champion)."""


def lower_is_better(metric: str) -> bool:
    return "loss" in metric or "perplexity" in metric


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass
class Decision:
    """The outcome of comparing a candidate with the champion, with a reason per metric looked at."""

    promoted: bool
    how: str  # first | auto | manual | none
    reasons: list[str] = field(default_factory=list)


def _fmt(value: float) -> str:
    return f"{value:.4f}"


def decide(candidate: dict[str, Any], champion: dict[str, Any] | None, config: PromoteConfig) -> Decision:
    """Give back whether `candidate` metrics should replace `champion` metrics, and why."""
    if champion is None:
        return Decision(True, "first", ["no champion yet: the first evaluated model becomes champion"])
    primary = config.primary_metric
    new, old = candidate.get(primary), champion.get(primary)
    if new is None:
        return Decision(False, "auto", [f"the candidate has no '{primary}' metric; nothing to compare"])
    if old is None:
        return Decision(False, "auto", [f"the champion has no '{primary}' metric; use `itune promote` to decide"])
    gain = old - new if lower_is_better(primary) else new - old
    beats = gain > config.min_improvement
    margin = f" by more than {config.min_improvement}" if config.min_improvement else ""
    reasons = [f"{primary} {_fmt(new)} vs champion {_fmt(old)}: {'beats' if beats else 'does not beat'} it{margin}"]
    regressed = False
    for metric, tolerance in config.tolerances.items():
        if metric == primary:
            continue
        a, b = candidate.get(metric), champion.get(metric)
        if a is None or b is None:
            reasons.append(f"{metric}: not measured on both models, not compared")
            continue
        worse = a - b if lower_is_better(metric) else b - a
        if worse > tolerance:
            regressed = True
            reasons.append(f"{metric} {_fmt(a)} vs {_fmt(b)}: regresses by {_fmt(worse)} > tolerance {tolerance}")
        else:
            reasons.append(f"{metric} {_fmt(a)} vs {_fmt(b)}: within tolerance {tolerance}")
    return Decision(beats and not regressed, "auto", reasons)


def headline_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """Give back the flat numeric metrics of an evaluation (nested tables left out)."""
    return {k: float(v) for k, v in metrics.items() if isinstance(v, int | float) and not isinstance(v, bool)}


class Registry:
    """The registry file of one artifact root."""

    def __init__(self, root: str | Path):
        self.store = ArtifactStore(root)
        self.root = self.store.root
        self.folder = self.root / REGISTRY_DIR
        self.file = self.folder / REGISTRY_FILE

    def _pull(self) -> None:
        """With a shared root, bring this machine's copy of the registry up to date with the shared one."""
        text = self.store.shared.read_text(REGISTRY_DIR, REGISTRY_FILE) if self.store.shared else None
        if text is not None:
            self.folder.mkdir(parents=True, exist_ok=True)
            write_text_atomically(self.file, text)

    def load(self) -> dict[str, Any]:
        """Give back the registry (an empty one if none was written yet); reads need no lock."""
        self._pull()
        try:
            data = json.loads(self.file.read_text(encoding="utf-8"))
        except FileNotFoundError:
            data = {}
        except ValueError as exc:
            raise RegistryError(f"{self.file} is not valid JSON ({exc}); restore it or move it aside") from None
        return {"champion": None, "candidates": {}, "history": [], **data}

    @contextmanager
    def updating(self) -> Iterator[dict[str, Any]]:
        """Yield the registry under the lock; write it back atomically when the block succeeds."""
        self.folder.mkdir(parents=True, exist_ok=True)
        with FileLock(str(self.file) + ".lock", timeout=LOCK_TIMEOUT_S):
            data = self.load()
            yield data
            write_text_atomically(self.file, json.dumps(data, indent=2, default=str))
            if self.store.shared is not None:
                # object stores have no lock: machines deciding in the same moment can overwrite each other's
                # entry (the models stay registered in their artifacts); one promoting pool avoids that
                self.store.shared.upload(self.file, [REGISTRY_DIR, REGISTRY_FILE])

    def consider(self, candidate: dict[str, Any], config: PromoteConfig, flow_run_id: str | None = None
                 ) -> dict[str, Any]:
        """Record an evaluated model, decide on promotion, and give back the recorded decision.

        `candidate` holds model_key, model_uri, evaluate_key, evaluate_uri and metrics.
        """
        with self.updating() as data:
            key = candidate["model_key"]
            data["candidates"][key] = {**data["candidates"].get(key, {}), **candidate, "evaluated_at": now()}
            champion = data["champion"]
            if champion is not None and champion["model_key"] == key:
                # the same model evaluated again (a rerun, or a new eval config): keep its figures current
                champion.update(metrics=candidate["metrics"], evaluate_key=candidate["evaluate_key"],
                                evaluate_uri=candidate["evaluate_uri"])
                decision = Decision(False, "none", ["the candidate is already the champion"])
            elif not config.enabled:
                decision = Decision(False, "none", ["promotion is disabled (promote.enabled=false)"])
            else:
                decision = decide(candidate["metrics"], champion["metrics"] if champion else None, config)
            return self._record(data, candidate, decision, flow_run_id, config.primary_metric)

    def promote_manual(self, spec: str, reason: str = "") -> dict[str, Any]:
        """Make a registered model champion whatever its metrics; give back the recorded decision."""
        with self.updating() as data:
            key = self._find(data, spec)
            candidate = data["candidates"][key]
            if data["champion"] is not None and data["champion"]["model_key"] == key:
                decision = Decision(False, "manual", ["the model is already the champion"])
            else:
                decision = Decision(True, "manual", [reason or "promoted by hand with `itune promote`"])
            return self._record(data, candidate, decision, None, None)

    def _record(self, data: dict[str, Any], candidate: dict[str, Any], decision: Decision,
                flow_run_id: str | None, primary: str | None) -> dict[str, Any]:
        before = data["champion"]["model_key"] if data["champion"] else None
        if decision.promoted:
            data["champion"] = {**candidate, "promoted_at": now(), "how": decision.how}
        entry = {
            "at": now(), **asdict(decision), "candidate": candidate["model_key"],
            "evaluate_key": candidate.get("evaluate_key"), "champion_before": before,
            "champion": data["champion"]["model_key"] if data["champion"] else None,
            "primary_metric": primary, "flow_run_id": flow_run_id,
        }
        data["history"].append(entry)
        data["candidates"][candidate["model_key"]]["last_decision"] = entry
        return entry

    @staticmethod
    def _find(data: dict[str, Any], spec: str) -> str:
        path = Path(spec).expanduser()
        if path.exists():
            path = path.resolve()
            for key, entry in data["candidates"].items():
                if path in (Path(entry["model_uri"]), Path(entry["model_uri"]) / "model"):
                    return key
        matches = [key for key in data["candidates"] if key.startswith(spec)]
        if len(matches) == 1:
            return matches[0]
        if len(matches) > 1:
            raise RegistryError(f"'{spec}' matches {len(matches)} models ({', '.join(matches)}); give more of the key")
        raise RegistryError(f"no evaluated model '{spec}' in the registry; `itune models` lists them")

    def champion(self) -> dict[str, Any] | None:
        return self.load()["champion"]

    def decision_for_run(self, flow_run_id: str) -> dict[str, Any] | None:
        """Give back the last decision a flow run recorded, or None."""
        return next((e for e in reversed(self.load()["history"]) if e.get("flow_run_id") == str(flow_run_id)), None)

    def entry(self, spec: str) -> dict[str, Any]:
        """Give back the registered entry of `champion` or of a model key (or a unique prefix of one)."""
        data = self.load()
        if spec == "champion":
            if data["champion"] is None:
                raise RegistryError(f"no champion yet in {self.file}")
            return data["champion"]
        return data["candidates"][self._find(data, spec)]

    def model_folder(self, spec: str) -> Path:
        """Give back the finetune artifact folder for `champion`, a registered key (prefix) or a folder."""
        data = self.load()
        if spec == "champion":
            if data["champion"] is None:
                raise RegistryError(f"no champion yet in {self.file}; run `itune run` (the first model becomes "
                                    "champion) or pass --model PATH")
            return self._model_path(data["champion"])
        path = Path(spec).expanduser()
        if path.is_dir():
            return path.resolve()
        return self._model_path(data["candidates"][self._find(data, spec)])

    @staticmethod
    def _model_path(entry: dict[str, Any]) -> Path:
        return local_folder(entry["model_uri"], "finetune", entry["model_key"])
