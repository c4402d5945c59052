"""Stage 1: raw teacher traces -> `raw_teacher_traces` (+ `quarantine`, `source_files`, `ingest_runs`).

Each source file is read at most once per content hash, whatever the number of teacher
partitions or runs (`lalp_resources.pipeline.sync_sources`); a partition then takes its
teacher's rows from the current file versions. A selected teacher with no rows in the current
sources keeps its earlier data, and the run says so: only `lalp forget TEACHER` removes a teacher.
"""


import json

import dagster as dg
import polars as pl

from lalp_assets.metadata import check_result, table_metadata
from lalp_assets.partitions import Scope, scope_of, settled_partitions
from lalp_assets.versions import ensure_version, ingest_version
from lalp_resources import adapters
from lalp_resources import expectations as gx_suites
from lalp_resources.markdown import markdown_table
from lalp_resources.pipeline import assemble_traces, sync_sources, utcnow
from lalp_resources.resources import TraceSourcesResource, WarehouseResource
from lalp_resources.warehouse import insert, insert_from, query, run_transaction

CHECKS = [
    dg.AssetCheckSpec("traces_valid", asset="raw_teacher_traces", blocking=True,
                      description="GX: non-null keys, unique response_id, non-empty responses"),
    dg.AssetCheckSpec("counts_reconcile", asset="raw_teacher_traces", blocking=True,
                      description="GX: per source file and for the selected teachers, rows read = accepted + quarantined"),
]


def build(trace_sources: TraceSourcesResource, partitions_def, backfill) -> dg.AssetsDefinition:
    @dg.asset(
        name="raw_teacher_traces",
        partitions_def=partitions_def,
        backfill_policy=backfill,
        group_name="ingest",
        kinds={"duckdb", "polars"},
        code_version=ingest_version(trace_sources),
        check_specs=CHECKS,
        description=(
            "Teacher traces in the canonical shape (prompt_id, prompt, teacher, response, reference_answer) "
            "with provenance (source_uri, source_sha256, source_row, ingest_run_id) and the verified final "
            "answer. Rows that cannot be used go to the `quarantine` table with their reason; "
            "rows read = accepted + quarantined. Each file is read once per content hash."
        ),
    )
    def raw_teacher_traces(context: dg.AssetExecutionContext, warehouse: WarehouseResource, trace_sources: TraceSourcesResource):
        ensure_version(context, ingest_version(trace_sources))
        scope = scope_of(context)
        wh = warehouse.get()
        items = adapters.expand_sources(trace_sources.all_sources())
        run_id = context.run.run_id
        files = sync_sources(wh, items, trace_sources.read_one, adapters.file_sha256, run_id, trace_sources.format,
                             log=context.log.info)
        fresh = [f for f in files if f.new]
        context.log.info(f"{len(files)} source file(s): {len(fresh)} read now, {len(files) - len(fresh)} unchanged since an earlier read")
        traces, dups = assemble_traces(wh, files, scope.teachers)
        yield from _write(context, wh, scope, files, traces, dups, ingest_version(trace_sources))

    return raw_teacher_traces


# a `source_traces` row: its file content, row, and the read that parsed it
SOURCE_ROW = ("source_sha256", "source_row", "read_run_id")


def _same_rows(con, teachers: list[str], traces: pl.DataFrame, dups: pl.DataFrame) -> bool:
    """Whether the warehouse holds exactly these accepted rows (file, row, response id) and these
    duplicates for `teachers`: a rerun on unchanged files then rewrites nothing, and the rows keep
    the ingest run that wrote them (so later stages see nothing new)."""
    for table, frame, cols, where in (
        ("raw_teacher_traces", traces, ("source_sha256", "source_row", "response_id"), ""),
        ("quarantine", dups, ("source_sha256", "source_row"), "AND t.stage = 'assemble'"),
    ):
        con.register("_lalp_same", frame.select(*cols, pl.lit(True).alias("_found")).to_arrow())
        try:
            n_old, n_same = con.execute(
                f"SELECT count(*), count(k._found) FROM {table} t LEFT JOIN _lalp_same k USING ({', '.join(cols)}) "
                f"WHERE t.teacher IN (SELECT unnest(?)) {where}", [teachers]).fetchone()
        finally:
            con.unregister("_lalp_same")
        if not (n_old == n_same == frame.height):
            return False
    return True


