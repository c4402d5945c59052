"""Step segmentation: exact tiling (property-based) and the concrete rules of docs/method.md."""

from __future__ import annotations

import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lalp_resources.method.segmentation import (
    SEGMENTER_VERSIONS,
    SEGMENTERS,
    check_tiling,
    is_tiny,
    merge_tiny,
    segment,
    segment_line,
    segment_paragraph,
    segment_sentence,
    spans_from_groups,
)

RULE_SEGMENTERS = ("paragraph", "line", "sentence")


def pieces(text: str, method: str) -> list[str]:
    spans = segment(text, method)
    check_tiling(text, spans)
    return [text[s:e] for s, e in spans]


# ------------------------------------------------------------------------------------------
# Property: every rule segmenter tiles any text exactly
# ------------------------------------------------------------------------------------------

_TOKENS = [
    "\n", "\n\n", "\r\n", "\r\n\r\n", "\r", " ", "  ", "\t", "\u00a0", "\u2028", "\x85", "\x0c",
    "$", "$$", "\\", "\\(", "\\)", "\\[", "\\]", "\\begin{align}", "\\end{align}",
    "\\begin{proof}", "\\end{proof}", "{", "}", "(", ")", ".", "..", "!", "?", "'", "\u201d",
    "0", "1", "3.5", "1.", "2)", "(a)", "-", "*", "\u2022", "Step 3:", "e.g.", "i.e.", "etc.",
    "Fig. 2", "Eq. (3)", "Dr.", "J.", "x", "A", "word", "The", "the", "=",
]
_text = st.lists(
    st.one_of(st.sampled_from(_TOKENS), st.text(max_size=4)), min_size=1, max_size=40
).map("".join).filter(lambda t: t.strip() != "")


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_text)
def test_rule_segmenters_tile_exactly(text):
    for method in RULE_SEGMENTERS:
        spans = segment(text, method)
        check_tiling(text, spans)
        parts = [text[s:e] for s, e in spans]
        assert "".join(parts) == text
        assert all(not p.isspace() for p in parts)
        assert all(len(p) > 0 for p in parts)


def _cuts_by_definition(text: str, min_breaks: int) -> list[int]:
    """After every maximal whitespace run (not at the end) with >= min_breaks line breaks, counted
    as str.splitlines counts them ("\r\n" is one)."""
    import re

    return [m.end() for m in re.finditer(r"\s+", text)
            if m.end() < len(text) and len(("x" + m.group() + "x").splitlines()) - 1 >= min_breaks]


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_text)
def test_break_cuts_are_the_runs_with_enough_line_breaks(text):
    from lalp_resources.method.segmentation import _break_cuts

    for k in (1, 2, 3):
        assert _break_cuts(text, k) == _cuts_by_definition(text, k), k


@settings(max_examples=200, deadline=None)
@given(_text)
def test_merge_tiny_leaves_no_tiny_step_unless_single(text):
    for method in RULE_SEGMENTERS:
        parts = pieces(text, method)
        if len(parts) > 1:
            # The tiny fragments were merged; every step holds a non-tiny piece, so none is
            # just an enumerator or shorter than 3 non-whitespace characters.
            assert not any(p.isspace() for p in parts)
            assert all(sum(not c.isspace() for c in p) >= 3 for p in parts)


@settings(max_examples=200, deadline=None)
@given(_text, st.data())
def test_spans_from_groups_roundtrip(text, data):
    """Cutting a text anywhere, stripping/reflowing whitespace in each group, maps back exactly."""
    n = len(text)
    cuts = sorted(set(data.draw(st.lists(st.integers(1, max(1, n - 1)), max_size=6))))
    bounds = [0] + [c for c in cuts if 0 < c < n] + [n]
    groups = [" ".join(text[a:b].split()) for a, b in zip(bounds, bounds[1:])]
    spans = spans_from_groups(text, groups)
    assert spans is not None
    check_tiling(text, spans)


# ------------------------------------------------------------------------------------------
# API surface
# ------------------------------------------------------------------------------------------


def test_api_constants():
    assert SEGMENTERS == ("paragraph", "line", "sentence", "llm")
    assert set(SEGMENTER_VERSIONS) == set(SEGMENTERS)
    assert all("@" in v for v in SEGMENTER_VERSIONS.values())


@pytest.mark.parametrize("method", RULE_SEGMENTERS)
@pytest.mark.parametrize("text", ["", "   ", "\n\n\t", "\r\n"])
def test_empty_text_raises(method, text):
    with pytest.raises(ValueError, match="empty"):
        segment(text, method)


