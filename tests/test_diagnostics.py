"""The diagnostics on small cases worked by hand: length bias, DROP, CASL, the weakest step, the
same-family table and the first-wrong-step metrics."""

import math

import numpy as np
import polars as pl
import pytest

from lalp_resources import diagnostics as dx


def steps(rows):
    cols = ["response_id", "teacher", "step_index", "n_tokens", "sum_logprob", "head1_logprob", "head2_logprob"]
    df = pl.DataFrame([dict(zip(cols, r)) for r in rows], schema={
        "response_id": pl.Utf8, "teacher": pl.Utf8, "step_index": pl.Int32, "n_tokens": pl.Int32,
        "sum_logprob": pl.Float64, "head1_logprob": pl.Float64, "head2_logprob": pl.Float64}, orient="row")
    return df.with_columns((pl.col("sum_logprob") / pl.col("n_tokens")).alias("mean_logprob"))


def test_spearman_by_hand():
    # ranks x: 1 2 3 4, y: 1 3 2 4 -> d^2 = 0+1+1+0 = 2, rho = 1 - 6*2/(4*15) = 0.8
    assert dx.spearman([1, 2, 3, 4], [10, 30, 20, 40]) == pytest.approx(0.8)
    assert dx.spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    # ties take average ranks: x ranks 1.5 1.5 3, y 1 2 3 -> Pearson of ranks = 0.8660
    assert dx.spearman([5, 5, 7], [1, 2, 3]) == pytest.approx(math.sqrt(3) / 2)
    assert dx.spearman([1, 2], [1, 2]) is None
    assert dx.spearman([1, 1, 1], [1, 2, 3]) is None


def test_length_bias_per_teacher():
    df = steps([
        ("a1", "A", 0, 2, -4.0, -3, -4), ("a1", "A", 1, 4, -4.0, -2, -3), ("a1", "A", 2, 8, -4.0, -1, -2),  # longer = higher
        ("b1", "B", 0, 2, -1.0, -1, -1), ("b1", "B", 1, 4, -4.0, -1, -2), ("b1", "B", 2, 8, -16.0, -1, -2),  # longer = lower
    ])
    got = dict(dx.length_bias(df).iter_rows())
    assert got["A"] == pytest.approx(1.0) and got["B"] == pytest.approx(-1.0)


def test_drop_by_hand():
    # step 0: tokens -3, -1, -1, -1 (sum -6, head1 -3, head2 -4): DROP-1 = -3/3 = -1, DROP-2 = -2/2 = -1
    # step 1: tokens -2, -1 (sum -3, head1 -2, head2 -3): DROP-1 = -1/1 = -1, DROP-2 = none (2 tokens)
    df = steps([("r", "T", 0, 4, -6.0, -3.0, -4.0), ("r", "T", 1, 2, -3.0, -2.0, -3.0)])
    r = dx.response_diagnostics(df).row(0, named=True)
    assert r["drop1"] == pytest.approx(-1.0)
    assert r["drop2"] == pytest.approx(-1.0)  # only step 0 has more than 2 tokens
    # CASL inputs: M = -9/6 = -1.5; head tokens: -3 and -2 -> M_first = -2.5; the rest -4/4 = -1; F = 2/6
    assert r["casl_m"] == pytest.approx(-1.5)
    assert r["casl_m_first"] == pytest.approx(-2.5)
    assert r["casl_m_non"] == pytest.approx(-1.0)
    assert r["casl_f"] == pytest.approx(1 / 3)
    assert r["has_heads"] is True
    assert dx.drop_step_mean(-6.0, 4, -3.0, 1) == pytest.approx(-1.0)
    assert dx.drop_step_mean(-3.0, 2, -3.0, 2) is None
    assert dx.drop_step_mean(-3.0, 4, None, 1) is None


def test_rows_without_head_sums_are_left_out_not_guessed():
    df = steps([("old", "T", 0, 4, -6.0, None, None), ("old", "T", 1, 2, -3.0, -2.0, -3.0),
                ("new", "T", 0, 3, -3.0, -1.0, -2.0)])
    out = {r["response_id"]: r for r in dx.response_diagnostics(df).iter_rows(named=True)}
    assert out["old"]["has_heads"] is False and out["old"]["drop1"] is None and out["old"]["casl_m"] is None
    assert out["new"]["has_heads"] is True and out["new"]["drop1"] == pytest.approx(-1.0)


