"""The catalog: content-addressed artifacts, manifests, atomic writes, verification, and caching.

An artifact lives at `<root>/<step>/<key>/`: its files plus `manifest.json`, written last. The key
hashes the input artifacts' keys, the step's config section and the step's code, so equal inputs
give an equal key. An artifact counts as present only when its manifest exists and every file's
sha256 matches it; anything else is rebuilt, never read.

The root is a folder or an fsspec URL (`s3://bucket/itune`, `gs://...`, `memory://...`) that workers
on several machines share. With a URL, each machine builds and reads in a local mirror of the root
and the shared copy is the meeting point: an artifact is uploaded after it is published locally,
its manifest last (object stores have no rename, so a manifest marks a complete upload), and is
downloaded on first use with every file checked against the manifest's sha256.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from catalog.files import files_match, sweep_abandoned, temp_name, verified_listing, write_text_atomically
from catalog.keys import canonical_json, library_versions, sha256_text
from catalog.shared_root import SharedRoot, absolute_root, is_url

MANIFEST = "manifest.json"
# Library versions every manifest records, for the reader (what keys a step is the code version's job).
MANIFEST_LIBRARIES = ("prefect", "pandas", "pyarrow", "torch", "transformers", "great-expectations")
_HASH_CHUNK = 1 << 20

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
        """The artifact's folder on this machine (fetched from a shared root on first use)."""
        return local_folder(self.uri, self.step, self.key)

    def manifest(self) -> dict[str, Any]:
        """The artifact's manifest as written, not re-verified: a reference is handed out only for a verified one."""
        return json.loads((self.path / MANIFEST).read_text(encoding="utf-8"))


def sha256_file(path: Path) -> str:
    """Give back a file's sha256, hashed once per process while the file itself stays as it was.

    A step publishes its files (hashing them) and the next step verifies them at once: hundreds of megabytes
    hashed twice within seconds. A file is known here by device, inode, size, and modification and change times;
    any write, link or touch moves the change time (which no one can set back), so a changed file is hashed
    again, and a renamed folder's files (same inodes) are not.
    """
    identity = _identity(path)
    if identity not in _DIGESTS:
        if len(_DIGESTS) >= _DIGESTS_KEPT:
            _DIGESTS.clear()
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            while chunk := handle.read(_HASH_CHUNK):
                digest.update(chunk)
        _DIGESTS[identity] = digest.hexdigest()
    return _DIGESTS[identity]


_DIGESTS: dict[tuple[int, ...], str] = {}
_DIGESTS_KEPT = 100_000


def _identity(path: Path) -> tuple[int, ...]:
    stat = os.stat(path)
    return stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns


def link_file(source: Path, target: Path) -> None:
    """Hard-link `source` at `target` (copy it where links cannot be made), its sha256 kept: the same bytes."""
    digest = sha256_file(source)
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)
    _DIGESTS[_identity(target)] = digest  # a link moves the change time of both names: one inode, known again


def local_folder(uri: str, step: str, key: str) -> Path:
    """Give back the folder on this machine of the artifact at `uri`, a path or `<shared root URL>/<step>/<key>`."""
    if not is_url(uri):
        return Path(uri)
    store = ArtifactStore(uri.rstrip("/").rsplit("/", 2)[0])
    if not (store.path(step, key) / MANIFEST).is_file():
        store.manifest(step, key)  # fetches it into this machine's mirror
    return store.path(step, key)


