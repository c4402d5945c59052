"""What several test modules need, in one place: paths, tiny random students, trace writers and
a temporary Dagster instance. Test modules import from here, never from each other."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
ZEROEVAL = SHARED_DATA / "zeroeval-math-l5"


def tiny_llama(vocab_size: int, seed: int = 0, **overrides):
    """A tiny random Llama built from a config (no weights downloaded)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = dict(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8192,
    )
    cfg.update(overrides)
    model = LlamaForCausalLM(LlamaConfig(**cfg)).eval()
    model.config._attn_implementation = "sdpa"
    return model


def save_tiny_student(folder: Path, tokenizer, seed: int = 5, **overrides) -> Path:
    """A tiny random Llama plus the given tokenizer, saved as a local HF model directory."""
    folder.mkdir(parents=True, exist_ok=True)
    tiny_llama(len(tokenizer), seed=seed, **overrides).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def load_saved_student(folder: Path):
    """A student saved by `save_tiny_student`, loaded as transformers does, fp32, for the reference."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, attn_implementation="sdpa").eval()


def zeroeval_or_skip() -> Path:
    if not ZEROEVAL.is_dir():
        pytest.skip(f"{ZEROEVAL} is absent: the shared ZeroEval traces are needed for this test")
    return ZEROEVAL


def zeroeval_traces():
    """The shared ZeroEval traces as canonical rows (skips where they are absent)."""
    from lalp_resources import adapters

    files = sorted(str(p) for p in zeroeval_or_skip().glob("*.json") if p.name != "summary.json")
    limits = adapters.Limits(max_prompt_chars=100_000, max_response_chars=200_000, max_teacher_chars=256,
                             max_prompt_id_chars=256)
    return adapters.ingest(files, "zeroeval", teacher_mode="model", limits=limits, verify=False).traces


WORDS = "we note that the sum of x and y equals z so the answer follows from it".split()


def write_traces(path: Path, n_prompts: int, teachers=("t1", "t2"), paragraphs: int = 8, seed: int = 0) -> Path:
    """Canonical JSONL traces: every teacher answers every prompt, with a boxed correct answer."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for p in range(n_prompts):
            for t in teachers:
                pars = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 40))) + "." for _ in range(paragraphs)]
                resp = "\n\n".join(pars) + f"\n\nSo the answer is \\boxed{{{p}}}."
                f.write(json.dumps({"prompt_id": f"q{p}", "prompt": f"Question {p}: what is {p}?", "teacher": t,
                                    "response": resp, "reference_answer": str(p)}) + "\n")
    return path


def temp_dagster_home(root: Path) -> Path:
    """A fresh DAGSTER_HOME with the repository's dagster.yaml (SQLite storage, pools, run monitoring)."""
    home = root / "dagster_home"
    home.mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO / "dagster_home" / "dagster.yaml", home / "dagster.yaml")
    return home


# --------------------------------------------------------------------------- adapters

# The pipeline's limits (lalp_resources/settings.py declares them); tests spell them out.
LIMIT_DEFAULTS = dict(max_prompt_chars=100_000, max_response_chars=200_000, max_teacher_chars=256,
                      max_prompt_id_chars=256)


def limits(**overrides):
    """An adapters.Limits with the pipeline's default numbers, some overridden."""
    from lalp_resources.adapters import Limits

    return Limits(**{**LIMIT_DEFAULTS, **overrides})


def trace_row(pid="p1", teacher="t1", prompt="What is 1+1?", response="1+1 = \\boxed{2}", **extra) -> dict:
    """One canonical trace row."""
    return {"prompt_id": pid, "prompt": prompt, "teacher": teacher, "response": response, **extra}


def write_lines(path: Path, lines: list) -> Path:
    """Write JSONL: dicts are dumped, str encoded, bytes written as is."""
    out = []
    for line in lines:
        if isinstance(line, dict):
            line = json.dumps(line)
        if isinstance(line, str):
            line = line.encode("utf-8")
        out.append(line)
    path.write_bytes(b"\n".join(out) + b"\n")
    return path