def test_unknown_method_and_llm_without_segmenter():
    with pytest.raises(ValueError, match="unknown segmenter"):
        segment("Some text here.", "words")
    with pytest.raises(ValueError, match="llm"):
        segment("Some text here.", "llm")


def test_llm_dispatch_uses_segmenter_object():
    class Fake:
        def segment(self, text):
            return [(0, 10), (10, len(text))], None

    text = "Step one. Step two here."
    assert segment(text, "llm", llm=Fake()) == [(0, 10), (10, len(text))]


def test_individual_functions_match_dispatch():
    text = "A first line.\nA second one.\n\nNew paragraph. Two sentences."
    assert segment_paragraph(text) == segment(text, "paragraph")
    assert segment_line(text) == segment(text, "line")
    assert segment_sentence(text) == segment(text, "sentence")


# ------------------------------------------------------------------------------------------
# check_tiling
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spans, problem",
    [
        ([], "no spans"),
        ([(1, 9)], "starts at 1"),
        ([(0, 3), (4, 9)], "gap"),
        ([(0, 4), (3, 9)], "overlap"),
        ([(0, 4), (4, 4), (4, 9)], "empty"),
        ([(0, 5)], "ends at 5"),
        ([(0, 4), (4, 5), (5, 9)], "whitespace-only"),
        ([(0, 4), (4, 12)], "past the end"),
        ([(0, 4.0), (4.0, 9)], "non-integer"),
    ],
)
def test_check_tiling_names_the_problem(spans, problem):
    text = "abcd efgh"
    with pytest.raises(ValueError, match=problem):
        check_tiling(text, spans)


def test_check_tiling_accepts_exact_tiling():
    check_tiling("abcd efgh", [(0, 5), (5, 9)])


# ------------------------------------------------------------------------------------------
# paragraph / line
# ------------------------------------------------------------------------------------------


def test_paragraph_separator_belongs_to_step_it_ends():
    text = "First paragraph here.\n\nSecond paragraph here.\n \n\t\nThird one."
    assert pieces(text, "paragraph") == [
        "First paragraph here.\n\n",
        "Second paragraph here.\n \n\t\n",
        "Third one.",
    ]


def test_paragraph_single_newline_does_not_split():
    text = "Line one is here.\nLine two is here."
    assert pieces(text, "paragraph") == [text]


def test_line_separator_belongs_to_step_it_ends():
    text = "Line one here\nLine two here  \n\n  Line three here"
    assert pieces(text, "line") == ["Line one here\n", "Line two here  \n\n  ", "Line three here"]


def test_leading_and_trailing_whitespace():
    text = "\n\n  First para.\n\nSecond para.\n\n"
    assert pieces(text, "paragraph") == ["\n\n  First para.\n\n", "Second para.\n\n"]
    assert pieces(text, "line")[0] == "\n\n  First para.\n\n"
    assert pieces(text, "sentence")[0].startswith("\n\n  First")


def test_crlf_line_endings():
    text = "Alpha line one.\r\nBeta line two.\r\n\r\nGamma para two.\r\n"
    assert pieces(text, "paragraph") == ["Alpha line one.\r\nBeta line two.\r\n\r\n", "Gamma para two.\r\n"]
    assert pieces(text, "line") == ["Alpha line one.\r\n", "Beta line two.\r\n\r\n", "Gamma para two.\r\n"]
    assert pieces(text, "sentence") == pieces(text, "line")
    # "\r\n" is one line break: a single CRLF is not a paragraph break.
    assert pieces("Alpha one.\r\nBeta two.", "paragraph") == ["Alpha one.\r\nBeta two."]


# ------------------------------------------------------------------------------------------
# Tiny fragments
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("frag", ["1.", "2)", "(a)", "a.", "-", "*", "\u2022", "Step 3:", "**2.**", "iv.", "ok", "x"])
def test_is_tiny(frag):
    assert is_tiny(frag)
    assert is_tiny(f"  {frag}\n")


@pytest.mark.parametrize("piece", ["Yes.", "x = 1", "Step 3: add them", "3.5 m"])
def test_not_tiny(piece):
    assert not is_tiny(piece)


def test_enumerator_merges_into_next_step():
    text = "1.\nCompute the sum.\n2.\nCheck the result."
    assert pieces(text, "line") == ["1.\nCompute the sum.\n", "2.\nCheck the result."]
    text = "1. Compute the sum. 2. Check the result."
    assert pieces(text, "sentence") == ["1. Compute the sum. ", "2. Check the result."]


