"""Run expectation suites with Great Expectations, keep Data Docs, and decide pass / block / warn."""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from catalog import layout

if TYPE_CHECKING:
    from catalog.store import ArtifactRef


class GateFailed(RuntimeError):
    """A blocking expectation failed; the message lists which, what was observed, and the Data Docs link."""


def raise_if_blocked(ref: ArtifactRef, error: type[GateFailed], fallback: str) -> None:
    """Raise `error` when a gated artifact's manifest says a blocking check failed: which, and its Data Docs link."""
    manifest = ref.manifest()
    if not manifest.get("passed", False):
        docs = layout.data_docs_index(ref.path)
        raise error(f"{manifest.get('failure', fallback)}. Data Docs: {docs.as_uri()}")


@dataclass
class CheckOutcome:
    suite: str
    expectation: str
    column: str
    success: bool
    blocking: bool
    observed: Any
    threshold: dict[str, Any]
    observed_is_count: bool = False  # an unexpected-value count (adds up over batches), not a measured value

    def describe(self) -> str:
        where = f" on '{self.column}'" if self.column else ""
        bounds = ", ".join(f"{k}={v}" for k, v in self.threshold.items() if v is not None)
        wanted = f" (want {bounds})" if bounds else ""
        return f"{self.suite}: {self.expectation}{where} observed {self.observed}{wanted}"


@dataclass
class GateReport:
    outcomes: list[CheckOutcome] = field(default_factory=list)
    docs_index: str = ""

    @property
    def blocking_failures(self) -> list[CheckOutcome]:
        return [o for o in self.outcomes if not o.success and o.blocking]

    @property
    def warnings(self) -> list[CheckOutcome]:
        return [o for o in self.outcomes if not o.success and not o.blocking]

    def as_records(self) -> list[dict[str, Any]]:
        return [{**o.__dict__, "observed": str(o.observed), "threshold": str(o.threshold)} for o in self.outcomes]


    def failure_message(self) -> str:
        """Give back one line: how many blocking checks failed, the first three (observed vs wanted)."""
        first = self.blocking_failures[:3]
        more = len(self.blocking_failures) - len(first)
        listed = "; ".join(o.describe() for o in first) + (f"; and {more} more" if more else "")
        return f"{len(self.blocking_failures)} blocking expectation(s) failed: {listed}"


_THRESHOLD_KEYS = ("min_value", "max_value", "column_set", "type_", "type_list", "value_set")


def _merge(first: CheckOutcome, later: CheckOutcome) -> CheckOutcome:
    """One outcome for an expectation checked batch by batch: fails if any batch failed; counts add up."""
    counts = isinstance(first.observed, int) and isinstance(later.observed, int) and first.observed_is_count
    observed = first.observed + later.observed if counts else (later.observed if first.success else first.observed)
    return CheckOutcome(first.suite, first.expectation, first.column, first.success and later.success,
                        first.blocking, observed, first.threshold, first.observed_is_count)


def run_suites(suites: dict[str, tuple[pd.DataFrame | Iterable[pd.DataFrame], list[Any]]], docs_dir: Path,
               warn_only: set[str]) -> GateReport:
    """Validate each named suite's frame, or its frames batch by batch, and write Data Docs under `docs_dir`.

    Batches keep memory bounded on large artifacts: each batch is one validation run (one Data Docs page) and
    the report holds one outcome per expectation, failed if any batch failed, with unexpected counts summed.
    An expectation is blocking unless its type (e.g. `expect_column_values_to_be_unique`) or
    `<suite>.<type>` is listed in `warn_only`.
    """
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False, metric_calculations=False)
    context.add_data_docs_site(site_name="itune", site_config={
        "class_name": "SiteBuilder",
        "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(docs_dir)},
        "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
    })
    source = context.data_sources.add_pandas("itune")
    report = GateReport(docs_index=str(docs_dir / "index.html"))
    for name, (frames, expectations) in suites.items():
        batch = source.add_dataframe_asset(name).add_batch_definition_whole_dataframe("all")
        suite = context.suites.add(gx.ExpectationSuite(name=name, expectations=expectations))
        definition = context.validation_definitions.add(gx.ValidationDefinition(name=name, data=batch, suite=suite))
        # no Data Docs action: it rebuilds the whole site after every run (Jinja compiling its templates each
        # time, most of a small gate's cost); the site is built once below from the stored results
        checkpoint = context.checkpoints.add(gx.Checkpoint(
            name=f"{name}_checkpoint", validation_definitions=[definition], actions=[]))
        merged: dict[str, CheckOutcome] = {}
        for frame in [frames] if isinstance(frames, pd.DataFrame) else frames:
            result = checkpoint.run(batch_parameters={"dataframe": frame})
            for run in result.run_results.values():
                for check in run.results:
                    outcome = _outcome(name, check, warn_only)
                    key = str(check.expectation_config.id)
                    merged[key] = _merge(merged[key], outcome) if key in merged else outcome
        report.outcomes += merged.values()
    context.build_data_docs(site_names=["itune"])
    return report


def _outcome(suite: str, check: Any, warn_only: set[str]) -> CheckOutcome:
    config = check.expectation_config
    has_value = "observed_value" in check.result
    return CheckOutcome(
        suite=suite, expectation=config.type, column=str(config.kwargs.get("column", "")),
        success=bool(check.success),
        blocking=config.type not in warn_only and f"{suite}.{config.type}" not in warn_only,
        observed=check.result["observed_value"] if has_value else check.result.get("unexpected_count"),
        threshold={k: config.kwargs[k] for k in _THRESHOLD_KEYS if k in config.kwargs},
        observed_is_count=not has_value,
    )


def rows_passed_before(earlier: Path | None, suite: str) -> bool:
    """Tell whether an earlier artifact of the same recipe met every expectation of a row suite on every row.

    Row expectations look at one row at a time, so a row with the same content meets them again: a rebuild on
    grown data need only check the rows that artifact did not hold (the table-wide ones are checked whole).
    """
    import json

    try:
        records = json.loads((Path(earlier) / layout.GATE_REPORT).read_text(encoding="utf-8")) if earlier else []
    except (OSError, ValueError):
        return False
    mine = [record for record in records if record["suite"] == suite]
    return bool(mine) and all(record["success"] and (not record["observed_is_count"] or record["observed"] == "0")
                              for record in mine)
