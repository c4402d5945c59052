"""Stage 2: raw traces -> `reasoning_steps` (character spans that tile each response)."""


import dagster as dg
import polars as pl

from lalp_resources.method.aggregation import sample_prompts, steps_frame
from lalp_assets.common import BACKFILL, SETTINGS, check_result, table_metadata, teacher_partitions
from lalp_resources import expectations as gx_suites
from lalp_resources.resources import PipelineSettingsResource, SegmentationResource, StudentModelResource, WarehouseResource
from lalp_resources.method.tokenization import merge_unscored_steps
from lalp_resources.warehouse import query, replace_teachers

CHECKS = [
    dg.AssetCheckSpec("steps_tile_responses", asset="reasoning_steps", blocking=True,
                      description="GX: steps concatenate to their response exactly; no whitespace-only step"),
]


def segment_traces(traces: pl.DataFrame, segmentation: SegmentationResource, tokenizer) -> pl.DataFrame:
    """Segment, then merge steps that own no student token into their neighbour."""
    seg = segmentation.segment_fn()

    def segment(text: str):
        spans, note = seg(text)
        return merge_unscored_steps(tokenizer, text, spans), note

    return steps_frame(traces, segment)


@dg.asset(
    partitions_def=teacher_partitions,
    backfill_policy=BACKFILL,
    group_name="scoring",
    kinds={"duckdb", "polars"},
    deps=["raw_teacher_traces"],
    code_version=f"steps@1|{SETTINGS.segmenter}|{SETTINGS.model}|max_prompts={SETTINGS.max_prompts}",
    check_specs=CHECKS,
    description=(
        "Reasoning steps: contiguous character spans that tile each response exactly (a separator "
        "belongs to the step it ends). Segmenter: paragraph, line, sentence (math-aware) or llm. "
        "Only the sampled prompts (LALP_MAX_PROMPTS; 0 = all) are segmented."
    ),
)
def reasoning_steps(
    context: dg.AssetExecutionContext,
    warehouse: WarehouseResource,
    segmentation: SegmentationResource,
    student: StudentModelResource,
    settings: PipelineSettingsResource,
):
    teachers = list(context.partition_keys)
    wh = warehouse.get()
    with wh.connect() as con:
        all_prompts = [r[0] for r in con.execute("SELECT DISTINCT prompt_id FROM raw_teacher_traces").fetchall()]
        traces = query(
            con,
            "SELECT response_id, prompt_id, teacher, response, source_uri, source_sha256, ingest_run_id "
            "FROM raw_teacher_traces WHERE teacher IN (SELECT unnest(?)) ORDER BY response_id",
            [teachers],
        )
    keep = sample_prompts(all_prompts, settings.max_prompts)
    sampled = traces.filter(pl.col("prompt_id").is_in(list(keep)))
    context.log.info(
        f"segmenting {sampled.height} of {traces.height} responses ({len(keep)} of {len(all_prompts)} prompts; "
        f"max_prompts={settings.max_prompts}) with '{segmentation.method}'"
    )
    steps = segment_traces(sampled, segmentation, student.tokenizer())
    version = segmentation.version()
    steps = steps.join(
        sampled.select("response_id", "source_uri", "source_sha256", "ingest_run_id"), on="response_id"
    ).with_columns(
        pl.lit(segmentation.method).alias("segmenter"),
        pl.lit(version).alias("segmenter_version"),
        pl.lit(context.run.run_id).alias("steps_run_id"),
    )
    with wh.connect() as con:
        replace_teachers(con, "reasoning_steps", teachers, steps)
    fallbacks = steps.filter(pl.col("segment_note").is_not_null())["response_id"].n_unique()
    per_resp = steps.group_by("response_id").len()
    yield dg.MaterializeResult(
        metadata=table_metadata(
            steps.drop("source_uri", "source_sha256"), "reasoning_steps",
            responses=sampled.height, responses_not_sampled=traces.height - sampled.height,
            prompts_sampled=len(keep), segmenter=version, llm_fallbacks=fallbacks,
            mean_steps_per_response=float(per_resp["len"].mean() or 0.0),
        )
    )
    yield check_result("steps_tile_responses", gx_suites.steps_suite(steps, sampled))
