"""A real cluster on one machine (issue 12): a throwaway PostgreSQL holds both the Dagster instance
(dagster-postgres storage, rendered from dagster_home/deploy/dagster.yaml, the `gpu` pool at 2 slots)
and the DuckLake catalog of the warehouse (Parquet data in a temp folder). The pipeline runs with
LALP_SHARDS=2 on two teachers as separate processes, the way a cluster launches runs:

  1. ingest + segment both teachers (score_teachers_job),
  2. the 2 teachers x 2 shards of step_scores as 4 concurrent runs, each `dg.execute_job` through the
     multiprocess executor; one scoring step's process is SIGKILLed once it has committed some of
     its scores, and that partition is run again (it resumes from the score cache),
  3. response_scores for both teachers, then rank_and_curate_job.

Every table then equals an embedded single-process run of the same input (shards=1, a DuckDB file,
SQLite instance): the same rows, none duplicated or missing, scores within 1e-6. From the instance:
at most 2 scoring steps ran at once (the pool), and the 4 shard runs overlapped.

No mocks: a real server on loopback, real DuckLake, real processes, a real SIGKILL. The student is
a small random Llama saved as a local model dir. Skips with a message when PostgreSQL's server
binaries are absent (.ci/run installs them)."""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import polars as pl
import pytest
import yaml

from helpers import REPO, save_tiny_student, temp_dagster_home, write_traces
from pg import postgres_or_skip, throwaway_postgres

pytestmark = pytest.mark.slow

TEACHERS = ("t1", "t2")
SHARDS = 2
N_PROMPTS, PARAGRAPHS = 6, 6  # shard_of splits q0..q5 as 1 + 5 prompts
TOL = 1e-6
RUNNER = REPO / "tests" / "cluster_job.py"
DEPLOY = REPO / "dagster_home" / "deploy" / "dagster.yaml"
TABLES = ["raw_teacher_traces", "reasoning_steps", "step_scores", "galp_scores", "response_scores",
          "teacher_rankings", "selection_decisions", "curated_sft_dataset"]
STEP_END = (dg.DagsterEventType.STEP_SUCCESS, dg.DagsterEventType.STEP_FAILURE)


@pytest.fixture(scope="module")
def pg():
    postgres_or_skip()
    with throwaway_postgres() as server:
        yield server


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory, smol_tokenizer):
    # big enough that a shard takes seconds (so its step can be killed midway), small enough for CI
    return save_tiny_student(tmp_path_factory.mktemp("student"), smol_tokenizer, seed=5,
                             hidden_size=256, intermediate_size=512, num_hidden_layers=4)


def common_settings(root: Path, traces: Path, student: Path) -> dict:
    """The LALP_* values both deployments share (the data-changing ones must be equal)."""
    return dict(LALP_SOURCES=str(traces), LALP_INBOX=str(root / "inbox"), LALP_EXPORTS=str(root / "exports"),
                LALP_MODEL=str(student), LALP_DEVICE="cpu", LALP_DTYPE="float32", LALP_MAX_PROMPTS="0",
                LALP_GROUP_TOKENS="256", LALP_BOOTSTRAP="100")


# --------------------------------------------------------------------------- the embedded reference


def embedded_run(root: Path, traces: Path, student: Path, monkeypatch) -> Path:
    """Single process, default shards=1, a DuckDB file, SQLite instance: the lalp run shape."""
    from lalp_assets.definitions import build_defs
    from lalp_resources.settings import Settings

    home = temp_dagster_home(root)
    monkeypatch.setenv("DAGSTER_HOME", str(home))  # the SQLite storage's base_dir
    settings = Settings.from_env({**common_settings(root, traces, student), "DAGSTER_HOME": str(home),
                                  "LALP_WAREHOUSE": str(root / "lalp.duckdb")})
    assert settings.shards == 1
    defs = build_defs(settings)
    instance = dg.DagsterInstance.from_config(str(home))
    try:
        instance.add_dynamic_partitions("teacher", list(TEACHERS))
        r = defs.resolve_job_def("score_teachers_job").execute_in_process(
            instance=instance, tags={"dagster/asset_partition_range_start": TEACHERS[0],
                                     "dagster/asset_partition_range_end": TEACHERS[-1]})
        assert r.success
        assert defs.resolve_job_def("rank_and_curate_job").execute_in_process(instance=instance).success
    finally:
        instance.dispose()
    return root / "lalp.duckdb"