def test_consecutive_tiny_fragments_merge_into_next():
    text = "Step 3:\n-\n(a)\nNow add the numbers."
    assert pieces(text, "line") == [text]


def test_last_tiny_step_merges_into_previous():
    text = "The answer is 42.\n\nOK"
    assert pieces(text, "paragraph") == [text]
    text = "We are done here.\n\n1."
    assert pieces(text, "paragraph") == [text]


def test_whitespace_piece_merges_into_previous():
    text = "abc def ghi"
    assert merge_tiny(text, [(0, 3), (3, 4), (4, 11)]) == [(0, 4), (4, 11)]
    # A whitespace-only piece between two real steps joins the previous one.
    text = "First step.   Second step."
    assert merge_tiny(text, [(0, 11), (11, 14), (14, 26)]) == [(0, 14), (14, 26)]
    # Leading whitespace joins the first step.
    text = "   First step."
    assert merge_tiny(text, [(0, 3), (3, 14)]) == [(0, 14)]


def test_all_tiny_text_is_one_step():
    for method in RULE_SEGMENTERS:
        assert pieces("1.\n\n2.\n\n", method) == ["1.\n\n2.\n\n"]
        assert pieces("x", method) == ["x"]


# ------------------------------------------------------------------------------------------
# Sentence: math-aware rules
# ------------------------------------------------------------------------------------------


def test_sentence_basic_split_and_separator_ownership():
    text = "We add the numbers. The sum is 7!  Is it right? Yes, it is."
    assert pieces(text, "sentence") == [
        "We add the numbers. ",
        "The sum is 7!  ",
        "Is it right? ",
        "Yes, it is.",
    ]


def test_sentence_closing_quotes_and_brackets_stay_with_sentence():
    text = 'He said "stop here." Then we left. (See the note.) Done now.'
    assert pieces(text, "sentence") == [
        'He said "stop here." ',
        "Then we left. ",
        "(See the note.) ",
        "Done now.",
    ]


@pytest.mark.parametrize(
    "text",
    [
        "Use a known identity, e.g. Vieta's formulas, to finish.",
        "The roots are real, i.e. The discriminant is positive.",
        "Apples, pears, etc. All of them count.",
        "Compare A vs. B in the table.",
        "As shown in Fig. 2 the curve rises.",
        "By Eq. (3) we get the bound.",
        "Dr. Smith proved it.",
        "It takes approx. 3 hours in total.",
        "This holds, cf. Lemma 4 for details.",
        "The value 3.5 is the answer.",
        "The author J. Smith wrote it.",
        "See p. 12 for the proof of it.",
        "Here x.y is a field access.",
    ],
)
def test_sentence_does_not_split_inside_abbreviations_and_decimals(text):
    assert pieces(text, "sentence") == [text]


@pytest.mark.parametrize(
    "first, second",
    [
        ("Let $a.b$ be the product. ", "Then it is small."),
        ("We have $x = 1. Then y = 2.$ as before. ", "Next we check."),
        ("Thus $$x = 1. Then y = 2.$$ Finally z follows. ", "We stop."),
        ("Thus $$\nx = 1. Then\ny = 2.\n$$ Finally z follows. ", "We stop."),
        ("Thus \\[ x = 1. Then y = 2. \\] Finally z follows. ", "We stop."),
        ("Thus \\( x = 1. Then y = 2. \\) Finally z follows. ", "We stop."),
        (
            "Thus\n\\begin{align}\nx &= 1. Then \\\\\ny &= 2. Next\n\\end{align}\nFinally z follows. ",
            "We stop.",
        ),
        ("Thus \\begin{equation*} a. B \\end{equation*} holds. ", "We stop."),
    ],
)
def test_sentence_does_not_split_inside_math(first, second):
    assert pieces(first + second, "sentence") == [first, second]


def test_sentence_dollar_amounts_are_not_math():
    text = "It costs $5. Then it costs $10. We pay."
    assert pieces(text, "sentence") == ["It costs $5. ", "Then it costs $10. ", "We pay."]


def test_sentence_escaped_dollar_is_not_math():
    text = "Price \\$x. Then more \\$ here. Done."
    assert pieces(text, "sentence") == ["Price \\$x. ", "Then more \\$ here. ", "Done."]


def test_sentence_text_environment_still_splits():
    text = "\\begin{proof}First we note this. Then we conclude.\\end{proof}"
    assert len(pieces(text, "sentence")) == 2


