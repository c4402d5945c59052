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


class DeviceAccumulator:
    """Per-batch sums and counts of log-probs by task, kept on the device; `fetch()` is the one
    device-to-host copy per batch (both columns at once)."""

    def __init__(self, n_local: int, device):
        self.acc = torch.zeros((2, max(1, n_local)), dtype=torch.float64, device=device)

    def add(self, local_task: torch.Tensor, logprobs: torch.Tensor) -> None:
        self.acc[0].index_add_(0, local_task, logprobs.to(torch.float64))
        self.acc[1].index_add_(0, local_task, torch.ones_like(logprobs, dtype=torch.float64))

    def fetch(self):
        """(sums, counts) as NumPy arrays: one device-to-host copy."""
        a = self.acc.cpu().numpy()
        return a[0], a[1]