def test_casl_fit_recovers_a_known_length_term():
    # M = 0.5*M_non + 0.25*M_first - 2*F + 0.1 exactly: the fit finds g = -2 and corrects M - g*F
    rng = np.random.default_rng(0)
    n = 40
    m_non, m_first, f = rng.normal(-1, 0.3, n), rng.normal(-3, 0.5, n), rng.uniform(0.05, 0.4, n)
    m = 0.5 * m_non + 0.25 * m_first - 2 * f + 0.1
    resp = pl.DataFrame({"response_id": [str(i) for i in range(n)], "casl_m": m, "casl_m_non": m_non,
                         "casl_m_first": m_first, "casl_f": f})
    fit = dx.casl_fit(resp)
    assert fit["g"] == pytest.approx(-2.0) and fit["b1"] == pytest.approx(0.5)
    assert fit["b2"] == pytest.approx(0.25) and fit["c"] == pytest.approx(0.1)
    out = dx.casl_scores(resp, fit)
    assert np.allclose(out["casl"].to_numpy(), m + 2 * f)
    assert dx.casl_fit(resp.head(4)) is None
    assert dx.casl_scores(resp, None)["casl"].null_count() == n


def test_weakest_step_by_hand():
    df = pl.DataFrame({
        "response_id": ["r"] * 4 + ["s"] * 2,
        "step_index": [0, 1, 2, 3, 0, 1],
        "mean_logprob": [-1.0, -3.0, float("nan"), -2.0, -2.0, -2.0],
        "char_start": [0, 10, 20, 30, 0, 5], "char_end": [10, 20, 30, 40, 5, 9],
    })
    w = {r["response_id"]: r for r in dx.weakest_steps(df).iter_rows(named=True)}
    # r: scored steps -1, -3, -2 (mean -2): the weakest is step 1 (chars 10-20), 1.0 below the mean
    assert (w["r"]["weakest_step"], w["r"]["weakest_char_start"], w["r"]["weakest_char_end"]) == (1, 10, 20)
    assert w["r"]["weakest_score"] == -3.0 and w["r"]["weakest_gap"] == pytest.approx(1.0)
    # s: a tie goes to the lower index; the gap is 0
    assert w["s"]["weakest_step"] == 0 and w["s"]["weakest_gap"] == 0.0


def test_shorten():
    assert dx.shorten("a\n\n b") == "a b"
    s = dx.shorten("x" * 50 + "y" * 50, limit=21)
    assert len(s) == 21 and s.startswith("x" * 9) and s.endswith("y" * 9) and "…" in s


def test_same_family_table_and_setting():
    assert dx.family_of("Qwen2.5-Math-7B") == "qwen" and dx.family_of("QwQ-32B") == "qwen"
    assert dx.family_of("meta-llama/Llama-3.1-8B") == "llama" and dx.family_of("SmolLM2-135M") == "smollm"
    assert dx.family_of("GPT-4 Turbo") == "gpt" and dx.family_of("PaLM 2 Medium") == "palm"
    assert dx.family_of("alphabet") is None  # "phi" inside a word is not Phi
    flagged = dx.same_family(["Qwen3-8B", "Llama-3-8B", "GPT-4"], ["Qwen/Qwen3-4B", "Qwen2TokenizerFast"])
    assert set(flagged) == {"Qwen3-8B"} and "qwen" in flagged["Qwen3-8B"]
    # the student matched by its tokenizer class alone
    assert set(dx.same_family(["llama-70b"], [None, "LlamaTokenizerFast"])) == {"llama-70b"}
    fams = dx.parse_families("acme=acme-?lm, qwen=qwen|tongyi")
    assert dx.family_of("AcmeLM-7B", fams) == "acme" and dx.family_of("Tongyi-7B", fams) == "qwen"
    with pytest.raises(ValueError, match="name=regex"):
        dx.parse_families("nopattern")
    with pytest.raises(ValueError, match="bad regex"):
        dx.parse_families("x=(")


def test_step_at():
    spans = [(0, 10), (10, 25), (25, 30)]
    assert dx.step_at(spans, 0) == 0 and dx.step_at(spans, 10) == 1 and dx.step_at(spans, 29) == 2
    assert dx.step_at(spans, 30) == 2 and dx.step_at(spans, 31) is None


