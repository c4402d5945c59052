"""Shared fixtures: the real SmolLM2 tokenizer/student (session-scoped) and tiny random models."""

from __future__ import annotations

import os

import pytest

from helpers import REPO, SHARED_DATA, ZEROEVAL, tiny_llama, zeroeval_or_skip  # noqa: F401  (re-exported)

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


@pytest.fixture(scope="session")
def tiny_model(smol_tokenizer):
    return tiny_llama(len(smol_tokenizer))
