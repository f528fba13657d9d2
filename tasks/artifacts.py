"""The catalog: content-addressed artifacts, manifests, atomic writes, verification, and caching.

An artifact lives at `<root>/<step>/<key>/`: its files plus `manifest.json`, written last. The key
hashes the input artifacts' keys, the step's config section and the step's code, so equal inputs
give an equal key. An artifact counts as present only when its manifest exists and every file's
sha256 matches it; anything else is rebuilt, never read.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from pydantic import BaseModel

MANIFEST = "manifest.json"
_HASH_CHUNK = 1 << 20

# Operators rehearse "fail, then rerun only what failed" by naming a step here; it fails only when it would build.
FAULT_ENV = "ITUNE_FAIL_AT"


class InjectedFault(RuntimeError):
    """The step named by ITUNE_FAIL_AT was about to build its artifact."""


class ArtifactError(RuntimeError):
    """An artifact is missing or fails verification."""


class ArtifactRef(BaseModel):
    """What steps pass to each other: where an artifact is and the content key it was built for."""

    step: str
    key: str
    uri: str
    rows: int
    sha256: str

    @property
    def path(self) -> Path:
        return Path(self.uri)


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def code_version(module_file: str | Path) -> str:
    """Give back a hash of a step module's source: editing a step invalidates its artifacts."""
    return sha256_text(Path(module_file).read_text(encoding="utf-8"))[:12]


def artifact_key(step: str, config: dict[str, Any], input_keys: list[str], code: str, fingerprint: str) -> str:
    """Give back the content key of a step's output."""
    payload = {"step": step, "config": config, "inputs": input_keys, "code": code, "source": fingerprint}
    return sha256_text(canonical_json(payload))[:16]


def _library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in ("prefect", "pandas", "pyarrow", "torch", "transformers", "great_expectations"):
        try:
            versions[name] = metadata.version(name.replace("_", "-"))
        except metadata.PackageNotFoundError:
            continue
    return versions


class ArtifactStore:
    """Reads and writes artifacts under one root folder."""

    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser().resolve()

    def path(self, step: str, key: str) -> Path:
        for part in (step, key):
            if not part or part in (".", "..") or "/" in part or "\\" in part:
                raise ArtifactError(f"artifact name {part!r} would leave the artifact root {self.root}")
        return self.root / step / key

    def manifest(self, step: str, key: str) -> dict[str, Any] | None:
        """Give back the manifest of an intact artifact, or None if it is missing or corrupt."""
        folder = self.path(step, key)
        try:
            manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
            files = manifest["files"]
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return manifest if files_match(folder, files, sha256_file) else None

    def ref(self, step: str, key: str, manifest: dict[str, Any]) -> ArtifactRef:
        return ArtifactRef(
            step=step, key=key, uri=str(self.path(step, key)), rows=manifest["rows"], sha256=manifest["sha256"]
        )

    def open(self, ref: ArtifactRef) -> Path:
        """Give back the folder of a verified artifact; raise ArtifactError if it fails verification."""
        manifest = self.manifest(ref.step, ref.key)
        if manifest is None or manifest["sha256"] != ref.sha256:
            raise ArtifactError(f"artifact {ref.uri} is missing or corrupt; run the pipeline again to rebuild it")
        return self.path(ref.step, ref.key)

    @contextmanager
    def writing(self, step: str, key: str, record: dict[str, Any]) -> Iterator[Path]:
        """Yield a private temp folder; on success publish it atomically with its manifest written last.

        `record` is filled in by the caller while writing (rows, stats) and lands in the manifest.
        Two writers of one key both finish: the first rename wins and the other's copy is discarded.
        """
        final = self.path(step, key)
        final.parent.mkdir(parents=True, exist_ok=True)
        temp = final.parent / f".tmp-{key}-{uuid.uuid4().hex[:8]}"
        temp.mkdir()
        try:
            yield temp
            files = {
                str(p.relative_to(temp)): sha256_file(p) for p in sorted(temp.rglob("*")) if p.is_file()
            }
            manifest = {
                "step": step,
                "key": key,
                **record,
                "files": files,
                "sha256": sha256_text(canonical_json(files)),
                "build_id": uuid.uuid4().hex,
                "created_at": datetime.now(timezone.utc).isoformat(),
                "versions": _library_versions(),
            }
            manifest.setdefault("rows", 0)
            write_text_atomically(temp / MANIFEST, json.dumps(manifest, indent=2, default=str))
            self._publish(temp, final)
        finally:
            shutil.rmtree(temp, ignore_errors=True)

    def find(self, spec: str) -> Path:
        """Give back an artifact folder from a path, `step/key`, or a unique key prefix."""
        candidate = Path(spec).expanduser()
        if (candidate / MANIFEST).is_file():
            return candidate.resolve()
        if (self.root / spec / MANIFEST).is_file():
            return self.root / spec
        matches = [m.parent for m in self.root.glob(f"*/{spec}*/{MANIFEST}")]
        if len(matches) != 1:
            raise ArtifactError(f"'{spec}' names {len(matches)} artifacts under {self.root}; give step/key or a path")
        return matches[0]

    def lineage(self, folder: Path) -> list[dict[str, Any]]:
        """Give back the chain of manifests from an artifact back to its source, nearest first."""
        chain: list[dict[str, Any]] = []
        pending = [Path(folder)]
        seen: set[Path] = set()
        while pending:
            current = pending.pop(0)
            if current in seen:
                continue
            seen.add(current)
            manifest = json.loads((current / MANIFEST).read_text(encoding="utf-8"))
            verified = self.manifest(manifest["step"], manifest["key"]) is not None if current.parent.parent == \
                self.root else None
            chain.append({"uri": str(current), "step": manifest["step"], "key": manifest["key"],
                          "code_version": manifest.get("code_version"), "config": manifest.get("config"),
                          "rows": manifest.get("rows"), "created_at": manifest.get("created_at"),
                          "verified": verified, "inputs": [entry["uri"] for entry in manifest.get("inputs", [])],
                          "sources": manifest.get("sources") or []})
            pending += [Path(entry["uri"]) for entry in manifest.get("inputs", [])]
        return chain

    def _publish(self, temp: Path, final: Path) -> None:
        if final.exists():
            if self.manifest(final.parent.name, final.name) is not None:
                return  # another run published the same content first
            aside = final.parent / f".corrupt-{final.name}-{uuid.uuid4().hex[:8]}"
            os.rename(final, aside)
            shutil.rmtree(aside, ignore_errors=True)
        try:
            os.rename(temp, final)
        except OSError:
            if self.manifest(final.parent.name, final.name) is None:
                raise


