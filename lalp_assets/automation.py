"""Jobs, sensors, schedules and the automation sensor, built from the settings.

- `inbox_sensor` watches the inbox folder (or `s3://` prefix). A file is taken only once it is
  stable: the same size and mtime (an object: size and ETag) on two consecutive ticks (and older
  than `LALP_INBOX_SETTLE_S`), so a file still being copied is never read half-written; writing
  to a temporary name and renaming into the inbox is the fastest convention. An object is whole
  once it is listed (a multipart upload shows only when completed). It registers new teachers as partitions and requests runs for
  the teachers of new or changed files, including teachers a changed file no longer holds.
- `rescore_schedule` re-scores every teacher periodically; with the score cache only windows
  never seen before reach the model.
- `lalp_automation` evaluates AutomationConditions: rankings and the curated set follow the
  per-teacher scores declaratively (and, with shards, each teacher's `response_scores` follows
  its shards).
"""


import contextlib
import hashlib
import json
import time

import dagster as dg

from lalp_assets.partitions import teacher_partitions
from lalp_resources import adapters, objectstore
from lalp_resources.resources import TraceSourcesResource
from lalp_resources.settings import Settings

PER_TEACHER = ["raw_teacher_traces", "reasoning_steps", "step_scores", "response_scores"]


def build_jobs(settings: Settings) -> dict:
    jobs = {
        "rank_and_curate_job": dg.define_asset_job(
            "rank_and_curate_job", selection=dg.AssetSelection.assets("teacher_rankings", "curated_sft_dataset"),
            description="Rank teachers and select the curated SFT set from the current scores."),
    }
    if settings.shards <= 1:
        jobs["score_teachers_job"] = dg.define_asset_job(
            "score_teachers_job", selection=dg.AssetSelection.assets(*PER_TEACHER),
            description="Ingest, segment and score the selected teacher partitions (one run, one model load).")
        jobs["rescore_job"] = dg.define_asset_job(
            "rescore_job", selection=dg.AssetSelection.assets("reasoning_steps", "step_scores", "response_scores"),
            description="Re-segment and re-score teacher partitions with the current settings.")
    else:
        jobs["score_teachers_job"] = dg.define_asset_job(
            "score_teachers_job", selection=dg.AssetSelection.assets("raw_teacher_traces", "reasoning_steps"),
            description="Ingest and segment the selected teachers; their shards are scored by score_shards_job.")
        jobs["score_shards_job"] = dg.define_asset_job(
            "score_shards_job", selection=dg.AssetSelection.assets("step_scores"),
            description="Score teacher × shard partitions (one run per GPU).")
        jobs["response_scores_job"] = dg.define_asset_job(
            "response_scores_job", selection=dg.AssetSelection.assets("response_scores"),
            description="LALP and GALP per response, once every shard of a teacher is scored.")
        jobs["rescore_job"] = jobs["score_shards_job"]
    return jobs


def stable_files(paths_stats: dict[str, tuple[int, int, float]], previous: dict, settle_s: float, now: float):
    """Which files are stable: (size, mtime) equal to the previous tick's and old enough."""
    stable, observed = [], {}
    for path, (size, mtime_ns, age_s) in paths_stats.items():
        observed[path] = [size, mtime_ns]
        if previous.get(path) == [size, mtime_ns] and age_s >= settle_s:
            stable.append(path)
    return stable, observed


