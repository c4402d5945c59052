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


def zeroeval_or_skip() -> Path:
    if not ZEROEVAL.is_dir():
        pytest.skip(f"{ZEROEVAL} is absent: the shared ZeroEval traces are needed for this test")
    return ZEROEVAL


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