def check_ingest_invariants(res, lim=None) -> None:
    """What must hold for any adapters result: schemas, reconciliation, known reasons, unique
    ids, one response per (prompt_id, teacher), every accepted field within the limits."""
    import polars as pl

    from lalp_resources.adapters import QUARANTINE_COLUMNS, REASONS, TRACE_COLUMNS

    assert res.traces.columns == TRACE_COLUMNS
    assert res.quarantine.columns == QUARANTINE_COLUMNS
    assert res.traces.schema["source_row"] == pl.Int64
    assert res.traces.schema["is_correct"] == pl.Boolean
    assert res.n_read == res.traces.height + res.quarantine.height
    assert set(res.quarantine["reason"].to_list()) <= set(REASONS)
    assert res.quarantine["detail"].null_count() == 0
    assert (res.quarantine["raw_excerpt"].str.len_chars() <= 300).all()
    s = res.summary()
    assert s["read"] == res.n_read and s["accepted"] + s["quarantined"] == s["read"]
    assert sum(s["by_reason"].values()) == s["quarantined"]
    assert res.traces["response_id"].n_unique() == res.traces.height
    assert res.traces.select("prompt_id", "teacher").is_duplicated().sum() == 0
    if lim is not None and res.traces.height:
        longest = res.traces.select(pl.col(c).str.len_chars().max() for c in ("prompt_id", "teacher", "prompt", "response"))
        row = longest.row(0, named=True)
        assert row["prompt_id"] <= lim.max_prompt_id_chars and row["teacher"] <= lim.max_teacher_chars
        assert row["prompt"] <= lim.max_prompt_chars and row["response"] <= lim.max_response_chars


# --- scoring-engine helpers (tests/test_engine.py, tests/test_gpu.py) -------------------------

ENGINE_WORDS = ["we", "have", "x", "=", "3.5", "so", "the", "sum", "is", "$\\frac{1}{2}$", "e.g.", "Fig.", "2",
                "then", "\\[a+b\\]", "therefore", "1.", "answer", "\\boxed{7}", "Note", "that", "(a)", "y^2", "+",
                "-", "!"]
ENGINE_TOL = 1e-4


def random_response(rng: random.Random, n_par: int) -> str:
    pars = []
    for _ in range(n_par):
        lines = []
        for _ in range(rng.randint(1, 3)):
            sent = " ".join(rng.choice(ENGINE_WORDS) for _ in range(rng.randint(2, 9)))
            lines.append(sent.capitalize() + rng.choice([".", ".", "?", "!", ":"]))
        pars.append(rng.choice([" ", "\n"]).join(lines))
    return rng.choice(["\n\n", "\n\n\n", "\n \n"]).join(pars) + rng.choice(["", "\n", "\n\n"])


def make_engine_items(tok, segmenter: str, n: int = 6, seed: int = 0):
    """Random math-flavoured responses to two shared prompts, segmented and merged."""
    from lalp_resources.engine import ScoreItem
    from lalp_resources.method.segmentation import segment
    from lalp_resources.method.tokenization import merge_unscored_steps

    rng = random.Random(seed)
    prompts = ["Compute the sum of the roots.", "What is 3.5 + 1/2? Explain."]
    items = []
    for k in range(n):
        text = random_response(rng, rng.randint(1, 7))
        spans = merge_unscored_steps(tok, text, segment(text, segmenter))
        items.append(ScoreItem(f"r{k}", prompts[k % 2], text, spans))  # teachers share prompts
    return items


def assert_matches_reference(model, tok, items, window, template, engine_cls=None, **engine_kw):
    """Score with the engine and with `reference_score`; every step mean, LALP and GALP agree
    within ENGINE_TOL and every token count is equal. Returns the engine."""
    from lalp_resources.engine import ScoringEngine
    from lalp_resources.reference import reference_score

    eng = (engine_cls or ScoringEngine)(model, tok, window=window, template=template, **engine_kw)
    assert_chunk_matches_reference(model, tok, items, eng.score_all(items), window, template)
    return eng


def assert_chunk_matches_reference(model, tok, items, out, window, template) -> None:
    """Scores of `items` (a ScoredChunk, from any backend) against `reference_score`: every step
    mean, head sum, LALP and GALP within ENGINE_TOL and every token count equal."""
    from lalp_resources.reference import reference_score

    by_id = {}
    for s in out.steps:
        by_id.setdefault(s.response_id, []).append(s)
    worst = 0.0
    for it in items:
        ref = reference_score(model, tok, it.prompt, it.text, it.spans, window, template)
        got = sorted(by_id[it.response_id], key=lambda s: s.step_index)
        assert [s.n_tokens for s in got] == ref.step_counts
        for s, rs, rc in zip(got, ref.step_sums, ref.step_counts):
            if rc:
                worst = max(worst, abs(s.mean_logprob - rs / rc))
        # the head sums (first 1 and 2 scored tokens of each window): present exactly where the reference has them
        for s, h1, h2 in zip(got, ref.step_head1, ref.step_head2):
            assert (s.head1_logprob is None, s.head2_logprob is None) == (h1 is None, h2 is None), (s, h1, h2)
            for g, w in ((s.head1_logprob, h1), (s.head2_logprob, h2)):
                if w is not None:
                    worst = max(worst, abs(g - w))
        resp = next(r for r in out.responses if r.response_id == it.response_id)
        assert resp.galp_tokens == ref.galp_count
        worst = max(worst, abs(resp.galp - ref.galp), abs(resp.lalp - ref.lalp))
    assert worst < ENGINE_TOL, f"scores differ from the reference by {worst:.2e}"
