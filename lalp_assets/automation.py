"""Sensors, schedules and the automation sensor.

- `inbox_sensor` watches the inbox folder for new trace files, registers new teachers as
  partitions and requests runs for exactly those teachers (and for teachers whose files changed).
- `rescore_schedule` re-runs scoring for every teacher periodically; with the score cache only
  windows never seen before reach the model.
- `lalp_automation` evaluates AutomationConditions: rankings and the curated set follow the
  per-teacher scores declaratively.
"""


import hashlib
import json
from pathlib import Path

import dagster as dg

from lalp_assets.common import SETTINGS, teacher_partitions
from lalp_resources.resources import TraceSourcesResource

PER_TEACHER = ["raw_teacher_traces", "reasoning_steps", "step_scores", "response_scores"]
score_teachers_job = dg.define_asset_job(
    "score_teachers_job",
    selection=dg.AssetSelection.assets(*PER_TEACHER),
    description="Ingest, segment and score the selected teacher partitions (one run, one model load).",
)
rank_and_curate_job = dg.define_asset_job(
    "rank_and_curate_job",
    selection=dg.AssetSelection.assets("teacher_rankings", "curated_sft_dataset"),
    description="Rank teachers and select the curated SFT set from the current scores.",
)


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@dg.sensor(
    name="inbox_sensor",
    job=score_teachers_job,
    minimum_interval_seconds=30,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="New or changed trace files in the inbox: register their teachers and score them.",
)
def inbox_sensor(context: dg.SensorEvaluationContext, trace_sources: TraceSourcesResource):
    seen = json.loads(context.cursor) if context.cursor else {}
    files = trace_sources.inbox_files()
    changed = {}
    for f in files:
        d = _file_digest(f)
        if seen.get(str(f)) != d:
            changed[str(f)] = d
    if not changed:
        return dg.SkipReason(f"no new or changed files in {trace_sources.inbox or '(no inbox configured)'}")
    teachers = trace_sources.discover_teachers(sorted(changed))
    known = set(context.instance.get_dynamic_partitions(teacher_partitions.name))
    new = [t for t in teachers if t not in known]
    seen.update(changed)
    context.log.info(f"{len(changed)} new/changed file(s); teachers {teachers}; new partitions {new}")
    return dg.SensorResult(
        run_requests=[
            dg.RunRequest(partition_key=t, run_key=f"{t}:{hashlib.sha256(json.dumps(sorted(changed.items())).encode()).hexdigest()[:16]}")
            for t in teachers
        ],
        dynamic_partitions_requests=[teacher_partitions.build_add_request(new)] if new else [],
        cursor=json.dumps(seen),
    )


rescore_job = dg.define_asset_job(
    "rescore_job",
    selection=dg.AssetSelection.assets("reasoning_steps", "step_scores", "response_scores"),
    description="Re-segment and re-score teacher partitions with the current settings.",
)


@dg.schedule(
    name="rescore_schedule",
    job=rescore_job,
    cron_schedule=SETTINGS.rescore_cron,
    default_status=dg.DefaultScheduleStatus.STOPPED,
    description="Periodic re-scoring of every teacher (LALP_RESCORE_CRON), as one run over the teacher "
    "range so the student loads once. Only windows missing from the score cache reach the model.",
)
def rescore_schedule(context: dg.ScheduleEvaluationContext):
    keys = context.instance.get_dynamic_partitions(teacher_partitions.name)
    if not keys:
        return dg.SkipReason("no teacher partitions registered yet")
    return dg.RunRequest(
        run_key=None,
        tags={"dagster/asset_partition_range_start": keys[0], "dagster/asset_partition_range_end": keys[-1]},
    )

automation_sensor = dg.AutomationConditionSensorDefinition(
    "lalp_automation",
    target=dg.AssetSelection.assets("teacher_rankings", "curated_sft_dataset"),
    default_status=dg.DefaultSensorStatus.RUNNING,
    minimum_interval_seconds=30,
)
