"""A step's identity in the catalog: its key for given inputs, and building or reusing its artifact."""

from __future__ import annotations

import importlib
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from catalog.keys import (
    PROJECT_PACKAGES,
    artifact_key,
    canonical_json,
    code_parts,
    code_version,
    rebuild_reasons,
    sha256_text,
)
from catalog.store import MANIFEST, ArtifactError, ArtifactRef, ArtifactStore

# Operators rehearse "fail, then rerun only what failed" by naming a step here; it fails only when it would build.
FAULT_ENV = "ITUNE_FAIL_AT"


class InjectedFault(RuntimeError):
    """The step named by ITUNE_FAIL_AT was about to build its artifact."""


@dataclass(frozen=True)
class Plan:
    """What a step would do now: its key, whether an intact artifact has it, and what a build would record."""

    step: str
    key: str
    cached: bool
    record: dict[str, Any]

    def reasons(self, store: ArtifactStore) -> list[str]:
        """Give back why the step would rebuild (empty when it is Cached), against its newest earlier artifact."""
        if self.cached:
            return []
        return rebuild_reasons(newest_manifest(store, self.step, other_than=self.key), self.record)


@dataclass(frozen=True)
class Step:
    """One pipeline step: its name, its module (whose imports make its code version), the libraries its
    bytes depend on, and how its source is fingerprinted (ingest)."""

    name: str
    module: str
    libraries: tuple[str, ...] = ()
    fingerprint: Callable[[dict[str, Any]], str] | None = field(default=None, compare=False)
    packages: tuple[str, ...] = PROJECT_PACKAGES  # whose imports are followed: this project's
    # "module:function" called when the step is about to build (not when it is Cached), to start early what later
    # steps will need. Named, not imported: it does not change what this step writes, so it is not in its code version
    on_build: str | None = field(default=None, compare=False)

    @property
    def code(self) -> dict[str, dict[str, str]]:
        return code_parts(self.module, self.libraries, self.packages)

    def _planned(self, config: dict[str, Any], pairs: list[tuple[str, str]]) -> tuple[str, dict[str, Any]]:
        code = self.code
        version = code_version(code)
        source = self.fingerprint(config) if self.fingerprint else ""
        key = artifact_key(self.name, config, [f"{step}:{key}" for step, key in pairs], version, source)
        record = {"inputs": [{"step": step, "key": key} for step, key in pairs], "config": config,
                  "code_version": version, "code": code, "source": source}
        return key, record

    def key(self, config: dict[str, Any], inputs: list[ArtifactRef]) -> str:
        """Give back the content key of this step's output for these inputs."""
        return self._planned(config, [(r.step, r.key) for r in inputs])[0]

    def plan(self, config: dict[str, Any], root: str, inputs: list[tuple[str, str]]) -> Plan:
        """Give back what the step would do for these inputs ((step, key) pairs): reuse its artifact or build."""
        key, record = self._planned(config, inputs)
        return Plan(self.name, key, ArtifactStore(root).manifest(self.name, key) is not None, record)

    def recipe(self, config: dict[str, Any], inputs: list[ArtifactRef]) -> str:
        """Give back a hash of how this step's output is made from the source: its config and code version and its
        inputs' recipes, all but the source data itself. Equal recipes: each row is derived the same way."""
        upstream = [ref.manifest().get("recipe", "") for ref in inputs]
        return sha256_text(canonical_json([self.name, config, code_version(self.code), upstream]))

    def earlier(self, config: dict[str, Any], root: str, inputs: list[ArtifactRef]) -> Path | None:
        """Give back the folder of this step's newest intact artifact with the recipe a build now would have (its
        key differs only by the data), whose derived rows a build may reuse; None when there is none."""
        return earlier_build(ArtifactStore(root), self.name, self.recipe(config, inputs))

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
        key, planned = self._planned(config, [(r.step, r.key) for r in inputs])
        existing = store.manifest(self.name, key)
        if existing is not None:
            return store.ref(self.name, key, existing), False
        if os.environ.get(FAULT_ENV) == self.name:
            raise InjectedFault(f"fault injected into '{self.name}' by {FAULT_ENV}={self.name} (a testing setting)")
        if self.on_build is not None:
            module, _, function = self.on_build.partition(":")
            getattr(importlib.import_module(module), function)()
        input_dirs = [store.open(ref) for ref in inputs]
        reasons = Plan(self.name, key, False, planned).reasons(store)
        _log_to_run(f"building {self.name} {key}: " + "; ".join(reasons))
        record: dict[str, Any] = {
            "inputs": [{"step": r.step, "key": r.key, "uri": r.uri, "sha256": r.sha256} for r in inputs],
            "config": config,
            "code_version": planned["code_version"],
            "code": planned["code"],
            "source_fingerprint": planned["source"],
            "recipe": self.recipe(config, inputs),
            "rebuilt_because": reasons,
            "built_by": current_run_ids(),
        }
        with store.writing(self.name, key, record) as out:
            record.update(build(out, input_dirs))
        # the copy this build published was hashed as it was written; one another run published first is verified
        manifest = store.published.pop(store.path(self.name, key), None) or store.manifest(self.name, key)
        if manifest is None:
            raise ArtifactError(f"artifact {store.path(self.name, key)} failed verification right after writing")
        return store.ref(self.name, key, manifest), True


def _listed_manifests(store: ArtifactStore, step: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """Yield (key, manifest as written) for each artifact folder of `step` on this root whose manifest parses."""
    folder = store.root / step
    for listing in folder.glob(f"[!.]*/{MANIFEST}") if folder.is_dir() else []:
        try:
            yield listing.parent.name, json.loads(listing.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue


def newest_manifest(store: ArtifactStore, step: str, other_than: str | None = None) -> dict[str, Any] | None:
    """Give back the manifest of the step's most recently built artifact on this root (read, not re-verified)."""
    newest: dict[str, Any] | None = None
    for key, manifest in _listed_manifests(store, step):
        if key != other_than and (newest is None or str(manifest.get("created_at")) > str(newest.get("created_at"))):
            newest = manifest
    return newest


def earlier_build(store: ArtifactStore, step: str, recipe: str) -> Path | None:
    """Give back the folder of the newest artifact of `step` on this root made by `recipe` that verifies, or None.

    Read on this machine's root (a shared root's mirror): an artifact only the shared copy holds is not looked for.
    """
    found = sorted(((str(manifest.get("created_at")), key) for key, manifest in _listed_manifests(store, step)
                    if manifest.get("recipe") == recipe), reverse=True)
    for _, key in found:
        if store.manifest(step, key) is not None:  # reused rows are read, so they must verify like any input
            return store.path(step, key)
    return None


def _log_to_run(message: str) -> None:
    from prefect.exceptions import MissingContextError
    from prefect.logging import get_run_logger

    try:
        get_run_logger().info(message)
    except MissingContextError:
        pass  # called outside a flow run (a test or a script calling the step directly): nobody to tell


def current_run_ids() -> dict[str, str | None] | None:
    """Give back the Prefect flow run and task run this code runs in (None outside any run)."""
    from prefect.context import FlowRunContext, TaskRunContext

    flow_run, task_run = FlowRunContext.get(), TaskRunContext.get()
    if flow_run is None and task_run is None:
        return None
    flow_run_id = flow_run.flow_run.id if flow_run and flow_run.flow_run else task_run.task_run.flow_run_id
    return {"flow_run_id": str(flow_run_id) if flow_run_id else None,
            "task_run_id": str(task_run.task_run.id) if task_run else None}
