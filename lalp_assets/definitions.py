"""The one `Definitions` object of the LALP pipeline (workspace.yaml points here)."""


import dagster as dg

from lalp_assets.automation import automation_sensor, inbox_sensor, rank_and_curate_job, rescore_schedule, score_teachers_job
from lalp_assets.common import SETTINGS
from lalp_assets.curation import curated_sft_dataset
from lalp_assets.ingest import raw_teacher_traces
from lalp_assets.rankings import teacher_rankings
from lalp_assets.scores import response_scores, step_scores
from lalp_assets.steps import reasoning_steps
from lalp_resources.resources import (
    PipelineSettingsResource,
    SegmentationResource,
    StudentModelResource,
    TraceSourcesResource,
    WarehouseResource,
)

ASSETS = [raw_teacher_traces, reasoning_steps, step_scores, response_scores, teacher_rankings, curated_sft_dataset]


def build_resources(settings=SETTINGS) -> dict:
    return {
        "warehouse": WarehouseResource(path=settings.warehouse, lock_timeout_s=settings.warehouse_lock_timeout_s),
        "trace_sources": TraceSourcesResource(
            sources=list(settings.sources), inbox=settings.inbox, format=settings.source_format,
            teacher_mode=settings.teacher_mode, max_response_chars=settings.max_response_chars,
        ),
        "student": StudentModelResource(
            model=settings.model, device=settings.device, dtype=settings.dtype, group_tokens=settings.group_tokens
        ),
        "segmentation": SegmentationResource(method=settings.segmenter, llm_url=settings.llm_url, llm_model=settings.llm_model),
        "settings": PipelineSettingsResource(
            window=settings.window, template=settings.template, max_prompts=settings.max_prompts,
            require_correct=settings.require_correct, bootstrap=settings.bootstrap, exports=settings.exports,
            staging_dir=settings.staging_dir,
        ),
    }


defs = dg.Definitions(
    assets=ASSETS,
    resources=build_resources(),
    jobs=[score_teachers_job, rank_and_curate_job],
    sensors=[inbox_sensor, automation_sensor],
    schedules=[rescore_schedule],
)


def score_teachers_job_def() -> dg.JobDefinition:
    """The per-teacher job, importable by name: `dg.reconstructable(score_teachers_job_def)` lets
    `execute_job` run it through the multiprocess executor (each step in its own process)."""
    return defs.resolve_job_def("score_teachers_job")
