"""The plain reference implementation of LALP and GALP: one forward pass per window, the prefix
recomputed every time, full-vocabulary logits at every position. Slow on purpose; it is the
definition in docs/method.md written as directly as possible, kept for tests and the benchmark."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lalp_resources.engine.head import window_sums
from lalp_resources.method.windows import WindowSpec
from lalp_resources.method.tokenization import prefix_ids, scored_range, tokenize_with_starts


@dataclass
class ReferenceResult:
    step_sums: list[float]      # sum of scored-token log-probs per step
    step_counts: list[int]      # scored tokens per step
    step_head1: list[float | None]  # log-prob of each step's first scored token (None: no token)
    step_head2: list[float | None]  # sum over its first two (None: under two tokens)
    galp_sum: float
    galp_count: int
    galp_token_logprobs: list[float]
    galp_token_starts: list[int]

    @property
    def step_means(self) -> list[float]:
        return [s / n if n else float("nan") for s, n in zip(self.step_sums, self.step_counts)]

    @property
    def lalp(self) -> float:
        means = [m for m, n in zip(self.step_means, self.step_counts) if n]
        return sum(means) / len(means) if means else float("nan")

    @property
    def galp(self) -> float:
        return self.galp_sum / self.galp_count if self.galp_count else float("nan")


@torch.no_grad()
def token_logprobs(model, prefix: list[int], ids: list[int]) -> list[float]:
    """log p(ids[j] | prefix, ids[:j]) for every j, from one plain forward pass."""
    device = next(model.parameters()).device
    full = torch.tensor([prefix + ids], device=device)
    logits = model(input_ids=full).logits[0].float()
    logp = torch.log_softmax(logits[len(prefix) - 1 : len(prefix) + len(ids) - 1], dim=-1)
    return logp.gather(1, torch.tensor(ids, device=device)[:, None])[:, 0].tolist()


def reference_score(model, tokenizer, prompt: str, text: str, spans, window="fixed:4", template="chat") -> ReferenceResult:
    window = WindowSpec.parse(window)
    prefix = prefix_ids(tokenizer, prompt, template)
    sums, counts, head1, head2 = [], [], [], []
    for i, (lo, hi) in enumerate(spans):
        a = spans[window.start(i)][0]
        ids, starts = tokenize_with_starts(tokenizer, text[a:hi])
        j0, j1 = scored_range(starts, lo - a, hi - a)
        lps = token_logprobs(model, prefix, ids[:j1])[j0:j1] if j1 > j0 else []
        s, n, h1, h2 = window_sums(lps)
        sums.append(s)
        counts.append(n)
        head1.append(h1)
        head2.append(h2)
    ids, starts = tokenize_with_starts(tokenizer, text)
    lps = token_logprobs(model, prefix, ids) if ids else []
    return ReferenceResult(sums, counts, head1, head2, float(sum(lps)), len(lps), lps, starts)
