"""The Dagster instance for `lalp run`: a serialized first open, teacher registration, and the
reaping of runs whose process died (in-process runs have no run monitor)."""

from __future__ import annotations

import fcntl
import os
import socket
import sys
from pathlib import Path

import dagster as dg

from lalp_assets.partitions import teacher_partitions
from lalp_resources.settings import Settings


def open_instance(settings: Settings):
    """The Dagster instance in $DAGSTER_HOME. Its SQLite storages create their tables on first use,
    and two processes doing that at once on a fresh home collide ("table ... already exists"), so
    that first use is serialized with a file lock beside them."""
    settings.export_dagster_home()  # dagster.yaml's `env: DAGSTER_HOME` reads it
    home = Path(settings.dagster_home)
    home.mkdir(parents=True, exist_ok=True)
    with open(home / ".lalp-instance.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        instance = dg.DagsterInstance.get()
        # one read from each storage (runs, events, schedules) creates its tables
        instance.get_runs(limit=1)
        instance.get_dynamic_partitions("teacher")
        instance.all_instigator_state()
    return instance


def register_teachers(instance, teachers: list[str]) -> list[str]:
    """Add teacher partitions that do not exist yet. Safe when another process registers the
    same teachers at the same moment (the loser of the race sees them and moves on)."""
    added = []
    for t in teachers:
        if instance.has_dynamic_partition(teacher_partitions.name, t):
            continue
        try:
            instance.add_dynamic_partitions(teacher_partitions.name, [t])
            added.append(t)
        except Exception:
            if not instance.has_dynamic_partition(teacher_partitions.name, t):
                raise
    return added


def reap_dead_runs(instance) -> list[str]:
    """Runs this command executes in-process have no run monitor: if such a process was killed
    (SIGKILL, OOM), its run stays STARTED and keeps its `gpu` pool slot, blocking every later
    scoring run. Mark runs whose owning process is gone as failed and free their slots."""
    reaped = []
    host = socket.gethostname()
    for run in instance.get_runs(filters=dg.RunsFilter(statuses=[dg.DagsterRunStatus.STARTED, dg.DagsterRunStatus.STARTING])):
        pid, run_host = run.tags.get("lalp/pid"), run.tags.get("lalp/host")
        if not pid or run_host != host:
            continue
        try:
            os.kill(int(pid), 0)
            continue  # still alive
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        instance.report_run_failed(run, f"the process that ran it (pid {pid}) is gone; marked failed by lalp run")
        instance.event_log_storage.free_concurrency_slots_for_run(run.run_id)
        reaped.append(run.run_id)
        print(f"note: run {run.run_id} was left STARTED by a dead process; marked failed and freed its pool slot", file=sys.stderr)
    return reaped




def owner_tags() -> dict:
    return {"lalp/pid": str(os.getpid()), "lalp/host": socket.gethostname()}
