"""The evaluation report: markdown (headline, per category beside no-learning baselines, samples) and loss curve."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pandas as pd

from catalog import layout
from toolkit.baselines import BASELINES
from toolkit.registry import metric_rows

_SPACES = re.compile(r"\s+")
CURVE = layout.LOSS_CURVE


def category_rows(metrics: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"category": category or "(none)", **row} for category, row in metrics["per_category"].items()]


def _clip(text: Any, width: int = 80) -> str:
    text = _SPACES.sub(" ", str(text)).strip().replace("|", "\\|")
    return text if len(text) <= width else text[:width - 1] + "…"


def report_markdown(metrics: dict[str, Any], samples: pd.DataFrame, count: int = 5, image: str = CURVE) -> str:
    """Give back the evaluation report as markdown: headline table, per category, a few generations."""
    lines = [f"# itune evaluation ({metrics['examples']} held-out test examples)", "", "| metric | base | tuned |",
             "|---|---|---|"]
    lines += [f"| {r['metric']} | {r['base']:.4f} | {r['tuned']:.4f} |" for r in metric_rows(metrics)]
    shown = [name for name in BASELINES if any(name in row for row in metrics["per_category"].values())]
    lines += ["", "| category | scoring | examples | base | tuned |" + "".join(f" {BASELINES[n]} |" for n in shown),
              "|---|---|---|---|---|" + "---|" * len(shown)]
    lines += [f"| {r['category']} | {r['scoring']} | {r['examples']} | {r['base']:.3f} | {r['tuned']:.3f} |"
              + "".join(f" {r.get(n, float('nan')):.3f} |" for n in shown) for r in category_rows(metrics)]
    if metrics.get("base_model"):
        lines += ["", metrics["base_model"] + "; no-learning baselines: " + ", ".join(
            f"{BASELINES[n]} {metrics['baselines'][n]:.3f}" for n in shown if n in metrics.get("baselines", {})) + "."]
    lines += ["", "## Sample generations", "", "| instruction | input | reference | base | tuned |",
              "|---|---|---|---|---|"]
    for row in samples.head(count).itertuples():
        lines.append(f"| {_clip(row.instruction)} | {_clip(row.input, 40)} | {_clip(row.response, 40)} | "
                     f"{_clip(row.base_output, 40)} | {_clip(row.tuned_output, 40)} |")
    lines += ["", "## Loss curve", "", f"![train and val loss]({image})"]
    return "\n".join(lines) + "\n"


def plot_loss_curve(log_file: Path, metrics: dict[str, Any], out: Path) -> None:
    """Write the training loss per logged step, and the val loss where it was measured, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    from matplotlib import pyplot as plt

    log = [json.loads(line) for line in log_file.read_text(encoding="utf-8").splitlines() if line.strip()] \
        if log_file.is_file() else []
    train = [(e["step"], e["loss"]) for e in log if "loss" in e and "step" in e]
    val = [(e["step"], e["eval_loss"]) for e in log if "eval_loss" in e and "step" in e]
    val_label, val_style = "val (response tokens, fixed val subset)", "o--"
    if not val and "tuned_val_loss" in metrics:
        # no val loss during training: only the start (base model) and the end (tuned) were measured, so
        # they are drawn as two points, not a line that would invent the path between them
        val = [(0, metrics["base_val_loss"]), (metrics.get("train_steps") or (train[-1][0] if train else 1),
                                               metrics["tuned_val_loss"])]
        val_label, val_style = "val (response tokens), measured at start and end only", "o"
    figure, axis = plt.subplots(figsize=(6.4, 3.6), dpi=90)
    if train:
        axis.plot(*zip(*train, strict=True), label="train (response tokens)", color="tab:blue")
    if val:
        axis.plot(*zip(*val, strict=True), val_style, label=val_label, color="tab:orange")
    axis.set_xlabel("optimizer step")
    axis.set_ylabel("cross-entropy (nats/token)")
    axis.set_title("fine-tune loss")
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(out)
    plt.close(figure)
