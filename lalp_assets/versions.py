"""Code versions, computed from the resources' own values.

`build_defs(settings)` builds the resources from the settings and each asset's code version from
those resources. At run time an asset recomputes its version from the resources it was actually
given (the Launchpad can change resource config) and refuses to run when the two differ: what
the UI shows as the code version is what ran, so the cache and staleness can trust it.
"""

from __future__ import annotations

import dagster as dg

from lalp_resources.resources import PipelineSettingsResource, SegmentationResource, StudentModelResource, TraceSourcesResource

INGEST = "ingest@2"
STEPS = "steps@3"  # @3: control-token screen; trace text tokenized as text
SCORE = "score@2"  # @2: control-token strings in trace text are plain characters
RESPONSES = "response_scores@3"  # @3: the weakest step and the DROP/CASL inputs
RANKINGS = "rankings@3"  # @3: length bias, DROP/CASL, same-family
CURATED = "curated@2"


def ingest_version(src: TraceSourcesResource) -> str:
    return (f"{INGEST}|{src.teacher_mode}|{src.format}|chars={src.max_prompt_chars},{src.max_response_chars},"
            f"{src.max_teacher_chars},{src.max_prompt_id_chars}")


def steps_version(seg: SegmentationResource, student: StudentModelResource, s: PipelineSettingsResource) -> str:
    return (f"{STEPS}|{seg.method}|{seg.llm_model if seg.method == 'llm' else ''}|{student.model}|max_prompts={s.max_prompts}"
            f"|tokens={s.max_prompt_tokens},{s.max_response_tokens}|control_tokens={s.control_tokens}|{s.template}")


def score_version(student: StudentModelResource, s: PipelineSettingsResource) -> str:
    # another backend computes the same numbers (the cache is shared), but the version says who ran
    backend = "" if student.backend == "engine" else f"|backend={student.backend}"
    return f"{SCORE}|{student.model}|{student.dtype}|{s.window}|{s.template}{backend}"


def rankings_version(s: PipelineSettingsResource) -> str:
    return f"{RANKINGS}|bootstrap={s.bootstrap}|families={s.families}"


def curated_version(s: PipelineSettingsResource) -> str:
    return f"{CURATED}|require_correct={s.require_correct}|control_tokens={s.control_tokens}"


def ensure_version(context: dg.AssetExecutionContext, actual: str) -> None:
    """Refuse a run whose resource config no longer matches the asset's declared code version."""
    declared = context.assets_def.code_versions_by_key.get(context.asset_key)
    if declared is not None and declared != actual:
        raise dg.Failure(
            description=(
                f"{context.asset_key.to_user_string()}: this run's resource config gives code version {actual!r}, "
                f"but the code location declares {declared!r}. The code version is what the score cache and "
                "staleness trust, so a run may not change these values from the Launchpad. Set the matching "
                "LALP_* variable and reload the code location instead (README, Configuration)."
            ),
            allow_retries=False,
        )
