"""Surviving faults: a scoring run killed with SIGKILL resumes to the same scores, and two runs
started at once never corrupt the DuckDB file. Real `lalp run` processes, a real Dagster
instance and a real DuckDB file; the student is a small random model saved as a local HF dir."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import pytest

from helpers import REPO, save_tiny_student, temp_dagster_home, write_traces

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory, smol_tokenizer):
    # big enough that scoring takes seconds (so it can be killed midway), small enough for CI
    return save_tiny_student(tmp_path_factory.mktemp("student"), smol_tokenizer, seed=5,
                             hidden_size=256, intermediate_size=512, num_hidden_layers=4)


def lalp_env(root: Path, traces: Path, student: Path) -> dict:
    home = temp_dagster_home(root)
    env = {k: v for k, v in os.environ.items() if not k.startswith("LALP_")}
    env.update(
        DAGSTER_HOME=str(home), LALP_WAREHOUSE=str(root / "lalp.duckdb"), LALP_SOURCES=str(traces),
        LALP_INBOX=str(root / "inbox"), LALP_EXPORTS=str(root / "exports"), LALP_MODEL=str(student),
        LALP_DEVICE="cpu", LALP_DTYPE="float32", LALP_MAX_PROMPTS="0", LALP_GROUP_TOKENS="256", LALP_BOOTSTRAP="100",
        # every chunk commits on its own, so a kill lands between commits however fast the machine is
        LALP_COMMIT_EVERY_S="0",
    )
    return env


def lalp_run(env, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "lalp_assets.cli", "run"], env=env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True, **kw)


def scores(db: Path) -> list[tuple]:
    con = duckdb.connect(str(db), read_only=True)
    try:
        return con.execute("SELECT response_id, step_index, n_tokens, round(mean_logprob, 6) FROM step_scores "
                           "ORDER BY response_id, step_index").fetchall()
    finally:
        con.close()


def count(db: Path, sql: str) -> int | None:
    try:
        con = duckdb.connect(str(db), read_only=True)
    except duckdb.IOException:
        return None  # the writer holds the lock right now
    try:
        return con.execute(sql).fetchone()[0]
    except duckdb.CatalogException:
        return 0
    finally:
        con.close()


def test_sigkill_mid_scoring_then_resume_equals_uninterrupted(tmp_path, student_dir):
    traces = write_traces(tmp_path / "traces.jsonl", n_prompts=8)
    # the uninterrupted reference run
    ref_env = lalp_env(tmp_path / "ref", traces, student_dir)
    out = subprocess.run([sys.executable, "-m", "lalp_assets.cli", "run"], env=ref_env, cwd=REPO,
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    expected = scores(tmp_path / "ref" / "lalp.duckdb")
    total_steps = count(tmp_path / "ref" / "lalp.duckdb", "SELECT count(*) FROM reasoning_steps")
    assert len(expected) == total_steps > 0

    env = lalp_env(tmp_path / "crash", traces, student_dir)
    db = tmp_path / "crash" / "lalp.duckdb"
    proc = lalp_run(env)
    deadline = time.monotonic() + 600
    done = 0
    while time.monotonic() < deadline and proc.poll() is None:
        n = count(db, "SELECT count(*) FROM step_scores")
        if n:  # some chunks are committed, not all
            done = n
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed; make the input bigger"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    partial = None
    while partial is None:
        partial = count(db, "SELECT count(*) FROM step_scores")
    assert 0 < done <= partial < len(expected), (done, partial, len(expected))
    cached = count(db, "SELECT count(*) FROM score_cache")

    out = subprocess.run([sys.executable, "-m", "lalp_assets.cli", "run"], env=env, cwd=REPO,
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    got = scores(db)
    assert len(got) == len(set((r, i) for r, i, *_ in got)) == len(expected)  # none missing, none duplicated
    assert got == expected
    # the resumed run reused what the killed run had committed
    assert count(db, "SELECT count(*) FROM step_scores WHERE cache_hit") >= min(cached, 1)


def test_two_runs_at_once_do_not_corrupt_the_warehouse(tmp_path, student_dir):
    traces = write_traces(tmp_path / "traces.jsonl", n_prompts=4, paragraphs=4)
    env = lalp_env(tmp_path / "both", traces, student_dir)
    env["LALP_WAREHOUSE_LOCK_TIMEOUT"] = "300"
    a, b = lalp_run(env), lalp_run(env)
    outs = [p.communicate(timeout=900)[0] for p in (a, b)]
    codes = [a.returncode, b.returncode]
    for code, text in zip(codes, outs):
        # each run either succeeded (it waited for the other) or failed saying why
        assert code == 0 or "locked" in text.lower() or "lock" in text.lower(), text[-3000:]
    if 0 not in codes or codes.count(0) < 2:
        retry = subprocess.run([sys.executable, "-m", "lalp_assets.cli", "run"], env=env, cwd=REPO,
                               capture_output=True, text=True, timeout=900)
        assert retry.returncode == 0, retry.stdout[-3000:]
    db = tmp_path / "both" / "lalp.duckdb"
    con = duckdb.connect(str(db), read_only=True)
    try:
        n_steps = con.execute("SELECT count(*) FROM reasoning_steps").fetchone()[0]
        n_scores, n_keys = con.execute("SELECT count(*), count(DISTINCT (response_id, step_index)) FROM step_scores").fetchone()
        assert n_steps == n_scores == n_keys > 0
        n_raw = con.execute("SELECT count(*) FROM raw_teacher_traces").fetchone()[0]
        assert n_raw == 8
        read, acc, quar = con.execute("SELECT n_read, n_accepted, n_quarantined FROM ingest_runs LIMIT 1").fetchone()
        assert read == acc + quar
        assert con.execute("SELECT count(*) FROM curated_sft_dataset").fetchone()[0] <= 4
    finally:
        con.close()


def test_sigterm_mid_scoring_commits_what_is_done_and_fails_the_run(tmp_path, student_dir, monkeypatch):
    """SIGTERM (what Dagster's terminate and Kubernetes send first) commits the scored chunks, marks
    the run failed rather than leaving it STARTED, and a rerun resumes from the cache."""
    import threading

    import dagster as dg

    traces = write_traces(tmp_path / "traces.jsonl", n_prompts=8)
    ref_env = lalp_env(tmp_path / "ref", traces, student_dir)
    out = subprocess.run([sys.executable, "-m", "lalp_assets.cli", "run"], env=ref_env, cwd=REPO,
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:]
    expected = scores(tmp_path / "ref" / "lalp.duckdb")

    env = lalp_env(tmp_path / "term", traces, student_dir)
    env["LALP_COMMIT_EVERY_S"] = "600"  # nothing commits on the way: only the stop's own commit can save the work
    env["LALP_PROGRESS_EVERY_S"] = "0"  # a progress line per batch: the signal lands once some prompts are scored
    db = tmp_path / "term" / "lalp.duckdb"
    proc = lalp_run(env)
    lines: list[str] = []
    progressed = threading.Event()

    def read() -> None:
        for line in proc.stdout:
            lines.append(line)
            m = re.search(r"scored (\d+)/(\d+) responses", line)
            # past half of the responses: several whole prompt groups are scored (and pending), not all
            if m and 2 * int(m[1]) >= int(m[2]) > int(m[1]):
                progressed.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    assert progressed.wait(600), "scoring never reported progress:\n" + "".join(lines[-50:])
    assert count(db, "SELECT count(*) FROM step_scores") in (None, 0)  # nothing committed yet
    proc.send_signal(signal.SIGTERM)
    rc = proc.wait(timeout=300)
    reader.join(timeout=30)
    log = "".join(lines)
    assert rc != 0, log[-3000:]
    assert "interrupted: committing the chunks scored so far" in log, log[-3000:]
    partial = count(db, "SELECT count(*) FROM step_scores")
    assert 0 < partial < len(expected), (partial, len(expected))
    monkeypatch.setenv("DAGSTER_HOME", env["DAGSTER_HOME"])  # its dagster.yaml reads it
    with dg.DagsterInstance.from_config(env["DAGSTER_HOME"]) as instance:
        statuses = {r.status for r in instance.get_runs()}
    assert dg.DagsterRunStatus.FAILURE in statuses or dg.DagsterRunStatus.CANCELED in statuses, statuses
    assert not statuses & {dg.DagsterRunStatus.STARTED, dg.DagsterRunStatus.STARTING}, statuses

    env["LALP_COMMIT_EVERY_S"] = "0"
    out = subprocess.run([sys.executable, "-m", "lalp_assets.cli", "run"], env=env, cwd=REPO,
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "left STARTED by a dead process" not in out.stderr
    assert scores(db) == expected
    assert count(db, "SELECT count(*) FROM step_scores WHERE cache_hit") >= partial


def table_counts(db: Path) -> dict[str, int]:
    con = duckdb.connect(str(db), read_only=True)
    try:
        return {t: con.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in (
            "raw_teacher_traces", "quarantine", "reasoning_steps", "step_scores", "galp_scores", "response_scores",
            "teacher_rankings", "selection_decisions", "curated_sft_dataset")}
    finally:
        con.close()


def run_cli(env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lalp_assets.cli", "run"], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=900)


@pytest.fixture
def small_disk(tmp_path):
    """A 64 MiB tmpfs for the warehouse (mounting one needs root, as in CI's container)."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {done.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_a_full_disk_fails_the_run_clearly_and_a_rerun_resumes(tmp_path, student_dir, small_disk):
    traces = write_traces(tmp_path / "traces.jsonl", n_prompts=8)
    # the reference run, on the same disk with room to spare: how much the warehouse needs
    ref_env = lalp_env(tmp_path / "ref", traces, student_dir)
    ref_env["LALP_WAREHOUSE"] = str(small_disk / "ref.duckdb")
    out = run_cli(ref_env)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    expected, counts = scores(small_disk / "ref.duckdb"), table_counts(small_disk / "ref.duckdb")
    need = sum(f.stat().st_size for f in small_disk.iterdir())
    shutil.copy(small_disk / "ref.duckdb", tmp_path / "ref.duckdb")
    for f in list(small_disk.iterdir()):
        f.unlink()
    expected_db = tmp_path / "ref.duckdb"

    env = lalp_env(tmp_path / "full", traces, student_dir)
    db = small_disk / "lalp.duckdb"
    env["LALP_WAREHOUSE"] = str(db)
    filler = small_disk / "filler"
    free = shutil.disk_usage(small_disk).free
    with open(filler, "wb") as f:  # leave room for about half of what the run writes
        f.write(b"\0" * (free - need // 2))
    out = run_cli(env)
    log = out.stdout + out.stderr
    assert out.returncode != 0, log[-3000:]
    assert "no space left on the warehouse's disk" in log and "rerun: it resumes from what was committed" in log, log[-3000:]
    assert "Traceback" not in out.stderr[-2000:], out.stderr[-3000:]

    filler.unlink()
    out = run_cli(env)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    got = scores(db)
    assert got == expected and len(got) == len(set((r, i) for r, i, *_ in got))  # nothing lost, nothing twice
    assert table_counts(db) == counts == table_counts(expected_db)


def test_a_damaged_warehouse_file_is_refused_and_kept(tmp_path, student_dir):
    traces = write_traces(tmp_path / "traces.jsonl", n_prompts=2)
    env = lalp_env(tmp_path / "dmg", traces, student_dir)
    out = run_cli(env)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    db = tmp_path / "dmg" / "lalp.duckdb"
    os.truncate(db, 100)  # the header survives, nothing else
    before = db.read_bytes()
    out = run_cli(env)
    log = out.stdout + out.stderr
    assert out.returncode != 0, log[-3000:]
    assert f"the warehouse file {db} cannot be read as a DuckDB database" in log and "has not been changed" in log, log[-3000:]
    assert db.read_bytes() == before
