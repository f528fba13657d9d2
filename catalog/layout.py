"""What each step's artifact holds, by name, and the readers other steps and commands use.

Only this module spells an artifact's file names: a step writes `layout.data_path(out)` (through
catalog.parquet_writer.DataParts) and a later step reads `layout.read_data(folder)` or `layout.DataRows(folder)`,
so no step retypes another step's layout.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

from catalog.store import MANIFEST

# the rows of ingest, clean, validate, template and tokenize: a Parquet dataset folder of part files (Spark's
# layout, which pandas and pyarrow read by this name); a single Parquet file by this name is read the same way
DATA = "data.parquet"
PART = "part-{:05d}.parquet"
QUARANTINE = "quarantine.parquet"  # rows ingest or clean set aside, each with its reason
GATE_REPORT = "report.json"  # validate's and tokenize's expectation outcomes
DATA_DOCS = "data_docs"  # Great Expectations' Data Docs site
MODEL_DIR = "model"  # fine-tune's save_pretrained folder
TRAINING_LOG = "training_log.jsonl"  # fine-tune's loss and learning-rate history
METRICS = "metrics.json"  # evaluate's figures
REPORT = "report.md"
LOSS_CURVE = "loss_curve.png"
SAMPLES = "samples.parquet"
# what a data step derived for each row (keyed by toolkit.row_memo.row_keys), in table order, so the next build of the
# same step on grown data redoes only the rows it has not seen
ROW_MEMO = "row_memo.parquet"


def data_path(folder: Path) -> Path:
    return Path(folder) / DATA


def parts_of(path: Path) -> list[Path]:
    """Give back the Parquet files of a dataset folder in row order (a single Parquet file: itself)."""
    return [path] if path.is_file() else sorted(path.glob(PART.replace("{:05d}", "[0-9]" * 5)))


def data_parts(folder: Path) -> list[Path]:
    """Give back the Parquet files holding an artifact's rows, in row order."""
    return parts_of(data_path(folder))


def part_bounds(parts: list[Path]) -> Any:
    """Give back the first row of each Parquet part file, then the row count of them all (from the footers)."""
    import numpy as np
    import pyarrow.parquet as pq

    return np.cumsum([0, *(pq.ParquetFile(part).metadata.num_rows for part in parts)], dtype=np.int64)


def data_rows(folder: Path) -> int:
    return int(part_bounds(data_parts(folder))[-1])


class DataRows:
    """An artifact's rows read part after part, through the two calls of pyarrow's ParquetFile the steps use."""

    def __init__(self, folder: Path):
        self.parts = data_parts(folder)

    @functools.cached_property
    def schema_arrow(self) -> Any:
        import pyarrow.parquet as pq

        return pq.read_schema(self.parts[0])

    @functools.cached_property
    def part_rows(self) -> list[int]:
        """How many rows each part holds (from the files' footers)."""
        import numpy as np

        return np.diff(part_bounds(self.parts)).tolist()

    def iter_batches(self, batch_size: int, columns: list[str] | None = None, part: int | None = None) -> Any:
        """Yield the rows (of one part, if given) as Arrow record batches of at most `batch_size` rows (none spans
        two parts)."""
        import pyarrow.parquet as pq

        for file in self.parts if part is None else [self.parts[part]]:
            # pre_buffer=False: with it, Arrow keeps every byte it has read until the file is closed
            yield from pq.ParquetFile(file, pre_buffer=False).iter_batches(batch_size=batch_size, columns=columns)

    def read_part(self, index: int, columns: list[str] | None = None) -> Any:
        """Give back the rows of one part file as a table (a part holds at most ROWS_PER_PART rows)."""
        import pyarrow.parquet as pq

        return pq.read_table(self.parts[index], columns=columns)


def rows_in_unchanged_parts(folder: Path, earlier: Path | None) -> Any:
    """Give back, for each data row of the artifact `folder`, whether its part file has the sha256 of the part of the
    same name in the data that `earlier` (an earlier build of the step that reads `folder`) read.

    Every part but the last holds the same number of rows, so a row of such a part sits where it sat then: a row-wise
    step's output row there equals the earlier output row in the same place unless a whole-table decision moved it.
    """
    import numpy as np

    from catalog.shared_root import is_url

    rows = DataRows(folder)
    unchanged = np.zeros(sum(rows.part_rows), bool)
    try:
        uri = read_manifest(earlier)["inputs"][0]["uri"] if earlier is not None else ""
        before = read_manifest(Path(uri))["files"] if uri and not is_url(uri) else {}
        now = read_manifest(folder)["files"]
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        return unchanged
    start = 0
    for part, size in zip(rows.parts, rows.part_rows, strict=True):
        name = part.relative_to(folder).as_posix()
        unchanged[start:start + size] = name in now and before.get(name) == now[name]
        start += size
    return unchanged


def quarantine_file(folder: Path) -> Path:
    return Path(folder) / QUARANTINE


def memo_file(folder: Path) -> Path:
    return Path(folder) / ROW_MEMO


def read_memo(folder: Path | None, columns: list[str] | None = None) -> Any:
    """Give back an artifact's row memo (those columns) as a pyarrow Table, or None when there is no such artifact
    or memo."""
    if folder is None or not memo_file(folder).exists():
        return None
    # a chunk per part, not joined into one: rows are mostly sliced from it in order (toolkit.row_memo.rows_at), and
    # joining copied template's 554 MB memo of 1,000,000 rows for 1.5 s
    return _read_parts(parts_of(memo_file(folder)), columns)


def data_docs_index(folder: Path) -> Path:
    return Path(folder) / DATA_DOCS / "index.html"


def read_data(folder: Path, columns: list[str] | None = None, filters: Any = None) -> Any:
    """Give back an artifact's rows as a pyarrow Table (only `columns`, and rows meeting `filters`, when given)."""
    return _read_parts(data_parts(folder), columns, filters)


def _read_parts(parts: list[Path], columns: list[str] | None = None, filters: Any = None) -> Any:
    import pyarrow as pa
    import pyarrow.parquet as pq

    return pa.concat_tables([pq.read_table(part, columns=columns, filters=filters) for part in parts])


def data_schema(folder: Path) -> Any:
    import pyarrow.parquet as pq

    return pq.read_schema(data_parts(folder)[0])


def data_columns(folder: Path) -> list[str]:
    return data_schema(folder).names


def read_manifest(folder: Path) -> dict[str, Any]:
    """Give back an artifact's manifest as written (verification is the store's job)."""
    return json.loads((Path(folder) / MANIFEST).read_text(encoding="utf-8"))


def model_dir(folder: Path) -> Path:
    """Give back the save_pretrained folder inside a fine-tune artifact."""
    return Path(folder) / MODEL_DIR


def trained_model_config(folder: Path) -> dict[str, Any]:
    """Give back the `model` settings a fine-tune artifact was trained with."""
    return read_manifest(folder)["config"]["model"]


def training_log(folder: Path) -> Path:
    return Path(folder) / TRAINING_LOG


def read_metrics(folder: Path) -> dict[str, Any]:
    """Give back an evaluate artifact's metrics."""
    return json.loads((Path(folder) / METRICS).read_text(encoding="utf-8"))


# The artifacts each step reads, in the order it takes them (the pipeline flow passes them so).
INPUTS: dict[str, tuple[str, ...]] = {
    "ingest": (),
    "clean": ("ingest",),
    "validate": ("clean",),
    "template": ("validate",),
    "tokenize": ("template",),
    "finetune": ("tokenize",),
    "evaluate": ("template", "tokenize", "finetune"),
}
