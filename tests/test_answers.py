"""Tests for lalp_resources.method.answers: final-answer extraction and math verification."""

from __future__ import annotations

import threading
import time

import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lalp_resources.method import answers
from lalp_resources.method.answers import annotate, extract_final_answer, verify_answer


@pytest.mark.parametrize(
    "response, expected",
    [
        ("so x = \\boxed{\\frac{1}{2}}.", "\\frac{1}{2}"),  # nested braces survive
        ("first \\boxed{1}, then \\boxed{ 2 }", "2"),  # the last box wins, trimmed
        ("set \\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),  # escaped braces do not count
        ("unbalanced \\boxed{3 ... The final answer is 7.", "7"),  # falls back to the pattern
        ("Thus the final answer is $x^2+1$.", "x^2+1"),
        ("Answer: 12\nCheck: done", "12"),
        ("We conclude the answer is **5**.", "5"),
        ("no conclusion here", None),
        ("", None),
        (None, None),
    ],
)
def test_extract_final_answer(response, expected):
    assert extract_final_answer(response) == expected


@pytest.mark.parametrize(
    "answer, reference, expected",
    [
        ("\\frac{1}{2}", "0.5", (True, "verified")),
        ("-15", "-15", (True, "verified")),
        ("\\dfrac{3}{4}", "3/4", (True, "verified")),
        ("x^2+1", "1+x^2", (True, "verified")),
        ("3", "4", (False, "mismatch")),
        (None, "1", (None, "no_final_answer")),
        ("  ", "1", (None, "no_final_answer")),
        ("1", None, (None, "no_reference")),
        # CHAMP-style prose references and one-sentence answers.
        ("The total number of strings is 771.", "771", (True, "verified")),
        ("There are 76 involutions on the set {1, 2, 3, 4, 5, 6}.", "76", (True, "verified")),
        ("252", "C(10, 5), or equivalently 252", (True, "verified")),
        ("100", "100 (i.e., all values)", (True, "verified")),
        ("0", "0 is the only possible value", (True, "verified")),
        ("The limit exists and equals 3.", "The limit exists and is equal to 3", (True, "verified")),
        ("No, there are no integer solutions.", "No", (True, "verified")),
        ("Yes, there are.", "No", (False, "mismatch")),
    ],
)
def test_verify_answer(answer, reference, expected):
    assert verify_answer(answer, reference) == expected


def test_verify_answer_unverifiable_cases():
    ok, why = verify_answer("It is always bigger than 20.", "Always greater than 20")
    assert ok is None and why.startswith("parse_error: reference is prose")
    ok, why = verify_answer("1" * (answers.MAX_VERIFY_CHARS + 1), "2")
    assert ok is False and why.startswith("parse_error: answer longer")
    ok, why = verify_answer("\\", "2")  # a lone backslash: nothing to parse
    assert ok is False and why == "parse_error: answer not parsable"


def test_pathological_pair_is_cut_by_the_timeout():
    # Without a timeout, sympy compares this for minutes.
    t0 = time.perf_counter()
    ok, _ = verify_answer("(x+y+z)^{1999}", "2001000")
    assert ok is False and time.perf_counter() - t0 < 30


def test_verification_works_outside_the_main_thread():
    """math_verify's signal timeouts fail in worker threads; annotate must still work there."""
    df = pl.DataFrame({"response": ["\\boxed{\\frac{1}{2}}", "x", "y"],
                       "reference_answer": ["0.5", "2001000", "3"],
                       "final_answer": [None, "(x+y+z)^{1999}", "3"]})
    out: dict = {}

    def work():
        try:
            out["df"] = annotate(df)
            out["single"] = verify_answer("\\sqrt{4}", "2")
        except BaseException as exc:  # noqa: BLE001 - reported below
            out["error"] = exc

    th = threading.Thread(target=work)
    th.start()
    th.join(timeout=120)
    assert not th.is_alive(), "verification hung in a worker thread"
    assert "error" not in out, out.get("error")
    assert out["df"]["is_correct"].to_list() == [True, False, True]
    assert out["single"] == (True, "verified")


def test_annotate_fills_columns_and_keeps_given_answers():
    df = pl.DataFrame({
        "response": ["so \\boxed{4}", "the answer is 5", "no answer", "\\boxed{9}"],
        "reference_answer": ["4", "6", "1", None],
        "final_answer": [None, None, None, "given"],
    })
    out = annotate(df)
    assert out.columns == ["response", "reference_answer", "final_answer", "is_correct", "verify_reason"]
    assert out.schema["is_correct"] == pl.Boolean and out.schema["verify_reason"] == pl.Utf8
    assert out["final_answer"].to_list() == ["4", "5", None, "given"]
    assert out["is_correct"].to_list() == [True, False, None, None]
    assert out["verify_reason"].to_list() == ["verified", "mismatch", "no_final_answer", "no_reference"]


def test_annotate_verifies_each_distinct_pair_once(monkeypatch):
    calls = []
    real = answers._math_verdict

    def counting(fa, ref, cache, timeout):
        calls.append((fa, ref))
        return real(fa, ref, cache, timeout)

    monkeypatch.setattr(answers, "_math_verdict", counting)
    df = pl.DataFrame({"response": ["\\boxed{\\frac{2}{4}}"] * 50 + ["\\boxed{0.25}"] * 50,
                       "reference_answer": ["0.5"] * 100})
    out = annotate(df)
    assert out["is_correct"].to_list() == [True] * 50 + [False] * 50
    assert sorted(calls) == [("0.25", "0.5"), ("\\frac{2}{4}", "0.5")]


def test_annotate_empty_frame():
    df = pl.DataFrame(schema={"response": pl.Utf8, "reference_answer": pl.Utf8})
    out = annotate(df)
    assert out.height == 0 and out.schema["is_correct"] == pl.Boolean


@settings(max_examples=100, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("\\boxed{}$ Final answer is: 12xy+-/.\n")) | st.characters(),
               max_size=120))
def test_property_extract_never_raises(text):
    out = extract_final_answer(text)
    assert out is None or (isinstance(out, str) and out.strip() == out and out)


@settings(max_examples=40, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("0123456789xy+-*/^()[]{}\\frac sqrt,.= $")), max_size=20),
       st.sampled_from(["1", "\\frac{1}{2}", "x+1", "(1, 2)", "No", "0 pairs", "The limit is 2"]))
def test_property_verify_never_raises(answer, reference):
    ok, why = verify_answer(answer, reference)
    assert ok in (True, False, None) and isinstance(why, str) and why
