"""Finding artifacts and following them upstream: the one resolver and the one lineage walker."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from catalog import layout
from catalog.config import STEPS
from catalog.store import MANIFEST, ArtifactError, ArtifactStore, local_folder


def resolve(spec: str, root: str | Path) -> Path:
    """Give back an artifact folder from a path (the artifact or a file inside it), `STEP/KEY-prefix`, or a key prefix.

    Raises ArtifactError naming the spec when it matches no artifact or several.
    """
    candidate = Path(spec).expanduser()
    for folder in (candidate, candidate.parent):
        if (folder / MANIFEST).is_file():
            return folder.resolve()
    store = ArtifactStore(root)
    step, _, prefix = spec.rpartition("/")
    steps = [step] if step in STEPS else list(STEPS) if not step else []
    matches = [listing.parent for name in steps for listing in (store.root / name).glob(f"{prefix}*/{MANIFEST}")]
    if len(matches) == 1:
        return matches[0]
    raise ArtifactError(f"'{spec}' is not an artifact folder, STEP/KEY (e.g. finetune/3fa2) or a unique key prefix "
                        f"under {store.root}" + (f"; {len(matches)} match" if matches else ""))


def _inputs(manifest: dict[str, Any]) -> list[Path]:
    return [local_folder(entry["uri"], entry["step"], entry["key"]) for entry in manifest.get("inputs", [])]


def lineage(folder: Path) -> list[dict[str, Any]]:
    """Give back the chain of manifests from an artifact back to its source files, nearest first."""
    chain: list[dict[str, Any]] = []
    pending = [Path(folder)]
    seen: set[Path] = set()
    while pending:
        current = pending.pop(0)
        if current in seen:
            continue
        seen.add(current)
        manifest = layout.read_manifest(current)
        store = ArtifactStore(current.parent.parent)
        verified = store.manifest(manifest["step"], manifest["key"]) is not None
        chain.append({"uri": str(current), "step": manifest["step"], "key": manifest["key"],
                      "code_version": manifest.get("code_version"), "config": manifest.get("config"),
                      "rows": manifest.get("rows"), "created_at": manifest.get("created_at"),
                      "verified": verified, "inputs": [str(path) for path in _inputs(manifest)],
                      "sources": manifest.get("sources") or [], "built_by": manifest.get("built_by")})
        pending += _inputs(manifest)
    return chain


def upstream_manifest(folder: str | Path, step: str, depth: int = 10) -> dict[str, Any] | None:
    """Give back the manifest of the first `step` artifact up an artifact's lineage, or None if unreachable."""
    current = Path(folder)
    for _ in range(depth):
        try:
            manifest = layout.read_manifest(current)
        except (OSError, ValueError):
            return None
        if manifest.get("step") == step:
            return manifest
        inputs = manifest.get("inputs") or []
        if not inputs:
            return None
        # a step's primary input comes first (template before tokenize for evaluate; data for the rest)
        entry = next((i for i in inputs if i["step"] == step), inputs[-1])
        current = local_folder(entry["uri"], entry["step"], entry["key"])
    return None


def upstream_config(folder: str | Path, step: str) -> dict[str, Any] | None:
    """Give back the config of the first `step` artifact up an artifact's lineage, or None if unreachable."""
    manifest = upstream_manifest(folder, step)
    return manifest.get("config") if manifest else None


def model_and_template(folder: Path) -> tuple[Path, dict[str, Any] | None]:
    """Give back (the save_pretrained folder, the template config it was trained with if its lineage says so)."""
    folder = Path(folder)
    if (layout.model_dir(folder) / "config.json").is_file():
        artifact = folder
    elif (folder / "config.json").is_file():
        artifact = folder.parent if (folder.parent / MANIFEST).is_file() else folder
    else:
        raise ArtifactError(f"{folder} holds no model (expected a finetune artifact or a save_pretrained folder)")
    model = layout.model_dir(artifact) if (layout.model_dir(artifact) / "config.json").is_file() else folder
    template = upstream_config(artifact, "template")
    return model, {k: v for k, v in template.items() if not k.endswith("_fraction")} if template else None
