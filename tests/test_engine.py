"""The packed engine equals the plain reference (the definition), and the consistency property."""

from __future__ import annotations

import random

import pytest
import torch

from lalp_resources.method.segmentation import segment
from lalp_resources.method.windows import WindowSpec
from lalp_resources.engine import DictCache, ScoreItem, ScoringEngine
from lalp_resources.reference import reference_score
from lalp_resources.method.tokenization import merge_unscored_steps, prefix_ids, tokenize_with_starts

from helpers import tiny_llama

TOL = 1e-4

WORDS = ["we", "have", "x", "=", "3.5", "so", "the", "sum", "is", "$\\frac{1}{2}$", "e.g.", "Fig.", "2", "then",
         "\\[a+b\\]", "therefore", "1.", "answer", "\\boxed{7}", "Note", "that", "(a)", "y^2", "+", "-", "!"]


def random_response(rng: random.Random, n_par: int) -> str:
    pars = []
    for _ in range(n_par):
        lines = []
        for _ in range(rng.randint(1, 3)):
            sent = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 9)))
            lines.append(sent.capitalize() + rng.choice([".", ".", "?", "!", ":"]))
        pars.append(rng.choice([" ", "\n"]).join(lines))
    return rng.choice(["\n\n", "\n\n\n", "\n \n"]).join(pars) + rng.choice(["", "\n", "\n\n"])


def make_items(tok, segmenter: str, n: int = 6, seed: int = 0) -> list[ScoreItem]:
    rng = random.Random(seed)
    prompts = ["Compute the sum of the roots.", "What is 3.5 + 1/2? Explain."]
    items = []
    for k in range(n):
        text = random_response(rng, rng.randint(1, 7))
        spans = merge_unscored_steps(tok, text, segment(text, segmenter))
        items.append(ScoreItem(f"r{k}", prompts[k % 2], text, spans))  # teachers share prompts
    return items


def assert_matches_reference(model, tok, items, window, template, **engine_kw):
    eng = ScoringEngine(model, tok, window=window, template=template, **engine_kw)
    out = eng.score_all(items)
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
        resp = next(r for r in out.responses if r.response_id == it.response_id)
        assert resp.galp_tokens == ref.galp_count
        worst = max(worst, abs(resp.galp - ref.galp), abs(resp.lalp - ref.lalp))
    assert worst < TOL, f"engine differs from the reference by {worst:.2e}"
    return eng


CASES = (
    # every segmenter with the default window, both templates
    [(seg, "fixed:4", tpl) for seg in ("paragraph", "line", "sentence") for tpl in ("chat", "plain")]
    # every window shape, including the fraction windows of paper v2
    + [("paragraph", w, "chat") for w in ("fixed:0", "fixed:2", "fraction:0.25", "fraction:0.6")]
    + [("sentence", "fraction:0.1", "plain")]
)


@pytest.mark.parametrize("segmenter,window,template", CASES)
def test_engine_equals_reference(tiny_model, smol_tokenizer, segmenter, window, template):
    items = make_items(smol_tokenizer, segmenter, seed=hash((segmenter, window, template)) % 1000)
    # small budgets so packing, several rows per batch and query chunking are all exercised
    assert_matches_reference(tiny_model, smol_tokenizer, items, window, template, row_tokens=96, batch_tokens=256, attn_budget=1 << 13)


def test_branches_cover_non_prefix_stable_tokenization(tiny_model, smol_tokenizer):
    """"\\n\\n" ends a window as one token but is two tokens before a word: the engine must score
    each window's own tokenization, so this case must produce branches and still match."""
    text = "First step.\n\nSecond step.\n\nThird step.\n\nFourth."
    a, _ = tokenize_with_starts(smol_tokenizer, text[: text.index("Second")])
    full, _ = tokenize_with_starts(smol_tokenizer, text)
    assert a != full[: len(a)], "premise: the tokenizer is not prefix-stable at paragraph ends"
    items = [ScoreItem("r", "Q?", text, segment(text, "paragraph"))]
    assert_matches_reference(tiny_model, smol_tokenizer, items, "fixed:1", "chat")


def test_consistency_full_window_equals_galp_grouped_by_step(tiny_model, smol_tokenizer):
    """docs/method.md: with a window covering all preceding steps, step scores equal GALP's token
    log-probs grouped by step (fp32, tolerance 1e-4). Line steps end in a single newline before
    a word, where the tokenizer is prefix-stable, so the property holds token for token."""
    text = "Let x = 2.\nThen x^2 = 4.\nAdd 3 to get 7.\nSo the answer is \\boxed{7}."
    spans = segment(text, "line")
    assert len(spans) == 4
    full_ids, full_starts = tokenize_with_starts(smol_tokenizer, text)
    for lo, hi in spans:  # premise: every window is a prefix of the full tokenization
        ids, _ = tokenize_with_starts(smol_tokenizer, text[:hi])
        assert ids == full_ids[: len(ids)]
    ref = reference_score(tiny_model, smol_tokenizer, "Q?", text, spans, "fixed:all", "chat")
    eng = ScoringEngine(tiny_model, smol_tokenizer, window="fixed:all", template="chat")
    out = eng.score_all([ScoreItem("r", "Q?", text, spans)])
    for (lo, hi), step in zip(spans, sorted(out.steps, key=lambda s: s.step_index)):
        lps = [lp for lp, s in zip(ref.galp_token_logprobs, ref.galp_token_starts) if lo <= s < hi]
        assert step.n_tokens == len(lps) > 0
        assert abs(step.mean_logprob - sum(lps) / len(lps)) < TOL
    # and everything came from one pass: the GALP trunk
    assert eng.stats.forward_calls == 2  # prefix + one trunk


