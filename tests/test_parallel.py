"""Scale-out, locally: several teacher partitions scored at once, one run per partition (as a
`LALP_BACKFILL=multi` backfill launches them), each through Dagster's multiprocess executor, in
cluster mode (LALP_STAGING_DIR: workers write per-partition Parquet, `response_scores` loads it).

Asserted from the real instance's event log: the runs overlapped, at most `gpu`-limit scoring
steps ever ran at once, and the DuckDB loads (the `warehouse` pool, limit 1) never overlapped.
The staged scores equal the engine scoring every teacher in one process (within 1e-4)."""

from __future__ import annotations

import subprocess
import sys
import time

import dagster as dg
import duckdb
import pytest

from helpers import REPO
from test_faults import lalp_env, scores, student_dir, write_traces  # noqa: F401  (fixture)

pytestmark = pytest.mark.slow

TEACHERS = ["t1", "t2", "t3"]
GPU_LIMIT = 2

LAUNCH = """
import sys
import dagster as dg
from lalp_assets.definitions import score_teachers_job_def

with dg.DagsterInstance.get() as instance:
    result = dg.execute_job(
        dg.reconstructable(score_teachers_job_def), instance=instance,
        tags={"dagster/partition": sys.argv[1], "test/parallel": "1"},
        run_config={"execution": {"config": {"multiprocess": {"max_concurrent": 2}}}},
    )
    print("RUN", result.run_id, result.success, flush=True)
    sys.exit(0 if result.success else 1)
"""


def intervals(instance, run_ids, step_key: str) -> list[tuple[float, float]]:
    out = []
    for rid in run_ids:
        start = end = None
        for ev in instance.all_logs(rid):
            de = ev.dagster_event
            if de is None or ev.step_key != step_key:
                continue
            if de.event_type == dg.DagsterEventType.STEP_START:
                start = ev.timestamp
            elif de.event_type in (dg.DagsterEventType.STEP_SUCCESS, dg.DagsterEventType.STEP_FAILURE):
                end = ev.timestamp
        assert start is not None and end is not None, f"run {rid} has no complete {step_key} step"
        out.append((start, end))
    return out


def max_overlap(spans: list[tuple[float, float]]) -> int:
    """The most intervals open at one moment (an end at t frees before a start at t)."""
    points = sorted([(s, 1) for s, _ in spans] + [(e, -1) for _, e in spans], key=lambda p: (p[0], p[1]))
    cur = best = 0
    for _, d in points:
        cur += d
        best = max(best, cur)
    return best


def test_max_overlap():
    assert max_overlap([(0, 2), (1, 3), (2, 4)]) == 2
    assert max_overlap([(0, 1), (1, 2)]) == 1
    assert max_overlap([(0, 5), (1, 2), (1, 3)]) == 3


