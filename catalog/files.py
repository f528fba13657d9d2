"""Files on disk as readers must see them: whole or not at all, and matching what a listing says."""

from __future__ import annotations

import json
import os
import shutil
import socket
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any


def verified_listing(listing: Path, describe: Callable[[Path], Any]) -> dict[str, Any] | None:
    """Give back the JSON at `listing` if it parses and `describe` of every file in its "files" (paths relative
    to the listing's folder) equals the value listed; None otherwise."""
    try:
        data = json.loads(listing.read_text(encoding="utf-8"))
        files = data["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return data if files_match(listing.parent, files, describe) else None


def temp_name(kind: str, key: str) -> str:
    # the writer's pid and host in the name let a later run tell an abandoned temp folder from a live one
    return f"{kind}-{key}-{uuid.uuid4().hex[:8]}-{os.getpid()}@{socket.gethostname()}"


def _writer_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


def sweep_abandoned(folder: Path) -> list[Path]:
    """Remove temp folders whose writer on this host is gone (killed, out of memory); give back what went.

    Temp folders of live writers and of other hosts are left alone: from here it cannot be told whether a
    writer on another machine is still at work.
    """
    removed = []
    host = socket.gethostname()
    for temp in [*folder.glob(".tmp-*@*"), *folder.glob(".fetch-*@*")]:
        name, _, temp_host = temp.name.partition("@")
        pid = name.rsplit("-", 1)[-1]
        if temp_host == host and pid.isdigit() and not _writer_alive(int(pid)):
            shutil.rmtree(temp, ignore_errors=True)
            removed.append(temp)
    return removed


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
