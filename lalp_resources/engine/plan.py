"""The packing and attention plan: what the model computes, and which keys each query sees.

Planning turns items into *tasks* (one cache entry each: a step window, or the whole response
for GALP) and the missing tasks into *units*: a trunk (the text from a window start to the
furthest end any window with that start needs) plus *branches* (a window's own tokens where its
tokenization leaves the trunk's; see `build_units`). A unit lays itself out as *tiles*: a run
of queries that see

    the prompt prefix  [pa, pb)   +   one extra context range  [xa, xb)   +   [c, own key]

in one key space (a query's own key is the key of its own token, so the last range is causal).
A trunk tile sees the prefix and the trunk up to itself; a branch sees the prefix, the trunk
before its attach point, and its own branch up to itself. Both attention paths execute the same
tiles: the sparse path gathers exactly those keys (`attention.sparse_attention`), the dense
fallback turns them into a boolean mask over a padded row (`dense_mask`).

Packing:
- sparse path: units of a group are packed one after another into flat batches of at most
  `batch_tokens` tokens, no padding; a prompt's prefix is computed in the first batch that needs
  it and its keys are kept (the *stash*) for later batches.
- dense path: units are packed first-fit-decreasing into rows of one prompt (`row_tokens`), rows
  batched by `batch_tokens`, the prefixes computed once in a padded prefix pass.
"""

from __future__ import annotations

import re
from bisect import bisect_left, bisect_right
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np

from lalp_resources.method.tokenization import encode_arrays, encode_lists, prefix_ids, scored_range, tokenize_many

GALP_STEP = -1


@dataclass
class Task:
    """One cache entry: a step window, or the whole response for GALP."""

    key: str
    item: int
    step: int
    sum: float = 0.0
    count: int = 0
    head1: float | None = None   # sum of the first scored token's log-prob (None: no token)
    head2: float | None = None   # of the first two (None: under two tokens)


@dataclass
class Unit:
    prompt: int                              # index into the group's prefixes
    trunk: list[int]
    branches: list[tuple[int, list[int]]]    # (attach point d, token ids)
    # (unit-local predictor position or -1 for the prefix, token, task, rank): rank = the token's place among
    # its window's scored tokens, clipped at 2 (0 and 1 feed the head sums, see head.window_sums)
    targets: list[tuple[int, int, int, int]]

    @property
    def length(self) -> int:
        return len(self.trunk) + sum(len(b) for _, b in self.branches)

    def ids(self) -> list[int]:
        out = list(self.trunk)
        for _, b in self.branches:
            out += b
        return out

    def positions(self) -> np.ndarray:
        """Positions after the prefix: the trunk counts on, a branch continues from its attach point."""
        parts = [np.arange(len(self.trunk))] + [d + np.arange(len(b)) for d, b in self.branches]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)

    def tiles(self, q_base: int, k_base: int, chunk: int) -> list[tuple[int, int, int, int, int]]:
        """(q0, q1, c, xa, xb) for the unit placed at query index q_base and key index k_base;
        runs longer than `chunk` queries are split (bounds a tile's mask and scores)."""
        out = []
        n = len(self.trunk)
        for a in range(0, n, chunk):
            out.append((q_base + a, q_base + min(n, a + chunk), k_base, 0, 0))
        off = n
        for d, b in self.branches:
            m = len(b)
            for a in range(0, m, chunk):
                out.append((q_base + off + a, q_base + off + min(m, a + chunk), k_base + off, k_base, k_base + d))
            off += m
        return out


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


# --- windows and units ---------------------------------------------------------------------


