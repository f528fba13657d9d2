"""What changed between two pipeline runs: rows per source, quarantine, tokens, splits, config, code, metrics.

A run is one entry of the registry history (the pipeline run that evaluated a model, by flow run id or
evaluate key); its data is the lineage of its evaluate artifact. Rows are matched by content id, so an
edited row shows as changed (same file position, new content), not as one removed and one added. Pure:
no Prefect, no torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from catalog import layout
from catalog.config import STEPS
from catalog.keys import rebuild_reasons
from catalog.lineage import lineage
from catalog.store import MANIFEST, ArtifactError, ArtifactStore
from toolkit.registry import Registry, RegistryError, headline_metrics, lower_is_better

AGAINST = ("previous", "champion")


class ChangesError(RuntimeError):
    """Two runs that cannot be compared: an unknown run, or artifacts no longer on disk."""


def find_run(history: list[dict[str, Any]], spec: str | None) -> int:
    """Give back the history index of a run: the newest when `spec` is None, else by flow run id or evaluate key."""
    runs = [i for i, entry in enumerate(history) if entry.get("flow_run_id") and entry.get("evaluate_key")]
    if not runs:
        raise ChangesError("no pipeline run in the registry yet: `itune run` evaluates one")
    if spec is None:
        return runs[-1]
    matches = [i for i in runs if str(history[i]["flow_run_id"]).startswith(spec)
               or str(history[i]["evaluate_key"]).startswith(spec)]
    if not matches:
        raise ChangesError(f"no run '{spec}' in the registry history (give a flow run id or an evaluate key)")
    return matches[-1]


def _side(root: str, label: str, evaluate_key: str, entry: dict[str, Any] | None) -> dict[str, Any]:
    store = ArtifactStore(root)
    if not (store.path("evaluate", evaluate_key) / MANIFEST).is_file():
        store.manifest("evaluate", evaluate_key)  # with a shared root: fetched into this machine's mirror
    return {"label": label, "flow_run_id": (entry or {}).get("flow_run_id"), "evaluate_key": evaluate_key,
            "model_key": (entry or {}).get("candidate"), "folder": store.path("evaluate", evaluate_key)}


def _against(root: str, data: dict[str, Any], index: int, against: str) -> dict[str, Any] | None:
    history = data["history"]
    if against == "previous":
        earlier = [i for i in range(index) if history[i].get("flow_run_id") and history[i].get("evaluate_key")]
        return _side(root, "previous run", history[earlier[-1]]["evaluate_key"], history[earlier[-1]]) \
            if earlier else None
    if against == "champion":
        key = history[index].get("champion_before")
        if key is None:
            return None
        champion = data["candidates"][key]
        return {**_side(root, "champion before the run", champion["evaluate_key"], None), "model_key": key}
    other = find_run(history, against)
    return _side(root, f"run {against}", history[other]["evaluate_key"], history[other])


def _chain(folder: Path) -> dict[str, tuple[Path, dict[str, Any]]]:
    """Give back {step: (folder, manifest)} along an evaluate artifact's lineage."""
    if not (folder / MANIFEST).is_file():
        raise ChangesError(f"{folder} is gone: its run's artifacts can no longer be compared")
    found: dict[str, tuple[Path, dict[str, Any]]] = {}
    for entry in lineage(folder):
        if entry["step"] not in found:
            found[entry["step"]] = (Path(entry["uri"]), layout.read_manifest(Path(entry["uri"])))
    return found


def row_changes(before: Path | None, after: Path) -> dict[str, dict[str, int]]:
    """Give back {source file: rows now, added, removed, changed} between two ingest artifacts, by row id.

    Content that is still there (anywhere in the source) is neither added nor removed. Of the rows that
    are gone and the rows that are new between the same two surviving rows of a file, the pairs count as
    changed (edited in place), the rest as removed or added: rows shifted by an insertion do not count.
    """
    new = _ids(after)
    old = _ids(before) if before is not None else new.iloc[0:0]
    gone = _between_survivors(old, set(new["id"]))
    fresh = _between_survivors(new, set(old["id"]))
    pairs = pd.concat([gone.value_counts(["file", "anchor"]).rename("gone"),
                       fresh.value_counts(["file", "anchor"]).rename("fresh")], axis=1).fillna(0)
    edited = pairs[["gone", "fresh"]].min(axis=1).groupby(level="file").sum()
    counts = {"rows": new["file"].value_counts(), "added": fresh["file"].value_counts().sub(edited, fill_value=0),
              "removed": gone["file"].value_counts().sub(edited, fill_value=0), "changed": edited}
    files = sorted(set(new["file"]) | set(old["file"]))
    return {file: {name: int(series.get(file, 0)) for name, series in counts.items()} for file in files}


