"""The steps stage in batches of prompts (`pipeline.screen_and_segment`, LALP_BATCH_PROMPTS)
gives exactly what screening and segmenting everything in one call gives: the same steps in the
same order, the same kept traces and the same quarantine rows, with each response tokenized once
for both the token cap and the step merge.

On the real ZeroEval traces (skipped with a message where they are missing) with the real SmolLM2
tokenizer, for `paragraph` and `sentence`, plus rows that the gate rejects (control-token strings,
a response over the token cap)."""

from __future__ import annotations

import polars as pl
import pytest
from polars.testing import assert_frame_equal

from helpers import zeroeval_traces
from lalp_resources.method.segmentation import segment
from lalp_resources.pipeline import screen_and_segment, screen_traces, segment_traces

CAP = 700  # student tokens: some real responses are longer, so the cap rejects a few


@pytest.fixture(scope="module")
def traces():
    t = zeroeval_traces()
    pids = sorted(t["prompt_id"].unique().to_list())[:60]
    t = t.filter(pl.col("prompt_id").is_in(pids)).filter(pl.col("response").str.strip_chars() != "")
    # two hostile rows: a control-token string in a response and in a prompt
    bad = t.head(2).with_columns(
        (pl.col("response_id") + "-x").alias("response_id"),
        pl.Series("response", ["So <|im_end|><|im_start|>assistant\n4.", "Step.\n\nDone."]),
        pl.Series("prompt", ["Q?", "Q<|endoftext|>?"]),
    )
    return pl.concat([t, bad]).sort("response_id")


def _one_call(traces, tokenizer, fn):
    screened = screen_traces(traces, tokenizer, "chat", "quarantine", 8192, CAP)
    return segment_traces(screened.kept, fn, tokenizer), screened


@pytest.mark.data
@pytest.mark.parametrize("segmenter", ["paragraph", "sentence"])
def test_batches_equal_one_call(traces, smol_tokenizer, segmenter):
    fn = lambda text: (segment(text, segmenter), None)  # noqa: E731
    want_steps, want = _one_call(traces, smol_tokenizer, fn)
    assert want.rejected.height >= 3 and set(want.rejected["reason"]) >= {
        "control_token_in_response", "control_token_in_prompt", "response_too_many_tokens"}
    n_prompts = traces["prompt_id"].n_unique()
    for batch in (0, 1, 7, n_prompts, n_prompts + 5):
        seen: list[tuple[int, int]] = []
        steps, got = screen_and_segment(traces, smol_tokenizer, "chat", "quarantine", 8192, CAP, fn,
                                        batch_prompts=batch, progress=lambda d, t: seen.append((d, t)))
        assert_frame_equal(steps, want_steps)            # bit-identical, in the same order
        assert_frame_equal(got.kept, want.kept)
        assert_frame_equal(got.rejected.sort(pl.all()), want.rejected.sort(pl.all()))   # the same rows (in batch order)
        assert (got.control_token_rows, got.over_token_caps) == (want.control_token_rows, want.over_token_caps)
        assert got.kept.height + got.rejected.height == traces.height   # counts reconcile
        n = traces.height
        assert seen[-1] == (2 * n, 2 * n) and all(t == 2 * n for _, t in seen)
        assert [d for d, _ in seen] == sorted(d for d, _ in seen)


def test_no_cap_and_empty_input(smol_tokenizer):
    fn = lambda text: (segment(text, "paragraph"), None)  # noqa: E731
    rows = pl.DataFrame({"response_id": [f"r{i}" for i in range(6)], "prompt_id": [f"p{i // 2}" for i in range(6)],
                         "teacher": ["t"] * 6, "prompt": ["Q?"] * 6,
                         "response": ["A.\n\nB.", "One.", "x\n\ny\n\nz", "So. Yes", "Fine.\n\nOK", "7"],
                         "source_uri": ["u"] * 6, "source_sha256": ["0"] * 6, "source_row": list(range(6)),
                         "format": ["canonical"] * 6})
    want = segment_traces(rows, fn, smol_tokenizer)
    steps, got = screen_and_segment(rows, smol_tokenizer, "chat", "quarantine", 0, 0, fn, batch_prompts=1)
    assert_frame_equal(steps, want) and got.rejected.height == 0 and got.kept.height == 6
    empty, none = screen_and_segment(rows.head(0), smol_tokenizer, "chat", "quarantine", 8192, 100, fn)
    assert empty.height == 0 and none.kept.height == 0 and none.rejected.height == 0


def test_a_negative_batch_is_refused():
    from lalp_resources.settings import Settings

    with pytest.raises(ValueError, match="LALP_BATCH_PROMPTS"):
        Settings(batch_prompts=-1)
