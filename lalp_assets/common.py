"""Shared pieces of the asset modules: the teacher partitions, settings, and metadata helpers."""

from __future__ import annotations

import os
import warnings

import dagster as dg
import polars as pl

from lalp_resources.markdown import markdown_table  # noqa: F401  (re-exported for the asset modules)
from lalp_resources.settings import Settings

SETTINGS = Settings()

# backfill_policy is marked beta in this Dagster release; we rely on it knowingly.
warnings.filterwarnings("ignore", category=dg.BetaWarning)

# One partition per teacher: "a new teacher arrived" scores that teacher alone.
teacher_partitions = dg.DynamicPartitionsDefinition(name="teacher")

# Scoring a backfill of many teachers runs as one run locally (the model loads once); on a
# cluster, set LALP_BACKFILL=multi to fan out one run per teacher.
BACKFILL = (
    dg.BackfillPolicy.multi_run(1) if os.environ.get("LALP_BACKFILL") == "multi" else dg.BackfillPolicy.single_run()
)


def table_metadata(df: pl.DataFrame, table: str, preview_rows: int = 5, **extra) -> dict:
    """Row count, schema and a markdown preview for a materialization."""
    schema = dg.TableSchema(columns=[dg.TableColumn(name=c, type=str(t)) for c, t in df.schema.items()])
    preview = df.head(preview_rows)
    for c, t in preview.schema.items():
        if t == pl.Utf8:
            preview = preview.with_columns(pl.col(c).str.slice(0, 60).str.replace_all(r"[\n|]", " "))
    md = markdown_table(preview)
    return {
        "dagster/row_count": dg.MetadataValue.int(df.height),
        "dagster/column_schema": schema,
        "table": dg.MetadataValue.text(f"duckdb:{table}"),
        "preview": dg.MetadataValue.md(md),
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


def score_config(student: str, segmenter: str, segmenter_version: str, dtype: str, window: str, template: str) -> dict:
    return {
        "student": student,
        "segmenter": segmenter,
        "segmenter_version": segmenter_version,
        "window_spec": window,
        "template": template,
        "dtype": dtype,
    }