def test_cache_sends_only_new_windows_to_the_model(tiny_model, smol_tokenizer):
    items = make_items(smol_tokenizer, "paragraph", n=4, seed=3)
    cache = DictCache()
    e1 = ScoringEngine(tiny_model, smol_tokenizer, cache=cache, namespace="tiny|chat|float32")
    r1 = e1.score_all(items)
    cache.store(r1.new_cache_rows)
    assert e1.stats.windows_scored == e1.stats.windows_total > 0
    e2 = ScoringEngine(tiny_model, smol_tokenizer, cache=cache, namespace="tiny|chat|float32")
    r2 = e2.score_all(items)
    assert e2.stats.windows_scored == 0 and e2.stats.tokens_forwarded == 0
    assert [s.mean_logprob for s in r2.steps] == pytest.approx([s.mean_logprob for s in r1.steps], nan_ok=True)
    # a new response: only its windows reach the model
    extra = make_items(smol_tokenizer, "paragraph", n=5, seed=3)[4:]
    e3 = ScoringEngine(tiny_model, smol_tokenizer, cache=cache, namespace="tiny|chat|float32")
    e3.score_all(items + extra)
    assert e3.stats.windows_scored == len(extra[0].spans) + 1  # its steps + its GALP
    # another namespace (student/dtype/template) never reuses scores
    e4 = ScoringEngine(tiny_model, smol_tokenizer, cache=cache, namespace="other|chat|float32")
    e4.score_all(items)
    assert e4.stats.windows_cached == 0


def test_out_of_memory_halves_the_batch_and_retries(tiny_model, smol_tokenizer, monkeypatch):
    items = make_items(smol_tokenizer, "paragraph", n=6, seed=5)
    eng = ScoringEngine(tiny_model, smol_tokenizer, row_tokens=64, batch_tokens=512)
    real = eng._forward_batch

    def flaky(batch, *a):
        if len(batch) > 1:  # pretend the device cannot hold more than one row
            raise torch.OutOfMemoryError("simulated CUDA out of memory")
        return real(batch, *a)

    monkeypatch.setattr(eng, "_forward_batch", flaky)
    out = eng.score_all(items)
    assert eng.stats.oom_retries > 0
    base = ScoringEngine(tiny_model, smol_tokenizer).score_all(items)
    assert [s.mean_logprob for s in out.steps] == pytest.approx([s.mean_logprob for s in base.steps], abs=TOL)


def test_long_trace_is_scored_without_truncation_in_chunks(smol_tokenizer):
    """A ~4k-token single-step trace (window = whole trace) with a tiny attention budget: the
    engine runs it in query chunks against the KV cache and still equals the reference."""
    model = tiny_llama(len(smol_tokenizer), seed=1)
    rng = random.Random(7)
    text = " ".join(rng.choice(WORDS) for _ in range(1800)) + "\n\nDone: \\boxed{7}."
    spans = segment(text, "paragraph")
    n_tok = len(tokenize_with_starts(smol_tokenizer, text)[0])
    assert n_tok > 3000
    eng = assert_matches_reference(model, smol_tokenizer, [ScoreItem("long", "Q?", text, spans)], "fixed:4", "plain",
                                   attn_budget=1 << 16)
    assert eng.stats.forward_calls > 4  # chunked, not one giant attention matrix
    assert eng.stats.windows_over_context == 0


def test_windows_past_the_trained_context_are_scored_and_counted(smol_tokenizer):
    """Past max_position_embeddings a window is still scored in full (== reference), and counted."""
    model = tiny_llama(len(smol_tokenizer), seed=2, max_position_embeddings=64)
    rng = random.Random(3)
    short = "Yes.\n\nSo 4."
    long = "\n\n".join(" ".join(rng.choice(WORDS) for _ in range(30)) for _ in range(3))
    items = [ScoreItem("short", "Q?", short, segment(short, "paragraph")),
             ScoreItem("long", "Q?", long, segment(long, "paragraph"))]
    eng = assert_matches_reference(model, smol_tokenizer, items, "fixed:4", "plain")
    pre = len(prefix_ids(smol_tokenizer, "Q?", "plain"))
    n_long = len(tokenize_with_starts(smol_tokenizer, long)[0])
    assert pre + n_long > 64 and pre + len(tokenize_with_starts(smol_tokenizer, short)[0]) <= 64
    # fixed:4 windows all start at the first step here; GALP is the whole response
    ends = [pre + len(tokenize_with_starts(smol_tokenizer, long[:hi])[0]) for _, hi in items[1].spans]
    expected = sum(n > 64 for n in ends) + 1
    assert expected >= 2 and eng.stats.windows_over_context == expected