def test_first_wrong_metrics_by_hand():
    # scores -1, -2, -5, -3; the first wrong step is 2 (the lowest): a top-1 hit, below every
    # other step (percentile 0), both earlier steps score above it (2 of 2 pairs won)
    m = dx.first_wrong_metrics([-1, -2, -5, -3], 2)
    assert m == {"top1": True, "percentile": 0.0, "pairs": 2, "pairs_won": 2.0}
    # wrong step 1 (-2): step 2 is lower -> no hit; others -1, -5, -3: 2 below it of 3 -> 2/3;
    # one earlier step (-1) above it -> 1 of 1 pair
    m = dx.first_wrong_metrics([-1, -2, -5, -3], 1)
    assert m["top1"] is False and m["percentile"] == pytest.approx(2 / 3) and (m["pairs"], m["pairs_won"]) == (1, 1.0)
    # a tie with an earlier step counts half; the first step wrong has no pair
    m = dx.first_wrong_metrics([-2, -2, -1], 1)
    assert m["top1"] is False and m["percentile"] == pytest.approx(0.25) and m["pairs_won"] == 0.5
    assert dx.first_wrong_metrics([-3, -1], 0)["pairs"] == 0
    assert dx.first_wrong_metrics([-3], 0)["percentile"] is None
    s = dx.summarize_first_wrong([dx.first_wrong_metrics([-1, -2, -5, -3], 2), dx.first_wrong_metrics([-1, -2, -5, -3], 1),
                                  dx.first_wrong_metrics([-3, -1], 0)])
    # top1: 2 of 3; percentiles 0, 2/3, 0 -> 2/9; pairs 2 + 1 + 0 = 3, won 2 + 1 = 3 -> AUROC 1.0
    assert s["n"] == 3 and s["top1"] == pytest.approx(2 / 3)
    assert s["mean_percentile"] == pytest.approx(2 / 9) and s["auroc"] == pytest.approx(1.0) and s["pairs"] == 3
    assert dx.summarize_first_wrong([])["auroc"] is None


def test_teacher_corrected_scores_and_the_verdict_on_a_reordering():
    # two prompts; A leads on LALP, B on DROP-1 (per prompt means first, then over the shared prompts)
    resp = pl.DataFrame({
        "teacher": ["A", "A", "A", "B", "B"], "prompt_id": ["p", "p", "q", "p", "q"],
        "lalp": [-1.0, -1.0, -1.2, -1.5, -1.5], "drop1": [-0.9, -0.7, -0.8, -0.5, -0.6],
        "drop2": [-0.5, -0.5, -0.5, -0.9, -0.9], "casl": [None, -1.0, -1.0, -2.0, -2.0],
        "has_heads": [False, True, True, True, True],
    })
    tc = {r["teacher"]: r for r in dx.teacher_corrected(resp, ["A", "B"], ["p", "q"]).iter_rows(named=True)}
    # A: drop1 per prompt p = -0.8, q = -0.8 -> -0.8; B: (-0.5 + -0.6) / 2 = -0.55
    assert tc["A"]["drop1_mean"] == pytest.approx(-0.8) and tc["B"]["drop1_mean"] == pytest.approx(-0.55)
    assert (tc["A"]["drop1_rank"], tc["B"]["drop1_rank"]) == (2, 1)
    assert tc["A"]["casl_mean"] == pytest.approx(-1.0)  # the response lacking heads is left out
    assert (tc["A"]["n_responses_without_heads"], tc["B"]["n_responses_without_heads"]) == (1, 0)
    rk = pl.DataFrame({"teacher": ["A", "B"], "lalp_mean": [-1.05, -1.5], "length_rho": [0.6, 0.1],
                       "same_family": ["qwen", None], "n_responses_without_heads": [1, 0]}).join(
        dx.teacher_corrected(resp, ["A", "B"], ["p", "q"]).drop("n_responses_without_heads"), on="teacher")
    assert dx.order_changes(rk) == {"drop1": (["A", "B"], ["B", "A"])}
    v = dx.diagnostics_verdict(rk)
    assert "The length correction DROP-1 changes the teacher order: LALP gives A > B, DROP-1 gives B > A." in v
    assert "DROP-2, CASL keep the LALP order." in v
    assert "A (rho +0.60)" in v and "favours long steps" in v
    assert "1 response(s) were scored by an earlier release without head sums" in v
    assert "A's rank is suspect: it is of the student's family (qwen)" in v
    same = rk.with_columns(pl.col("drop1_mean").alias("lalp_mean"))
    assert "keep the LALP order" in dx.diagnostics_verdict(same.drop("drop2_mean", "casl_mean"))
