"""One run of the pipeline's jobs the way a cluster runs it: `dg.execute_job` on a reconstructable
job, against the Dagster instance in $DAGSTER_HOME, with the settings read from the `LALP_*`
variables in every process (this one and the multiprocess executor's step processes, which
rebuild the job from the functions below). Used by tests/test_cluster.py:

    python tests/cluster_job.py JOB [JOB ...] [--teachers T1,T2 | --partition TEACHER/SHARD]
        [--executor in_process|multiprocess] [--register T1,T2]

The jobs run one after the other in this process (a partition or range applies to the partitioned
ones); it stops at the first failure. Per run it prints one JSON line, {"job": ..., "run_id": ...,
"success": ...}, and exits 0 when every run succeeded.
"""

from __future__ import annotations

import argparse
import json
import sys

import dagster as dg

from lalp_assets.definitions import build_defs
from lalp_assets.instance import owner_tags, register_teachers
from lalp_resources.settings import Settings


def _job(name: str) -> dg.JobDefinition:
    return build_defs(Settings.from_env()).resolve_job_def(name)


# Module-level job functions: what `dg.reconstructable` points the step processes at.
def score_teachers_job() -> dg.JobDefinition:
    return _job("score_teachers_job")


def score_shards_job() -> dg.JobDefinition:
    return _job("score_shards_job")


def response_scores_job() -> dg.JobDefinition:
    return _job("response_scores_job")


def rank_and_curate_job() -> dg.JobDefinition:
    return _job("rank_and_curate_job")


JOBS = {f.__name__: f for f in (score_teachers_job, score_shards_job, response_scores_job, rank_and_curate_job)}


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("jobs", nargs="+", choices=sorted(JOBS))
    ap.add_argument("--teachers", help="a teacher range FIRST,LAST (partition range tags)")
    ap.add_argument("--partition", help="TEACHER/SHARD: one teacher x shard partition")
    ap.add_argument("--executor", choices=["in_process", "multiprocess"], default="multiprocess")
    ap.add_argument("--register", help="teacher partitions to add first (comma-separated)")
    args = ap.parse_args(argv)

    instance = dg.DagsterInstance.get()
    if args.register:
        register_teachers(instance, args.register.split(","))
    executor = {"in_process": {}} if args.executor == "in_process" else {"multiprocess": {"max_concurrent": 1}}
    for name in args.jobs:
        fn = JOBS[name]
        job = fn()
        tags = dict(owner_tags())
        if job.partitions_def is not None:
            if args.partition:
                teacher, shard = args.partition.split("/")
                key = dg.MultiPartitionKey({"teacher": teacher, "shard": shard})
                tags.update(job.get_tags_for_partition_key(key, None))
            elif args.teachers:
                lo, hi = args.teachers.split(",")
                tags.update({"dagster/asset_partition_range_start": lo, "dagster/asset_partition_range_end": hi})
        result = dg.execute_job(dg.reconstructable(fn), instance=instance, tags=tags,
                                run_config={"execution": {"config": executor}})
        print(json.dumps({"job": name, "run_id": result.run_id, "success": result.success}), flush=True)
        if not result.success:
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
