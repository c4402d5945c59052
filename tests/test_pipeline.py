"""End to end, for real: `lalp run` (the whole Dagster graph on a real instance, the real SmolLM2
student, a real DuckDB file) and `lalp score`, on a tiny canonical JSONL written here.

Slow (the student loads in each subprocess), but the inputs are tiny: 3 prompts x 3 teachers of
2-3 short paragraphs each. These test the command a user types, so each is a subprocess with its
own DAGSTER_HOME, warehouse, exports and inbox under tmp_path.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import temp_dagster_home

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

# --- tiny inputs --------------------------------------------------------------------------------

PROMPTS = [
    ("p1", "What is 2 + 3?", "5"),
    ("p2", "What is 4 times 6?", "24"),
    ("p3", "What is 10 minus 7?", "3"),
]


def _alpha(q: str, a: str) -> str:
    return f"We need to compute the value.\n\nDoing the arithmetic gives {a}.\n\nSo the answer is \\boxed{{{a}}}."


def _beta(q: str, a: str) -> str:
    return (
        f"Let us think step by step about this question.\n\nThe result is {a}.\n\n"
        f"Therefore the final answer is \\boxed{{{a}}}."
    )


def _gamma(q: str, a: str) -> str:  # always wrong: never eligible for the curated set
    return f"Compute it directly.\n\nThe answer is \\boxed{{{int(a) + 1}}}."


TEACHERS = {"alpha": _alpha, "beta": _beta, "gamma": _gamma}


def canonical_rows(prompts=PROMPTS, teachers=TEACHERS) -> list[dict]:
    return [
        {"prompt_id": pid, "prompt": q, "teacher": t, "response": f(q, a), "reference_answer": a}
        for pid, q, a in prompts
        for t, f in teachers.items()
    ]


def write_jsonl(path: Path, lines: list) -> Path:
    """Each item is a dict (written as JSON) or a str (written verbatim, e.g. broken JSON)."""
    with open(path, "w", encoding="utf-8") as f:
        for item in lines:
            f.write((item if isinstance(item, str) else json.dumps(item)) + "\n")
    return path


def bad_input_lines() -> tuple[list, dict[int, str], list[dict]]:
    """2 prompts x 2 teachers of valid rows with three bad lines between them.
    Returns (lines, {line_no: expected reason}, valid rows)."""
    valid = canonical_rows(PROMPTS[:2], {"alpha": _alpha, "beta": _beta})
    no_teacher = {k: v for k, v in valid[0].items() if k != "teacher"}
    empty = {**valid[1], "prompt_id": "p9", "response": "  \n\n  "}
    lines = [
        valid[0],                                             # line 1
        valid[1],                                             # line 2
        '{"prompt_id": "p1", "prompt": "What is 2 + 3?", "teacher": "alpha", "response": ',  # line 3
        valid[2],                                             # line 4
        no_teacher,                                           # line 5
        valid[3],                                             # line 6
        empty,                                                # line 7
    ]
    return lines, {3: "invalid_json", 5: "missing_field", 7: "empty_response"}, valid


# --- running the CLI ----------------------------------------------------------------------------


def lalp_cmd() -> list[str]:
    exe = BIN / "lalp"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "lalp_assets.cli"]


def make_home(root: Path) -> Path:
    return temp_dagster_home(root)


def pipeline_env(root: Path, home: Path, sources: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LALP_")}
    (root / "inbox").mkdir(exist_ok=True)
    env.update(
        DAGSTER_HOME=str(home),
        LALP_SOURCES=str(sources),
        LALP_MAX_PROMPTS="0",
        LALP_WAREHOUSE=str(root / "warehouse" / "lalp.duckdb"),
        LALP_EXPORTS=str(root / "exports"),
        LALP_INBOX=str(root / "inbox"),
        LALP_BOOTSTRAP="200",
        TOKENIZERS_PARALLELISM="false",
    )
    return env


def run_cli(args: list[str], env: dict, cwd: Path, log_dir: Path, timeout: int = 420) -> subprocess.CompletedProcess:
    # cwd is the temp DAGSTER_HOME: whatever the instance writes relative to the cwd stays there
    proc = subprocess.run(lalp_cmd() + args, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    log_dir.mkdir(parents=True, exist_ok=True)
    (log_dir / "stdout.txt").write_text(proc.stdout)
    (log_dir / "stderr.txt").write_text(proc.stderr)
    return proc


def explain(proc: subprocess.CompletedProcess) -> str:
    return f"rc={proc.returncode}\n--- stdout ---\n{proc.stdout[-4000:]}\n--- stderr ---\n{proc.stderr[-8000:]}"


class PipelineRun:
    def __init__(self, root: Path, source: Path):
        self.root = root
        self.source = source
        self.home = make_home(root)
        self.env = pipeline_env(root, self.home, source)
        self.proc = run_cli(["run"], self.env, self.home, root / "logs")
        self.warehouse = Path(self.env["LALP_WAREHOUSE"])
        self.exports = Path(self.env["LALP_EXPORTS"])

    def sql(self, q: str, params=None) -> list[tuple]:
        import duckdb

        con = duckdb.connect(str(self.warehouse), read_only=True)
        try:
            return con.execute(q, params or []).fetchall()
        finally:
            con.close()

    def count(self, table: str) -> int:
        return self.sql(f"SELECT count(*) FROM {table}")[0][0]

    def instance(self):
        """The run's Dagster instance, opened in this process (DAGSTER_HOME and cwd as the CLI had)."""
        import contextlib

        import dagster as dg

        @contextlib.contextmanager
        def opened():
            with pytest.MonkeyPatch.context() as mp:
                mp.setenv("DAGSTER_HOME", str(self.home))
                mp.chdir(self.home)
                with dg.DagsterInstance.get() as inst:
                    yield inst

        return opened()


