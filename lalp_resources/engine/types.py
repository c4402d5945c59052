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
    new_cache_rows: list[tuple[str, float, int]]  # (key, sum_logprob, n_tokens) computed by the model


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
    def lookup(self, keys: list[str]) -> dict[str, tuple[float, int]]: ...


class DictCache:
    """In-memory cache (for the CLI and tests); the warehouse provides the DuckDB one."""

    def __init__(self):
        self.data: dict[str, tuple[float, int]] = {}

    def lookup(self, keys):
        return {k: self.data[k] for k in keys if k in self.data}

    def store(self, rows):
        for k, s, n in rows:
            self.data[k] = (s, n)