def _digest(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def build_inbox_sensor(job) -> dg.SensorDefinition:
    @dg.sensor(
        name="inbox_sensor",
        job=job,
        minimum_interval_seconds=30,
        default_status=dg.DefaultSensorStatus.RUNNING,
        description="New or changed trace files in the inbox (once stable across two ticks): register "
        "their teachers and score them.",
    )
    def inbox_sensor(context: dg.SensorEvaluationContext, trace_sources: TraceSourcesResource):
        cursor = json.loads(context.cursor) if context.cursor else {}
        done, seen_stats = cursor.get("done", {}), cursor.get("observed", {})
        now = time.time()
        stats = trace_sources.inbox_stats()
        stable, observed = stable_files(stats, seen_stats, trace_sources.inbox_settle_s, now)
        changed, teachers_now = {}, {}
        for path in stable:
            if done.get(path, {}).get("stat") == observed[path]:
                continue
            with contextlib.ExitStack() as held:
                try:
                    local = held.enter_context(objectstore.local_copy(path))[0] if objectstore.is_remote(path) else None
                    digest = _digest(str(local or path))
                except (OSError, RuntimeError):
                    continue  # vanished or unreadable now: looked at again next tick
                if done.get(path, {}).get("sha") != digest:
                    changed[path] = digest
                    # read_one never raises on a bad file (it becomes a quarantine row when the run ingests it)
                    part = adapters.read_one(path, trace_sources.format, teacher_mode=trace_sources.teacher_mode,
                                             limits=trace_sources.limits(), local=local)
                    teachers_now[path] = sorted(part.traces["teacher"].unique().to_list())
                else:
                    done[path]["stat"] = observed[path]
        waiting = sorted(set(stats) - set(stable))
        new_cursor = {"done": done, "observed": observed}
        if not changed:
            note = f"; waiting for {len(waiting)} file(s) to stop changing" if waiting else ""
            return dg.SensorResult(skip_reason=f"no new or changed stable files in {trace_sources.inbox or '(no inbox)'}{note}",
                                   cursor=json.dumps(new_cursor))
        affected = sorted({t for p in changed for t in teachers_now[p] + done.get(p, {}).get("teachers", [])})
        for p, digest in changed.items():
            done[p] = {"sha": digest, "stat": observed[p], "teachers": teachers_now[p]}
        known = set(context.instance.get_dynamic_partitions(teacher_partitions.name))
        new = [t for t in affected if t not in known]
        run_key = hashlib.sha256(json.dumps(sorted(changed.items())).encode()).hexdigest()[:16]
        context.log.info(f"{len(changed)} new/changed file(s); teachers {affected}; new partitions {new}")
        return dg.SensorResult(
            run_requests=[dg.RunRequest(partition_key=t, run_key=f"{t}:{run_key}") for t in affected],
            dynamic_partitions_requests=[teacher_partitions.build_add_request(new)] if new else [],
            cursor=json.dumps(new_cursor),
        )

    return inbox_sensor


def build_rescore_schedule(settings: Settings, job) -> dg.ScheduleDefinition:
    @dg.schedule(
        name="rescore_schedule",
        job=job,
        cron_schedule=settings.rescore_cron,
        default_status=dg.DefaultScheduleStatus.STOPPED,
        description="Periodic re-scoring of every teacher (LALP_RESCORE_CRON), as one run over the teacher "
        "range so the student loads once. Only windows missing from the score cache reach the model.",
    )
    def rescore_schedule(context: dg.ScheduleEvaluationContext):
        keys = context.instance.get_dynamic_partitions(teacher_partitions.name)
        if not keys:
            return dg.SkipReason("no teacher partitions registered yet")
        if settings.shards > 1:
            return [dg.RunRequest(partition_key=dg.MultiPartitionKey({"teacher": t, "shard": str(s)}), run_key=None)
                    for t in keys for s in range(settings.shards)]
        return dg.RunRequest(
            run_key=None,
            tags={"dagster/asset_partition_range_start": keys[0], "dagster/asset_partition_range_end": keys[-1]},
        )

    return rescore_schedule


automation_sensor = dg.AutomationConditionSensorDefinition(
    "lalp_automation",
    target=dg.AssetSelection.assets("response_scores", "teacher_rankings", "curated_sft_dataset"),
    default_status=dg.DefaultSensorStatus.RUNNING,
    minimum_interval_seconds=30,
)