# --------------------------------------------------------------------------- the cluster


def render_instance(pg, home: Path, db: str) -> dict:
    """$DAGSTER_HOME/dagster.yaml: the deploy file's PostgreSQL storage (its DAGSTER_PG_* variables,
    the test server's port) and its pools; the K8s launcher and the queued coordinator need a cluster
    and a daemon, so Dagster's defaults stand in (runs here are started with execute_job).
    Returns the DAGSTER_PG_* variables the storage section reads."""
    deploy = yaml.safe_load(DEPLOY.read_text())
    storage = copy.deepcopy(deploy["storage"])
    storage["postgres"]["postgres_db"]["port"] = pg.port
    cfg = {"storage": storage,
           "concurrency": {"pools": {**deploy["concurrency"]["pools"], "granularity": "op"}},
           "telemetry": {"enabled": False}}
    home.mkdir(parents=True, exist_ok=True)
    (home / "dagster.yaml").write_text(yaml.safe_dump(cfg))
    return {"DAGSTER_PG_HOST": pg.host, "DAGSTER_PG_USERNAME": pg.user, "DAGSTER_PG_PASSWORD": "unused-trust-auth",
            "DAGSTER_PG_DB": db}


class Cluster:
    """Processes that run one job each against the shared instance and warehouse."""

    def __init__(self, env: dict, logs: Path):
        self.env, self.logs = env, logs
        logs.mkdir(parents=True, exist_ok=True)
        self.procs: list[subprocess.Popen] = []

    def start(self, name: str, *args: str) -> subprocess.Popen:
        log = open(self.logs / f"{name}.log", "w")
        p = subprocess.Popen([sys.executable, str(RUNNER), *args], env=self.env, cwd=REPO, stdout=log,
                             stderr=subprocess.STDOUT, text=True, start_new_session=True)
        log.close()
        p.log_path = self.logs / f"{name}.log"
        self.procs.append(p)
        return p

    def wait(self, p: subprocess.Popen, timeout: float = 300) -> dict:
        p.wait(timeout=timeout)
        text = p.log_path.read_text(errors="replace")
        runs = [json.loads(ln) for ln in text.splitlines() if ln.startswith('{"job"')]
        assert runs, f"{p.args[2:]} printed no result (exit {p.returncode}):\n{text[-4000:]}"
        return {"runs": runs, "run_id": runs[-1]["run_id"], "success": all(r["success"] for r in runs),
                "returncode": p.returncode, "log": text}

    def run(self, name: str, *args: str, timeout: float = 300) -> dict:
        out = self.wait(self.start(name, *args), timeout)
        assert out["success"] and out["returncode"] == 0, f"{name} failed:\n{out['log'][-4000:]}"
        return out

    def stop_all(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()


def run_of(instance, pid: int):
    runs = instance.get_runs(filters=dg.RunsFilter(tags={"lalp/pid": str(pid)}))
    return runs[0] if runs else None


def events(instance, run_id: str, kind) -> list:
    return list(instance.get_records_for_run(run_id, of_type=kind, limit=1000).records)


def step_interval(instance, run_id: str) -> tuple[float, float | None]:
    """step_scores' STEP_START .. STEP_SUCCESS/STEP_FAILURE timestamps in one run (None: no end event)."""
    start = [r.event_log_entry.timestamp for r in events(instance, run_id, dg.DagsterEventType.STEP_START)
             if r.event_log_entry.step_key == "step_scores"]
    end = [r.event_log_entry.timestamp for kind in STEP_END for r in events(instance, run_id, kind)
           if r.event_log_entry.step_key == "step_scores"]
    assert len(start) == 1, (run_id, start)
    return start[0], (max(end) if end else None)


def most_at_once(intervals: list[tuple[float, float]]) -> int:
    points = sorted([(a, 1) for a, _ in intervals] + [(b, -1) for _, b in intervals], key=lambda x: (x[0], x[1]))
    now = best = 0
    for _, d in points:  # an end at the same instant as a start counts first
        now += d
        best = max(best, now)
    return best


def step_scores_metadata(instance, run_id: str) -> dict:
    recs = events(instance, run_id, dg.DagsterEventType.ASSET_MATERIALIZATION)
    mats = [r.event_log_entry.asset_materialization for r in recs]
    mats = [m for m in mats if m.asset_key == dg.AssetKey("step_scores")]
    assert len(mats) == 1, mats
    return {k: v.value for k, v in mats[0].metadata.items()}


def test_cluster_on_one_machine_equals_the_embedded_run(pg, student_dir, tmp_path, monkeypatch):
    from lalp_assets.instance import reap_dead_runs
    from lalp_resources.pipeline import shard_of
    from lalp_resources.warehouse import KEYS, Warehouse

    t_start = time.monotonic()
    traces = write_traces(tmp_path / "traces.jsonl", n_prompts=N_PROMPTS, teachers=TEACHERS, paragraphs=PARAGRAPHS)
    shard = {f"q{p}": shard_of(f"q{p}", SHARDS) for p in range(N_PROMPTS)}
    assert set(shard.values()) == set(range(SHARDS)), "every shard needs a prompt; change n_prompts"
    # the shard with the most prompts: its step is the one killed mid-run
    big = max(range(SHARDS), key=lambda s: sum(v == s for v in shard.values()))

    ref_db = embedded_run(tmp_path / "embedded", traces, student_dir, monkeypatch)
    t_ref = time.monotonic() - t_start

    # ---- the cluster: one PostgreSQL server, a database for the instance and one for the lake
    root = tmp_path / "cluster"
    home = root / "dagster_home"
    pg_env = render_instance(pg, home, pg.create_database("dagster").split("dbname=")[1].split()[0])
    lake_dsn = pg.create_database("lake")
    for k, v in pg_env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    env = {k: v for k, v in os.environ.items() if not k.startswith("LALP_")}
    env.update(pg_env, DAGSTER_HOME=str(home), TOKENIZERS_PARALLELISM="false", LALP_SHARDS=str(SHARDS),
               LALP_WAREHOUSE=f"ducklake:postgres:{lake_dsn}", LALP_LAKE_DATA_PATH=str(root / "lake") + "/",
               **common_settings(root, traces, student_dir))
    lake = Warehouse(env["LALP_WAREHOUSE"], data_path=env["LALP_LAKE_DATA_PATH"])

    instance = dg.DagsterInstance.from_config(str(home))
    cluster = Cluster(env, root / "logs")
    try:
        from dagster_postgres import PostgresEventLogStorage

        assert isinstance(instance.event_log_storage, PostgresEventLogStorage)
        instance.event_log_storage.set_concurrency_slots("gpu", 2)  # two GPUs' worth of scoring runs

        # 1. ingest and segment both teachers: one run over the teacher range
        cluster.run("ingest", "score_teachers_job", "--register", ",".join(TEACHERS),
                    "--teachers", f"{TEACHERS[0]},{TEACHERS[-1]}", "--executor", "in_process")

        # 2. the 4 teacher x shard partitions of step_scores, concurrently, multiprocess executor each
        parts = [(t, s) for t in TEACHERS for s in range(SHARDS)]
        procs = {(t, s): cluster.start(f"score-{t}-{s}", "score_shards_job", "--partition", f"{t}/{s}")
                 for t, s in parts}
        victim_part = (TEACHERS[0], big)
        victim_proc = procs[victim_part]
        steps_of_victim = lake.read(
            "SELECT prompt_id, count(*) AS n FROM reasoning_steps WHERE teacher = ? GROUP BY prompt_id",
            [victim_part[0]]).filter(pl.col("prompt_id").map_elements(lambda p: shard[p], return_dtype=pl.Int64) == big)
        victim_steps = int(steps_of_victim["n"].sum())
        victim_run, worker_pid, committed = None, None, 0
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            assert victim_proc.poll() is None, "the victim's run ended before it could be killed; make the input bigger:\n" \
                + victim_proc.log_path.read_text()[-3000:]
            victim_run = victim_run or run_of(instance, victim_proc.pid)
            if victim_run is not None and worker_pid is None:
                started = [r.event_log_entry.dagster_event for r in
                           events(instance, victim_run.run_id, dg.DagsterEventType.STEP_WORKER_STARTED)]
                started = [e for e in started if e.step_key == "step_scores"]
                worker_pid = started[0].pid if started else None
            if worker_pid is not None:
                committed = lake.read("SELECT count(*) AS n FROM step_scores WHERE score_run_id = ?",
                                      [victim_run.run_id])["n"][0]
                if committed:  # some chunks of this shard are committed; the step is still running
                    break
            time.sleep(0.1)
        assert committed, "the victim's scoring step never committed a chunk within 300 s"
        os.kill(worker_pid, signal.SIGKILL)  # the multiprocess executor's step process, mid-scoring

        results = {p: cluster.wait(proc, timeout=400) for p, proc in procs.items()}
        for p, out in results.items():
            if p != victim_part:
                assert out["success"], f"{p} failed:\n{out['log'][-4000:]}"
        assert not results[victim_part]["success"]
        victim_run = instance.get_run_by_id(victim_run.run_id)
        if victim_run.status not in (dg.DagsterRunStatus.FAILURE,):
            # the run's own process died too (or hung): the lalp run way of cleaning up
            cluster.stop_all()
            reap_dead_runs(instance)
            victim_run = instance.get_run_by_id(victim_run.run_id)
        assert victim_run.status == dg.DagsterRunStatus.FAILURE
        assert instance.event_log_storage.get_concurrency_info("gpu").active_slot_count == 0, "a slot leaked"
        partial = lake.read("SELECT count(*) AS n FROM step_scores WHERE score_run_id = ?", [victim_run.run_id])["n"][0]
        assert 0 < partial < victim_steps, (partial, victim_steps)

        # the partition again: it resumes from the score cache the killed step committed
        again = cluster.run("rescore", "score_shards_job", "--partition", f"{victim_part[0]}/{victim_part[1]}")
        md = step_scores_metadata(instance, again["run_id"])
        assert md["windows_cached"] >= partial and md["windows_scored"] > 0
        assert md["windows_cached"] + md["windows_scored"] == md["windows_total"]

        # 3. per-teacher response scores, then the ranking and the curated set
        final = cluster.run("finish", "response_scores_job", "rank_and_curate_job",
                            "--teachers", f"{TEACHERS[0]},{TEACHERS[-1]}", "--executor", "in_process")
        assert [r["job"] for r in final["runs"]] == ["response_scores_job", "rank_and_curate_job"]

        # ---- the instance: the pool held, the runs overlapped
        shard_runs = {p: results[p]["run_id"] for p in parts}
        records = {r.dagster_run.run_id: r for r in instance.get_run_records(
            filters=dg.RunsFilter(run_ids=list(shard_runs.values()) + [again["run_id"]]))}
        intervals = []
        for rid, rec in records.items():
            a, b = step_interval(instance, rid)
            intervals.append((a, b if b is not None else rec.end_time))
        assert most_at_once(intervals) <= 2, intervals
        spans = {p: (records[rid].start_time, records[rid].end_time) for p, rid in shard_runs.items()}
        for p, (a, b) in spans.items():
            assert any(a < d and c < b for q, (c, d) in spans.items() if q != p), (p, spans)
        statuses = {r.status for r in instance.get_runs()}
        assert statuses == {dg.DagsterRunStatus.SUCCESS, dg.DagsterRunStatus.FAILURE}
        assert len(instance.get_runs(filters=dg.RunsFilter(statuses=[dg.DagsterRunStatus.FAILURE]))) == 1
    finally:
        cluster.stop_all()
        instance.dispose()

    # ---- the tables: equal to the embedded run
    ref = Warehouse(ref_db)
    for table in TABLES:
        a, b = ref.read(f"SELECT count(*) AS n FROM {table}")["n"][0], lake.read(f"SELECT count(*) AS n FROM {table}")["n"][0]
        assert a == b > 0, (table, a, b)
        key = ", ".join(KEYS[table])
        distinct = lake.read(f"SELECT count(*) AS n FROM (SELECT DISTINCT {key} FROM {table})")["n"][0]
        assert distinct == b, f"{table}: duplicated keys ({b} rows, {distinct} distinct {key})"
    for wh in (ref, lake):
        assert wh.read("SELECT count(*) AS n FROM quarantine")["n"][0] == 0
        files = wh.read("SELECT n_read, n_accepted, n_quarantined FROM source_files")
        assert files.height >= 1 and (files["n_read"] == files["n_accepted"] + files["n_quarantined"]).all()
        assert files["n_read"].sum() == N_PROMPTS * len(TEACHERS)
        # nothing missing: every step scored, every response with steps has its scores
        missing = wh.read("SELECT count(*) AS n FROM reasoning_steps s ANTI JOIN step_scores USING (response_id, step_index)")
        assert missing["n"][0] == 0
        assert wh.read("SELECT count(*) AS n FROM raw_teacher_traces ANTI JOIN response_scores USING (response_id)")["n"][0] == 0
        assert wh.read("SELECT count(*) AS n FROM raw_teacher_traces ANTI JOIN galp_scores USING (response_id)")["n"][0] == 0

    def frame(wh, sql):
        return wh.read(sql)

    q = "SELECT response_id, step_index, n_tokens, mean_logprob, sum_logprob FROM step_scores ORDER BY ALL"
    s_ref, s_lake = frame(ref, q), frame(lake, q)
    assert s_ref.select("response_id", "step_index", "n_tokens").equals(s_lake.select("response_id", "step_index", "n_tokens"))
    assert (s_ref["mean_logprob"] - s_lake["mean_logprob"]).abs().max() <= TOL
    assert ((s_ref["sum_logprob"] - s_lake["sum_logprob"]).abs() / s_ref["n_tokens"].clip(1)).max() <= TOL

    q = "SELECT response_id, prompt_id, teacher, n_steps, galp_tokens, is_correct, lalp, galp FROM response_scores ORDER BY response_id"
    r_ref, r_lake = frame(ref, q), frame(lake, q)
    assert r_ref.drop("lalp", "galp").equals(r_lake.drop("lalp", "galp"))
    assert (r_ref["lalp"] - r_lake["lalp"]).abs().max() <= TOL
    assert (r_ref["galp"] - r_lake["galp"]).abs().max() <= TOL

    q = "SELECT teacher, lalp_rank, galp_rank, n_shared_prompts, n_responses, lalp_mean, galp_mean FROM teacher_rankings ORDER BY teacher"
    k_ref, k_lake = frame(ref, q), frame(lake, q)
    assert k_ref.select("teacher", "lalp_rank", "galp_rank", "n_shared_prompts", "n_responses").equals(
        k_lake.select("teacher", "lalp_rank", "galp_rank", "n_shared_prompts", "n_responses"))
    assert (k_ref["lalp_mean"] - k_lake["lalp_mean"]).abs().max() <= TOL
    for table, cols in (("selection_decisions", "prompt_id, response_id, teacher, eligible, chosen, reason"),
                        ("curated_sft_dataset", "prompt_id, response_id, teacher, n_candidates, n_eligible, reason")):
        sql = f"SELECT {cols} FROM {table} ORDER BY ALL"
        assert frame(ref, sql).equals(frame(lake, sql)), table
    print(f"\nembedded reference {t_ref:.0f}s; whole test {time.monotonic() - t_start:.0f}s; "
          f"killed {victim_part} after {committed} committed step rows ({partial} at death of {victim_steps})")
