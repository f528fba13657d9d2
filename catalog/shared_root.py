"""Shared artifact roots: an fsspec URL that machines share, and where each machine mirrors it."""

from __future__ import annotations

import os
from pathlib import Path

from catalog.keys import sha256_text

# Where machines keep their local mirrors of shared (URL) artifact roots.
MIRROR_ENV = "ITUNE_MIRROR"
DEFAULT_MIRROR = "~/.cache/itune/mirrors"


def is_url(root: str | Path) -> bool:
    """Tell whether an artifact root names shared storage (an fsspec URL other than a local file path)."""
    text = str(root)
    return "://" in text and text.split("://", 1)[0] not in ("file", "")


def absolute_root(root: str | Path) -> str:
    """Give back the root as deployments and other working directories must see it: absolute, URLs unchanged."""
    if is_url(root):
        return str(root).rstrip("/")
    return str(Path(str(root).removeprefix("file://")).expanduser().resolve())


class SharedRoot:
    """The shared copy of a URL artifact root, reached through fsspec, and this machine's mirror of it."""

    def __init__(self, url: str):
        import fsspec

        self.url = url.rstrip("/")
        self.fs, self.base = fsspec.core.url_to_fs(self.url)
        mirrors = Path(os.environ.get(MIRROR_ENV) or DEFAULT_MIRROR).expanduser().resolve()
        self.mirror = mirrors / sha256_text(self.url)[:16]

    def remote(self, *parts: str) -> str:
        return "/".join([self.base.rstrip("/"), *parts])

    def read_text(self, *parts: str) -> str | None:
        try:
            return self.fs.cat_file(self.remote(*parts)).decode("utf-8")
        except FileNotFoundError:
            return None

    def download(self, parts: list[str], local: Path) -> None:
        local.parent.mkdir(parents=True, exist_ok=True)
        self.fs.get_file(self.remote(*parts), str(local))

    def upload(self, local: Path, parts: list[str]) -> None:
        target = self.remote(*parts)
        self.fs.makedirs(target.rsplit("/", 1)[0], exist_ok=True)
        self.fs.put_file(str(local), target)