def test_window_spec():
    w = WindowSpec.parse("fixed:4")
    assert [w.width(i) for i in range(7)] == [0, 1, 2, 3, 4, 4, 4]
    f = WindowSpec.parse("fraction:0.25")
    assert [f.width(i) for i in range(10)] == [0, 1, 1, 1, 1, 2, 2, 2, 2, 3]
    assert WindowSpec.parse("fixed:all").width(1000) == 1000
    assert str(WindowSpec.parse("fraction:0.10")) == "fraction:0.1"
    for bad in ("fixed", "fixed:-1", "fraction:2", "sliding:3", "fixed:x"):
        with pytest.raises(ValueError):
            WindowSpec.parse(bad)


def test_merge_unscored_steps_gives_every_step_a_token(smol_tokenizer):
    text = "The value is 4. Yes. So it is 4."
    spans = segment(text, "sentence")
    merged = merge_unscored_steps(smol_tokenizer, text, spans)
    assert "".join(text[a:b] for a, b in merged) == text
    _, starts = tokenize_with_starts(smol_tokenizer, text)
    for a, b in merged:
        assert any(a <= s < b for s in starts)


@pytest.mark.slow
def test_real_student_engine_equals_reference(smol_student):
    """The bundled SmolLM2 student in float32 on real-looking traces: engine == reference < 1e-4."""
    tok = smol_student.tokenizer
    items = make_items(tok, "paragraph", n=3, seed=11) + make_items(tok, "sentence", n=2, seed=12)
    items = [ScoreItem(f"x{k}", it.prompt, it.text, it.spans) for k, it in enumerate(items)]
    for window, template in (("fixed:4", "chat"), ("fraction:0.25", "plain")):
        assert_matches_reference(smol_student.model, tok, items, window, template)


def test_approximate_single_pass_mode_is_opt_in_and_close(tiny_model, smol_tokenizer):
    """The step-sliding single pass: with a window covering every step and prefix-stable steps it
    is exact; with a short window it differs (context tokens see other histories) and is keyed
    apart in the cache so it can never be served as an exact score."""
    text = "Let x = 2.\nThen x^2 = 4.\nAdd 3 to get 7.\nSo the answer is \\boxed{7}.\nDone here."
    items = [ScoreItem("r", "Q?", text, segment(text, "line"))]
    exact_all = ScoringEngine(tiny_model, smol_tokenizer, window="fixed:all").score_all(items)
    approx_all = ScoringEngine(tiny_model, smol_tokenizer, window="fixed:all", approx=True).score_all(items)
    for e, a in zip(exact_all.steps, approx_all.steps):
        assert a.n_tokens == e.n_tokens and abs(a.mean_logprob - e.mean_logprob) < TOL
    cache = DictCache()
    exact = ScoringEngine(tiny_model, smol_tokenizer, window="fixed:1", cache=cache)
    r = exact.score_all(items)
    cache.store(r.new_cache_rows)
    approx = ScoringEngine(tiny_model, smol_tokenizer, window="fixed:1", cache=cache, approx=True)
    ra = approx.score_all(items)
    assert approx.stats.windows_scored == len(items[0].spans)  # GALP (exact) came from the cache
    diffs = [abs(a.mean_logprob - e.mean_logprob) for a, e in zip(ra.steps, r.steps)]
    assert diffs[0] < TOL and diffs[1] < TOL  # steps 0-1 see the same history in both
    assert max(diffs) > TOL  # later context tokens see a different history: not exact
    assert approx.stats.tokens_forwarded < exact.stats.tokens_forwarded


def test_progress_is_reported_within_a_group(tiny_model, smol_tokenizer):
    text = "\n\n".join(f"Paragraph {i} says something about x and y." for i in range(30))
    items = [ScoreItem(f"r{k}", f"Q{k % 2}", text, segment(text, "paragraph")) for k in range(4)]
    seen = []
    ScoringEngine(tiny_model, smol_tokenizer, row_tokens=128, batch_tokens=256).score_all(
        items, progress=lambda done, total, stats: seen.append((done, total, stats.seconds)))
    total = sum(len(it.spans) + 1 for it in items)
    assert len(seen) > 3 and seen[-1][:2] == (total, total)
    assert all(a[0] <= b[0] for a, b in zip(seen, seen[1:])) and seen[0][0] < total
    assert all(s > 0 for _, _, s in seen)
