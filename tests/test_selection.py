"""Teacher ranking, response selection, prompt sampling, report and exports (pure logic)."""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest

from lalp_resources.method.aggregation import lalp_from_steps, rank_teachers, sample_prompts, select_responses, sft_messages
from lalp_assets.curation import export_curated
from lalp_resources.report import ranking_plot, step_distribution_plot, write_report


def responses(rows):
    return pl.DataFrame(rows, schema={"response_id": pl.Utf8, "prompt_id": pl.Utf8, "teacher": pl.Utf8,
                                      "lalp": pl.Float64, "galp": pl.Float64, "is_correct": pl.Boolean}, orient="row")


def test_ranking_uses_only_prompts_every_teacher_answered():
    df = responses([
        ("a1", "p1", "A", -1.0, -2.0, True), ("b1", "p1", "B", -2.0, -1.0, True),
        ("a2", "p2", "A", -1.2, -2.2, False), ("b2", "p2", "B", -2.2, -1.1, True),
        ("a3", "p3", "A", -9.0, -9.0, True),  # B never answered p3: excluded from the comparison
    ])
    rk = rank_teachers(df, n_boot=200, seed=1)
    a = rk.filter(pl.col("teacher") == "A").row(0, named=True)
    b = rk.filter(pl.col("teacher") == "B").row(0, named=True)
    assert a["n_shared_prompts"] == b["n_shared_prompts"] == 2
    assert a["lalp_mean"] == pytest.approx(-1.1) and b["lalp_mean"] == pytest.approx(-2.1)
    assert a["lalp_rank"] == 1 and b["lalp_rank"] == 2
    assert a["galp_rank"] == 2 and b["galp_rank"] == 1  # GALP disagrees, shown beside
    assert a["lalp_ci_low"] <= a["lalp_mean"] <= a["lalp_ci_high"]
    assert a["n_responses"] == 3 and a["accuracy"] == pytest.approx(2 / 3)


def test_bootstrap_interval_covers_the_mean_and_narrows_with_more_prompts():
    rng = np.random.default_rng(0)
    def frame(n):
        return responses([(f"{t}{i}", f"p{i}", t, float(rng.normal(mu, 0.3)), -1.0, True)
                          for i in range(n) for t, mu in (("A", -1.0), ("B", -1.5))])
    small, big = rank_teachers(frame(10), n_boot=500), rank_teachers(frame(400), n_boot=500)
    w = lambda rk: float((rk["lalp_ci_high"] - rk["lalp_ci_low"]).mean())  # noqa: E731
    assert w(big) < w(small) / 3
    for r in big.iter_rows(named=True):
        assert r["lalp_ci_low"] < r["lalp_mean"] < r["lalp_ci_high"]


def test_teacher_without_shared_prompts_still_appears():
    df = responses([("a1", "p1", "A", -1.0, -1.0, True), ("b2", "p2", "B", -2.0, -2.0, True)])
    rk = rank_teachers(df, n_boot=50)
    assert sorted(rk["teacher"].to_list()) == ["A", "B"]
    assert rk["n_shared_prompts"].to_list() == [0, 0]
    assert rk["lalp_mean"].null_count() == 2


def candidates(rows):
    df = pl.DataFrame(rows, schema={"prompt_id": pl.Utf8, "response_id": pl.Utf8, "teacher": pl.Utf8, "lalp": pl.Float64,
                                    "galp": pl.Float64, "is_correct": pl.Boolean, "reference_answer": pl.Utf8,
                                    "verify_reason": pl.Utf8}, orient="row")
    return df


