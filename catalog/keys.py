"""Content keys: what a step's artifact is keyed on, and why a key differs from the artifact on disk.

A key hashes the input artifacts' keys, the step's config, a fingerprint of its source (ingest) and
its code version. The code version covers everything that shapes the step's bytes: the step's module
and every project module it imports, found by walking the imports (lazy ones inside functions too),
and the versions of the libraries the step declares its output depends on. A module is hashed as its
parsed syntax tree without docstrings, so comments, docstrings and formatting never cost a rebuild.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import importlib.util
import json
from importlib import metadata
from pathlib import Path
from typing import Any

# Top-level packages of this project: imports of these are followed; anything else is a library.
PROJECT_PACKAGES = ("catalog", "commands", "data_checks", "deployments", "flows", "tasks", "toolkit")


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@functools.lru_cache(maxsize=16)
def _package_folder(top: str) -> Path | None:
    spec = importlib.util.find_spec(top)  # a top-level lookup: finds the package without importing it
    return Path(spec.origin).parent if spec and spec.origin else None


def _module_file(name: str) -> Path | None:
    """Give back the source file of a project module, or None when the dotted name is not a module."""
    top, *rest = name.split(".")
    folder = _package_folder(top)
    if folder is None:
        return None
    base = folder.joinpath(*rest)
    for file in (base.with_suffix(".py") if rest else None, base / "__init__.py"):
        if file is not None and file.is_file():
            return file
    return None


def _without_docstrings(tree: ast.AST) -> ast.AST:
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                    and isinstance(body[0].value.value, str):
                node.body = body[1:] or [ast.Pass()]
    return tree


@functools.lru_cache(maxsize=256)
def _parsed(path: str, mtime_ns: int, size: int) -> tuple[str, tuple[str, ...]]:
    """Give back (hash of the module's syntax tree without docstrings, the modules it imports)."""
    tree = ast.parse(Path(path).read_text(encoding="utf-8"), filename=path)
    imported = []
    package = _package_of(path)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            imported.append(base)
            # `from toolkit import builtin_tasks` imports a module, not a name
            imported += [f"{base}.{alias.name}" for alias in node.names]
    dump = ast.dump(_without_docstrings(tree), include_attributes=False)
    return sha256_text(dump)[:16], tuple(imported)


def _package_of(path: str) -> str:
    file = Path(path)
    parts = [] if file.name == "__init__.py" else [file.stem]
    folder = file.parent
    while (folder / "__init__.py").is_file():
        parts.insert(0, folder.name)
        folder = folder.parent
    return ".".join(parts[:-1]) if file.name != "__init__.py" else ".".join(parts)


def module_hashes(module: str, packages: tuple[str, ...] = PROJECT_PACKAGES) -> dict[str, str]:
    """Give back {project module file: hash} for a module and every project module it imports, transitively."""
    hashes: dict[str, str] = {}
    seen: set[str] = set()
    pending = [module]
    while pending:
        name = pending.pop()
        if name in seen or name.split(".")[0] not in packages:
            continue
        seen.add(name)
        file = _module_file(name)
        if file is None:
            continue  # a name imported from a module, not a module of its own
        stat = file.stat()
        digest, imported = _parsed(str(file), stat.st_mtime_ns, stat.st_size)
        top = file.parents[name.count(".") + (1 if file.name == "__init__.py" else 0)]
        hashes[file.relative_to(top).as_posix()] = digest
        # importing a.b.c runs a/__init__.py and a/b/__init__.py too
        parents = [".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)]
        pending += [*parents, *imported]
    return dict(sorted(hashes.items()))


def library_versions(names: tuple[str, ...]) -> dict[str, str]:
    """Give back the installed version of each named distribution ("absent" where it is not installed)."""
    versions = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "absent"
    return versions


def code_parts(module: str, libraries: tuple[str, ...], packages: tuple[str, ...] = PROJECT_PACKAGES
               ) -> dict[str, dict[str, str]]:
    """Give back what a step's code version is made of: its project modules and its libraries' versions."""
    return {"modules": module_hashes(module, packages), "libraries": library_versions(libraries)}


def code_version(parts: dict[str, dict[str, str]]) -> str:
    return sha256_text(canonical_json(parts))[:12]


def artifact_key(step: str, config: dict[str, Any], input_keys: list[str], code: str, fingerprint: str) -> str:
    """Give back the content key of a step's output."""
    payload = {"step": step, "config": config, "inputs": input_keys, "code": code, "source": fingerprint}
    return sha256_text(canonical_json(payload))[:16]


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Give back a nested config as {dotted key: value}; an empty mapping is a value of its own."""
    if not isinstance(tree, dict) or not tree:
        return {prefix: tree}
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        flat.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def _changes(kind: str, before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    lines = []
    for name in sorted(set(before) | set(after)):
        old, new = before.get(name, "(none)"), after.get(name, "(none)")
        if old != new:
            lines.append(f"{kind} {name}: {_short(old)} -> {_short(new)}")
    return lines


def _short(value: Any) -> str:
    text = json.dumps(value, default=str) if not isinstance(value, str) else value
    return text if len(text) <= 40 else text[:37] + "..."


def rebuild_reasons(previous: dict[str, Any] | None, planned: dict[str, Any]) -> list[str]:
    """Give back, one line each, what differs between a step's previous manifest and the build it would do now.

    `planned` holds what a build now records: inputs (step, key), config, code (modules, libraries), source.
    """
    if previous is None:
        return ["no earlier artifact of this step"]
    reasons = []
    before_inputs = {entry["step"]: entry["key"] for entry in previous.get("inputs", [])}
    after_inputs = {entry["step"]: entry["key"] for entry in planned["inputs"]}
    reasons += [f"input {step} artifact: {before_inputs.get(step, '(none)')} -> {key}"
                for step, key in after_inputs.items() if before_inputs.get(step) != key]
    if previous.get("source_fingerprint", planned["source"]) != planned["source"]:
        reasons.append(f"source data: fingerprint {str(previous.get('source_fingerprint'))[:12]} -> "
                       f"{planned['source'][:12]}")
    reasons += _changes("config key", flatten(previous.get("config") or {}), flatten(planned["config"]))
    old_code = previous.get("code") or {}
    if not old_code:
        reasons.append("code: the earlier artifact records no per-module versions (built by an older itune)")
    else:
        before, after = old_code.get("modules", {}), planned["code"]["modules"]
        for module in sorted(set(before) | set(after)):
            if before.get(module) != after.get(module):
                how = "added" if module not in before else "no longer imported" if module not in after else "changed"
                reasons.append(f"source module {module} {how}")
        reasons += _changes("library", old_code.get("libraries", {}), planned["code"]["libraries"])
    return reasons or ["the earlier artifact is missing or failed verification"]