def test_sentence_always_splits_at_paragraph_break():
    text = "No final punctuation here\n\nNext paragraph starts here"
    assert pieces(text, "sentence") == ["No final punctuation here\n\n", "Next paragraph starts here"]
    # Even after an abbreviation.
    text = "We list apples etc.\n\nNext paragraph starts."
    assert pieces(text, "sentence") == ["We list apples etc.\n\n", "Next paragraph starts."]


def test_sentence_lowercase_or_operator_continuation_does_not_split():
    assert pieces("So 5! = 120 is the count. Done here.", "sentence") == [
        "So 5! = 120 is the count. ",
        "Done here.",
    ]
    assert pieces("We wait... and then continue. Done here.", "sentence") == [
        "We wait... and then continue. ",
        "Done here.",
    ]


def test_sentence_refines_paragraph_boundaries():
    text = "Alpha one. Alpha two.\n\nBeta one. Beta two.\n\nGamma."
    para_cuts = {e for _, e in segment_paragraph(text)}
    sent_cuts = {e for _, e in segment_sentence(text)}
    assert para_cuts <= sent_cuts


# ------------------------------------------------------------------------------------------
# spans_from_groups
# ------------------------------------------------------------------------------------------


def test_spans_from_groups_whitespace_insensitive():
    text = "  First step: add.\n\nSecond   step:\nmultiply.  "
    spans = spans_from_groups(text, ["First step: add.", "Second step: multiply."])
    assert spans == [(0, 20), (20, len(text))]
    assert [text[s:e] for s, e in spans] == ["  First step: add.\n\n", "Second   step:\nmultiply.  "]


def test_spans_from_groups_rejects_mismatch():
    text = "First step. Second step."
    assert spans_from_groups(text, ["First step.", "Second stop."]) is None  # altered text
    assert spans_from_groups(text, ["Second step.", "First step."]) is None  # out of order
    assert spans_from_groups(text, ["First step."]) is None  # incomplete
    assert spans_from_groups(text, ["First step.", "Second step.", "Third."]) is None  # extra
    assert spans_from_groups(text, []) is None
    assert spans_from_groups(text, [1, 2]) is None  # type: ignore[list-item]
    # Empty groups are skipped.
    assert spans_from_groups(text, ["First step.", "  ", "Second step."]) == [(0, 12), (12, 24)]


# ------------------------------------------------------------------------------------------
# Speed
# ------------------------------------------------------------------------------------------


def test_large_trace_is_fast():
    unit = (
        "Let $x = 1.5$ and note, e.g., that Fig. 2 shows it. We compute 3.5 + 1 = 4.5! "
        "Then $$y = x^2. z = 2.$$ Hence \\[ a. b \\] holds.\n"
        "1. First item.\n2) Second item.\n\n"
        "Price $5 and $10. \\begin{align} p &= q. \\\\ r &= s. \\end{align} Done.\n\n"
    )
    text = unit * (100_000 // len(unit) + 1)
    assert len(text) >= 100_000
    for method in RULE_SEGMENTERS:
        t0 = time.perf_counter()
        spans = segment(text, method)
        elapsed = time.perf_counter() - t0
        check_tiling(text, spans)
        assert elapsed < 0.5, (method, elapsed)


def test_pathological_dollars_are_fast():
    text = "$a " * 40_000 + "end."
    t0 = time.perf_counter()
    check_tiling(text, segment_sentence(text))
    assert time.perf_counter() - t0 < 0.5


def test_segment_traces_reports_progress_to_the_end(smol_tokenizer):
    import polars as pl

    from lalp_resources.method.segmentation import segment
    from lalp_resources.pipeline import segment_traces

    n = 2500  # more than one report per pass
    traces = pl.DataFrame({"response_id": [f"r{i}" for i in range(n)], "prompt_id": ["p"] * n, "teacher": ["t"] * n,
                           "response": [f"Step one {i}.\n\nStep two.\n\nSo 4." if i % 2 else f"Only {i}." for i in range(n)]})
    seen: list[tuple[int, int]] = []
    steps = segment_traces(traces, lambda text: (segment(text, "paragraph"), None), smol_tokenizer, progress=lambda d, t: seen.append((d, t)))
    assert steps["response_id"].n_unique() == n
    assert seen[-1] == (2 * n, 2 * n) and all(t == 2 * n for _, t in seen)
    assert [d for d, _ in seen] == sorted(d for d, _ in seen) and len(seen) >= 4