def file_uri(p: Path) -> str:
    return p.resolve().as_uri()


def sha256(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


# --- the clean run ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory) -> PipelineRun:
    root = tmp_path_factory.mktemp("lalp_run")
    source = write_jsonl(root / "traces.jsonl", canonical_rows())
    run = PipelineRun(root, source)
    assert run.proc.returncode == 0, explain(run.proc)
    return run


def test_lalp_run_succeeds_and_reports(clean_run):
    out = clean_run.proc.stdout
    assert "teachers: ['alpha', 'beta', 'gamma']" in out
    assert "score_teachers_job succeeded" in out
    assert "rank_and_curate_job succeeded" in out
    assert "FAILED" not in out
    assert "Teacher ranking" in out
    for t in TEACHERS:
        assert f"| {t} |" in out, f"teacher {t} missing from the printed ranking"
    assert str(clean_run.exports / "curated_sft.jsonl") in out


def test_warehouse_tables_populated_and_reconciled(clean_run):
    r = clean_run
    assert r.warehouse.is_file()
    n = len(canonical_rows())
    assert r.count("raw_teacher_traces") == n
    assert r.count("quarantine") == 0
    n_steps = r.count("reasoning_steps")
    assert n_steps >= n * 2, "every response has at least two paragraphs"
    assert r.count("step_scores") == n_steps
    assert r.count("score_cache") >= n_steps
    assert r.count("galp_scores") == n
    assert r.count("response_scores") == n
    assert r.count("teacher_rankings") == len(TEACHERS)
    assert r.count("selection_decisions") == n
    assert r.count("curated_sft_dataset") == len(PROMPTS)
    runs = r.sql("SELECT ingest_run_id, n_read, n_accepted, n_quarantined FROM ingest_runs")
    assert len(runs) == 1
    _, n_read, n_acc, n_q = runs[0]
    assert n_read == n_acc + n_q == n and n_q == 0
    # every step of every response was scored, and nothing else
    assert r.sql(
        "SELECT count(*) FROM reasoning_steps s FULL JOIN step_scores c USING (response_id, step_index) "
        "WHERE s.response_id IS NULL OR c.response_id IS NULL"
    )[0][0] == 0


def test_steps_tile_responses_and_scores_are_log_probs(clean_run):
    r = clean_run
    responses = dict(r.sql("SELECT response_id, response FROM raw_teacher_traces"))
    steps: dict[str, list] = {}
    for rid, i, lo, hi, text in r.sql(
        "SELECT response_id, step_index, char_start, char_end, text FROM reasoning_steps ORDER BY response_id, step_index"
    ):
        steps.setdefault(rid, []).append((i, lo, hi, text))
    assert set(steps) == set(responses)
    for rid, ss in steps.items():
        assert [s[0] for s in ss] == list(range(len(ss)))
        assert ss[0][1] == 0 and ss[-1][2] == len(responses[rid])
        assert all(a[2] == b[1] for a, b in zip(ss, ss[1:])), "spans are not contiguous"
        assert "".join(s[3] for s in ss) == responses[rid]
        assert all(s[3].strip() for s in ss), "whitespace-only step"
    for mean, n_tok in r.sql("SELECT mean_logprob, n_tokens FROM step_scores"):
        assert math.isfinite(mean) and mean <= 0 and n_tok >= 1
    per_resp = {}
    for rid, mean in r.sql("SELECT response_id, mean_logprob FROM step_scores"):
        per_resp.setdefault(rid, []).append(mean)
    for rid, n_steps, lalp, galp in r.sql("SELECT response_id, n_steps, lalp, galp FROM response_scores"):
        assert math.isfinite(lalp) and lalp <= 0
        assert math.isfinite(galp) and galp <= 0
        assert n_steps == len(per_resp[rid])
        assert lalp == pytest.approx(sum(per_resp[rid]) / len(per_resp[rid]), abs=1e-9)
    configs = set(r.sql("SELECT DISTINCT student, segmenter, window_spec, template, dtype FROM step_scores"))
    assert len(configs) == 1
    student, segmenter, window, template, dtype = configs.pop()
    assert "smollm2" in student.lower() and "@" in student
    assert (segmenter, window, template) == ("paragraph", "fixed:4", "chat")
    assert dtype in ("float32", "bfloat16")


def test_every_row_carries_its_provenance(clean_run):
    r = clean_run
    uri, digest = file_uri(r.source), sha256(r.source)
    ingest_run = r.sql("SELECT ingest_run_id FROM ingest_runs")[0][0]
    for table in ("raw_teacher_traces", "reasoning_steps", "step_scores", "response_scores", "curated_sft_dataset"):
        rows = set(r.sql(f"SELECT DISTINCT source_uri, source_sha256, ingest_run_id FROM {table}"))
        assert rows == {(uri, digest, ingest_run)}, f"{table}: {rows}"
    lines = [json.loads(x) for x in r.source.read_text().splitlines()]
    for rid, pid, teacher, row, response in r.sql(
        "SELECT response_id, prompt_id, teacher, source_row, response FROM raw_teacher_traces"
    ):
        src = lines[row - 1]  # JSONL rows are 1-based line numbers
        assert (src["prompt_id"], src["teacher"], src["response"]) == (pid, teacher, response)
    # one query from a curated row back to its teacher, file and runs
    lineage = r.sql("SELECT response_id, teacher, source_uri, source_row, score_run_id, select_run_id FROM curated_lineage")
    assert len(lineage) == r.count("curated_sft_dataset")
    for _, teacher, src_uri, src_row, score_run, select_run in lineage:
        assert teacher in TEACHERS and src_uri == uri and src_row >= 1 and score_run and select_run


def test_curated_selection(clean_run):
    r = clean_run
    cur = r.sql(
        "SELECT c.prompt_id, c.response_id, c.teacher, c.lalp, t.response_id IS NOT NULL "
        "FROM curated_sft_dataset c LEFT JOIN raw_teacher_traces t USING (response_id)"
    )
    prompts = [c[0] for c in cur]
    assert len(prompts) == len(set(prompts)), "more than one curated row for a prompt"
    assert all(c[4] for c in cur), "a curated row does not join raw_teacher_traces"
    # gamma is always wrong: with reference answers, only verified-correct answers are eligible
    assert r.sql("SELECT teacher, bool_and(is_correct), bool_or(is_correct) FROM raw_teacher_traces GROUP BY teacher ORDER BY teacher") == [
        ("alpha", True, True), ("beta", True, True), ("gamma", False, False)
    ]
    best = {}
    for pid, rid, lalp in r.sql(
        "SELECT s.prompt_id, s.response_id, s.lalp FROM response_scores s JOIN raw_teacher_traces t USING (response_id) "
        "WHERE t.is_correct"
    ):
        if pid not in best or lalp > best[pid][1]:
            best[pid] = (rid, lalp)
    assert {c[0]: c[1] for c in cur} == {pid: v[0] for pid, v in best.items()}
    assert {c[2] for c in cur} <= {"alpha", "beta"}
    decisions = r.sql("SELECT teacher, eligible, chosen, reason FROM selection_decisions")
    assert all(reason for *_, reason in decisions)
    for teacher, eligible, chosen, reason in decisions:
        if teacher == "gamma":
            assert not eligible and not chosen and "not verified correct" in reason
    assert sum(1 for d in decisions if d[2]) == len(PROMPTS)


def test_curated_export(clean_run):
    r = clean_run
    jsonl = r.exports / "curated_sft.jsonl"
    assert jsonl.is_file() and (r.exports / "curated_sft.parquet").is_file()
    recs = [json.loads(line) for line in jsonl.read_text(encoding="utf-8").splitlines()]
    db = {rid: (pid, t, lalp, prompt, resp) for rid, pid, t, lalp, prompt, resp in r.sql(
        "SELECT response_id, prompt_id, teacher, lalp, prompt, response FROM curated_sft_dataset"
    )}
    assert len(recs) == len(db) == len(PROMPTS)
    for rec in recs:
        for k in ("messages", "prompt_id", "teacher", "response_id", "lalp", "source_uri"):
            assert k in rec, f"export lacks {k}: {rec}"
        pid, teacher, lalp, prompt, response = db[rec["response_id"]]
        assert (rec["prompt_id"], rec["teacher"]) == (pid, teacher)
        assert rec["lalp"] == pytest.approx(lalp)
        assert rec["source_uri"] == file_uri(r.source)
        assert rec["messages"] == [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]


def test_dagster_instance_records_runs_checks_and_partitions(clean_run):
    import dagster as dg
    from dagster import DagsterEventType, DagsterRunStatus

    with clean_run.instance() as inst:
        assert inst.get_dynamic_partitions("teacher") == ["alpha", "beta", "gamma"]
        runs = [rec.dagster_run for rec in inst.get_run_records()]
        assert sorted(r.job_name for r in runs) == ["rank_and_curate_job", "score_teachers_job"]
        assert all(r.status == DagsterRunStatus.SUCCESS for r in runs), [(r.job_name, r.status) for r in runs]
        score_run = next(r for r in runs if r.job_name == "score_teachers_job")
        assert score_run.tags.get("dagster/asset_partition_range_start") == "alpha"
        assert score_run.tags.get("dagster/asset_partition_range_end") == "gamma"
        evaluations = {}
        for run in runs:
            for ev in inst.all_logs(run.run_id, of_type=DagsterEventType.ASSET_CHECK_EVALUATION):
                e = ev.dagster_event.event_specific_data
                evaluations[(e.asset_key.to_user_string(), e.check_name)] = e.passed
        assert evaluations == {
            ("raw_teacher_traces", "traces_valid"): True,
            ("raw_teacher_traces", "counts_reconcile"): True,
            ("reasoning_steps", "steps_tile_responses"): True,
            ("step_scores", "step_scores_valid"): True,
            ("response_scores", "every_response_scored"): True,
            ("teacher_rankings", "every_teacher_ranked"): True,
            ("curated_sft_dataset", "one_row_per_prompt_traceable"): True,
        }
        for name in ("raw_teacher_traces", "reasoning_steps", "step_scores", "response_scores"):
            assert inst.get_materialized_partitions(dg.AssetKey(name)) == {"alpha", "beta", "gamma"}, name
        for name in ("teacher_rankings", "curated_sft_dataset"):
            assert inst.get_latest_materialization_event(dg.AssetKey(name)) is not None, name
    # the instance lives in the temp DAGSTER_HOME, not in the repository
    assert any((clean_run.home / d).exists() for d in ("history", "storage"))


# --- bad rows -----------------------------------------------------------------------------------


def test_lalp_run_quarantines_bad_rows(tmp_path):
    lines, bad, valid = bad_input_lines()
    source = write_jsonl(tmp_path / "mixed.jsonl", lines)
    r = PipelineRun(tmp_path, source)
    assert r.proc.returncode == 0, explain(r.proc)
    assert "score_teachers_job succeeded" in r.proc.stdout and "rank_and_curate_job succeeded" in r.proc.stdout

    q = r.sql("SELECT source_row, reason, detail, source_uri, source_sha256, ingest_run_id FROM quarantine ORDER BY source_row")
    assert {row[0]: row[1] for row in q} == bad
    for row, reason, detail, uri, digest, run_id in q:
        assert detail.startswith(f"line {row}:"), detail
        assert uri == file_uri(source) and digest == sha256(source) and run_id
    missing = next(d for row, _, d, *_ in q if row == 5)
    assert "teacher" in missing

    # every valid row is present, with its line number
    got = set(r.sql("SELECT prompt_id, teacher, response, source_row FROM raw_teacher_traces"))
    valid_lines = [i for i, item in enumerate(lines, start=1) if isinstance(item, dict) and i not in bad]
    assert got == {(v["prompt_id"], v["teacher"], v["response"], line) for v, line in zip(valid, valid_lines)}
    n_read, n_acc, n_q = r.sql("SELECT n_read, n_accepted, n_quarantined FROM ingest_runs")[0]
    assert (n_read, n_acc, n_q) == (len(lines), len(valid), len(bad))
    assert json.loads(r.sql("SELECT by_reason FROM ingest_runs")[0][0]) == {v: 1 for v in bad.values()}

    # the valid rows went all the way through
    assert r.count("response_scores") == len(valid)
    assert r.count("curated_sft_dataset") == 2
    with r.instance() as inst:
        from dagster import AssetKey, DagsterEventType, DagsterRunStatus

        runs = [rec.dagster_run for rec in inst.get_run_records()]
        assert len(runs) == 2 and all(x.status == DagsterRunStatus.SUCCESS for x in runs)
        checks = {
            ev.dagster_event.event_specific_data.check_name: ev.dagster_event.event_specific_data.passed
            for x in runs for ev in inst.all_logs(x.run_id, of_type=DagsterEventType.ASSET_CHECK_EVALUATION)
        }
        assert checks.get("counts_reconcile") is True and checks.get("traces_valid") is True, checks
        assert all(checks.values()), checks
        mat = inst.get_latest_materialization_event(AssetKey("raw_teacher_traces")).asset_materialization
        md = {k: getattr(v, "value", v) for k, v in mat.metadata.items()}
        assert (md["rows_read"], md["rows_accepted"], md["rows_quarantined"]) == (len(lines), len(valid), len(bad))


# --- lalp score (no Dagster) --------------------------------------------------------------------

STEP_COLUMNS = ["response_id", "prompt_id", "teacher", "step_index", "char_start", "char_end", "text", "n_tokens", "mean_logprob"]
RESPONSE_COLUMNS = ["response_id", "prompt_id", "teacher", "n_steps", "lalp", "galp"]


def test_lalp_score_cli(tmp_path):
    import polars as pl

    lines, bad, valid = bad_input_lines()
    source = write_jsonl(tmp_path / "mixed.jsonl", lines)
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if not k.startswith("LALP_")}
    env["TOKENIZERS_PARALLELISM"] = "false"
    proc = run_cli(["score", str(source), "--out", str(out)], env, tmp_path, tmp_path / "logs")
    assert proc.returncode == 0, explain(proc)
    err = proc.stderr
    assert f"read {len(lines)} rows = {len(valid)} accepted + {len(bad)} quarantined" in err, err
    skipped = [line for line in err.splitlines() if "skipped:" in line]
    for n in bad:
        assert any(f"line {n}:" in s for s in skipped), f"stderr does not name line {n}:\n{err}"
    assert len(skipped) == len(bad)

    steps = pl.read_parquet(out / "steps.parquet")
    resp = pl.read_parquet(out / "responses.parquet")
    assert steps.columns == STEP_COLUMNS
    assert resp.columns == RESPONSE_COLUMNS
    assert pl.read_parquet(out / "quarantine.parquet").height == len(bad)

    assert resp.height == len(valid)
    assert set(resp.select("prompt_id", "teacher").iter_rows()) == {(v["prompt_id"], v["teacher"]) for v in valid}
    text_of = {(v["prompt_id"], v["teacher"]): v["response"] for v in valid}
    for rid, pid, teacher, n_steps, lalp, galp in resp.iter_rows():
        assert math.isfinite(lalp) and lalp <= 0, (rid, lalp)
        assert math.isfinite(galp) and galp <= 0, (rid, galp)
        mine = steps.filter(pl.col("response_id") == rid).sort("step_index")
        assert mine.height == n_steps >= 2
        assert mine["step_index"].to_list() == list(range(n_steps))
        assert "".join(mine["text"].to_list()) == text_of[(pid, teacher)]
        assert mine["char_start"][0] == 0 and mine["char_end"][-1] == len(text_of[(pid, teacher)])
        assert (mine["n_tokens"] >= 1).all()
        assert lalp == pytest.approx(mine["mean_logprob"].mean(), abs=1e-9)
    assert steps["mean_logprob"].is_finite().all() and (steps["mean_logprob"] <= 0).all()
    assert "wrote" in proc.stdout