def test_parallel_partitions_respect_the_gpu_pool(tmp_path, student_dir, monkeypatch):  # noqa: F811
    traces = write_traces(tmp_path / "traces.jsonl", n_prompts=4, teachers=TEACHERS)
    env = lalp_env(tmp_path / "cluster", traces, student_dir)
    staging = tmp_path / "cluster" / "staging"
    env.update(LALP_STAGING_DIR=str(staging), LALP_BACKFILL="multi")
    home = env["DAGSTER_HOME"]
    monkeypatch.setenv("DAGSTER_HOME", home)  # the instance's dagster.yaml reads it
    with dg.DagsterInstance.from_config(home) as instance:
        instance.add_dynamic_partitions("teacher", TEACHERS)
        instance.event_log_storage.set_concurrency_slots("gpu", GPU_LIMIT)

    procs = [
        subprocess.Popen([sys.executable, "-c", LAUNCH, t], env=env, cwd=REPO, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
        for t in TEACHERS
    ]
    outs = []
    deadline = time.monotonic() + 900
    for p in procs:
        out, _ = p.communicate(timeout=max(1, deadline - time.monotonic()))
        outs.append(out)
    for t, p, out in zip(TEACHERS, procs, outs):
        assert p.returncode == 0, f"run for {t} failed:\n{out[-4000:]}"
    run_ids = [next(line.split()[1] for line in out.splitlines() if line.startswith("RUN ")) for out in outs]

    with dg.DagsterInstance.from_config(home) as instance:
        runs = [instance.get_run_by_id(r) for r in run_ids]
        assert [r.tags["dagster/partition"] for r in runs] == TEACHERS
        assert all(r.status == dg.DagsterRunStatus.SUCCESS for r in runs)
        # each run used the multiprocess executor: its steps ran in child processes
        assert all(
            any(ev.dagster_event and ev.dagster_event.event_type == dg.DagsterEventType.STEP_WORKER_STARTED
                for ev in instance.all_logs(r)) for r in run_ids
        )
        run_spans = intervals(instance, run_ids, "raw_teacher_traces")
        score_spans = intervals(instance, run_ids, "step_scores")
        load_spans = intervals(instance, run_ids, "response_scores")
        # the limits bit: some step waited for a slot (Dagster logs it as an engine event)
        blocked = [ev.dagster_event.message for r in run_ids for ev in instance.all_logs(r)
                   if ev.dagster_event and ev.dagster_event.event_type == dg.DagsterEventType.ENGINE_EVENT
                   and "blocked by limit for pool" in (ev.dagster_event.message or "")]
        assert blocked and all(m.endswith(("pool gpu", "pool warehouse")) for m in blocked), blocked
        # every slot is back in the pool
        info = instance.event_log_storage.get_concurrency_info("gpu")
        assert info.slot_count == GPU_LIMIT and info.active_slot_count == 0 and info.pending_step_count == 0

    assert max_overlap([(a[0], b[1]) for a, b in zip(run_spans, load_spans)]) >= 2, "the runs did not run in parallel"
    assert max_overlap(score_spans) <= GPU_LIMIT
    assert max_overlap(load_spans) == 1

    # workers wrote Parquet; the serialized loads moved all of it into DuckDB and cleaned up
    assert list(staging.iterdir()) == []
    db = tmp_path / "cluster" / "lalp.duckdb"
    con = duckdb.connect(str(db), read_only=True)
    try:
        per_teacher = dict(con.execute(
            "SELECT teacher, count(DISTINCT score_run_id) FROM step_scores GROUP BY teacher").fetchall())
        assert per_teacher == {t: 1 for t in TEACHERS}
        assert con.execute("SELECT count(*) FROM step_scores").fetchone() == con.execute(
            "SELECT count(*) FROM reasoning_steps").fetchone()
        assert con.execute("SELECT count(*) FROM response_scores WHERE lalp IS NULL OR galp IS NULL").fetchone()[0] == 0
        assert {r: t for t, r in con.execute("SELECT DISTINCT teacher, score_run_id FROM step_scores").fetchall()} == dict(
            zip(run_ids, TEACHERS))
    finally:
        con.close()

    # the staged, per-partition scores equal the engine scoring all teachers at once, in one process
    from lalp_assets.scores import items_for
    from lalp_resources.engine import ScoringEngine
    from lalp_resources.student import load_student
    from lalp_resources.warehouse import Warehouse

    wh = Warehouse(db)
    steps = wh.read("SELECT * FROM reasoning_steps ORDER BY response_id, step_index")
    traces_df = wh.read("SELECT response_id, prompt_id, teacher, prompt, response FROM raw_teacher_traces ORDER BY prompt_id, teacher")
    st = load_student(str(student_dir), device="cpu", dtype="float32")
    engine = ScoringEngine(st.model, st.tokenizer, template="chat", window="fixed:4")
    want = sorted((s.response_id, s.step_index, s.n_tokens, s.mean_logprob)
                  for s in engine.score_all(items_for(steps, traces_df)).steps)
    got = scores(db)
    assert [g[:3] for g in got] == [w[:3] for w in want]
    # per-teacher runs pack windows into other batches than one pass over all teachers
    assert max(abs(g[3] - w[3]) for g, w in zip(got, want)) < 1e-4