def window_plans(items, window, galp: bool):
    """Every window text and the whole responses, tokenized in one batch.

    Returns (plans, toks): plans[n] = (wins, galp text id) with wins = [(step, a, text id, lo, hi)]
    (a: the window's first character), toks[text id] = (ids, starts)."""
    texts: list[str] = []
    text_id: dict[str, int] = {}

    def need(s: str) -> int:
        if s not in text_id:
            text_id[s] = len(texts)
            texts.append(s)
        return text_id[s]

    plans = []
    for it in items:
        spans = list(it.spans)
        wins = []
        for i, (lo, hi) in enumerate(spans):
            a = spans[window.start(i)][0]
            wins.append((i, a, need(it.text[a:hi]), lo, hi))
        plans.append((wins, need(it.text) if galp else None))
    return plans, texts, text_id


# A word start: a non-whitespace character after whitespace (m.end()); m.start() begins the run.
_WORD = re.compile(r"\s+(?=\S)")
# windows with fewer word starts inside than this are tokenized on their own
SPLICE_MIN_WORDS = 6


def window_tokens(tokenizer, items, plans, texts) -> tuple[list[tuple[np.ndarray, np.ndarray]], int]:
    """toks[text id] = (ids, starts) of every text of `window_plans`, exactly as tokenizing each
    text on its own would give, with each response tokenized once.

    A window is a slice [a, b) of its response. Away from its two edges its tokens are the
    response's own; only near the edges can they differ (the first word has no space before it,
    BPE is not prefix-stable at the end). So each response is tokenized whole, and per window two
    short pieces: the head (from a to its third word start) and the tail (from its third-to-last
    word start to b). A piece is joined to the response's tokens only where, over a stretch of
    at least one whole word clear of the piece's own cut, both tokenizations have the same
    tokens (ids, first characters, ends); otherwise, and for short windows, the window is
    tokenized on its own. Returns (toks, windows tokenized on their own)."""
    where: list[tuple[int, int, int] | None] = [None] * len(texts)
    for n, (wins, galp_tid) in enumerate(plans):
        for _, a, tid, _, hi in wins:  # a window ends where its own step does
            if where[tid] is None:
                where[tid] = (n, a, hi)
        if galp_tid is not None and where[galp_tid] is None:
            where[galp_tid] = (n, 0, len(items[n].text))
    full = encode_arrays(tokenizer, [it.text for it in items])
    # the joins compare a few tokens at a time: Python lists and bisect beat numpy calls there
    full_lists: dict[int, tuple[list, list, list]] = {}
    words: dict[int, tuple[list, list]] = {}
    toks: list = [None] * len(texts)
    alone: list[int] = []
    jobs = []
    pieces: dict[tuple[int, int, int], int] = {}
    for tid, (n, a, b) in enumerate(where):
        text = items[n].text
        if a == 0 and b == len(text):
            toks[tid] = full[n][:2]
            continue
        if n not in words:
            ms = list(_WORD.finditer(text))
            words[n] = ([m.end() for m in ms], [m.start() for m in ms])
        w, run = words[n]
        k0, k1 = bisect_right(w, a), bisect_left(w, b)
        if k1 - k0 < SPLICE_MIN_WORDS:
            alone.append(tid)
            continue
        head = pieces.setdefault((n, a, w[k0 + 2]), len(pieces))
        tail = pieces.setdefault((n, w[k1 - 3], b), len(pieces))
        # head: join at or after the run before word 2, checked up to the run before word 3;
        # tail: join at or after the run before the second-to-last word, checked up to the last's
        jobs.append((tid, n, a, head, run[k0 + 1], run[k0 + 2], tail, run[k1 - 2], run[k1 - 1]))
    keys = list(pieces)
    # the pieces' starts and ends in the response's characters
    piece = encode_lists(tokenizer, [items[n].text[x:y] for n, x, y in keys], [x for _, x, _ in keys])
    for tid, n, a, head, h0, h1, tail, t0, t1 in jobs:
        fid, fst, _ = full[n]
        if n not in full_lists:
            full_lists[n] = tuple(x.tolist() for x in full[n])
        fl = full_lists[n]
        hid, hst, hen = piece[head]
        tid_, tst, ten = piece[tail]
        x = _join(hid, hst, hen, *fl, h0, h1)
        y = _join(tid_, tst, ten, *fl, t0, t1)
        if x is None or y is None or not x[1] < y[1]:
            alone.append(tid)
            continue
        (hx, fx), (ty, fy) = x, y
        toks[tid] = (np.concatenate([hid[:hx], fid[fx:fy], tid_[ty:]]).astype(np.int64, copy=False),
                     np.concatenate([hst[:hx], fst[fx:fy], tst[ty:]]).astype(np.int64, copy=False) - a)
    for tid, (ids, st, _) in zip(alone, encode_arrays(tokenizer, [texts[t] for t in alone])):
        toks[tid] = (ids, st)
    return toks, len(alone)


