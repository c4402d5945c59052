"""Incremental re-scoring, the inbox sensor, and row-level lineage, on a real Dagster instance
in a temp dir, a real DuckDB file, and a tiny random student saved as a local HF model dir."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import dagster as dg
import pytest

from helpers import save_tiny_student, temp_dagster_home
from lalp_assets.definitions import build_defs
from lalp_resources.lineage import lineage_report
from lalp_resources.settings import Settings
from lalp_resources.warehouse import Warehouse


def write_teacher(path: Path, teacher: str, salt: str) -> Path:
    rows = []
    for k, (q, ans) in enumerate([("What is 2+3?", "5"), ("What is 4*2?", "8"), ("Half of 9?", "4.5")]):
        resp = (f"We start from the question ({salt}).\n\nWe compute carefully step {k}.\n\n"
                f"Checking again with {teacher}.\n\nSo the answer is \\boxed{{{ans}}}.")
        rows.append({"prompt_id": f"p{k}", "prompt": q, "teacher": teacher, "response": resp, "reference_answer": ans})
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory, smol_tokenizer):
    return save_tiny_student(tmp_path_factory.mktemp("tiny_student"), smol_tokenizer, seed=3)


@pytest.fixture
def env(tmp_path, monkeypatch, tiny_model_dir):
    home = temp_dagster_home(tmp_path)
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    inbox = tmp_path / "inbox"
    inbox.mkdir()

    def settings(**kw):
        base = dict(dagster_home=str(home), warehouse=str(tmp_path / "lalp.duckdb"), sources=(), inbox=str(inbox), model=str(tiny_model_dir),
                    device="cpu", dtype="float32", max_prompts=0, exports=str(tmp_path / "exports"), bootstrap=200)
        base.update(kw)
        return Settings(**base)

    instance = dg.DagsterInstance.get()
    yield instance, inbox, settings, tmp_path
    instance.dispose()


def tick(defs, instance, cursor):
    sensor = defs.resolve_sensor_def("inbox_sensor")
    ctx = dg.build_sensor_context(instance=instance, cursor=cursor, resources={"trace_sources": defs.resources["trace_sources"]})
    return sensor(ctx)


def tick_and_run(instance, settings, cursor=None):
    """Sensor ticks until the inbox is stable (a file is taken once its size and mtime held for
    two ticks), then the runs it requested, as the daemon would launch them."""
    defs = build_defs(settings)
    result = tick(defs, instance, cursor)
    if not result.run_requests:
        result = tick(defs, instance, result.cursor)  # the second look at the same, now stable, files
    if not result.run_requests:
        return [], result.cursor
    for req in result.dynamic_partitions_requests:
        instance.add_dynamic_partitions(req.partitions_def_name, list(req.partition_keys))
    job = defs.resolve_job_def("score_teachers_job")
    scored = []
    for rr in result.run_requests:
        out = job.execute_in_process(instance=instance, partition_key=rr.partition_key)
        assert out.success
        scored.append((rr.partition_key, windows_scored(instance)))
    return scored, result.cursor


def run_teacher(instance, settings, teacher):
    defs = build_defs(settings)
    assert defs.resolve_job_def("score_teachers_job").execute_in_process(instance=instance, partition_key=teacher).success
    return windows_scored(instance)


def windows_scored(instance) -> dict:
    ev = instance.get_latest_materialization_event(dg.AssetKey("step_scores"))
    md = ev.asset_materialization.metadata
    return {k: md[k].value for k in ("windows_total", "windows_scored", "windows_cached")}


def expected_windows(wh: Warehouse, teacher: str, new_start_after: int | None = None) -> int:
    """Steps + one GALP window per response; with `new_start_after`, only the steps whose window
    start moved (index > K for fixed:K)."""
    n = wh.read("SELECT count(*) AS n FROM reasoning_steps WHERE teacher = ?", [teacher])["n"][0]
    r = wh.read("SELECT count(DISTINCT response_id) AS n FROM reasoning_steps WHERE teacher = ?", [teacher])["n"][0]
    if new_start_after is None:
        return int(n + r)
    return int(wh.read("SELECT count(*) AS n FROM reasoning_steps WHERE teacher = ? AND step_index > ?",
                       [teacher, new_start_after])["n"][0])


def test_inbox_sensor_scores_new_teacher_only_then_nothing(env):
    instance, inbox, settings, tmp = env
    s = settings()
    wh = Warehouse(s.warehouse)
    write_teacher(inbox / "alpha.jsonl", "alpha", "a")
    scored, cursor = tick_and_run(instance, s)
    assert [t for t, _ in scored] == ["alpha"]
    assert scored[0][1]["windows_scored"] == expected_windows(wh, "alpha") > 0

    # nothing new: the sensor skips
    again, cursor = tick_and_run(instance, s, cursor)
    assert again == []

    # a new teacher arrives: only it is registered and scored, and only its windows reach the model
    write_teacher(inbox / "beta.jsonl", "beta", "b")
    scored, cursor = tick_and_run(instance, s, cursor)
    assert [t for t, _ in scored] == ["beta"]
    assert instance.get_dynamic_partitions("teacher") == ["alpha", "beta"]
    assert scored[0][1]["windows_scored"] == expected_windows(wh, "beta")

    # re-materializing with nothing new plans nothing: every response is passed over
    w = run_teacher(instance, s, "beta")
    assert w == {"windows_total": 0, "windows_scored": 0, "windows_cached": 0}
    assert materialized(instance, "step_scores")["responses_passed_over"] == 3

    # rankings and the curated set now include the new teacher
    defs = build_defs(s)
    assert defs.resolve_job_def("rank_and_curate_job").execute_in_process(instance=instance).success
    assert sorted(wh.read("SELECT teacher FROM teacher_rankings")["teacher"].to_list()) == ["alpha", "beta"]
    teachers = set(wh.read("SELECT teacher FROM curated_sft_dataset")["teacher"].to_list())
    assert teachers <= {"alpha", "beta"} and teachers
    decisions = wh.read("SELECT DISTINCT teacher FROM selection_decisions")["teacher"].to_list()
    assert sorted(decisions) == ["alpha", "beta"]

    # lineage: a curated row back to its file, whose hash matches the inbox file
    rid, teacher = wh.read("SELECT response_id, teacher FROM curated_sft_dataset LIMIT 1").row(0)
    rep = lineage_report(rid, s.warehouse)
    sha = hashlib.sha256((inbox / f"{teacher}.jsonl").read_bytes()).hexdigest()
    assert rep["curated"] and rep["teacher"] == teacher
    assert rep["input"]["source_sha256"] == sha and rep["input"]["file_unchanged"] is True
    assert rep["scores"]["lalp"] is not None and len(rep["steps"]) > 0
    assert all(info["status"] == "SUCCESS" for info in rep["runs"].values())


def test_changing_the_window_rescores_once_then_nothing(env):
    instance, inbox, settings, tmp = env
    write_teacher(inbox / "alpha.jsonl", "alpha", "a")
    instance.add_dynamic_partitions("teacher", ["alpha"])
    s4 = settings(window="fixed:4")
    wh = Warehouse(s4.warehouse)
    first = run_teacher(instance, s4, "alpha")
    assert first["windows_scored"] == first["windows_total"]
    s2 = settings(window="fixed:2")
    changed = run_teacher(instance, s2, "alpha")
    # windows of steps 0..2 start at step 0 under both settings: identical tokens, reused exactly
    assert changed["windows_scored"] == expected_windows(wh, "alpha", new_start_after=2) > 0
    assert run_teacher(instance, s2, "alpha")["windows_scored"] == 0
    assert wh.read("SELECT DISTINCT window_spec FROM step_scores")["window_spec"].to_list() == ["fixed:2"]


def materialized(instance, asset: str) -> dict:
    md = instance.get_latest_materialization_event(dg.AssetKey(asset)).asset_materialization.metadata
    return {k: v.value for k, v in md.items()}


def test_a_rerun_passes_over_unchanged_responses_and_scores_only_what_changed(env):
    instance, inbox, settings, tmp = env
    src = write_teacher(inbox / "alpha.jsonl", "alpha", "a")
    instance.add_dynamic_partitions("teacher", ["alpha"])
    s = settings(sources=(str(src),))
    wh = Warehouse(s.warehouse)
    q = ("SELECT response_id, step_index, n_tokens, sum_logprob, mean_logprob, student, segmenter_version, window_spec "
         "FROM step_scores ORDER BY response_id, step_index")
    first = run_teacher(instance, s, "alpha")
    assert first["windows_scored"] == first["windows_total"] > 0
    before, steps_before = wh.read(q), wh.read("SELECT * FROM reasoning_steps ORDER BY response_id, step_index")

    again = run_teacher(instance, s, "alpha")
    assert again == {"windows_total": 0, "windows_scored": 0, "windows_cached": 0}  # nothing planned at all
    steps_md, scores_md = materialized(instance, "reasoning_steps"), materialized(instance, "step_scores")
    assert (steps_md["responses_passed_over"], steps_md["responses_segmented"], steps_md["responses"]) == (3, 0, 3)
    assert (scores_md["responses_passed_over"], scores_md["responses_scored"]) == (3, 0)
    assert scores_md["dagster/row_count"] == before.height == steps_md["dagster/row_count"]
    assert wh.read(q).equals(before)
    assert wh.read("SELECT * FROM reasoning_steps ORDER BY response_id, step_index").equals(steps_before)

    # one response changes: only it is segmented and scored; the old one's rows go
    rows = [json.loads(line) for line in src.read_text().splitlines()]
    rows[1]["response"] = rows[1]["response"].replace("carefully", "very carefully")
    src.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    changed = run_teacher(instance, s, "alpha")
    steps_md, scores_md = materialized(instance, "reasoning_steps"), materialized(instance, "step_scores")
    assert (steps_md["responses_passed_over"], steps_md["responses_segmented"]) == (2, 1)
    assert (scores_md["responses_passed_over"], scores_md["responses_scored"]) == (2, 1)
    assert 0 < changed["windows_total"] < first["windows_total"]
    after = wh.read(q)
    ids = set(wh.read("SELECT response_id FROM raw_teacher_traces")["response_id"])
    assert set(after["response_id"]) == ids and len(ids) == 3
    assert wh.read("SELECT count(*) AS n FROM galp_scores")["n"][0] == 3
    kept = before.filter(before["response_id"].is_in(list(ids)))
    assert kept.height > 0 and after.filter(after["response_id"].is_in(kept["response_id"].implode())).equals(kept)

    # a fresh warehouse with the same scores is what a full run computes
    fresh = settings(sources=(str(src),), warehouse=str(tmp / "fresh.duckdb"))
    assert run_teacher(instance, fresh, "alpha")["windows_total"] > 0  # the fresh file has no steps: all planned
    assert Warehouse(fresh.warehouse).read(q).select("response_id", "step_index", "n_tokens", "mean_logprob").equals(
        after.select("response_id", "step_index", "n_tokens", "mean_logprob"))


def test_a_rerun_with_nothing_new_passes_over_scores_rankings_and_curation(env):
    """Nothing new: ingest keeps its rows (and their ingest run), response_scores, teacher_rankings
    and curated_sft_dataset keep their tables and re-run their checks on them. A missing export, or a
    changed response, makes the stages that depend on it compute again."""
    instance, inbox, settings, tmp = env
    src = write_teacher(inbox / "alpha.jsonl", "alpha", "a")
    instance.add_dynamic_partitions("teacher", ["alpha"])
    s = settings(sources=(str(src),))
    wh = Warehouse(s.warehouse)
    stages = ("response_scores", "teacher_rankings", "curated_sft_dataset")
    tables = {t: f"SELECT * FROM {t} ORDER BY ALL" for t in (*stages, "raw_teacher_traces", "selection_decisions")}

    def run_all():
        defs = build_defs(s)
        assert defs.resolve_job_def("score_teachers_job").execute_in_process(instance=instance, partition_key="alpha").success
        out = defs.resolve_job_def("rank_and_curate_job").execute_in_process(instance=instance)
        assert out.success
        checks = [e.event_specific_data for e in out.all_events
                  if e.event_type == dg.DagsterEventType.ASSET_CHECK_EVALUATION]
        assert checks and all(c.passed for c in checks)
        return {a: materialized(instance, a)["passed_over"] for a in stages}

    assert run_all() == dict.fromkeys(stages, False)
    before = {t: wh.read(q) for t, q in tables.items()}
    assert run_all() == dict.fromkeys(stages, True)
    assert all(wh.read(q).equals(before[t]) for t, q in tables.items())  # ingest_run_id included
    assert materialized(instance, "curated_sft_dataset")["dagster/row_count"] == before["curated_sft_dataset"].height

    # an export gone: only the curation writes it again
    Path(materialized(instance, "curated_sft_dataset")["jsonl"]).unlink()
    assert run_all() == {"response_scores": True, "teacher_rankings": True, "curated_sft_dataset": False}
    assert Path(materialized(instance, "curated_sft_dataset")["jsonl"]).exists()

    # one response changes: everything after it computes again
    rows = [json.loads(line) for line in src.read_text().splitlines()]
    rows[0]["response"] = rows[0]["response"].replace("carefully", "very carefully")
    src.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert run_all() == dict.fromkeys(stages, False)
    assert not wh.read(tables["raw_teacher_traces"]).equals(before["raw_teacher_traces"])
