"""Ingest's memo: each source file's rows, reused from the previous ingest artifact while the file's sha256 stays.

A nightly folder grows by new files; an unchanged file gives the same rows (ids, sources, quarantined records) as
before, so only new or changed files are read and parsed, and a file that is gone leaves nothing behind. The
manifest lists every file read (`source_files`: its sha256 and where its rows and quarantined records sit in
the artifact), which is how the next build finds them.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from catalog import layout
from catalog.store import sha256_file
from toolkit.readers import resolve_files

# (file label, the spec's position, the spec, quarantine list) -> the file's canonical rows
FileReader = Callable[[str, int, list[dict[str, Any]]], pa.Table]


@dataclass(frozen=True)
class EarlierRows:
    """Rows [start, start + num_rows) of the earlier ingest artifact's data."""

    start: int
    num_rows: int


class SourceFiles:
    """The files of the sources read whole, and what the previous ingest artifact of the same config holds of them."""

    def __init__(self, earlier: Path | None):
        self.files: list[dict[str, Any]] = []
        self.rows_before = 0  # rows the artifact holds before the next file's: other sources' too
        self.reused = 0
        known = layout.read_manifest(earlier).get("source_files", []) if earlier is not None else []
        self.known = {(entry["spec"], entry["file"], entry["sha256"]): entry for entry in known}
        self.earlier = earlier

    @functools.cached_property
    def _earlier_quarantine(self) -> pa.Table:
        assert self.earlier is not None
        return pq.read_table(layout.quarantine_file(self.earlier))

    def tables(self, spec_number: int, source: str, read: FileReader, quarantine: list[dict[str, Any]]
               ) -> Iterator[pa.Table | EarlierRows]:
        """Yield each file's rows of one source in file order: read, or where the file is unchanged, the place of its
        rows in the earlier artifact (DataParts.write_earlier links or reads them, so they need not be read here)."""
        for path in resolve_files(source):
            label, digest = str(path), sha256_file(path)
            known = self.known.get((spec_number, label, digest))
            before = len(quarantine)
            if known is None:
                rows: pa.Table | EarlierRows = read(label, spec_number, quarantine)
            else:
                rows = EarlierRows(known["offset"], known["rows"])
                quarantine += self._earlier_quarantine.slice(known["quarantine_offset"], known["quarantined"]
                                                             ).to_pylist()
                self.reused += rows.num_rows
            self.files.append({"spec": spec_number, "file": label, "sha256": digest, "offset": self.rows_before,
                               "rows": rows.num_rows, "quarantine_offset": before,
                               "quarantined": len(quarantine) - before, "reused": known is not None})
            self.rows_before += rows.num_rows
            yield rows

    def record(self) -> dict[str, Any]:
        """Give back what the manifest keeps: every file read, and how many rows came from the earlier artifact."""
        return {"source_files": self.files, "rows_reused": self.reused,
                "reused_from": self.earlier.name if self.earlier is not None and self.reused else None}
