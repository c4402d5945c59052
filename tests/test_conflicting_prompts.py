"""One prompt_id with different prompt texts for different teachers: the teachers are not compared
on it (the ranking leaves it out and names it, the verdict says so) and no response is chosen among
answers to different questions (each candidate's decision gives the reason)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import dagster as dg
import duckdb
import polars as pl
import pytest

from helpers import save_tiny_student, temp_dagster_home
from lalp_resources.method.aggregation import rank_teachers, ranking_verdict


def responses(rows) -> pl.DataFrame:
    return pl.DataFrame(rows, schema=["teacher", "prompt_id", "lalp", "galp", "is_correct"], orient="row")


def test_conflicting_prompt_ids_are_left_out_of_the_comparison_and_counted():
    df = responses([("A", "p1", -1.0, -1.0, True), ("B", "p1", -2.0, -2.0, True),
                    ("A", "p2", -5.0, -5.0, True), ("B", "p2", -0.1, -0.1, True),  # p2: B answered another question
                    ("A", "p3", -1.0, -1.0, True), ("B", "p3", -2.0, -2.0, True)])
    plain = rank_teachers(df, n_boot=50)
    assert plain["n_shared_prompts"].to_list() == [3, 3] and plain["n_conflicting_prompts"].to_list() == [0, 0]
    assert plain.filter(pl.col("teacher") == "B")["lalp_rank"].item() == 1  # p2 alone makes B win
    rk = rank_teachers(df, n_boot=50, conflicting=["p2"])
    assert rk["n_shared_prompts"].to_list() == [2, 2] and rk["n_conflicting_prompts"].to_list() == [1, 1]
    assert rk.filter(pl.col("teacher") == "A")["lalp_rank"].item() == 1
    assert rk.filter(pl.col("teacher") == "A")["lalp_mean"].item() == pytest.approx(-1.0)
    assert "1 prompt id(s) were given to the teachers with different prompt texts" in ranking_verdict(rk)
    assert "different prompt texts" not in ranking_verdict(plain)


ROWS = [
    {"prompt_id": "p1", "prompt": "What is 2+3?", "teacher": "alpha", "response": "2+3 is 5.\n\nSo \\boxed{5}.", "reference_answer": "5"},
    {"prompt_id": "p1", "prompt": "What is 2+3?", "teacher": "beta", "response": "Add them.\n\n\\boxed{5}", "reference_answer": "5"},
    # p2: the same id, two questions (a join gone wrong upstream)
    {"prompt_id": "p2", "prompt": "What is 4*4?", "teacher": "alpha", "response": "4*4 = 16.\n\n\\boxed{16}", "reference_answer": "16"},
    {"prompt_id": "p2", "prompt": "What is 9-1?", "teacher": "beta", "response": "9-1 = 8.\n\n\\boxed{8}", "reference_answer": "8"},
    # p3: only surrounding whitespace differs: the same question
    {"prompt_id": "p3", "prompt": "What is 7+1?", "teacher": "alpha", "response": "7+1 = 8.\n\n\\boxed{8}", "reference_answer": "8"},
    {"prompt_id": "p3", "prompt": "What is 7+1?\n", "teacher": "beta", "response": "Eight.\n\n\\boxed{8}", "reference_answer": "8"},
]


@pytest.mark.slow
def test_the_graph_flags_a_prompt_id_with_two_questions(tmp_path, monkeypatch, smol_tokenizer, capsys):
    from lalp_assets import cli

    student = save_tiny_student(tmp_path / "student", smol_tokenizer, seed=3)
    src = tmp_path / "t.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    for k in list(os.environ):
        if k.startswith("LALP_"):
            monkeypatch.delenv(k)
    home = temp_dagster_home(tmp_path / "home")
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    for k, v in {"LALP_MODEL": str(student), "LALP_DEVICE": "cpu", "LALP_DTYPE": "float32", "LALP_MAX_PROMPTS": "0",
                 "LALP_BOOTSTRAP": "20"}.items():
        monkeypatch.setenv(k, v)
    assert cli.main(["run", "--source", str(src)]) == 0
    out = capsys.readouterr().out
    assert "1 prompt id(s) were given to the teachers with different prompt texts" in out
    con = duckdb.connect(str(home / "lalp.duckdb"), read_only=True)
    try:
        assert con.execute("SELECT DISTINCT n_shared_prompts, n_conflicting_prompts FROM teacher_rankings").fetchall() == [(2, 1)]
        decisions = con.execute("SELECT prompt_id, teacher, eligible, chosen, reason FROM selection_decisions "
                                "ORDER BY prompt_id, teacher").fetchall()
        curated = [r[0] for r in con.execute("SELECT prompt_id FROM curated_sft_dataset ORDER BY 1").fetchall()]
        scored = con.execute("SELECT count(*) FROM response_scores").fetchone()[0]
    finally:
        con.close()
    assert scored == 6  # every response is scored: the conflict is about comparing, not about the rows
    p2 = [d for d in decisions if d[0] == "p2"]
    assert [(t, e, c) for _, t, e, c, _ in p2] == [("alpha", False, False), ("beta", False, False)]
    assert all(r.startswith("prompt_id holds 2 different prompt texts (teachers: alpha, beta)") for *_, r in p2), p2
    assert curated == ["p1", "p3"]
    with dg.DagsterInstance.get() as instance:
        meta = instance.get_latest_materialization_event(dg.AssetKey("teacher_rankings")).asset_materialization.metadata
        assert meta["n_conflicting_prompts"].value == 1
        assert "p2" in meta["conflicting_prompts"].value and "p3" not in meta["conflicting_prompts"].value
        curated_meta = instance.get_latest_materialization_event(dg.AssetKey("curated_sft_dataset")).asset_materialization.metadata
        assert curated_meta["candidates_under_conflicting_prompt_ids"].value == 2
    report = (home / "exports" / "report" / "teacher_selection_report.md").read_text()
    assert "different prompt texts" in report
