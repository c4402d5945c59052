"""Stage 2: raw traces -> `reasoning_steps` (character spans that tile each response)."""


import dagster as dg
import polars as pl

from lalp_assets.metadata import check_result, table_metadata
from lalp_assets.partitions import scope_of
from lalp_assets.versions import ensure_version, steps_version
from lalp_resources import expectations as gx_suites
from lalp_resources.method.aggregation import sample_prompts
from lalp_resources.pipeline import screen_traces, segment_traces, utcnow
from lalp_resources.resources import PipelineSettingsResource, SegmentationResource, StudentModelResource, WarehouseResource
from lalp_resources.warehouse import insert, query, run_transaction

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
        ensure_version(context, steps_version(segmentation, student, settings))
        teachers = scope_of(context).teachers
        wh = warehouse.get()
        with wh.connect(read_only=True) as con:
            all_prompts = [r[0] for r in con.execute("SELECT DISTINCT prompt_id FROM raw_teacher_traces").fetchall()]
            traces = query(
                con,
                "SELECT response_id, prompt_id, teacher, prompt, response, source_uri, source_sha256, source_row, format, "
                "ingest_run_id FROM raw_teacher_traces WHERE teacher IN (SELECT unnest(?)) ORDER BY response_id",
                [teachers],
            )
        present = set(traces["teacher"].unique().to_list())
        absent = [t for t in teachers if t not in present]
        if absent:
            context.log.warning(f"teacher(s) {absent} have no traces: their steps are left as they are")
        keep = sample_prompts(all_prompts, settings.max_prompts)
        sampled = traces.filter(pl.col("prompt_id").is_in(list(keep)))
        tokenizer = student.tokenizer()
        screened = screen_traces(sampled, tokenizer, settings.template, settings.control_tokens,
                                 settings.max_prompt_tokens, settings.max_response_tokens)
        sampled, too_long = screened.kept, screened.rejected
        if screened.control_token_rows:
            verb = "kept and scored as plain text" if settings.control_tokens == "keep" else "not scored"
            context.log.warning(f"{screened.control_token_rows} response(s) hold the student's control-token strings: {verb} "
                                "(LALP_CONTROL_TOKENS; see `quarantine`, stage 'steps')")
        if screened.over_token_caps:
            context.log.warning(f"{screened.over_token_caps} response(s) over the token caps are not scored (see `quarantine`, stage 'steps')")
        context.log.info(
            f"segmenting {sampled.height} of {traces.height} responses ({len(keep)} of {len(all_prompts)} prompts; "
            f"max_prompts={settings.max_prompts}) with '{segmentation.method}'"
        )
        steps = segment_traces(sampled, segmentation.segment_fn(), tokenizer)
        version = segmentation.version()
        steps = steps.join(
            sampled.select("response_id", "source_uri", "source_sha256", "ingest_run_id"), on="response_id"
        ).with_columns(
            pl.lit(segmentation.method).alias("segmenter"),
            pl.lit(version).alias("segmenter_version"),
            pl.lit(context.run.run_id).alias("steps_run_id"),
        )
        replaced = sorted(present)
        def replace(con):
            con.execute("DELETE FROM reasoning_steps WHERE teacher IN (SELECT unnest(?))", [replaced])
            insert(con, "reasoning_steps", steps)
            con.execute("DELETE FROM quarantine WHERE stage = 'steps' AND teacher IN (SELECT unnest(?))", [replaced])
            insert(con, "quarantine", too_long.with_columns(
                pl.lit("steps").alias("stage"), pl.lit(context.run.run_id).alias("ingest_run_id"),
                pl.lit(utcnow()).alias("quarantined_at")))

        with wh.connect() as con:
            run_transaction(con, lambda: replace(con))
        fallbacks = steps.filter(pl.col("segment_note").is_not_null())["response_id"].n_unique()
        per_resp = steps.group_by("response_id").len()
        yield dg.MaterializeResult(
            metadata=table_metadata(
                steps.drop("source_uri", "source_sha256"), "reasoning_steps",
                responses=sampled.height, responses_not_sampled=traces.height - sampled.height - too_long.height,
                responses_over_token_caps=screened.over_token_caps,
                responses_with_control_tokens=screened.control_token_rows,
                control_tokens=settings.control_tokens,
                prompts_sampled=len(keep), segmenter=version, llm_fallbacks=fallbacks,
                mean_steps_per_response=float(per_resp["len"].mean() or 0.0),
            )
        )
        yield check_result("steps_tile_responses", gx_suites.steps_suite(steps, sampled))

    return reasoning_steps
