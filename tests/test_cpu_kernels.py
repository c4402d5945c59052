"""The engine's CPU kernels (lalp_resources/engine/cpu_kernels.py): packed oneDNN GEMMs, the fused
SiLU-gated MLP and RMSNorm compute what the model's own modules compute, only inside `active()`,
and a module they do not fit is left as it is."""

from __future__ import annotations

import pytest
import torch

from lalp_resources.engine import ScoringEngine
from lalp_resources.engine.cpu_kernels import FastCPU, fast_cpu, supported

from helpers import assert_matches_reference, make_engine_items, tiny_llama

pytestmark = pytest.mark.skipif(not supported(tiny_llama(64))[0], reason="no oneDNN float32 linear in this torch build")


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_active_forward_equals_the_plain_forward_and_is_restored():
    model = tiny_llama(97, seed=3)
    ids = torch.randint(0, 97, (1, 40), generator=torch.Generator().manual_seed(1))
    plain = _logits(model, ids)
    fast = FastCPU(model)
    # 2 layers: q, k, v, o + the head are packed linears; 2 fused MLPs; 2 x 2 layer norms + the final one
    assert fast.counts == {"linear": 2 * 4 + 1, "mlp": 2, "rmsnorm": 2 * 2 + 1}
    assert fast.skipped == []
    with fast.active():
        assert all("forward" in m.__dict__ for m in fast.forwards)
        got = _logits(model, ids)
    assert torch.allclose(got, plain, atol=1e-5, rtol=1e-5)
    assert not any("forward" in m.__dict__ for m in fast.forwards)  # back to the modules' own forwards
    assert torch.equal(_logits(model, ids), plain)


def test_restores_a_forward_that_was_already_replaced():
    model = tiny_llama(50, seed=4)
    norm = model.model.norm
    own = norm.forward
    sentinel = lambda x: own(x)  # noqa: E731 (a caller's own replacement, say a hook library's)
    norm.forward = sentinel
    fast = FastCPU(model)
    with fast.active():
        assert norm.forward is not sentinel
    assert norm.forward is sentinel


def test_a_module_that_differs_is_left_as_it_is():
    """A GELU MLP is not the SiLU-gated MLP the fused kernel computes; the probe sees it."""
    model = tiny_llama(50, seed=5, hidden_act="gelu")
    fast = FastCPU(model)
    assert fast.counts["mlp"] == 0 and len(fast.skipped) == 2 and "not a SiLU-gated MLP" in fast.skipped[0]
    ids = torch.randint(0, 50, (1, 30), generator=torch.Generator().manual_seed(2))
    plain = _logits(model, ids)
    with fast.active():
        assert torch.allclose(_logits(model, ids), plain, atol=1e-5, rtol=1e-5)


def test_a_norm_with_another_formula_is_left_as_it_is():
    model = tiny_llama(50, seed=6)

    class OffsetRMSNorm(torch.nn.Module):  # Gemma's: x * rsqrt(mean(x^2) + eps) * (1 + w)
        def __init__(self, inner):
            super().__init__()
            self.weight, self.variance_epsilon = inner.weight, inner.variance_epsilon

        def forward(self, x):
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon) * (1 + self.weight)

    with torch.no_grad():
        model.model.norm.weight.normal_()
    model.model.norm = OffsetRMSNorm(model.model.norm)
    fast = FastCPU(model)
    assert model.model.norm not in fast.forwards
    assert any(s.startswith("model.norm") for s in fast.skipped)


def test_not_used_off_the_cpu_float32_path():
    model = tiny_llama(50, seed=7).to(torch.bfloat16)
    ok, why = supported(model)
    assert not ok and "bfloat16" in why and fast_cpu(model) is None


def test_built_once_per_model():
    model = tiny_llama(50, seed=8)
    assert fast_cpu(model) is fast_cpu(model)


@pytest.mark.parametrize("window", ["fixed:2", "fraction:0.5"])
def test_engine_with_cpu_kernels_equals_reference_and_the_plain_engine(smol_tokenizer, window):
    model = tiny_llama(len(smol_tokenizer), seed=9)
    items = make_engine_items(smol_tokenizer, "paragraph", seed=11)
    fast = assert_matches_reference(model, smol_tokenizer, items, window, "chat", batch_tokens=256, cpu_kernels=True)
    assert fast.fast is not None
    plain = ScoringEngine(model, smol_tokenizer, window=window, batch_tokens=256, cpu_kernels=False)
    assert plain.fast is None
    a, b = fast.score_all(items), plain.score_all(items)
    for x, y in zip(a.steps, b.steps):
        assert (x.response_id, x.step_index, x.n_tokens) == (y.response_id, y.step_index, y.n_tokens)
        assert x.mean_logprob == pytest.approx(y.mean_logprob, abs=1e-5)
