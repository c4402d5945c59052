"""The diagnostics through the whole graph: a real Dagster instance in a temp dir, a real DuckDB
file and a tiny random student saved as a local HF model dir. response_scores keeps the weakest
step and the DROP/CASL inputs; teacher_rankings the length bias, DROP/CASL and the same-family
flag; the verdict, the UI metadata, the report and `lalp lineage` say so."""

from __future__ import annotations

import json
from pathlib import Path

import dagster as dg
import duckdb
import pytest

from helpers import save_tiny_student, temp_dagster_home
from lalp_assets.definitions import build_defs
from lalp_resources import diagnostics as dx
from lalp_resources.lineage import format_report, lineage_report
from lalp_resources.settings import Settings
from lalp_resources.warehouse import Warehouse

QUESTIONS = [("What is 2+3?", "5"), ("What is 4*2?", "8"), ("Half of 9?", "4.5"), ("What is 7-2?", "5")]


def write_teacher(path: Path, teacher: str, style: str) -> Path:
    rows = []
    for k, (q, ans) in enumerate(QUESTIONS):
        resp = (f"We start from the question {k} ({style}).\n\nWe compute carefully, {style} {style}, step {k}.\n\n"
                f"Check.\n\nSo the answer is \\boxed{{{ans}}}.")
        rows.append({"prompt_id": f"p{k}", "prompt": q, "teacher": teacher, "response": resp, "reference_answer": ans})
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory, smol_tokenizer):
    return save_tiny_student(tmp_path_factory.mktemp("tinyfam_student"), smol_tokenizer, seed=4)


def test_diagnostics_through_the_graph(tmp_path, monkeypatch, tiny_model_dir):
    home = temp_dagster_home(tmp_path)
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    src = tmp_path / "src"
    src.mkdir()
    write_teacher(src / "a.jsonl", "tinyfam-distilled", "briefly")
    write_teacher(src / "b.jsonl", "other-teacher", "with many more words in every single sentence")
    s = Settings(dagster_home=str(home), warehouse=str(tmp_path / "lalp.duckdb"), sources=(str(src),),
                 inbox=str(tmp_path / "inbox"), model=str(tiny_model_dir), device="cpu", dtype="float32", max_prompts=0,
                 exports=str(tmp_path / "exports"), bootstrap=50, families="tinyfam=tinyfam")
    defs = build_defs(s)
    with dg.DagsterInstance.get() as instance:
        instance.add_dynamic_partitions("teacher", ["other-teacher", "tinyfam-distilled"])
        for t in ("other-teacher", "tinyfam-distilled"):
            assert defs.resolve_job_def("score_teachers_job").execute_in_process(instance=instance, partition_key=t).success
        assert defs.resolve_job_def("rank_and_curate_job").execute_in_process(instance=instance).success
        md = instance.get_latest_materialization_event(dg.AssetKey("teacher_rankings")).asset_materialization.metadata
        cur = instance.get_latest_materialization_event(dg.AssetKey("curated_sft_dataset")).asset_materialization.metadata
    wh = Warehouse(s.warehouse)
    # the weakest step of each response: its lowest step score, span and gap, as recomputed from step_scores
    resp = wh.read("SELECT * FROM response_scores ORDER BY response_id")
    steps = wh.read("SELECT s.*, r.char_start, r.char_end FROM step_scores s JOIN reasoning_steps r "
                    "USING (response_id, step_index)")
    want = dx.per_response(steps).sort("response_id")
    assert resp["weakest_step"].to_list() == want["weakest_step"].to_list()
    assert resp["weakest_char_start"].null_count() == 0 and (resp["weakest_gap"] >= 0).all()
    assert resp["drop1"].null_count() == 0 and resp["casl_m"].null_count() == 0
    assert steps["head1_logprob"].null_count() == 0  # every new window carries its head sums
    # the ranking: length bias, corrected scores and their ranks, the same-family flag
    rk = wh.read("SELECT * FROM teacher_rankings ORDER BY teacher")
    assert rk["length_rho"].null_count() == 0 and rk["drop1_rank"].sort().to_list() == [1, 2]
    assert rk["casl_mean"].null_count() == 0 and rk["n_responses_without_heads"].to_list() == [0, 0]
    assert rk["same_family"].to_list() == [None, "tinyfam"]
    verdict = md["verdict"].value
    assert "tinyfam-distilled's rank is suspect" in verdict and "student's family (tinyfam)" in verdict
    reorder = md["length_corrections_reorder"].value
    if reorder == "none":
        assert "keep the LALP order" in verdict
    else:
        assert all(f"The length correction {c} changes the teacher order" in verdict for c in reorder.split(", "))
    assert "tinyfam-distilled" in md["same_family"].value
    # the UI's weakest-step preview names each teacher and shows (shortened) step text
    preview = md["weakest_steps"].value
    assert "other-teacher" in preview and "tinyfam-distilled" in preview and "text (shortened)" in preview
    assert "length rho" in md["ranking"].value and "DROP-1" in md["ranking"].value
    assert "weakest_steps_of_curated" in cur
    report = (tmp_path / "exports" / "report" / "teacher_selection_report.md").read_text()
    assert "## Length bias, length-corrected scores, same family" in report and "rank is suspect" in report
    # lineage prints the weakest step
    rid = resp["response_id"][0]
    text = format_report(lineage_report(rid, s.warehouse))
    w = resp.row(0, named=True)
    assert f"weakest step: {w['weakest_step']} chars [{w['weakest_char_start']}, {w['weakest_char_end']})" in text


def test_length_bias_sql_is_spearman():
    """The SQL rho (average ranks in DuckDB) equals `spearman` on the same steps, ties included,
    and leaves out the conflicting prompt ids."""
    con = duckdb.connect()
    con.execute("CREATE TABLE step_scores (teacher VARCHAR, prompt_id VARCHAR, n_tokens INTEGER, mean_logprob DOUBLE)")
    rows = [("A", "p", 3, -1.0), ("A", "p", 5, -0.5), ("A", "q", 5, -0.7), ("A", "q", 9, -0.2), ("A", "q", 2, -0.5),
            ("B", "p", 4, -1.0), ("B", "p", 6, -2.0), ("B", "q", 8, -3.0), ("B", "x", 1, -9.0)]
    con.executemany("INSERT INTO step_scores VALUES (?, ?, ?, ?)", rows)
    got = dict(con.execute(dx.LENGTH_BIAS_SQL, [["x"]]).fetchall())
    for t in ("A", "B"):
        sel = [r for r in rows if r[0] == t and r[1] != "x"]
        assert got[t] == pytest.approx(dx.spearman([r[3] for r in sel], [r[2] for r in sel]))
    assert got["B"] == pytest.approx(-1.0)
    every_b = [r for r in rows if r[0] == "B"]  # nothing left out: the x step counts again
    assert dict(con.execute(dx.LENGTH_BIAS_SQL, [[]]).fetchall())["B"] == pytest.approx(
        dx.spearman([r[3] for r in every_b], [r[2] for r in every_b]))
