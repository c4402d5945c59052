"""GPU checks: the engine equals the reference on CUDA in float32, with packed rows, chunked long
rows and every window kind. They skip on machines without CUDA (CI has none); on a GPU lease run
them with `python3 -m benchmarks.gpu_check`. The tokenizer comes from the benchmark bundle (`.devbundle`,
which a lease can carry) or, where the embedded student is installed, from it."""

from __future__ import annotations

import random

import pytest
import torch

from helpers import REPO, tiny_llama
from lalp_resources.method.segmentation import segment
from lalp_resources.engine import ScoreItem
from test_engine import WORDS, assert_matches_reference, make_items

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


@pytest.mark.parametrize("window,template,segmenter", [
    ("fixed:4", "chat", "paragraph"), ("fraction:0.25", "plain", "sentence"), ("fixed:2", "chat", "line"),
])
def test_engine_equals_reference_on_cuda_fp32(student_shaped, tok, window, template, segmenter):
    items = make_items(tok, segmenter, n=8, seed=21)
    eng = assert_matches_reference(student_shaped, tok, items, window, template)
    assert eng.stats.forward_calls >= 1


def test_long_row_is_chunked_on_cuda_and_still_exact(tok):
    model = tiny_llama(len(tok), seed=1).to("cuda")
    rng = random.Random(7)
    text = " ".join(rng.choice(WORDS) for _ in range(1800)) + "\n\nDone: \\boxed{7}."
    eng = assert_matches_reference(model, tok, [ScoreItem("long", "Q?", text, segment(text, "paragraph"))],
                                   "fixed:4", "plain", attn_budget=1 << 16)
    assert eng.stats.forward_calls > 4


def test_bundle_is_present_for_the_benchmark():
    """The GPU benchmark reads .devbundle (the shared data and the weights cannot reach a lease)."""
    assert (BUNDLE / "rows.jsonl").is_file(), (
        f"{BUNDLE} is missing: write it before the lease with "
        "`python -m benchmarks.benchmark --prompts 24 --write-bundle .devbundle`"
    )