def _ids(folder: Path) -> pd.DataFrame:
    frame = layout.read_data(folder, ["id", "source"]).to_pandas()
    frame["file"] = frame["source"].str.rsplit(":", n=1).str[0]  # source is "<file>:<row number>"
    return frame


def _between_survivors(frame: pd.DataFrame, other_ids: set[str]) -> pd.DataFrame:
    """Give back the rows of `frame` whose id is not in `other_ids`, each with the id of the last surviving row
    before it in its file ("anchor"; "" at the file's start)."""
    survives = frame["id"].isin(other_ids)
    anchor = frame["id"].where(survives).groupby(frame["file"]).ffill().fillna("")
    return frame.assign(anchor=anchor)[~survives]


def quarantine_changes(before: dict[str, Path] | None, after: dict[str, Path]) -> dict[str, dict[str, int]]:
    """Give back {reason: now, before, new} over ingest's and clean's quarantine (new: not set aside before)."""
    now, then = _quarantined(after), _quarantined(before) if before else pd.DataFrame(columns=["reason", "what"])
    reasons = sorted(set(now["reason"]) | set(then["reason"]))
    seen = set(zip(then["reason"], then["what"], strict=True))
    fresh = now[[pair not in seen for pair in zip(now["reason"], now["what"], strict=True)]]
    return {reason: {"now": int((now["reason"] == reason).sum()), "before": int((then["reason"] == reason).sum()),
                     "new": int((fresh["reason"] == reason).sum())} for reason in reasons}


def _quarantined(folders: dict[str, Path]) -> pd.DataFrame:
    """Give back (reason, what) of every row set aside: ingest's by code and raw text, clean's by reason and id."""
    frames = []
    if "ingest" in folders:
        ingest = pd.read_parquet(layout.quarantine_file(folders["ingest"]), columns=["code", "raw"])
        frames.append(pd.DataFrame({"reason": ingest["code"], "what": ingest["raw"]}))
    if "clean" in folders:
        clean = pd.read_parquet(layout.quarantine_file(folders["clean"]), columns=["reason", "id"])
        frames.append(pd.DataFrame({"reason": clean["reason"], "what": clean["id"]}))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["reason", "what"])


FIGURES = {"tokenize": ("tokens", "target_tokens", "train_rows", "val_rows", "test_rows", "packing"),
           "ingest": ("rows", "quarantined"), "clean": ("rows",)}


