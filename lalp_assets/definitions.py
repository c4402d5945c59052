"""The one `Definitions` object of the LALP pipeline.

`build_defs(settings)` is the whole graph for one configuration: resources made from the
settings, and asset code versions computed from those same resources. `workspace.yaml` loads
`defs` below, which reads the settings from the environment once, when the code location loads;
`lalp run` builds its settings from its flags and calls `build_defs` itself.
"""

from __future__ import annotations

import warnings

import dagster as dg

from lalp_assets import curation, ingest, rankings, scores, steps
from lalp_assets.automation import automation_sensor, build_inbox_sensor, build_jobs, build_rescore_schedule
from lalp_assets.partitions import backfill_policy, scoring_partitions, teacher_partitions
from lalp_resources.resources import (
    PipelineSettingsResource,
    SegmentationResource,
    StudentModelResource,
    TraceSourcesResource,
    WarehouseResource,
)
from lalp_resources.settings import Settings

# backfill_policy and pools are marked beta/preview in this Dagster release; used knowingly.
warnings.filterwarnings("ignore", category=dg.BetaWarning)
warnings.filterwarnings("ignore", category=getattr(dg, "PreviewWarning", dg.BetaWarning))


def build_resources(s: Settings) -> dict:
    return {
        "warehouse": WarehouseResource(path=s.warehouse, lake_data_path=s.lake_data_path, lock_timeout_s=s.warehouse_lock_timeout_s,
                                       memory_limit=s.duckdb_memory),
        "trace_sources": TraceSourcesResource(
            sources=list(s.sources), inbox=s.inbox, format=s.source_format, teacher_mode=s.teacher_mode,
            max_prompt_chars=s.max_prompt_chars, max_response_chars=s.max_response_chars,
            max_teacher_chars=s.max_teacher_chars, max_prompt_id_chars=s.max_prompt_id_chars,
            inbox_settle_s=s.inbox_settle_s,
        ),
        "student": StudentModelResource(
            model=s.model, device=s.device, dtype=s.dtype, cache_dir=s.cache_dir,
            row_tokens=s.row_tokens, batch_tokens=s.batch_tokens, group_tokens=s.group_tokens, compile=s.compile,
            cpu_kernels=s.cpu_kernels, host_workers=s.host_workers,
            backend=s.backend, vllm_tp=s.vllm_tp, vllm_pp=s.vllm_pp, vllm_gpu_memory=s.vllm_gpu_memory,
            vllm_max_model_len=s.vllm_max_model_len, vllm_batch_tokens=s.vllm_batch_tokens,
            vllm_kv_cache_gb=s.vllm_kv_cache_gb, server_model=s.server_model, server_concurrency=s.server_concurrency,
            server_timeout_s=s.server_timeout_s, server_retries=s.server_retries,
        ),
        "segmentation": SegmentationResource(
            method=s.segmenter, llm_url=s.llm_url, llm_model=s.llm_model, llm_timeout_s=s.llm_timeout_s,
            # the key is resolved by Dagster at run time and never shown in the UI
            llm_api_key=dg.EnvVar("LALP_LLM_API_KEY") if Settings.env_var_set("LALP_LLM_API_KEY") else s.llm_api_key,
        ),
        "settings": PipelineSettingsResource(
            window=s.window, template=s.template, max_prompts=s.max_prompts, max_prompt_tokens=s.max_prompt_tokens,
            max_response_tokens=s.max_response_tokens, control_tokens=s.control_tokens, require_correct=s.require_correct, bootstrap=s.bootstrap,
            families=s.families, student=s.model, exports=s.exports, shards=s.shards, commit_every_s=s.commit_every_s,
            progress_every_s=s.progress_every_s,
            batch_prompts=s.batch_prompts,
        ),
    }


def build_defs(settings: Settings) -> dg.Definitions:
    res = build_resources(settings)
    backfill = backfill_policy(settings)
    assets = [
        ingest.build(res["trace_sources"], teacher_partitions, backfill),
        steps.build(res["segmentation"], res["student"], res["settings"], teacher_partitions, backfill),
        scores.build_step_scores(res["student"], res["settings"], scoring_partitions(settings.shards), backfill, settings.k8s_gpu),
        scores.build_response_scores(settings.shards, teacher_partitions, backfill),
        rankings.build(res["settings"]),
        curation.build(res["settings"]),
    ]
    jobs = build_jobs(settings)
    return dg.Definitions(
        assets=assets,
        resources=res,
        jobs=list({id(j): j for j in jobs.values()}.values()),
        sensors=[build_inbox_sensor(jobs["score_teachers_job"]), automation_sensor],
        schedules=[build_rescore_schedule(settings, jobs["rescore_job"])],
    )


@dg.definitions
def defs() -> dg.Definitions:
    """The code location's entry point: settings from the environment, read once, here."""
    return build_defs(Settings.from_env())
