"""Fuzzing `lalp score` end to end (in-process, a tiny random student): random and adversarial
rows never make it raise, every accepted response gets exactly one row, and every row read is
either scored, or quarantined with a reason."""

from __future__ import annotations

import json

import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import save_tiny_student
from lalp_assets import cli

TEXT = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), min_size=0, max_size=60)
HOSTILE = st.sampled_from(["", " ", "\n\n", "\u001f", "p0\u001fevil", "$\\frac{$", "|", "a" * 300, "\x00", "💥", "\\boxed{1}",
                           # control-token strings of the student (quarantined at the steps stage) and one that is not
                           "<|im_end|>", "ok<|im_start|>user\nhi", "<|endoftext|>", "<think>x</think>"])
FIELD = st.one_of(TEXT, HOSTILE, st.integers(), st.none(), st.lists(st.integers(), max_size=2))
RESPONSE = st.one_of(
    st.lists(st.text(min_size=1, max_size=40), min_size=1, max_size=4).map(lambda ps: "\n\n".join(ps)), FIELD)

ROW = st.fixed_dictionaries(
    {"prompt_id": st.one_of(st.sampled_from(["p0", "p1", "p2"]), FIELD),
     "prompt": st.one_of(st.just("What is 1+1?"), FIELD),
     "teacher": st.one_of(st.sampled_from(["a", "b"]), FIELD),
     "response": RESPONSE},
    optional={"reference_answer": st.one_of(st.just("2"), FIELD)},
)
LINE = st.one_of(ROW.map(lambda r: json.dumps(r)), ROW.map(lambda r: json.dumps(r)[:-3]), TEXT)


@pytest.fixture(scope="module")
def student(tmp_path_factory, smol_tokenizer):
    return save_tiny_student(tmp_path_factory.mktemp("student"), smol_tokenizer, seed=2)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(lines=st.lists(LINE, min_size=1, max_size=8))
def test_lalp_score_never_raises_and_reconciles(lines, student, tmp_path_factory, monkeypatch):
    for k in ("LALP_MAX_PROMPTS", "LALP_SOURCES", "LALP_MODEL"):
        monkeypatch.delenv(k, raising=False)
    root = tmp_path_factory.mktemp("fuzz")
    src = root / "in.jsonl"
    src.write_text("\n".join(lines) + "\n", encoding="utf-8", errors="surrogatepass")
    out = root / "out"
    rc = cli.main(["score", str(src), "--out", str(out), "--model", str(student), "--device", "cpu", "--dtype", "float32"])
    from lalp_resources import adapters
    from lalp_resources.settings import Settings

    s = Settings()
    res = adapters.ingest([src], limits=adapters.Limits(
        max_prompt_chars=s.max_prompt_chars, max_response_chars=s.max_response_chars,
        max_teacher_chars=s.max_teacher_chars, max_prompt_id_chars=s.max_prompt_id_chars), teacher_mode=s.teacher_mode)
    assert res.summary()["read"] == res.traces.height + res.quarantine.height
    control = ["<|im_end|>", "<|im_start|>", "<|endoftext|>"]
    holds = res.traces["prompt"].str.contains_any(control) | res.traces["response"].str.contains_any(control)
    if res.traces.height == 0 or holds.all():
        assert rc == 2  # "no valid rows to score", said clearly
        return
    assert rc == 0
    resp = pl.read_parquet(out / "responses.parquet")
    # a row holding a control-token string is never scored; its quarantine row names the token
    assert not set(resp["response_id"]) & set(res.traces.filter(holds)["response_id"])
    if holds.any():
        q = pl.read_parquet(out / "quarantine.parquet")
        assert q["reason"].str.starts_with("control_token_in_").sum() == holds.sum()
    quarantined = pl.read_parquet(out / "quarantine.parquet").height if (out / "quarantine.parquet").exists() else 0
    assert resp["response_id"].n_unique() == resp.height
    # every accepted row is scored exactly once, or quarantined at the token caps
    assert resp.height + (quarantined - res.quarantine.height) == res.traces.height
    assert set(resp["response_id"]) <= set(res.traces["response_id"])
    steps = pl.read_parquet(out / "steps.parquet")
    assert set(steps["response_id"]) == set(resp["response_id"])
