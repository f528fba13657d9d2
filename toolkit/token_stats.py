"""What the tokenize step measured: the figures its manifest and gate hold, and the report a user reads in Prefect.

The figures come from the rows as written (after any packing) and from counts taken batch by batch before
packing (examples, truncations, what cutting long conversations did: toolkit.conversations.CUTS). Whether to pack
at all (`decide_packing`) is settled from the templated text before any row is tokenized.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.compute as pc

from catalog import layout
from catalog.sections import TokenizeConfig

REPORT_KEY = "itune-tokenize-report"


def tokenize_figures(written: pd.DataFrame, counts: dict[str, int], config: TokenizeConfig) -> dict[str, Any]:
    """Give back the figures of a tokenize artifact from its written rows (id, split, length, n_target, truncated,
    n_target_lost) and the counts taken before packing (examples, truncated, zero_target and the CUTS)."""
    splits = written["split"].value_counts()
    tokens = int(written["length"].sum())
    targets, lost = int(written["n_target"].sum()), int(written["n_target_lost"].sum())
    return {
        "rows": len(written), "examples": counts["examples"], "tokens": tokens, "target_tokens": targets,
        "truncated_share": counts["truncated"] / max(counts["examples"], 1), "zero_target_rows": counts["zero_target"],
        "target_tokens_lost": lost, "target_tokens_lost_share": lost / max(targets + lost, 1),
        "long_conversations": config.long_conversations,
        "conversations_cut": counts["conversations_cut"], "conversation_windows": counts["conversation_windows"],
        "assistant_turns_dropped": counts["assistant_turns_dropped"],
        "padding_share_at_max_length": 1 - tokens / max(len(written) * config.max_length, 1),
        **{f"{name}_rows": int(splits.get(name, 0)) for name in ("train", "val", "test")},
    }


def report_markdown(figures: dict[str, Any]) -> str:
    """Give back a markdown table of what tokenize did to the data: tokens, targets, cuts and packing."""
    cut = figures.get("conversations_cut", 0)
    windows, dropped = figures.get("conversation_windows", 0), figures.get("assistant_turns_dropped", 0)
    lines = [
        ("rows written (train / val / test)",
         f"{figures['rows']:,} ({figures['train_rows']:,} / {figures['val_rows']:,} / {figures['test_rows']:,})"),
        ("examples", f"{figures['examples']:,}"),
        ("tokens (of which targets)", f"{figures['tokens']:,} ({figures['target_tokens']:,})"),
        ("examples truncated", f"{figures['truncated_share']:.1%}"),
        ("target tokens lost to cuts", f"{figures['target_tokens_lost']:,} "
                                       f"({figures['target_tokens_lost_share']:.1%})"),
        (f"conversations cut at turn boundaries ({figures.get('long_conversations', 'split')})",
         f"{cut:,}: into {windows:,} windows, {dropped:,} assistant turns dropped" if cut else "0"),
        ("packing", f"{'on' if figures.get('packing') else 'off'} ({figures.get('packing_reason', '')})"),
    ]
    return "# tokenize\n\n| figure | value |\n|---|---|\n" + "".join(f"| {name} | {value} |\n" for name, value in lines)


def publish_report(figures: dict[str, Any], where: str) -> None:
    """Show the tokenize report in the Prefect UI (a markdown artifact keyed itune-tokenize-report)."""
    from prefect.artifacts import create_markdown_artifact

    create_markdown_artifact(report_markdown(figures), key=REPORT_KEY, description=f"tokenize figures, {where}")


def decide_packing(config: TokenizeConfig, templated: Path) -> tuple[bool, str]:
    """Give back (whether to pack the train split, why), deciding `packing: auto` from the templated text.

    A random batch padded to its longest row wastes about 1 - mean/p95 of its tokens; packing pays when
    that share reaches `min_packing_waste`. Lengths are estimated from characters (about 4 per GPT-2
    token), so the decision costs one pass over two string columns, not a tokenization.
    """
    if config.packing != "auto":
        return bool(config.packing), f"tokenize.packing={str(config.packing).lower()}"
    table = layout.read_data(templated, columns=["split", "prompt", "completion"], filters=[("split", "=", "train")])
    if table.num_rows == 0:
        return False, "auto: no train rows"
    chars = pc.add(pc.utf8_length(table["prompt"]), pc.utf8_length(table["completion"])).to_numpy()
    tokens = np.minimum(chars / 4.0, config.max_length)
    waste = 1 - float(tokens.mean()) / max(float(np.quantile(tokens, 0.95)), 1.0)
    verdict = waste >= config.min_packing_waste
    compared = ">=" if verdict else "<"
    return verdict, (f"auto: a padded batch would waste about {waste:.0%} of its tokens ({compared} "
                     f"{config.min_packing_waste:.0%}): {'packed' if verdict else 'not packed'}")
