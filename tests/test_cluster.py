"""A real cluster on one machine (issue 12): a throwaway PostgreSQL holds both the Dagster instance
(dagster-postgres storage, rendered from dagster_home/deploy/dagster.yaml, the `gpu` pool at 2 slots)
and the DuckLake catalog of the warehouse, whose Parquet data is in an object store the processes
share, as pods would (a loopback S3-compatible server, tests/s3.py; issue 19). The pipeline runs with
LALP_SHARDS=2 on two teachers as separate processes, the way a cluster launches runs:

  1. ingest + segment both teachers (score_teachers_job),
  2. the 2 teachers x 2 shards of step_scores as 4 concurrent runs, each `dg.execute_job` through the
     multiprocess executor (tests/cluster_job.py: every process builds its settings from LALP_*).
     Two faults with SIGKILL, each once that step has committed some of its scores: t1's big shard
     loses its step process (the run's executor reports the crash), t2's big shard loses its whole
     run (it stays STARTED holding a `gpu` slot until `reap_dead_runs`, called at once, marks it
     failed and frees the slot). Both partitions are run again and resume from the score cache,
  3. response_scores for both teachers, then rank_and_curate_job.

Every table then equals an embedded single-process run of the same input (shards=1, a DuckDB file,
SQLite instance): the same row counts (the score cache too: every window exactly once), no key
duplicated, nothing missing, step and response scores within 1e-6, the same ranking and selection;
rows read = accepted + quarantined. From the instance: at most 2 scoring steps ran at once (the
pool), the 4 shard runs overlapped, and exactly the two killed runs failed.

No mocks: real servers on loopback, real DuckLake, real processes, a real SIGKILL. The student is
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
import pytest
import yaml

from helpers import REPO, save_tiny_student, temp_dagster_home, write_traces
from pg import postgres_or_skip, throwaway_postgres
from s3 import s3_or_skip, throwaway_s3

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
def s3():
    s3_or_skip()
    with throwaway_s3() as server:
        server.create_bucket("lalp-lake")
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
           "concurrency": {"pools": deploy["concurrency"]["pools"]},  # as deployed: each step claims its slot
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


def reap_now(instance, run_id: str) -> None:
    """A run whose process died stays STARTED and keeps its `gpu` slot (nothing in the run noticed);
    `reap_dead_runs` (what `lalp run` does on start) marks it failed and frees the slot, so the
    other scoring runs get both slots back at once."""
    from lalp_assets.instance import reap_dead_runs

    assert instance.get_run_by_id(run_id).status == dg.DagsterRunStatus.STARTED
    assert run_id in instance.event_log_storage.get_concurrency_info("gpu").active_run_ids, "the dead run holds a slot"
    assert reap_dead_runs(instance) == [run_id]
    assert instance.get_run_by_id(run_id).status == dg.DagsterRunStatus.FAILURE
    assert run_id not in instance.event_log_storage.get_concurrency_info("gpu").active_run_ids


def kill_mid_scoring(instance, lake, victims: dict, procs: dict, timeout_s: float = 300) -> dict:
    """SIGKILL each victim partition's run as soon as its step_scores step process has committed some
    rows (all victims watched at once, so each dies early in its scoring): "step process" kills that
    process (pid from the run's STEP_WORKER_STARTED event), "whole run" the run's process group.
    Returns {partition: (run id, rows committed when seen, kill time)}."""
    runs, workers, killed = {}, {}, {}
    deadline = time.monotonic() + timeout_s
    while len(killed) < len(victims):
        assert time.monotonic() < deadline, f"no committed chunk of {sorted(set(victims) - set(killed))} in {timeout_s:.0f} s"
        for part, how in victims.items():
            if part in killed:
                continue
            proc = procs[part]
            assert proc.poll() is None, f"{part}'s run ended before it could be killed; make the input bigger:\n" \
                + proc.log_path.read_text()[-3000:]
            runs[part] = runs.get(part) or run_of(instance, proc.pid)
            if runs[part] is None:
                continue
            if part not in workers:
                started = [r.event_log_entry.dagster_event for r in
                           events(instance, runs[part].run_id, dg.DagsterEventType.STEP_WORKER_STARTED)]
                pid = next((e.pid for e in started if e.step_key == "step_scores"), None)
                if pid is None:
                    continue
                workers[part] = pid
            n = lake.read("SELECT count(*) AS n FROM step_scores WHERE score_run_id = ?", [runs[part].run_id])["n"][0]
            if not n:
                continue
            if how == "step process":  # the multiprocess executor's child for step_scores
                os.kill(workers[part], signal.SIGKILL)
            else:  # the run's process, its executor and its step process at once
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()  # not left a zombie: reap_dead_runs must see the process gone
            killed[part] = (runs[part].run_id, int(n), time.time())
            if how == "whole run":
                reap_now(instance, runs[part].run_id)
        time.sleep(0.2)
    return killed


def step_scores_metadata(instance, run_id: str) -> dict:
    recs = events(instance, run_id, dg.DagsterEventType.ASSET_MATERIALIZATION)
    mats = [r.event_log_entry.asset_materialization for r in recs]
    mats = [m for m in mats if m.asset_key == dg.AssetKey("step_scores")]
    assert len(mats) == 1, mats
    return {k: v.value for k, v in mats[0].metadata.items()}


def test_cluster_on_one_machine_equals_the_embedded_run(pg, s3, student_dir, tmp_path, monkeypatch):
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
    # the pods share an object store, not a folder: DuckLake's data goes to the loopback S3 server
    for k, v in {**pg_env, **s3.variables()}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    env = {k: v for k, v in os.environ.items() if not k.startswith("LALP_")}
    # LALP_COMMIT_EVERY_S=0: every engine group commits on its own, so the kill lands between
    # commits of a shard (with the 2 s default a fast shard's rows could all land in one commit)
    env.update(pg_env, DAGSTER_HOME=str(home), TOKENIZERS_PARALLELISM="false", LALP_SHARDS=str(SHARDS),
               LALP_COMMIT_EVERY_S="0",
               LALP_WAREHOUSE=f"ducklake:postgres:{lake_dsn}", LALP_LAKE_DATA_PATH="s3://lalp-lake/lake/",
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
        # Two faults, each once its step has committed some chunks: t1's big shard loses its step
        # process (the run's executor sees it die), t2's big shard loses its whole run (a node gone:
        # the run stays STARTED holding its gpu slot until reaped).
        victims = {(TEACHERS[0], big): "step process", (TEACHERS[1], big): "whole run"}
        killed = kill_mid_scoring(instance, lake, victims, procs)

        results = {p: cluster.wait(proc, timeout=400) for p, proc in procs.items() if victims.get(p) != "whole run"}
        for p, out in results.items():
            assert out["success"] == (p not in victims), f"{p}:\n{out['log'][-4000:]}"
        shard_runs = {p: results[p]["run_id"] if p in results else killed[p][0] for p in parts}
        # the run whose step process died: its executor reported the crash and gave the slot back;
        # the run that died whole was reaped when it was killed (reap_now)
        for p in victims:
            assert instance.get_run_by_id(killed[p][0]).status == dg.DagsterRunStatus.FAILURE, p
        gpu = instance.event_log_storage.get_concurrency_info("gpu")
        assert gpu.slot_count == 2 and gpu.active_slot_count == 0, f"a slot leaked: {gpu}"
        assert reap_dead_runs(instance) == []
        for p in victims:
            shard_steps = int(lake.read(
                "SELECT count(*) AS n FROM reasoning_steps WHERE teacher = ? AND prompt_id IN (SELECT unnest(?))",
                [p[0], [q for q, s in shard.items() if s == p[1]]])["n"][0])
            partial = lake.read("SELECT count(*) AS n FROM step_scores WHERE score_run_id = ?", [killed[p][0]])["n"][0]
            assert 0 < killed[p][1] <= partial < shard_steps, \
                f"{p}: {partial} of {shard_steps} step rows at the kill (0 < n < all expected; if all, make the input bigger)"
            killed[p] = (*killed[p], partial)

        # both partitions again, concurrently: each resumes from the score cache its killed step committed
        again_procs = {p: cluster.start(f"rescore-{p[0]}-{p[1]}", "score_shards_job", "--partition", f"{p[0]}/{p[1]}")
                       for p in victims}
        again = {p: cluster.wait(proc) for p, proc in again_procs.items()}
        for p, out in again.items():
            assert out["success"], f"rescore {p} failed:\n{out['log'][-4000:]}"
            md = step_scores_metadata(instance, out["run_id"])
            assert md["windows_cached"] >= killed[p][3] and md["windows_scored"] > 0, (p, md, killed[p])
            assert md["windows_cached"] + md["windows_scored"] == md["windows_total"]

        # 3. per-teacher response scores, then the ranking and the curated set
        final = cluster.run("finish", "response_scores_job", "rank_and_curate_job",
                            "--teachers", f"{TEACHERS[0]},{TEACHERS[-1]}", "--executor", "in_process")
        assert [r["job"] for r in final["runs"]] == ["response_scores_job", "rank_and_curate_job"]

        # ---- the instance: the pool held, the runs overlapped
        scoring = list(shard_runs.values()) + [out["run_id"] for out in again.values()]
        records = {r.dagster_run.run_id: r for r in instance.get_run_records(filters=dg.RunsFilter(run_ids=scoring))}
        intervals = []
        for rid in scoring:
            a, b = step_interval(instance, rid)
            if b is None:  # the whole-run kill: no end event; the step ended when it was killed
                b = next(k[2] for k in killed.values() if k[0] == rid)
            intervals.append((a, b))
        at_once = most_at_once(intervals)
        assert at_once <= 2, intervals
        spans = {p: (records[rid].start_time, records[rid].end_time) for p, rid in shard_runs.items()}
        for p, (a, b) in spans.items():
            assert any(a < d and c < b for q, (c, d) in spans.items() if q != p), (p, spans)
        statuses = {r.status for r in instance.get_runs()}
        assert statuses == {dg.DagsterRunStatus.SUCCESS, dg.DagsterRunStatus.FAILURE}
        failed = instance.get_runs(filters=dg.RunsFilter(statuses=[dg.DagsterRunStatus.FAILURE]))
        assert sorted(r.run_id for r in failed) == sorted(k[0] for k in killed.values())
    finally:
        cluster.stop_all()
        instance.dispose()

    # ---- the tables: equal to the embedded run
    ref = Warehouse(ref_db)
    # every window scored exactly once into the cache, whatever was killed and re-run
    for table in TABLES + ["score_cache"]:
        counts = []
        for wh in (ref, lake):
            key = ", ".join(KEYS[table])
            n, distinct = wh.read(f"SELECT count(*) AS n, (SELECT count(*) FROM (SELECT DISTINCT {key} FROM {table})) AS d "
                                  f"FROM {table}").row(0)
            assert distinct == n, f"{wh.describe()} {table}: duplicated keys ({n} rows, {distinct} distinct {key})"
            counts.append(n)
        assert counts[0] == counts[1] > 0, (table, counts)
    # the lake really is DuckLake: its catalog in PostgreSQL, its data Parquet files in the bucket
    lake_db = lake_dsn.split("dbname=")[1].split()[0]
    assert int(pg.psql("SELECT count(*) FROM ducklake_table", lake_db).strip()) >= len(TABLES)
    objects = s3.client().list_objects_v2(Bucket="lalp-lake", Prefix="lake/").get("Contents", [])
    assert any(o["Key"].endswith(".parquet") for o in objects)
    assert not [p for p in root.rglob("*.parquet") if "exports" not in p.parts]  # no lake data on the disk
    assert "runs" in pg.psql("SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'",
                             pg_env["DAGSTER_PG_DB"]).split()
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
          f"at most {at_once} scoring steps at once; killed (run_id, rows seen, time, rows at death): {killed}")
