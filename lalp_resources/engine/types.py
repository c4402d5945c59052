"""What the engine takes and gives back: items, scores, the cache protocol and its statistics."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

GALP_STEP = -1  # step index used for the whole-response (GALP) task


@dataclass
class ScoreItem:
    response_id: str
    prompt: str
    text: str
    spans: Sequence[tuple[int, int]]


@dataclass
class StepScore:
    response_id: str
    step_index: int
    n_tokens: int
    sum_logprob: float
    cached: bool
    # log-prob sums of the step window's first 1 and first 2 scored tokens (DROP-1/2); None where the
    # step has fewer tokens, or its score came from a cache row written before head sums existed
    head1_logprob: float | None = None
    head2_logprob: float | None = None

    @property
    def mean_logprob(self) -> float:
        return self.sum_logprob / self.n_tokens if self.n_tokens else float("nan")


@dataclass
class ResponseScore:
    response_id: str
    n_steps: int
    lalp: float
    galp: float
    galp_tokens: int


@dataclass
class ScoredChunk:
    """Results for a group of prompts, complete: safe to commit as one unit."""

    steps: list[StepScore]
    responses: list[ResponseScore]
    # (key, sum_logprob, n_tokens, head1_logprob, head2_logprob) computed by the model
    new_cache_rows: list[tuple[str, float, int, float | None, float | None]]


@dataclass
class EngineStats:
    windows_total: int = 0
    windows_cached: int = 0
    windows_scored: int = 0
    tokens_forwarded: int = 0     # response tokens through the model (trunks and branches)
    prefix_tokens: int = 0        # prompt-prefix tokens through the model
    padded_tokens: int = 0        # padding positions the model computed (dense path only)
    scored_tokens: int = 0
    forward_calls: int = 0
    windows_tokenized_alone: int = 0  # windows not derived from their response's tokens (short, or no clean join)
    batches: int = 0
    host_copies: int = 0          # device-to-host copies of results (one per batch)
    attention_flops: float = 0.0  # attention FLOPs over the keys each query sees (QK^T and PV)
    head_positions: int = 0       # positions through the LM head
    oom_retries: int = 0
    windows_over_context: int = 0  # scored, but longer than the student was trained on
    attention: str = ""           # the attention path used: "sparse" or "dense"
    seconds: float = 0.0
    host_seconds: float = 0.0     # planning, packing and assembly (no model work)

    def as_dict(self) -> dict:
        return dict(self.__dict__)


class ScoreCache(Protocol):
    """key -> (sum_logprob, n_tokens, head1_logprob, head2_logprob); a cache from an earlier release
    may give (sum_logprob, n_tokens) or None head sums (see `cache_row`)."""

    def lookup(self, keys: list[str]) -> dict[str, tuple]: ...


def cache_row(hit: Sequence) -> tuple[float, int, float | None, float | None]:
    """A cache hit as (sum, n, head1, head2): a row without head sums (an earlier release's)
    keeps its score and has None heads; NaN heads read as None."""
    s, n, *heads = hit
    h1, h2 = (list(heads) + [None, None])[:2]
    clean = lambda h: None if h is None or h != h else float(h)  # noqa: E731
    return float(s), int(n), clean(h1), clean(h2)


class DictCache:
    """In-memory cache (for the CLI and tests); the warehouse provides the DuckDB one."""

    def __init__(self):
        self.data: dict[str, tuple[float, int]] = {}

    def lookup(self, keys):
        return {k: self.data[k] for k in keys if k in self.data}

    def store(self, rows):
        """rows: (key, sum, n) or (key, sum, n, head1, head2)."""
        for k, *row in rows:
            self.data[k] = cache_row(row)
