"""Stage 1: raw teacher traces -> `raw_teacher_traces` (+ `quarantine`, `ingest_runs`)."""


import json
from datetime import datetime, timezone

import dagster as dg
import polars as pl

from lalp_assets.common import BACKFILL, SETTINGS, markdown_table, table_metadata, teacher_partitions, check_result
from lalp_resources import expectations as gx_suites
from lalp_resources.resources import TraceSourcesResource, WarehouseResource
from lalp_resources.warehouse import insert, replace_teachers

CHECKS = [
    dg.AssetCheckSpec("traces_valid", asset="raw_teacher_traces", blocking=True,
                      description="GX: non-null keys, unique response_id, non-empty responses"),
    dg.AssetCheckSpec("counts_reconcile", asset="raw_teacher_traces", blocking=True,
                      description="GX: rows read = accepted + quarantined"),
]


@dg.asset(
    partitions_def=teacher_partitions,
    backfill_policy=BACKFILL,
    group_name="ingest",
    kinds={"duckdb", "polars"},
    code_version=f"ingest@1|{SETTINGS.teacher_mode}|{SETTINGS.source_format}",
    check_specs=CHECKS,
    description=(
        "Teacher traces in the canonical shape (prompt_id, prompt, teacher, response, reference_answer) "
        "with provenance (source_uri, source_sha256, source_row, ingest_run_id) and the verified final "
        "answer. Rows that cannot be used go to the `quarantine` table with their reason; "
        "rows read = accepted + quarantined."
    ),
)
def raw_teacher_traces(context: dg.AssetExecutionContext, warehouse: WarehouseResource, trace_sources: TraceSourcesResource):
    teachers = list(context.partition_keys)
    sources = trace_sources.all_sources()
    context.log.info(f"reading {len(sources)} source(s) for teacher(s) {teachers}: {sources}")
    result = trace_sources.ingest(sources)
    now = datetime.now(timezone.utc).replace(tzinfo=None)
    run_id = context.run.run_id
    mine = result.traces.filter(pl.col("teacher").is_in(teachers)).with_columns(
        pl.lit(run_id).alias("ingest_run_id"), pl.lit(now).alias("ingested_at")
    )
    missing = sorted(set(teachers) - set(mine["teacher"].unique().to_list()))
    if missing:
        context.log.warning(f"no accepted traces for partition(s) {missing} in the configured sources")
    unpartitioned = sorted(set(result.traces["teacher"].unique().to_list()) - set(context.instance.get_dynamic_partitions("teacher")))
    if unpartitioned:
        context.log.warning(
            f"teachers {unpartitioned} are in the sources but have no partition yet: the inbox sensor or "
            "`lalp run` registers them"
        )
    quarantine = result.quarantine.with_columns(pl.lit(run_id).alias("ingest_run_id"), pl.lit(now).alias("quarantined_at"))
    summary = result.summary()
    wh = warehouse.get()
    with wh.connect() as con:
        replace_teachers(con, "raw_teacher_traces", teachers, mine)
        # re-reading a file replaces its quarantine rows (idempotent), other files' rows stay
        shas = quarantine["source_sha256"].unique().to_list() + result.traces["source_sha256"].unique().to_list()
        con.execute("DELETE FROM quarantine WHERE source_sha256 IN (SELECT unnest(?))", [shas])
        insert(con, "quarantine", quarantine)
        insert(
            con, "ingest_runs",
            pl.DataFrame([{
                "ingest_run_id": run_id, "sources": json.dumps(sources), "n_read": summary["read"],
                "n_accepted": summary["accepted"], "n_quarantined": summary["quarantined"],
                "by_reason": json.dumps(summary["by_reason"]), "ingested_at": now,
            }]),
            mode="replace",
        )
    by_source = (
        pl.concat([
            result.traces.group_by("source_uri").agg(pl.len().alias("accepted")).with_columns(pl.lit(0, pl.UInt32).alias("quarantined")),
            result.quarantine.group_by("source_uri").agg(pl.len().alias("quarantined")).with_columns(pl.lit(0, pl.UInt32).alias("accepted")).select("source_uri", "accepted", "quarantined"),
        ])
        .group_by("source_uri").agg(pl.col("accepted").sum(), pl.col("quarantined").sum()).sort("source_uri")
    )
    per_teacher = mine.group_by("teacher").agg(
        pl.len().alias("responses"), pl.col("prompt_id").n_unique().alias("prompts"),
        pl.col("is_correct").cast(pl.Float64).mean().alias("accuracy"),
    ).sort("teacher")
    yield dg.MaterializeResult(
        metadata=table_metadata(
            mine.drop("prompt", "response"), "raw_teacher_traces",
            rows_read=summary["read"], rows_accepted=summary["accepted"], rows_quarantined=summary["quarantined"],
            quarantined_by_reason=dg.MetadataValue.json(summary["by_reason"]),
            per_source=dg.MetadataValue.md(markdown_table(by_source)),
            per_teacher=dg.MetadataValue.md(markdown_table(per_teacher)),
        )
    )
    yield check_result("traces_valid", gx_suites.raw_traces_suite(mine))
    yield check_result(
        "counts_reconcile",
        gx_suites.reconciliation_suite(pl.DataFrame([{
            "source_uri": ",".join(sources), "n_read": summary["read"],
            "n_accepted": summary["accepted"], "n_quarantined": summary["quarantined"],
        }])),
    )