def block_tokens(tokenizer, template: str, window, galp: bool, prompts_of_groups: list[list[str]], items):
    """The tokenizer's half of planning a block of groups: every window's plan and tokens
    (`window_plans`, `window_tokens`) over the block's items, and each group's prompt prefixes.
    A pure function of its arguments, so a planner process can run it ahead of the scorer
    (engine/prefetch.py). Returns (plans, toks, windows tokenized alone, prefixes per group)."""
    plans, texts, _ = window_plans(items, window, galp)
    toks, alone = window_tokens(tokenizer, items, plans, texts)
    prefixes = [[prefix_ids(tokenizer, p, template) for p in prompts] for prompts in prompts_of_groups]
    return plans, toks, alone, prefixes


def _join(pid: list, pst: list, pen: list, fid: list, fst: list, fen: list, lo: int, hi: int):
    """Where a piece's tokens (absolute first characters `pst`) can be joined to the response's:
    the first piece token starting at or after `lo` that starts a response token too, such that
    both tokenizations have the same tokens from there up to `hi` (at least one). Returns (piece
    index, response index) of that token, or None."""
    p, q_end = bisect_left(pst, lo), bisect_left(pst, hi)
    while p < q_end:
        f = bisect_left(fst, pst[p])
        if f < len(fst) and fst[f] == pst[p]:
            m = q_end - p
            if f + m <= len(fst) and pid[p:q_end] == fid[f:f + m] and pst[p:q_end] == fst[f:f + m] \
                    and pen[p:q_end] == fen[f:f + m]:
                return p, f
            return None
        p += 1
    return None


def _lists(tok):
    ids, starts = tok
    return (ids.tolist(), starts.tolist()) if isinstance(ids, np.ndarray) else (ids, starts)