def test_lalp_score_equals_the_asset_graph(clean_run, tmp_path):
    """One pipeline, two front doors: `lalp score` and the Dagster assets, on the same input and
    settings, give identical step scores and LALP (the same stage functions and item order)."""
    import polars as pl

    out = tmp_path / "out"
    proc = run_cli(["score", str(clean_run.source), "--out", str(out)], clean_run.env, tmp_path, tmp_path / "logs")
    assert proc.returncode == 0, explain(proc)
    cli_steps = pl.read_parquet(out / "steps.parquet").select("response_id", "step_index", "n_tokens", "mean_logprob")
    cli_resp = pl.read_parquet(out / "responses.parquet").select("response_id", "n_steps", "lalp", "galp")
    dag_steps = pl.DataFrame(clean_run.sql(
        "SELECT response_id, step_index, n_tokens, mean_logprob FROM step_scores"), orient="row",
        schema=cli_steps.schema)
    dag_resp = pl.DataFrame(clean_run.sql("SELECT response_id, n_steps, lalp, galp FROM response_scores"), orient="row",
                            schema=cli_resp.schema)
    a = cli_steps.sort("response_id", "step_index")
    b = dag_steps.sort("response_id", "step_index")
    assert a.height == b.height > 0
    assert a.select("response_id", "step_index", "n_tokens").equals(b.select("response_id", "step_index", "n_tokens"))
    assert (a["mean_logprob"] - b["mean_logprob"]).abs().max() == 0.0
    ra, rb = cli_resp.sort("response_id"), dag_resp.sort("response_id")
    assert ra["response_id"].to_list() == rb["response_id"].to_list()
    assert (ra["lalp"] - rb["lalp"]).abs().max() == 0.0 and (ra["galp"] - rb["galp"]).abs().max() == 0.0
