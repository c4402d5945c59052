"""The cluster's Dagster instance (dagster_home/deploy/dagster.yaml) on a real PostgreSQL: its
storage section, rendered for a throwaway loopback server, holds runs, events, dynamic partitions
and concurrency pools, and a second instance (another process's view) reads them back."""

from __future__ import annotations

import copy
import os

import pytest
import yaml

from helpers import REPO
from pg import postgres_or_skip, throwaway_postgres

DEPLOY = REPO / "dagster_home" / "deploy" / "dagster.yaml"


@pytest.fixture(scope="module")
def pg():
    postgres_or_skip()
    with throwaway_postgres() as server:
        yield server


def render_deploy_instance(pg, home, monkeypatch, db: str) -> dict:
    """The deploy file with the test server's port; hostname, user, password and database come
    from the same DAGSTER_PG_* variables the pods get. The K8s run launcher needs a cluster and
    dagster-k8s, so it is left out (Dagster's default launcher instead)."""
    cfg = yaml.safe_load(DEPLOY.read_text())
    out = copy.deepcopy(cfg)
    out.pop("run_launcher")
    out["storage"]["postgres"]["postgres_db"]["port"] = pg.port
    monkeypatch.setenv("DAGSTER_PG_HOST", pg.host)
    monkeypatch.setenv("DAGSTER_PG_USERNAME", pg.user)
    monkeypatch.setenv("DAGSTER_PG_PASSWORD", "unused-trust-auth")
    monkeypatch.setenv("DAGSTER_PG_DB", pg.create_database(db).split("dbname=")[1].split()[0])
    home.mkdir(parents=True, exist_ok=True)
    (home / "dagster.yaml").write_text(yaml.safe_dump(out))
    return cfg


def test_deploy_instance_on_postgres(pg, tmp_path, monkeypatch):
    import dagster as dg
    from dagster._core.storage.dagster_run import DagsterRunStatus
    from dagster_postgres import PostgresEventLogStorage, PostgresRunStorage, PostgresScheduleStorage

    home = tmp_path / "dagster_home"
    cfg = render_deploy_instance(pg, home, monkeypatch, "dagster")
    assert cfg["run_launcher"]["class"] == "K8sRunLauncher"  # what the cluster uses (not exercised here)
    instance = dg.DagsterInstance.from_config(str(home))
    try:
        assert isinstance(instance.run_storage, PostgresRunStorage)
        assert isinstance(instance.event_log_storage, PostgresEventLogStorage)
        assert isinstance(instance.schedule_storage, PostgresScheduleStorage)
        assert type(instance.run_coordinator).__name__ == "QueuedRunCoordinator"

        # dynamic partitions (the pipeline's teacher partitions)
        instance.add_dynamic_partitions("teacher", ["alpha", "beta"])
        instance.add_dynamic_partitions("teacher", ["beta", "gamma"])

        # a run with events, using the gpu pool
        @dg.asset(pool="gpu")
        def scored() -> int:
            return 1

        res = dg.materialize([scored], instance=instance, tags={"lalp/test": "pg"})
        assert res.success

        # pools: the deploy file's default limit applies to a new pool; `gpu` can be raised
        assert cfg["concurrency"]["pools"]["default_limit"] == 1
        ev = instance.event_log_storage
        assert ev.initialize_concurrency_limit_to_default("warehouse")
        assert ev.get_concurrency_info("warehouse").slot_count == 1
        ev.set_concurrency_slots("gpu", 2)
        claims = [ev.claim_concurrency_slot("gpu", "run-a", f"step-{i}") for i in range(3)]
        assert [c.is_claimed for c in claims] == [True, True, False]
        info = ev.get_concurrency_info("gpu")
        assert (info.slot_count, info.active_slot_count, info.pending_step_count) == (2, 2, 1)
        ev.free_concurrency_slots_for_run("run-a")
        assert ev.claim_concurrency_slot("gpu", "run-b", "step-0").is_claimed
    finally:
        instance.dispose()

    # another process's view of the same database
    again = dg.DagsterInstance.from_config(str(home))
    try:
        assert sorted(again.get_dynamic_partitions("teacher")) == ["alpha", "beta", "gamma"]
        runs = again.get_runs(filters=dg.RunsFilter(tags={"lalp/test": "pg"}))
        assert [r.run_id for r in runs] == [res.run_id] and runs[0].status == DagsterRunStatus.SUCCESS
        mat = again.get_latest_materialization_event(dg.AssetKey("scored"))
        assert mat is not None and mat.run_id == res.run_id
        assert again.event_log_storage.get_concurrency_info("gpu").slot_count == 2
        assert "gpu" in again.event_log_storage.get_concurrency_keys()
    finally:
        again.dispose()
    # the tables really are in the test's PostgreSQL database
    db = os.environ["DAGSTER_PG_DB"]
    tables = pg.psql("SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'", db).split()
    assert {"runs", "event_logs", "dynamic_partitions", "concurrency_limits", "jobs"} <= set(tables), tables
