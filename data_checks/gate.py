"""Run expectation suites with Great Expectations, keep Data Docs, and decide pass / block / warn."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd


class GateFailed(RuntimeError):
    """A blocking expectation failed; the message lists which, what was observed, and the Data Docs link."""


@dataclass
class CheckOutcome:
    suite: str
    expectation: str
    column: str
    success: bool
    blocking: bool
    observed: Any
    threshold: dict[str, Any]

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


def run_suites(frames: dict[str, tuple[pd.DataFrame, list[Any]]], docs_dir: Path, warn_only: set[str]) -> GateReport:
    """Validate each named frame against its expectations; write Data Docs under `docs_dir`.

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
    for name, (frame, expectations) in frames.items():
        batch = source.add_dataframe_asset(name).add_batch_definition_whole_dataframe("all")
        suite = context.suites.add(gx.ExpectationSuite(name=name, expectations=expectations))
        definition = context.validation_definitions.add(gx.ValidationDefinition(name=name, data=batch, suite=suite))
        checkpoint = context.checkpoints.add(gx.Checkpoint(
            name=f"{name}_checkpoint", validation_definitions=[definition],
            actions=[gx.checkpoint.UpdateDataDocsAction(name="docs", site_names=["itune"])],
        ))
        result = checkpoint.run(batch_parameters={"dataframe": frame})
        for run in result.run_results.values():
            for check in run.results:
                config = check.expectation_config
                observed = check.result.get("observed_value", check.result.get("unexpected_count"))
                report.outcomes.append(CheckOutcome(
                    suite=name, expectation=config.type, column=str(config.kwargs.get("column", "")),
                    success=bool(check.success),
                    blocking=config.type not in warn_only and f"{name}.{config.type}" not in warn_only,
                    observed=observed, threshold={k: config.kwargs[k] for k in _THRESHOLD_KEYS if k in config.kwargs},
                ))
    return report
