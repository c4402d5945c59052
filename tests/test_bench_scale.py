"""The scale benchmark at a tiny size: it runs the whole graph, prints its table and last line,
and the warehouse it leaves reconciles. Timings are printed, never asserted."""

from __future__ import annotations

import re
import subprocess
import sys

import duckdb

from helpers import REPO, zeroeval_or_skip

ROWS, TEACHERS = 200, 8
LAST_LINE = re.compile(r"^rows=(\d+) seconds=(\d+\.\d) peak_rss_mb=(\d+) per_row_ms=(\d+\.\d{3}) rerun_seconds=(\d+\.\d)$")


def test_bench_scale_tiny_run_reconciles(tmp_path):
    data = zeroeval_or_skip()
    work = tmp_path / "work"
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.bench_scale", "--rows", str(ROWS), "--teachers", str(TEACHERS),
         "--problems", "4", "--bad-every", "50", "--data", str(data), "--work", str(work),
         "--cache-store", str(tmp_path / "store")],
        cwd=REPO, capture_output=True, text=True, timeout=900,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    lines = out.stdout.strip().splitlines()
    m = LAST_LINE.match(lines[-1])
    assert m, lines[-1]
    assert int(m.group(1)) == ROWS and float(m.group(2)) > 0 and int(m.group(3)) > 0
    assert abs(float(m.group(4)) - float(m.group(2)) * 1000 / ROWS) <= 0.05 * 1000 / ROWS + 0.001  # seconds shown to 0.1
    assert float(m.group(5)) > 0
    assert "the rerun, nothing new:" in out.stdout
    table = "\n".join(lines)
    for stage in ("raw_teacher_traces", "reasoning_steps", "step_scores", "response_scores", "teacher_rankings",
                  "curated_sft_dataset", "check traces_valid", "check one_row_per_prompt_traceable"):
        assert f"| {stage}" in table or f"|   {stage}" in table, stage

    con = duckdb.connect(str(work / "dagster_home" / "lalp.duckdb"), read_only=True)
    try:
        def one(sql: str):
            return con.execute(sql).fetchone()

        raw, quarantined = one("SELECT count(*) FROM raw_teacher_traces")[0], one("SELECT count(*) FROM quarantine")[0]
        assert raw + quarantined == ROWS and quarantined == ROWS // 50  # the blanked responses
        assert one("SELECT count(DISTINCT teacher) FROM raw_teacher_traces")[0] == TEACHERS
        assert one("SELECT count(DISTINCT reason) FROM quarantine")[0] == 1
        # every response was segmented and scored (the pre-filled cache answered every window)
        assert one("SELECT count(*) FROM response_scores")[0] == raw
        assert one("SELECT count(*) FROM step_scores")[0] == one("SELECT count(*) FROM reasoning_steps")[0] > raw
        assert one("SELECT count(*) FROM step_scores WHERE NOT cache_hit")[0] == 0
        assert one("SELECT count(*) FROM selection_decisions")[0] == raw
        # at most one curated row per prompt, each one a raw trace and a chosen decision
        n, prompts = one("SELECT count(*), count(DISTINCT prompt_id) FROM curated_sft_dataset")
        assert 0 < n == prompts <= one("SELECT count(DISTINCT prompt_id) FROM raw_teacher_traces")[0]
        assert one("SELECT count(*) FROM curated_sft_dataset c ANTI JOIN raw_teacher_traces r USING (response_id)")[0] == 0
        assert one("SELECT count(*) FROM selection_decisions WHERE chosen")[0] == n
        assert one("SELECT count(*) FROM teacher_rankings")[0] == TEACHERS
    finally:
        con.close()
    assert (work / "dagster_home" / "exports" / "curated_sft.jsonl").read_text().count("\n") == n
