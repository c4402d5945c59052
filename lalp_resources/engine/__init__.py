"""The scoring engine, in parts:

- `exact`     `ScoringEngine`: the exact LALP/GALP engine (planning, batches, pipelining).
- `plan`      tasks, units (trunk + branches), packing, and the tiles each attention path executes.
- `attention` the sparse attention over what a window sees, and the dense-mask fallback.
- `head`      the exact chunked LM head, device-side accumulation, and `window_sums` (per-token
              log-probs -> a cache row's sum, count and head sums, for any backend).
- `approx`    `ApproximateScoringEngine`: the opt-in step-sliding single pass (not exact).
- `types`     items, results, statistics, the cache protocol.
"""

from lalp_resources.engine.types import (  # noqa: F401
    GALP_STEP, DictCache, EngineStats, ResponseScore, ScoreCache, ScoredChunk, ScoreItem, StepScore,
)
from lalp_resources.engine.head import window_sums  # noqa: F401
from lalp_resources.engine.exact import ScoringEngine  # noqa: F401
from lalp_resources.engine.approx import ApproximateScoringEngine  # noqa: F401

__all__ = [
    "ApproximateScoringEngine", "DictCache", "EngineStats", "GALP_STEP", "ResponseScore", "ScoreCache",
    "ScoredChunk", "ScoreItem", "ScoringEngine", "StepScore", "window_sums",
]