class ArtifactStore:
    """Reads and writes artifacts under one root: a folder, or the local mirror of a shared URL root."""

    def __init__(self, root: str | Path):
        self.shared = SharedRoot(str(root)) if is_url(root) else None
        # manifests this store published itself, by folder: their files were hashed just before the rename
        self.published: dict[Path, dict[str, Any]] = {}
        self.root = self.shared.mirror if self.shared else Path(absolute_root(root))

    @property
    def location(self) -> str:
        """The root as every machine names it: the URL of a shared root, else the folder."""
        return self.shared.url if self.shared else str(self.root)

    def uri_of(self, step: str, key: str) -> str:
        """Give back an artifact's location as a URI that is the same on every machine sharing the root."""
        if self.shared:
            return f"{self.shared.url}/{step}/{key}"
        return self.path(step, key).as_uri()

    def path(self, step: str, key: str) -> Path:
        for part in (step, key):
            if not part or part in (".", "..") or "/" in part or "\\" in part:
                raise ArtifactError(f"artifact name {part!r} would leave the artifact root {self.root}")
        return self.root / step / key

    def manifest(self, step: str, key: str) -> dict[str, Any] | None:
        """Give back the manifest of an intact artifact, or None if it is missing or corrupt.

        With a shared root, an artifact missing here is fetched from the shared copy first.
        """
        manifest = _intact_manifest(self.path(step, key))
        if manifest is None and self.shared is not None:
            manifest = self._fetch(step, key)
        return manifest

    def ref(self, step: str, key: str, manifest: dict[str, Any]) -> ArtifactRef:
        uri = self.uri_of(step, key) if self.shared else str(self.path(step, key))
        return ArtifactRef(step=step, key=key, uri=uri, rows=manifest["rows"], sha256=manifest["sha256"])

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
        sweep_abandoned(final.parent)
        temp = final.parent / temp_name(".tmp", key)
        temp.mkdir()
        try:
            yield temp
            looked = time.time_ns()
            files = {
                str(p.relative_to(temp)): sha256_file(p) for p in sorted(temp.rglob("*")) if p.is_file()
            }
            manifest = {
                "step": step,
                "key": key,
                **record,
                "files": files,
                "sha256": sha256_text(canonical_json(files)),
                "file_stats": {"looked_ns": looked, "files": {name: _stat_of(temp / name) for name in files}},
                "build_id": uuid.uuid4().hex,
                "created_at": datetime.now(timezone.utc).isoformat(),
                "versions": {"python": platform.python_version(), **library_versions(MANIFEST_LIBRARIES)},
            }
            manifest.setdefault("rows", 0)
            text = json.dumps(manifest, indent=2, default=str)
            write_text_atomically(temp / MANIFEST, text)
            if self._publish(temp, final):
                self.published[final] = json.loads(text)  # as a reader of the file would see it
        finally:
            shutil.rmtree(temp, ignore_errors=True)
        if self.shared is not None:
            self._upload(step, key)

    def _upload(self, step: str, key: str) -> None:
        """Copy a published artifact to the shared root, manifest last: until it lands, others see no artifact."""
        assert self.shared is not None
        folder = self.path(step, key)
        manifest = _intact_manifest(folder)
        if manifest is None:
            return  # nothing intact to share (the local publish lost to a corrupt copy); the next run rebuilds
        for name in manifest["files"]:
            self.shared.upload(folder / name, [step, key, name])
        self.shared.upload(folder / MANIFEST, [step, key, MANIFEST])

    def _fetch(self, step: str, key: str) -> dict[str, Any] | None:
        """Download an artifact from the shared root into the mirror if its copy there is complete and intact."""
        assert self.shared is not None
        text = self.shared.read_text(step, key, MANIFEST)
        if text is None:
            return None
        final = self.path(step, key)
        final.parent.mkdir(parents=True, exist_ok=True)
        temp = final.parent / temp_name(".fetch", key)
        try:
            files = json.loads(text)["files"]
            for name in files:
                self.shared.download([step, key, name], temp / name)
            if not files_match(temp, files, sha256_file):
                return None  # a torn or tampered shared copy counts as missing: the step rebuilds and re-uploads
            write_text_atomically(temp / MANIFEST, text)
            self._publish(temp, final)
        except (OSError, ValueError, KeyError, TypeError):
            return None
        finally:
            shutil.rmtree(temp, ignore_errors=True)
        return _intact_manifest(final)

    def _publish(self, temp: Path, final: Path) -> bool:
        """Rename `temp` to `final`; give back whether it was this copy that landed there."""
        if final.exists():
            if _intact_manifest(final) is not None:
                return False  # another run published the same content first
            aside = final.parent / f".corrupt-{final.name}-{uuid.uuid4().hex[:8]}"
            os.rename(final, aside)
            shutil.rmtree(aside, ignore_errors=True)
        try:
            os.rename(temp, final)
        except OSError:
            if _intact_manifest(final) is None:
                raise
            return False
        return True


def _intact_manifest(folder: Path) -> dict[str, Any] | None:
    """Give back the manifest in `folder` if every file it lists matches its sha256 (see _unchanged_files)."""
    unchanged = _unchanged_files(folder / MANIFEST)
    return verified_listing(folder / MANIFEST, lambda file: unchanged.get(file) or sha256_file(file))


def _stat_of(path: Path) -> list[int]:
    stat = os.stat(path)
    return [stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns]


# the kernel stamps files from a clock that runs a tick behind, so a file changed just after its stat was taken can
# keep the same time: only a file already this old when the writer looked at it is taken as known by its stat
_SETTLED_NS = 2_000_000_000


def _unchanged_files(listing: Path) -> dict[Path, str]:
    """Give back {file: listed sha256} for the listed files whose device, inode, size and modification time are still
    what the writer of the manifest saw, where the file had settled by then (as git trusts its index).

    A nightly build verifies yesterday's artifacts before reusing them: gigabytes hashed again otherwise. Any write
    moves the modification time; a file fetched, copied or restored gets another inode and is hashed.
    """
    try:
        manifest = json.loads(listing.read_text(encoding="utf-8"))
        looked, stats = manifest["file_stats"]["looked_ns"], manifest["file_stats"]["files"]
        unchanged = {}
        for name, digest in manifest["files"].items():
            seen = stats.get(name)
            if seen and seen[3] < looked - _SETTLED_NS and _stat_of(listing.parent / name) == seen:
                unchanged[listing.parent / name] = digest
                _DIGESTS[_identity(listing.parent / name)] = digest  # known to link_file and the next step too
        return unchanged
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return {}