def test_selection_argmax_among_verified_correct_with_reasons():
    df = candidates([
        ("p1", "r1", "A", -0.5, -1.0, False, "5", "mismatch"),   # best LALP but wrong
        ("p1", "r2", "B", -0.9, -1.0, True, "5", "verified"),
        ("p1", "r3", "C", -1.5, -1.0, True, "5", "verified"),
        ("p2", "r4", "A", -0.7, -0.5, True, "7", "verified"),    # tie on LALP: GALP decides
        ("p2", "r5", "B", -0.7, -0.9, True, "7", "verified"),
        ("p3", "r6", "A", -0.3, -0.3, False, "1", "mismatch"),   # nothing eligible
        ("p4", "r7", "A", -2.0, -2.0, None, None, "no_reference"),  # no reference: all eligible
        ("p4", "r8", "B", -1.0, -2.0, None, None, "no_reference"),
        ("p5", "r9", "A", None, None, True, "2", "verified"),    # not scored
    ])
    dec, chosen = select_responses(df)
    assert dec.height == df.height  # every candidate has a decision
    picked = dict(chosen.select("prompt_id", "response_id").iter_rows())
    assert picked == {"p1": "r2", "p2": "r4", "p4": "r8"}
    reason = dict(dec.select("response_id", "reason").iter_rows())
    assert reason["r1"].startswith("not verified correct (mismatch)")
    assert "tie" in reason["r4"] and "lower LALP" in reason["r3"]
    assert "nothing selected" in reason["r6"]
    assert "no reference" in reason["r8"]
    assert reason["r9"].startswith("not scored")
    assert chosen.filter(pl.col("prompt_id") == "p1")["n_candidates"][0] == 3
    assert chosen.filter(pl.col("prompt_id") == "p1")["n_eligible"][0] == 2
    # without the correctness requirement the best LALP wins
    _, loose = select_responses(df, require_correct=False)
    assert dict(loose.select("prompt_id", "response_id").iter_rows())["p1"] == "r1"


def test_lalp_is_the_unweighted_mean_of_step_scores():
    steps = pl.DataFrame({"response_id": ["r", "r", "r"], "mean_logprob": [-1.0, -2.0, -6.0]})
    assert lalp_from_steps(steps)["lalp"][0] == pytest.approx(-3.0)


def test_prompt_sample_is_deterministic_and_stable_under_growth():
    ids = [f"p{i}" for i in range(100)]
    s1 = sample_prompts(ids, 10)
    assert len(s1) == 10 and s1 == sample_prompts(list(reversed(ids)), 10)
    assert s1 <= sample_prompts(ids + ["new1", "new2"], 12) | s1
    assert sample_prompts(ids, 0) == set(ids)


def test_exports_and_report(tmp_path):
    curated = pl.DataFrame({
        "prompt_id": ["p1", "p2"], "teacher": ["A", "B"], "response_id": ["r1", "r2"], "lalp": [-1.0, -2.0],
        "galp": [-1.5, -2.5], "source_uri": ["file:///x", "file:///y"], "source_sha256": ["aa", "bb"],
        "messages": [sft_messages("Q1?", "A1."), sft_messages("Q2?", "A2.")],
    })
    paths = export_curated(curated, tmp_path)
    lines = [json.loads(x) for x in open(paths["jsonl"])]
    assert lines[0]["messages"] == [{"role": "user", "content": "Q1?"}, {"role": "assistant", "content": "A1."}]
    assert {"prompt_id", "teacher", "response_id", "lalp", "source_uri"} <= set(lines[0])
    assert pl.read_parquet(paths["parquet"]).height == 2
    import datasets

    ds = datasets.load_from_disk(paths["hf_dataset"])
    assert ds.num_rows == 2 and ds[1]["messages"][1]["content"] == "A2." and ds[0]["teacher"] == "A"

    rk = rank_teachers(responses([("a", "p1", "A", -1.0, -2.0, True), ("b", "p1", "B", -2.0, -1.0, True),
                                  ("c", "p2", "A", -1.1, -2.0, True), ("d", "p2", "B", -2.1, -1.0, True)]), n_boot=50)
    steps = pl.DataFrame({"teacher": ["A", "A", "B"], "mean_logprob": [-1.0, -1.2, -2.0]})
    png = ranking_plot(rk)
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert step_distribution_plot(steps)[:4] == b"\x89PNG"
    mix = pl.DataFrame({"teacher": ["A", "B"], "rows": [1, 1], "percent": [50.0, 50.0]})
    dec = pl.DataFrame({"prompt_id": ["p1", "p2"], "chosen": [True, True], "reason": ["highest LALP", "highest LALP"]})
    report = write_report(tmp_path / "report", rk, steps, mix, dec, {"window": "fixed:4"})
    text = report.read_text()
    assert "Highest mean LALP: A" in text and "![ranking](ranking.png)" in text
    assert (tmp_path / "report" / "ranking.png").exists()
