"""Stage 2: raw traces -> `reasoning_steps` (character spans that tile each response)."""


import dagster as dg
import polars as pl

from lalp_assets.metadata import check_result, progress_log, table_metadata
from lalp_assets.partitions import scope_of, settled_partitions
from lalp_assets.versions import ensure_version, steps_version
from lalp_resources import expectations as gx_suites
from lalp_resources.method.aggregation import sample_prompts
from lalp_resources.pipeline import prompt_batches, screen_and_segment, utcnow
from lalp_resources.resources import PipelineSettingsResource, SegmentationResource, StudentModelResource, WarehouseResource
from lalp_resources.warehouse import WarehouseSession, insert, query, run_transaction

TRACE_COLUMNS = ("response_id, prompt_id, teacher, prompt, response, source_uri, source_sha256, source_row, format, "
                 "ingest_run_id")
CHECKS = [
    dg.AssetCheckSpec("steps_tile_responses", asset="reasoning_steps", blocking=True,
                      description="GX: steps concatenate to their response exactly; no whitespace-only step"),
]


def build(segmentation, student, settings, partitions_def, backfill) -> dg.AssetsDefinition:
    @dg.asset(
        name="reasoning_steps",
        partitions_def=partitions_def,
        backfill_policy=backfill,
        group_name="scoring",
        kinds={"duckdb", "polars"},
        deps=["raw_teacher_traces"],
        code_version=steps_version(segmentation, student, settings),
        check_specs=CHECKS,
        description=(
            "Reasoning steps: contiguous character spans that tile each response exactly (a separator "
            "belongs to the step it ends). Segmenter: paragraph, line, sentence (math-aware) or llm. "
            "Only the sampled prompts (LALP_MAX_PROMPTS; 0 = all) are segmented; responses over the token "
            "caps, and (by default, LALP_CONTROL_TOKENS) prompts or responses holding the student's control-token "
            "strings, are recorded in `quarantine` (stage `steps`) and not scored."
        ),
    )
    def reasoning_steps(
        context: dg.AssetExecutionContext,
        warehouse: WarehouseResource,
        segmentation: SegmentationResource,
        student: StudentModelResource,
        settings: PipelineSettingsResource,
    ):
        version = steps_version(segmentation, student, settings)
        ensure_version(context, version)
        teachers = scope_of(context).teachers
        # Teachers whose steps were last written under these settings: a response of theirs that
        # already has steps from this segmenter version is passed over (one anti-join, before any
        # tokenization or segmentation). Everything else is screened and segmented.
        settled = sorted(settled_partitions(context, version))
        seg_version = segmentation.version()
        known_sql = ("SELECT DISTINCT s.response_id, s.prompt_id FROM reasoning_steps s WHERE s.teacher IN (SELECT unnest(?)) "
                     "AND s.segmenter = ? AND s.segmenter_version = ?")
        known_args = [settled, segmentation.method, seg_version]
        wh = warehouse.get()
        with wh.connect(read_only=True) as con:
            all_prompts = [r[0] for r in con.execute("SELECT DISTINCT prompt_id FROM raw_teacher_traces").fetchall()]
            present = [r[0] for r in con.execute(
                "SELECT DISTINCT teacher FROM raw_teacher_traces WHERE teacher IN (SELECT unnest(?))", [teachers]).fetchall()]
            n_traces = con.execute("SELECT count(*) FROM raw_teacher_traces WHERE teacher IN (SELECT unnest(?))", [teachers]).fetchone()[0]
            # known: steps already there for a response still in the traces
            known = query(con, f"SELECT k.* FROM ({known_sql}) k SEMI JOIN raw_teacher_traces t USING (response_id)", known_args)
            # the work list holds ids only: the texts are read a batch of prompts at a time
            todo = query(
                con,
                "SELECT response_id, prompt_id FROM raw_teacher_traces WHERE teacher IN (SELECT unnest(?)) "
                f"AND response_id NOT IN (SELECT response_id FROM ({known_sql}))",
                [teachers, *known_args],
            )
        absent = [t for t in teachers if t not in set(present)]
        if absent:
            context.log.warning(f"teacher(s) {absent} have no traces: their steps are left as they are")
        keep = sample_prompts(all_prompts, settings.max_prompts)
        todo = todo.filter(pl.col("prompt_id").is_in(list(keep)))
        kept = known.filter(pl.col("prompt_id").is_in(list(keep))).select("response_id")
        batches = prompt_batches(todo, settings.batch_prompts)
        tokenizer = student.tokenizer()
        context.log.info(
            f"screening and segmenting {todo.height} new or changed responses with '{segmentation.method}' in "
            f"{len(batches)} batch(es) of {settings.batch_prompts or 'all'} prompts; passed over {kept.height} whose "
            f"steps are already there ({len(keep)} of {len(all_prompts)} prompts sampled; max_prompts={settings.max_prompts})"
        )
        replaced = sorted(present)

        def clear(con):
            # the teachers' steps go, but for the responses passed over; each batch then commits its own
            con.register("_lalp_kept", kept.to_arrow())
            try:
                con.execute("DELETE FROM reasoning_steps WHERE teacher IN (SELECT unnest(?)) "
                            "AND response_id NOT IN (SELECT response_id FROM _lalp_kept)", [replaced])
            finally:
                con.unregister("_lalp_kept")
            con.execute("DELETE FROM quarantine WHERE stage = 'steps' AND teacher IN (SELECT unnest(?))", [replaced])

        def write(con, steps, rejected):
            # the batch's rows replace whatever a run beside this one wrote for them since this
            # run's `clear` (the same steps: segmentation is deterministic): steps by their key,
            # step quarantine rows (no key) by their source row, so two runs at once neither
            # collide on the key nor leave a quarantine row twice
            con.register("_lalp_rejected", rejected.select("source_sha256", "source_row").to_arrow())
            try:
                con.execute("DELETE FROM quarantine WHERE stage = 'steps' AND (source_sha256, source_row) IN "
                            "(SELECT source_sha256, source_row FROM _lalp_rejected)")
            finally:
                con.unregister("_lalp_rejected")
            insert(con, "reasoning_steps", steps, mode="replace")
            insert(con, "quarantine", rejected.with_columns(
                pl.lit("steps").alias("stage"), pl.lit(context.run.run_id).alias("ingest_run_id"),
                pl.lit(utcnow()).alias("quarantined_at")))

        report = progress_log(context.log, "segmenting, response passes (2 per response):", settings.progress_every_s)
        n_kept = n_rejected = n_control = n_caps = fallbacks = done = 0
        checks, preview = [], None
        # one connection for the loop, handed back every few seconds so other processes get the file
        session = WarehouseSession(wh, hold_s=2.5 * settings.commit_every_s)
        try:
            with session.use() as con:
                run_transaction(con, lambda: clear(con))
            for ids in batches:
                with session.use() as con:
                    batch = query(con, f"SELECT {TRACE_COLUMNS} FROM raw_teacher_traces WHERE response_id IN (SELECT unnest(?)) "
                                       "ORDER BY response_id", [ids])
                steps, screened = screen_and_segment(
                    batch, tokenizer, settings.template, settings.control_tokens, settings.max_prompt_tokens,
                    settings.max_response_tokens, segmentation.segment_fn(), batch_prompts=0,
                    progress=lambda d, t, base=2 * done: report(base + d, 2 * todo.height))
                steps = steps.join(
                    screened.kept.select("response_id", "source_uri", "source_sha256", "ingest_run_id"), on="response_id"
                ).with_columns(
                    pl.lit(segmentation.method).alias("segmenter"),
                    pl.lit(seg_version).alias("segmenter_version"),
                    pl.lit(context.run.run_id).alias("steps_run_id"),
                )
                with session.use() as con:
                    run_transaction(con, lambda: write(con, steps, screened.rejected))
                # the check runs batch by batch (steps tile their own responses); outcomes merged below
                checks.append(gx_suites.steps_suite(steps, screened.kept))
                preview = steps if preview is None or preview.height == 0 else preview
                n_kept, n_rejected = n_kept + screened.kept.height, n_rejected + screened.rejected.height
                n_control, n_caps = n_control + screened.control_token_rows, n_caps + screened.over_token_caps
                fallbacks += steps.filter(pl.col("segment_note").is_not_null())["response_id"].n_unique()
                done += batch.height
            with session.use() as con:
                n_steps, n_responses = con.execute(
                    "SELECT count(*), count(DISTINCT response_id) FROM reasoning_steps WHERE teacher IN (SELECT unnest(?))",
                    [teachers]).fetchone()
        finally:
            session.close()
        if n_control:
            verb = "kept and scored as plain text" if settings.control_tokens == "keep" else "not scored"
            context.log.warning(f"{n_control} response(s) hold the student's control-token strings: {verb} "
                                "(LALP_CONTROL_TOKENS; see `quarantine`, stage 'steps')")
        if n_caps:
            context.log.warning(f"{n_caps} response(s) over the token caps are not scored (see `quarantine`, stage 'steps')")
        yield dg.MaterializeResult(
            metadata=table_metadata(
                preview.drop("source_uri", "source_sha256"), "reasoning_steps", row_count=n_steps,
                responses=n_kept + kept.height, responses_segmented=n_kept,
                responses_passed_over=kept.height,
                responses_not_sampled=n_traces - n_kept - kept.height - n_rejected,
                responses_over_token_caps=n_caps,
                responses_with_control_tokens=n_control,
                control_tokens=settings.control_tokens,
                prompts_sampled=len(keep), segmenter=seg_version, llm_fallbacks=fallbacks,
                mean_steps_per_response=float(n_steps / n_responses) if n_responses else 0.0,
                batches=len(batches),
            )
        )
        yield check_result("steps_tile_responses", gx_suites.merge(checks))

    return reasoning_steps
