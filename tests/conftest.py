"""Shared fixtures: the real SmolLM2 tokenizer/student (session-scoped) and tiny random models."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
ZEROEVAL = SHARED_DATA / "zeroeval-math-l5"

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def smol_tokenizer():
    from lalp_resources.student import load_tokenizer

    return load_tokenizer("smollm2")


@pytest.fixture(scope="session")
def smol_student():
    """The real SmolLM2-135M-Instruct student (fp32, CPU)."""
    from lalp_resources.student import load_student

    return load_student("smollm2", device="cpu", dtype="float32")


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


@pytest.fixture(scope="session")
def tiny_model(smol_tokenizer):
    return tiny_llama(len(smol_tokenizer))


def zeroeval_or_skip() -> Path:
    if not ZEROEVAL.is_dir():
        pytest.skip(f"{ZEROEVAL} is absent: the shared ZeroEval traces are needed for this test")
    return ZEROEVAL
