"""The scoring engine, in parts:

- `exact`     `ScoringEngine`: the exact LALP/GALP engine (planning, batches, pipelining).
- `plan`      tasks, units (trunk + branches), packing, and the tiles each attention path executes.
- `prefetch`  planner processes that tokenize later blocks' windows while the engine scores.
- `attention` the sparse attention over what a window sees, and the dense-mask fallback.
- `head`      the exact chunked LM head, device-side accumulation, and `window_sums` (per-token
              log-probs -> a cache row's sum, count and head sums, for any backend).
- `approx`    `ApproximateScoringEngine`: the opt-in step-sliding single pass (not exact).
- `types`     items, results, statistics, the cache protocol.

The torch-backed names load on first use, so a planner process (which needs only `plan` and
the tokenizer) starts without torch.
"""

from importlib import import_module

from lalp_resources.engine.types import (  # noqa: F401
    GALP_STEP, DictCache, EngineStats, ResponseScore, ScoreCache, ScoredChunk, ScoreItem, StepScore,
)

_LAZY = {"ScoringEngine": "exact", "ApproximateScoringEngine": "approx", "window_sums": "head"}

__all__ = [
    "ApproximateScoringEngine", "DictCache", "EngineStats", "GALP_STEP", "ResponseScore", "ScoreCache",
    "ScoredChunk", "ScoreItem", "ScoringEngine", "StepScore", "window_sums",
]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(import_module(f"{__name__}.{_LAZY[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