def build_units(tokenizer, items, plans, toks, todo, prompt_index) -> list[Unit]:
    """Units: the missing windows of one response that share a start character.

    A window's own tokenization can differ from the unit's near the window end (BPE is not
    prefix-stable: "\\n\\n" ends a string as one token but is two before a word). Each window is
    compared with the trunk; the differing tail becomes a branch attending to the shared tokens
    before the divergence, so every scored token is predicted from exactly the reference's context."""
    groups: dict[tuple[int, int], list[int]] = defaultdict(list)
    win_of: dict[int, tuple[int, int, int, int]] = {}
    task_pos = {}
    k = 0
    for n, (wins, galp_tid) in enumerate(plans):
        for i, a, tid, lo, hi in wins:
            task_pos[k] = (n, a, tid, lo, hi)
            k += 1
        if galp_tid is not None:
            task_pos[k] = (n, 0, galp_tid, 0, len(items[n].text))
            k += 1
    for k in todo:
        n, a, tid, lo, hi = task_pos[k]
        groups[(n, a)].append(k)
        win_of[k] = (tid, lo, hi, a)

    # The unit's trunk is the text from the start to the furthest end any member needs; reuse
    # the tokenizations already done for window texts.
    trunk_texts = {(n, a): items[n].text[a: max(win_of[k][2] for k in ks)] for (n, a), ks in groups.items()}
    # token lists for the windows to score (window_tokens gives arrays; units are built of lists)
    toks = {tid: _lists(toks[tid]) for tid, _, _, _ in win_of.values()} | {
        g: _lists(toks[g]) for _, g in plans if g is not None}
    known = {}
    for n, (wins, galp_tid) in enumerate(plans):
        for i, a, tid, lo, hi in wins:
            if tid in toks:
                known.setdefault(items[n].text[a:hi], toks[tid])
        if galp_tid is not None:
            known.setdefault(items[n].text, toks[galp_tid])
    missing = list({s for s in trunk_texts.values() if s not in known})
    for s, t in zip(missing, tokenize_many(tokenizer, missing)):
        known[s] = t

    units = []
    for (n, a), ks in groups.items():
        trunk_ids, _ = known[trunk_texts[(n, a)]]
        branches: list[tuple[int, list[int]]] = []
        targets: list[tuple[int, int, int, int]] = []
        branch_targets: list[tuple[int, int, int, int, int]] = []  # (branch no, pos in branch, tok, task, rank)
        trunk_need = 0
        for kk in ks:
            tid, lo, hi, a_ = win_of[kk]
            ids, starts = toks[tid]
            j0, j1 = scored_range(starts, lo - a_, hi - a_)
            if j1 <= j0:
                continue
            d = common_prefix(ids, trunk_ids)
            b = None
            if j1 - 1 > d:  # branch inputs U[d : j1-1]
                b = len(branches)
                branches.append((d, ids[d: j1 - 1]))
                trunk_need = max(trunk_need, d)
            for j in range(j0, j1):
                r = min(j - j0, 2)
                if j == 0:
                    targets.append((-1, ids[j], kk, r))
                elif j - 1 < d:
                    targets.append((j - 1, ids[j], kk, r))
                    trunk_need = max(trunk_need, j)
                else:
                    branch_targets.append((b, j - 1 - d, ids[j], kk, r))
        trunk = trunk_ids[:trunk_need]
        offsets, off = [], len(trunk)
        for _, bids in branches:
            offsets.append(off)
            off += len(bids)
        for b, p, t, kk, r in branch_targets:
            targets.append((offsets[b] + p, t, kk, r))
        units.append(Unit(prompt_index[items[n].prompt], trunk, branches, targets))
    return units


# --- batches -------------------------------------------------------------------------------


