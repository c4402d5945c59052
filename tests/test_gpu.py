"""GPU checks: the engine equals the reference on CUDA in float32, with packed rows, chunked long
rows and every window kind. They skip on machines without CUDA (CI has none); on a GPU lease run
them with `python3 -m benchmarks.gpu_check`. The tokenizer comes from the benchmark bundle (`.devbundle`,
which a lease can carry) or, where the embedded student is installed, from it."""

from __future__ import annotations

import random

import pytest
import torch

from helpers import REPO, assert_matches_reference, make_engine_items, tiny_llama
from helpers import ENGINE_WORDS as WORDS
from lalp_resources.method.segmentation import segment
from lalp_resources.engine import ScoreItem

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (python3 -m benchmarks.gpu_check on a GPU lease)")

BUNDLE = REPO / ".devbundle"


@pytest.fixture(scope="module")
def tok():
    if (BUNDLE / "student" / "tokenizer.json").is_file():
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(BUNDLE / "student")
    from lalp_resources.student import load_tokenizer

    return load_tokenizer("smollm2")


@pytest.fixture(scope="module")
def student_shaped(tok):
    """The bundled student's architecture (or a tiny Llama) with random weights, fp32 on CUDA."""
    cfg_dir = BUNDLE / "student"
    if (cfg_dir / "config.json").is_file():
        from transformers import AutoConfig, AutoModelForCausalLM

        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(cfg_dir), dtype=torch.float32,
                                                 attn_implementation="sdpa")
    else:
        model = tiny_llama(len(tok), seed=0)
    return model.to("cuda").eval()


@pytest.mark.parametrize("attention", ["sparse", "dense"])
@pytest.mark.parametrize("window,template,segmenter", [
    ("fixed:4", "chat", "paragraph"), ("fraction:0.25", "plain", "sentence"), ("fixed:2", "chat", "line"),
])
def test_engine_equals_reference_on_cuda_fp32(student_shaped, tok, window, template, segmenter, attention):
    """Both attention paths on CUDA (the sparse one runs fused SDPA kernels there)."""
    items = make_engine_items(tok, segmenter, n=8, seed=21)
    eng = assert_matches_reference(student_shaped, tok, items, window, template, attention=attention)
    assert eng.stats.forward_calls >= 1 and eng.stats.attention == attention
    assert eng.stats.host_copies == eng.stats.batches + (attention == "dense")


def test_long_row_is_chunked_on_cuda_and_still_exact(tok):
    model = tiny_llama(len(tok), seed=1).to("cuda")
    rng = random.Random(7)
    text = " ".join(rng.choice(WORDS) for _ in range(1800)) + "\n\nDone: \\boxed{7}."
    for attention in ("sparse", "dense"):
        eng = assert_matches_reference(model, tok, [ScoreItem("long", "Q?", text, segment(text, "paragraph"))],
                                       "fixed:4", "plain", attn_budget=1 << 16, attention=attention, query_chunk=64)
        assert eng.stats.forward_calls > 4 or attention == "sparse"


def test_bundle_is_present_for_the_benchmark():
    """The GPU benchmark reads .devbundle (the shared data and the weights cannot reach a lease)."""
    assert (BUNDLE / "rows.jsonl").is_file(), (
        f"{BUNDLE} is missing: write it before the lease with "
        "`python -m benchmarks.benchmark --prompts 24 --write-bundle .devbundle`"
    )