def figure_changes(before: dict[str, Any], after: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Give back {step.figure: before, now} for row counts, tokens and split sizes."""
    figures = {}
    for step, names in FIGURES.items():
        for name in names:
            old = before.get(step, (None, {}))[1].get(name)
            figures[f"{step}.{name}"] = {"before": old, "now": after[step][1].get(name)}
    old_splits = (before.get("template", (None, {}))[1].get("splits") or {})
    for split, rows in sorted((after["template"][1].get("splits") or {}).items()):
        figures[f"template.splits.{split}"] = {"before": old_splits.get(split), "now": rows}
    for values in figures.values():
        numbers = all(isinstance(v, int | float) and not isinstance(v, bool) for v in values.values())
        values["delta"] = values["now"] - values["before"] if numbers else None
    return figures


def step_changes(before: dict[str, Any], after: dict[str, Any]) -> list[dict[str, Any]]:
    """Give back, per step whose artifact differs, the config keys, code and source that differ (one line each)."""
    found = []
    for step in STEPS:
        if step not in after or step not in before or before[step][1]["key"] == after[step][1]["key"]:
            continue
        manifest = after[step][1]
        planned = {"inputs": manifest.get("inputs", []), "config": manifest.get("config") or {},
                   "code": manifest.get("code") or {"modules": {}, "libraries": {}},
                   "source": manifest.get("source_fingerprint", "")}
        lines = [line for line in rebuild_reasons(before[step][1], planned) if not line.startswith("input ")]
        found.append({"step": step, "before": before[step][1]["key"], "now": manifest["key"],
                      "config": [line.removeprefix("config key ") for line in lines if line.startswith("config key ")],
                      "code": [line for line in lines if line.startswith(("source module", "library", "code:"))],
                      "code_version": {"before": before[step][1].get("code_version"),
                                       "now": manifest.get("code_version")},
                      "source": [line for line in lines if line.startswith("source data")]})
    return found


def metric_changes(metrics: dict[str, float], champion: dict[str, float] | None) -> list[dict[str, Any]]:
    """Give back each tuned metric beside the champion's, with the delta and whether it is better."""
    rows = []
    for name, value in sorted(metrics.items()):
        if not name.startswith("tuned_"):
            continue
        old = (champion or {}).get(name)
        delta = None if old is None else value - old
        better = None if not delta else (delta < 0) == lower_is_better(name)
        rows.append({"metric": name, "now": value, "champion": old, "delta": delta, "better": better})
    return rows


def compare(root: str, run: str | None = None, against: str = "previous") -> dict[str, Any]:
    """Give back what changed in run `run` (newest when None) against `against`: previous, champion or a run."""
    registry = Registry(root)
    try:
        data = registry.load()
    except RegistryError as exc:
        raise ChangesError(str(exc)) from None
    index = find_run(data["history"], run)
    entry = data["history"][index]
    this = _side(root, "this run", entry["evaluate_key"], entry)
    other = _against(root, data, index, against)
    try:
        after = _chain(this["folder"])
        before = _chain(other["folder"]) if other else {}
    except (ArtifactError, OSError, ValueError) as exc:
        raise ChangesError(f"cannot read the runs' artifacts: {str(exc).splitlines()[0]}") from None
    champion = data["candidates"].get(entry.get("champion_before") or "", {}).get("metrics")
    metrics = headline_metrics(after["evaluate"][1].get("metrics") or {})
    folders = {step: after[step][0] for step in ("ingest", "clean")}
    return {
        "run": _public(this), "against": _public(other) if other else None,
        "rows": row_changes(before["ingest"][0] if before else None, after["ingest"][0]),
        "quarantine": quarantine_changes({s: before[s][0] for s in folders} if before else None, folders),
        "figures": figure_changes(before, after),
        "steps": step_changes(before, after),
        "metrics": metric_changes(metrics, champion),
        "decision": {name: entry.get(name) for name in ("promoted", "how", "reasons", "champion_before", "champion")},
    }


def _public(side: dict[str, Any]) -> dict[str, Any]:
    return {**side, "folder": str(side["folder"])}


def markdown(report: dict[str, Any]) -> str:
    """Give back the report as markdown: what the Prefect UI shows and `itune changes` prints."""
    run, other = report["run"], report["against"]
    lines = [f"# What changed: run {run['flow_run_id']} (model {run['model_key']})", ""]
    if other is None:
        lines += ["Nothing to compare against (the first run, or no champion before it).", ""]
    else:
        lines += [f"Against the {other['label']}: {other['flow_run_id'] or 'evaluate ' + other['evaluate_key']} "
                  f"(model {other['model_key']}).", ""]
    changed = {f: c for f, c in report["rows"].items() if c["added"] or c["removed"] or c["changed"]}
    lines += ["## Rows by source", ""] + (_table(["source", "rows", "added", "removed", "changed"],
                                                 [[f, c["rows"], c["added"], c["removed"], c["changed"]]
                                                  for f, c in changed.items()]) if changed else ["No row changed."])
    if report["quarantine"]:
        lines += ["", "## Quarantined by reason", ""] + _table(
            ["reason", "now", "before", "new"], [[r, c["now"], c["before"], c["new"]]
                                                  for r, c in report["quarantine"].items()])
    lines += ["", "## Rows, tokens and splits", ""] + _table(
        ["figure", "before", "now", "delta"], [[name, _num(v["before"]), _num(v["now"]), _num(v["delta"], True)]
                                              for name, v in report["figures"].items()])
    lines += ["", "## Config and code that differ", ""]
    differing = [(s["step"], line) for s in report["steps"] for line in s["source"] + s["config"] + s["code"]]
    lines += [f"- {step}: {line}" for step, line in differing] or ["No step's config or code differs."]
    lines += ["", "## Metrics against the champion", ""] + _table(
        ["metric", "now", "champion", "delta", ""], [[m["metric"], _num(m["now"]), _num(m["champion"]),
                                                      _num(m["delta"], True), _mark(m["better"])]
                                                     for m in report["metrics"]])
    decision = report["decision"]
    verdict = "promoted to champion" if decision["promoted"] else "not promoted"
    lines += ["", f"**Decision: {verdict}** ({decision['how']}); champion now: {decision['champion']}", ""]
    return "\n".join(lines + [f"- {reason}" for reason in decision["reasons"] or []]) + "\n"


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    return [f"| {' | '.join(header)} |", f"|{'---|' * len(header)}"] + \
        [f"| {' | '.join(str(cell) for cell in row)} |" for row in rows]


def _num(value: Any, signed: bool = False) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool) or not isinstance(value, int | float):
        return str(value)
    if isinstance(value, int):
        return f"{value:+,}" if signed else f"{value:,}"
    return f"{value:+.4f}" if signed else f"{value:.4f}"


def _mark(better: bool | None) -> str:
    return "" if better is None else "better" if better else "worse"
