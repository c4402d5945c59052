"""The exact LM head on the positions that predict scored tokens, and device-side accumulation.

log p(target) = logit[target] - logsumexp(logits), computed in row chunks so that only one
full-vocabulary tensor per chunk ever exists: the chunk's logits, turned into exp(logit - max) in
place. Its size is bounded by `max_elements` whatever the vocabulary (a 152k vocabulary gets
fewer rows per chunk), so the head's memory does not grow with the number of scored tokens.
"""

from __future__ import annotations

import torch

HEAD_ELEMENTS = 1 << 24  # logits per chunk: 64 MiB in float32


def head_rows(vocab: int, max_elements: int = HEAD_ELEMENTS) -> int:
    """Rows per head chunk so that rows x vocab stays within `max_elements` (at least one row)."""
    return max(1, max_elements // max(1, vocab))


def target_logprobs(head, h: torch.Tensor, targets: torch.Tensor, *, softcap: float | None = None,
                    max_elements: int = HEAD_ELEMENTS) -> torch.Tensor:
    """log_softmax(head(h)).gather(targets) in float32, without a second full-vocabulary tensor.

    `head` is the model's output projection (any module mapping [n, d] to [n, vocab]); `h` is
    [n, d]; `targets` is [n] token ids on h's device. Logits are computed in the model's dtype and
    upcast once to float32, as a plain `model(...).logits.float()` would be.
    """
    n = h.shape[0]
    out = torch.empty(n, dtype=torch.float32, device=h.device)
    if n == 0:
        return out
    weight = getattr(head, "weight", None)
    vocab = weight.shape[0] if weight is not None else head(h[:1]).shape[-1]
    rows = head_rows(vocab, max_elements)
    for s in range(0, n, rows):
        e = min(n, s + rows)
        logits = head(h[s:e])
        if logits.dtype != torch.float32:
            logits = logits.float()  # the lower-precision logits are dropped right away
        if softcap:
            logits.div_(softcap).tanh_().mul_(softcap)
        picked = logits.gather(1, targets[s:e, None])[:, 0]
        top = logits.amax(dim=1, keepdim=True)
        logits.sub_(top).exp_()
        out[s:e] = picked - top[:, 0] - logits.sum(dim=1).log()
        del logits
    return out


HEAD_RANKS = 2  # head sums kept per window: the first 1 and the first 2 scored tokens (DROP-1, DROP-2)


def window_sums(logprobs) -> tuple[float, int, float | None, float | None]:
    """A window's scored-token log-probs (in text order) -> (sum, n, head1, head2): their sum and
    number, and the sums of the first 1 and first 2 of them (None where the window has fewer
    tokens). The one definition of what a score-cache row holds: the reference and any backend
    that gets per-token log-probs (e.g. from an inference server) call it; the batched engine
    computes the same numbers on the device (`DeviceAccumulator`, tests/test_engine.py checks)."""
    lps = [float(x) for x in logprobs]
    n = len(lps)
    return (float(sum(lps)), n, float(lps[0]) if n >= 1 else None, float(lps[0] + lps[1]) if n >= 2 else None)


class DeviceAccumulator:
    """Per-batch sums and counts of log-probs by task, and the head sums (the first 1 and first 2
    tokens of each window, by the targets' ranks), kept on the device; `fetch()` is the one
    device-to-host copy per batch (all four rows at once)."""

    def __init__(self, n_local: int, device):
        self.acc = torch.zeros((4, max(1, n_local)), dtype=torch.float64, device=device)

    def add(self, local_task: torch.Tensor, logprobs: torch.Tensor, rank: torch.Tensor) -> None:
        lp = logprobs.to(torch.float64)
        self.acc[0].index_add_(0, local_task, lp)
        self.acc[1].index_add_(0, local_task, torch.ones_like(lp))
        # head sums: a window's rank-0 and rank-1 tokens (at most one of each): exact whatever the order
        self.acc[2].index_add_(0, local_task, torch.where(rank == 0, lp, 0.0))
        self.acc[3].index_add_(0, local_task, torch.where(rank < HEAD_RANKS, lp, 0.0))

    def fetch(self):
        """(sums, counts, head1 sums, head2 sums) as NumPy arrays: one device-to-host copy."""
        a = self.acc.cpu().numpy()
        return a[0], a[1], a[2], a[3]
