"""Attention that computes only what a window sees, and the dense-mask fallback.

Both execute the tiles of `plan.Layout` (a run of queries seeing the prompt prefix, one extra
context range and their own keys up to themselves):

- **sparse** (`sparse_attention`): each tile's keys are gathered into a short key list; tiles of
  similar sizes are padded into a bucket and run as one `scaled_dot_product_attention` call with
  a small mask. Work is the keys each query sees plus the bucket padding (tiles are sorted by
  size); keys no query of a tile sees are never touched. It is registered with transformers'
  `AttentionInterface` and enabled for the duration of a forward (`sparse_attention_enabled`),
  so the model's own code (embeddings, norms, rotary, projections) runs unchanged; on CUDA the
  same calls run fused SDPA kernels. The prefix keys of a prompt computed in an earlier batch
  come from the *stash* (one copy per layer and prompt).
- **dense** (`dense_mask`): a boolean mask over a padded row with the prefix in a KV cache, the
  transformers way. Used automatically where the sparse path is unavailable: models with
  attention-logit softcapping or sliding-window layers, or no `AttentionInterface`.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

NAME = "lalp_sparse"
BUCKET_EFFICIENCY = 0.85   # a bucket's real (query, key) pairs over its padded pairs, at least


def sparse_supported(model) -> tuple[bool, str]:
    """Whether the sparse path can run this model (else the dense mask), and why not."""
    try:
        from transformers import AttentionInterface  # noqa: F401
    except ImportError:
        return False, "transformers has no AttentionInterface"
    cfg = getattr(model, "config", None)
    base = getattr(model, "model", None)
    if cfg is None or base is None or not hasattr(cfg, "_attn_implementation"):
        return False, "not a transformers causal LM"
    if getattr(cfg, "attn_logit_softcapping", None):
        return False, "attention-logit softcapping"
    layer_types = getattr(cfg, "layer_types", None)
    if layer_types and any(t != "full_attention" for t in layer_types):
        return False, f"layer types {sorted(set(layer_types))}"
    if getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", True):
        return False, "sliding-window attention"
    return True, ""


@dataclass
class Bucket:
    qidx: torch.Tensor   # [n * Qm] query rows (flat), padded slots repeat a real row
    kidx: torch.Tensor   # [n * Km] key-space indices
    mask: torch.Tensor   # [n, 1, Qm, Km] additive (0 or -inf), in the model's dtype
    dst: torch.Tensor    # [n * Qm] output row of each slot; padded slots write the scratch row N
    shape: tuple[int, int, int]  # n, Qm, Km


@dataclass
class SparsePlan:
    n: int
    buckets: list[Bucket]
    stash: dict                                   # (layer, prompt) -> (k, v) [kv_heads, L, head_dim]
    ext: list[int] = field(default_factory=list)  # prompts whose stashed keys precede the batch's
    keep: list[tuple[int, int, int]] = field(default_factory=list)  # (prompt, q0, q1): keys to stash


def _tile_keys(t, k_offset: int) -> np.ndarray:
    _, _, q1, c, pa, pb, xa, xb = (int(x) for x in t)
    return np.concatenate([np.arange(pa, pb), np.arange(xa, xb), np.arange(c, k_offset + q1)])


def plan_buckets(tiles: np.ndarray, k_offset: int, max_elements: int) -> list[list[int]]:
    """Group tiles (sorted by key count) so that each group's padding stays small and its
    [n, Qm, Km] score block stays within `max_elements`."""
    nq = tiles[:, 2] - tiles[:, 1]
    nk = (tiles[:, 5] - tiles[:, 4]) + (tiles[:, 7] - tiles[:, 6]) + (k_offset + tiles[:, 2] - tiles[:, 3])
    order = np.lexsort((nq, nk))
    groups, cur, mq, mk, real = [], [], 0, 0, 0
    for i in order:
        q, k = int(nq[i]), int(nk[i])
        Q, K = max(mq, q), max(mk, k)
        if cur and ((len(cur) + 1) * Q * K * BUCKET_EFFICIENCY > real + q * k or (len(cur) + 1) * Q * K > max_elements):
            groups.append(cur)
            cur, mq, mk, real = [], 0, 0, 0
            Q, K = q, k
        cur.append(int(i))
        mq, mk, real = Q, K, real + q * k
    if cur:
        groups.append(cur)
    return groups


def build_buckets(tiles: np.ndarray, k_offset: int, max_elements: int, n_rows: int, dtype, to_device) -> list[Bucket]:
    """Index lists and additive masks of every bucket; built once per batch, used by every layer."""
    out = []
    for g in plan_buckets(tiles, k_offset, max_elements):
        ts = tiles[g]
        keys = [_tile_keys(t, k_offset) for t in ts]
        nq = ts[:, 2] - ts[:, 1]
        n, Qm, Km = len(g), int(nq.max()), max(len(k) for k in keys)
        kidx = np.zeros((n, Km), dtype=np.int64)
        for i, k in enumerate(keys):
            kidx[i, : len(k)] = k
        j = np.arange(Qm)[None, :]
        valid = j < nq[:, None]
        qidx = np.where(valid, ts[:, 1:2] + j, ts[:, 1:2])
        ctx = (ts[:, 5] - ts[:, 4]) + (ts[:, 7] - ts[:, 6])
        # query j of a tile sees its context and its own keys up to itself; padded queries see slot 0
        lim = np.where(valid, ctx[:, None] + k_offset + ts[:, 1:2] + j - ts[:, 3:4] + 1, 1)
        # additive mask built on the host in one pass, converted to the model's dtype on the device
        mask = np.where(np.arange(Km)[None, None, None, :] < lim[:, None, :, None], np.float32(0), np.float32(-np.inf))
        mask = to_device(mask).to(dtype)
        dst = np.where(valid, qidx, n_rows)
        out.append(Bucket(to_device(qidx.reshape(-1)), to_device(kidx.reshape(-1)), mask,
                          to_device(dst.reshape(-1)), (n, Qm, Km)))
    return out


@torch.compiler.disable  # a compiled decoder layer calls it eagerly (`exact.compile_layers`)
def sparse_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """The `AttentionInterface` function: query [1, H, N, hd], key/value [1, Hkv, N, hd]."""
    plan: SparsePlan | None = kwargs.get("lalp_plan")
    if plan is None:
        raise RuntimeError("lalp sparse attention called without a plan")
    if kwargs.get("sliding_window") or kwargs.get("softcap") or kwargs.get("s_aux") is not None:
        raise RuntimeError("lalp sparse attention does not support sliding windows, softcapping or sinks")
    layer = module.layer_idx
    k, v = key[0], value[0]
    for p, a, b in plan.keep:
        plan.stash[(layer, p)] = (k[:, a:b].clone(), v[:, a:b].clone())
    if plan.ext:
        k = torch.cat([plan.stash[(layer, p)][0] for p in plan.ext] + [k], dim=1)
        v = torch.cat([plan.stash[(layer, p)][1] for p in plan.ext] + [v], dim=1)
    H, N, hd = query.shape[1], query.shape[2], query.shape[3]
    Hkv = k.shape[0]
    q2 = query[0].transpose(0, 1).reshape(N, H * hd)      # rows = tokens (a view when already laid out so)
    k2 = k.transpose(0, 1).reshape(-1, Hkv * hd)
    v2 = v.transpose(0, 1).reshape(-1, Hkv * hd)
    out = query.new_empty((N + 1, H * hd))                  # row N: scratch for padded slots
    gqa = Hkv != H
    for b in plan.buckets:
        n, Qm, Km = b.shape
        o = F.scaled_dot_product_attention(
            q2.index_select(0, b.qidx).view(n, Qm, H, hd).transpose(1, 2),
            k2.index_select(0, b.kidx).view(n, Km, Hkv, hd).transpose(1, 2),
            v2.index_select(0, b.kidx).view(n, Km, Hkv, hd).transpose(1, 2),
            attn_mask=b.mask, scale=scaling, enable_gqa=gqa,
        )
        out.index_copy_(0, b.dst, o.transpose(1, 2).reshape(n * Qm, H * hd))
    return out[:N].view(1, N, H, hd), None


_registered = False


def _register() -> None:
    global _registered
    if not _registered:
        from transformers import AttentionInterface

        AttentionInterface.register(NAME, sparse_attention)
        _registered = True


@contextmanager
def sparse_attention_enabled(model):
    """Route the model's attention to `sparse_attention` for the duration of a forward."""
    _register()
    cfg = model.config
    old = cfg._attn_implementation
    cfg._attn_implementation = NAME
    try:
        yield
    finally:
        cfg._attn_implementation = old


def dense_mask(ranges: torch.Tensor, q0: int, q1: int, n_keys: int, k_offset: int) -> torch.Tensor:
    """[B, 1, q1 - q0, n_keys] bool from per-token (pa, pb, xa, xb, c): query t sees the prefix
    range, the extra range and its own keys from c up to its own key (k_offset + t)."""
    r = ranges[:, q0:q1]
    kk = torch.arange(n_keys, device=ranges.device)[None, None, :]
    own = (k_offset + torch.arange(q0, q1, device=ranges.device))[None, :, None]
    m = ((kk >= r[..., 0:1]) & (kk < r[..., 1:2])) | ((kk >= r[..., 2:3]) & (kk < r[..., 3:4])) \
        | ((kk >= r[..., 4:5]) & (kk <= own))
    return m[:, None]