def _write(context, wh, scope: Scope, files, traces: pl.DataFrame, dups: pl.DataFrame, version: str):
    run_id, now = context.run.run_id, utcnow()
    present = set(traces["teacher"].unique().to_list())
    kept = [t for t in scope.teachers if t not in present]
    if kept:
        context.log.warning(
            f"no accepted traces for teacher(s) {kept} in the current sources: their earlier traces and scores are kept "
            "unchanged. If a teacher has left for good, remove it with `lalp forget TEACHER`."
        )
    replaced = [t for t in scope.teachers if t in present]
    shas = [f.source_sha256 for f in files]
    with wh.connect(read_only=True) as con:
        by_reason = dict(con.execute(
            "SELECT reason, count(*) FROM quarantine WHERE source_sha256 IN (SELECT unnest(?)) "
            "AND coalesce(stage, 'read') = 'read' GROUP BY reason ORDER BY 2 DESC, 1", [shas]).fetchall())
    for reason, n in dups.group_by("reason").len().iter_rows():
        by_reason[f"{reason} (across files)"] = n
    mine = traces
    with wh.connect(read_only=True) as con:
        # the partitions last written by this code version, holding exactly these rows
        same = set(replaced) <= settled_partitions(context, version) and _same_rows(con, replaced, traces, dups)
    if same:
        context.log.info(f"the rows of {replaced} are those already in the warehouse (same files, rows and "
                         "duplicates): kept as they are, with their ingest run")

    def replace(con):
        if not same:
            con.execute("DELETE FROM raw_teacher_traces WHERE teacher IN (SELECT unnest(?))", [replaced])
            # the rows are copied inside the warehouse: the texts never pass through this process
            insert_from(con, "raw_teacher_traces", traces.select(*SOURCE_ROW, "response_id"),
                        "SELECT s.* EXCLUDE (read_run_id), ? AS ingest_run_id, ? AS ingested_at FROM source_traces s "
                        f"JOIN _lalp_frame f USING ({', '.join(SOURCE_ROW)})", [run_id, now])
            con.execute("DELETE FROM quarantine WHERE stage = 'assemble' AND teacher IN (SELECT unnest(?))", [replaced])
            insert(con, "quarantine", dups.with_columns(
                pl.lit("assemble").alias("stage"), pl.lit(run_id).alias("ingest_run_id"), pl.lit(now).alias("quarantined_at")))
        insert(con, "ingest_runs", pl.DataFrame([{
            "ingest_run_id": run_id, "sources": json.dumps([f.item for f in files]),
            "n_read": sum(f.n_read for f in files), "n_accepted": sum(f.n_accepted for f in files),
            "n_quarantined": sum(f.n_quarantined for f in files),
            "by_reason": json.dumps(by_reason), "ingested_at": now,
        }]), mode="replace")

    with wh.connect() as con:
        run_transaction(con, lambda: replace(con))
    per_file = pl.DataFrame(
        [{"source": f.item, "sha256": f.source_sha256[:12], "read_now": f.new, "n_read": f.n_read,
          "n_accepted": f.n_accepted, "n_quarantined": f.n_quarantined} for f in files],
        schema={"source": pl.Utf8, "sha256": pl.Utf8, "read_now": pl.Boolean, "n_read": pl.Int64,
                "n_accepted": pl.Int64, "n_quarantined": pl.Int64},
    )
    with wh.connect(read_only=True) as con:
        preview = query(con, "SELECT * EXCLUDE (prompt, response) FROM raw_teacher_traces "
                             "WHERE teacher IN (SELECT unnest(?)) LIMIT 5", [replaced])
        # the selected teachers' rows in the current files: accepted here, or quarantined as duplicates
        n_teacher_rows = con.execute(
            "SELECT count(*) FROM (SELECT DISTINCT source_sha256, source_row FROM source_traces "
            "WHERE source_sha256 IN (SELECT unnest(?)) AND teacher IN (SELECT unnest(?)))",
            [[f.source_sha256 for f in files], scope.teachers]).fetchone()[0]
    per_teacher = mine.group_by("teacher").agg(
        pl.len().alias("responses"), pl.col("prompt_id").n_unique().alias("prompts"),
        pl.col("is_correct").cast(pl.Float64).mean().alias("accuracy"),
    ).sort("teacher")
    yield dg.MaterializeResult(
        metadata=table_metadata(
            preview, "raw_teacher_traces", row_count=mine.height,
            files=len(files), files_read_now=sum(f.new for f in files),
            rows_read=int(per_file["n_read"].sum() or 0), rows_accepted=int(per_file["n_accepted"].sum() or 0),
            rows_quarantined=int(per_file["n_quarantined"].sum() or 0), duplicates_across_files=dups.height,
            quarantined_by_reason=dg.MetadataValue.json(by_reason),
            teachers_kept_without_sources=dg.MetadataValue.json(kept),
            per_source=dg.MetadataValue.md(markdown_table(per_file)),
            per_teacher=dg.MetadataValue.md(markdown_table(per_teacher)),
        )
    )
    yield check_result("traces_valid", gx_suites.raw_traces_suite(mine))
    reconcile = pl.concat([
        per_file.select(pl.col("source").alias("source_uri"), "n_read", "n_accepted", "n_quarantined"),
        pl.DataFrame([{"source_uri": f"teachers {scope.teachers}", "n_read": n_teacher_rows,
                       "n_accepted": mine.height, "n_quarantined": dups.height}],
                     schema={"source_uri": pl.Utf8, "n_read": pl.Int64, "n_accepted": pl.Int64, "n_quarantined": pl.Int64}),
    ])
    yield check_result("counts_reconcile", gx_suites.reconciliation_suite(reconcile))