def write_text_atomically(path: Path, text: str) -> None:
    """Write a file so a reader sees the old content or the new, never a part: temp, fsync, rename."""
    temp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(temp, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)


def files_match(folder: Path, files: dict[str, Any], describe: Callable[[Path], Any]) -> bool:
    """Tell whether every listed file exists under `folder` and `describe(file)` equals its listed value."""
    for name, expected in files.items():
        file = folder / name
        if not file.is_file() or describe(file) != expected:
            return False
    return True


@dataclass(frozen=True)
class Step:
    """One pipeline step's identity: its name, its code version and how its source is fingerprinted."""

    name: str
    module_file: str
    fingerprint: Callable[[dict[str, Any]], str] | None = None

    @property
    def code(self) -> str:
        return code_version(self.module_file)

    def key(self, config: dict[str, Any], inputs: list[ArtifactRef]) -> str:
        source = self.fingerprint(config) if self.fingerprint else ""
        return artifact_key(self.name, config, [f"{r.step}:{r.key}" for r in inputs], self.code, source)

    def produce(
        self,
        config: dict[str, Any],
        root: str,
        inputs: list[ArtifactRef],
        build: Callable[[Path, list[Path]], dict[str, Any]],
    ) -> tuple[ArtifactRef, bool]:
        """Give back (the artifact for these inputs, whether it was built now).

        `build(out_dir, input_dirs)` writes the files and returns at least {"rows": N}. An intact
        artifact with the same key is reused as it is.
        """
        store = ArtifactStore(root)
        key = self.key(config, inputs)
        existing = store.manifest(self.name, key)
        if existing is not None:
            return store.ref(self.name, key, existing), False
        if os.environ.get(FAULT_ENV) == self.name:
            raise InjectedFault(f"fault injected into '{self.name}' by {FAULT_ENV}={self.name} (a testing setting)")
        input_dirs = [store.open(ref) for ref in inputs]
        record: dict[str, Any] = {
            "inputs": [{"step": r.step, "key": r.key, "uri": r.uri, "sha256": r.sha256} for r in inputs],
            "config": config,
            "code_version": self.code,
        }
        with store.writing(self.name, key, record) as out:
            record.update(build(out, input_dirs))
        manifest = store.manifest(self.name, key)
        if manifest is None:
            raise ArtifactError(f"artifact {store.path(self.name, key)} failed verification right after writing")
        return store.ref(self.name, key, manifest), True