@dataclass
class Layout:
    """One batch laid out for the model: token ids and positions [B, T], the tiles, the targets
    and the tasks they feed. Key space: sparse path = stashed prefix keys, then the batch's
    tokens; dense path, per row = the prefix cache columns, then the row's tokens."""

    ids: np.ndarray
    pos: np.ndarray
    tiles: np.ndarray            # [n, 8]: row, q0, q1, c, pa, pb, xa, xb (q in the row, the rest in key space)
    k_offset: int                # key index of a row's token t is k_offset + t
    tgt_row: np.ndarray
    tgt_pos: np.ndarray
    tgt_tok: np.ndarray
    tgt_task: np.ndarray         # local task index
    tasks: np.ndarray            # local -> global task index
    tgt_rank: np.ndarray         # a target's rank in its window (0, 1, or 2 = later)
    real_tokens: int = 0         # response tokens (trunks and branches)
    prefix_tokens: int = 0       # prefix tokens computed in this batch
    units: list = field(default_factory=list)
    own_prefixes: list = field(default_factory=list)   # sparse: prompts whose prefix this batch computes
    ext_prefixes: list = field(default_factory=list)   # sparse: prompts whose stashed prefix keys it reads
    keep_prefixes: list = field(default_factory=list)  # sparse: prompts whose prefix keys to stash
    own_rows: list = field(default_factory=list)       # sparse: (prompt, q0, q1) of each computed prefix

    def visible_keys(self) -> int:
        """Sum over real queries of the keys each sees (for attention FLOPs)."""
        t = self.tiles
        if len(t) == 0:
            return 0
        nq = t[:, 2] - t[:, 1]
        ctx = (t[:, 5] - t[:, 4]) + (t[:, 7] - t[:, 6])
        first = self.k_offset + t[:, 1] - t[:, 3] + 1  # own keys seen by the tile's first query
        return int((nq * ctx + nq * first + nq * (nq - 1) // 2).sum())


def _localize(targets):
    """targets (row, pos, tok, global task, rank) -> arrays with local task indices."""
    if not targets:
        z = np.zeros(0, dtype=np.int64)
        return z, z, z, z, z, z
    a = np.asarray(targets, dtype=np.int64)
    tasks, local = np.unique(a[:, 3], return_inverse=True)
    return a[:, 0], a[:, 1], a[:, 2], local.astype(np.int64), tasks, a[:, 4]


def pack_sparse(units: list[Unit], prefixes: list[list[int]], batch_tokens: int) -> list[Layout]:
    """Units in prompt order, packed one after another into flat batches (see module doc)."""
    order = sorted(range(len(units)), key=lambda k: (units[k].prompt, -units[k].length))
    batches: list[list[Unit]] = []
    cur, used, seen = [], 0, set()
    cur_new: set[int] = set()
    for k in order:
        u = units[k]
        cost = u.length + (0 if (u.prompt in seen or u.prompt in cur_new) else len(prefixes[u.prompt]))
        if cur and used + cost > batch_tokens:
            batches.append(cur)
            seen |= cur_new
            cur, used, cur_new = [], 0, set()
            cost = u.length + (0 if u.prompt in seen else len(prefixes[u.prompt]))
        if u.prompt not in seen:
            cur_new.add(u.prompt)
        cur.append(u)
        used += cost
    if cur:
        batches.append(cur)
    # which batch computes each prompt's prefix, and which later batches read it
    first: dict[int, int] = {}
    last: dict[int, int] = {}
    for b, us in enumerate(batches):
        for u in us:
            first.setdefault(u.prompt, b)
            last[u.prompt] = b
    return [
        _sparse_layout(us, prefixes, [p for p in dict.fromkeys(u.prompt for u in us) if first[p] == b],
                       [p for p in dict.fromkeys(u.prompt for u in us) if first[p] < b],
                       [p for p in dict.fromkeys(u.prompt for u in us) if first[p] == b and last[p] > b],
                       [u for p in first if first[p] == b for u in units if u.prompt == p])
        for b, us in enumerate(batches)
    ]


def _sparse_layout(units, prefixes, own, ext, keep, prompt_units, chunk: int = 1 << 30) -> Layout:
    """Flat layout of one sparse batch (chunking of tiles is applied by `split_tiles`)."""
    E = sum(len(prefixes[p]) for p in ext)
    pre_range, a = {}, 0
    for p in ext:
        pre_range[p] = (a, a + len(prefixes[p]))
        a += len(prefixes[p])
    ids, pos, tiles, targets = [], [], [], []
    f = 0
    own_rows = []
    for p in own:
        L = len(prefixes[p])
        own_rows.append((p, f, f + L))
        ids += prefixes[p]
        pos.append(np.arange(L))
        tiles.append((0, f, f + L, E + f, 0, 0, 0, 0))
        pre_range[p] = (E + f, E + f + L)
        # every target of this prompt predicted by the prefix's last position, whichever batch its unit is in
        for u in prompt_units:
            if u.prompt == p:
                targets += [(0, f + L - 1, t, kk, r) for q, t, kk, r in u.targets if q < 0]
        f += L
    n_pre = f
    for u in units:
        L = len(prefixes[u.prompt])
        pa, pb = pre_range[u.prompt]
        ids += u.ids()
        pos.append(L + u.positions())
        tiles += [(0, q0, q1, c, pa, pb, xa, xb) for q0, q1, c, xa, xb in u.tiles(f, E + f, chunk)]
        targets += [(0, f + q, t, kk, r) for q, t, kk, r in u.targets if q >= 0]
        f += u.length
    tr, tp, tt, tl, tasks, rk = _localize(targets)
    return Layout(
        np.asarray(ids, dtype=np.int64)[None], np.concatenate(pos).astype(np.int64)[None],
        np.asarray(tiles, dtype=np.int64).reshape(-1, 8), E, tr, tp, tt, tl, tasks, rk,
        real_tokens=f - n_pre, prefix_tokens=n_pre, units=units, own_prefixes=own, ext_prefixes=ext,
        keep_prefixes=keep, own_rows=own_rows,
    )


def split_tiles(tiles: np.ndarray, chunk: int) -> np.ndarray:
    """Split tiles longer than `chunk` queries (each piece keeps its key ranges)."""
    out = []
    for t in tiles:
        r, q0, q1 = int(t[0]), int(t[1]), int(t[2])
        for a in range(q0, q1, chunk):
            out.append((r, a, min(q1, a + chunk), *[int(x) for x in t[3:]]))
    return np.asarray(out, dtype=np.int64).reshape(-1, 8)


def pack_rows(units: list[Unit], row_tokens: int) -> list[list[Unit]]:
    """Dense path: first-fit-decreasing packing of a prompt's units into rows of `row_tokens`."""
    rows: list[tuple[int, int, list[Unit]]] = []
    for u in sorted(units, key=lambda u: -u.length):
        for r, (p, used, us) in enumerate(rows):
            if p == u.prompt and used + u.length <= row_tokens:
                rows[r] = (p, used + u.length, us + [u])
                break
        else:
            rows.append((u.prompt, u.length, [u]))
    out = [us for _, _, us in rows]
    out.sort(key=lambda r: -sum(u.length for u in r))
    return out


def batch_rows(rows: list[list[Unit]], batch_tokens: int) -> list[list[list[Unit]]]:
    """Dense path: rows (longest first) grouped while B x T stays within `batch_tokens`."""
    batches, batch = [], []
    for r in rows:
        width = max([sum(u.length for u in x) for x in batch + [r]])
        if not batch or width * (len(batch) + 1) <= batch_tokens:
            batch.append(r)
        else:
            batches.append(batch)
            batch = [r]
    if batch:
        batches.append(batch)
    return batches


def dense_layout(rows: list[list[Unit]], pre_len: list[int], p_max: int) -> Layout:
    """Dense path: rows padded to T; key space per row = p_max prefix cache columns + the row."""
    B = len(rows)
    T = max(sum(u.length for u in r) for r in rows)
    ids = np.zeros((B, T), dtype=np.int64)
    pos = np.zeros((B, T), dtype=np.int64)
    tiles, targets = [], []
    real = 0
    for b, r in enumerate(rows):
        L = pre_len[b]
        off = 0
        for u in r:
            n = u.length
            ids[b, off: off + n] = u.ids()
            pos[b, off: off + n] = L + u.positions()
            tiles += [(b, q0, q1, c, 0, L, xa, xb) for q0, q1, c, xa, xb in u.tiles(off, p_max + off, 1 << 30)]
            targets += [(b, off + q, t, kk, r) for q, t, kk, r in u.targets if q >= 0]
            off += n
        real += off  # padding positions get no tile: they see keys [0, own] and nothing sees them
    tr, tp, tt, tl, tasks, rk = _localize(targets)
    return Layout(ids, pos, np.asarray(tiles, dtype=np.int64).reshape(-1, 8), p_max, tr, tp, tt, tl, tasks, rk,
                  real_tokens=real, units=[u for r in rows for u in r])


def token_ranges(layout: Layout) -> np.ndarray:
    """Per query token [B, T, 5]: pa, pb, xa, xb, c (the dense mask's inputs)."""
    B, T = layout.ids.shape
    out = np.zeros((B, T, 5), dtype=np.int64)
    out[:, :, 4] = 0
    for r, q0, q1, c, pa, pb, xa, xb in layout.tiles:
        out[r, q0:q1] = (pa, pb, xa, xb, c)
    return out
