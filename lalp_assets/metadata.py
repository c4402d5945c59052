"""Materialization metadata helpers shared by the asset modules: table metadata with a bounded
preview, and GX suite outcomes as Dagster check results."""

from __future__ import annotations

import time

import dagster as dg
import polars as pl

from lalp_resources.markdown import markdown_table

PREVIEW_ROWS = 5


def table_metadata(df: pl.DataFrame, table: str, *, row_count: int | None = None, preview_rows: int = PREVIEW_ROWS, **extra) -> dict:
    """Row count, schema and a short markdown preview (only the first rows are formatted, so
    this stays cheap for any table size)."""
    schema = dg.TableSchema(columns=[dg.TableColumn(name=c, type=str(t)) for c, t in df.schema.items()])
    preview = df.head(preview_rows)
    for c, t in preview.schema.items():
        if t == pl.Utf8:
            preview = preview.with_columns(pl.col(c).str.slice(0, 60))
    return {
        "dagster/row_count": dg.MetadataValue.int(df.height if row_count is None else row_count),
        "dagster/column_schema": schema,
        "table": dg.MetadataValue.text(f"warehouse:{table}"),
        "preview": dg.MetadataValue.md(markdown_table(preview)),
        **extra,
    }


def check_result(name: str, suite) -> dg.AssetCheckResult:
    """A GX suite outcome as a Dagster check result, failed expectations in the metadata."""
    md = suite.metadata()
    return dg.AssetCheckResult(
        check_name=name,
        passed=suite.success,
        metadata={
            "rows_validated": dg.MetadataValue.int(md["rows_validated"]),
            "expectations": dg.MetadataValue.json(md["expectations"]),
            "failed_expectations": dg.MetadataValue.json(md["failed_expectations"]),
            "summary": dg.MetadataValue.text(suite.describe()),
        },
        severity=dg.AssetCheckSeverity.ERROR,
    )


def progress_log(log, what: str, every_s: float = 10.0):
    """`report(done, total)`: '<what> done/total (p%), rate/s, ~eta s left', at most every `every_s`
    seconds and always at the end (LALP_PROGRESS_EVERY_S)."""
    state = {"t0": time.monotonic(), "last": 0.0}

    def report(done: int, total: int) -> None:
        now = time.monotonic()
        if done < total and now - state["last"] < every_s:
            return
        state["last"] = now
        secs = now - state["t0"]
        rate = done / secs if secs > 0 else 0.0
        eta = f"~{(total - done) / rate:.0f}s left" if rate else "time left unknown"
        log.info(f"{what} {done}/{total} ({100 * done / max(total, 1):.0f}%), {rate:.1f}/s, {eta}")

    return report
