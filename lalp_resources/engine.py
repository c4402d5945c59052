"""The exact LALP/GALP scoring engine.

It computes the same numbers as `lalp_resources.reference` (the definition in docs/method.md) with
far fewer token-forwards:

- **Shared prefix.** The templated prompt is run once per prompt; its KV cache is reused by every
  window of every teacher's answer to that prompt (rows of different prompts in one batch get
  their own prefix columns, padded and masked).
- **Merged windows.** Windows that start at the same step form one *unit*: a single pass over
  the text from that start step to the last step that needs it scores all of them. For `fixed:K`
  the first K+1 steps and GALP come from one pass over the whole response.
- **Exact even where BPE is not prefix-stable.** A window's own tokenization can differ from the
  unit's near the window end (e.g. "\\n\\n" at the end of a string is one token, but two before a
  word). The engine compares them and appends the differing tail as a *branch* that attends to
  the shared tokens before the divergence, with positions continuing from there. Every scored
  token is therefore predicted from exactly the context the reference uses.
- **Packing.** Units of one prompt are packed into rows with block-diagonal attention and
  restarted positions; rows are sorted by length and batched by a token budget.
- **Head only where needed.** The LM head and log-softmax run only on the hidden states that
  predict scored tokens, in blocks; context tokens never materialise full-vocabulary logits.
- **No truncation.** Long rows run in query chunks against a growing KV cache, so memory is
  bounded by the chunk size and the (linear) cache, never by a quadratic attention matrix.
- **Cache.** Every window has a key over the student namespace and its exact tokens; windows
  found in the cache never reach the model.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable, Iterator, Protocol, Sequence

import numpy as np
import torch

from lalp_resources.method.windows import WindowSpec
from lalp_resources.method.tokenization import prefix_ids, scored_range, tokenize_many, window_key

log = logging.getLogger("lalp.engine")

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
    tokens_forwarded: int = 0
    prefix_tokens: int = 0
    scored_tokens: int = 0
    forward_calls: int = 0
    oom_retries: int = 0
    windows_over_context: int = 0  # scored, but longer than the student was trained on
    seconds: float = 0.0

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


# --- planning -------------------------------------------------------------------------------


@dataclass
class _Task:
    """One cache entry: a step window, or the whole response for GALP."""

    key: str
    item: int
    step: int
    targets: list[tuple[int, int]] = field(default_factory=list)  # (unit position or -1, token id)
    sum: float = 0.0
    count: int = 0


@dataclass
class _Unit:
    prompt: int                  # index into the group's prefixes
    trunk: list[int]
    branches: list[tuple[int, list[int]]]   # (attach point d, token ids)
    targets: list[tuple[int, int, int]]     # (unit-local predictor position, token id, task index)
    lo: list[int] | None = None             # approximate mode: first trunk position each position may see

    @property
    def length(self) -> int:
        return len(self.trunk) + sum(len(b) for _, b in self.branches)


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class ScoringEngine:
    """Exact, batched LALP/GALP scoring for one student model.

    `namespace` should identify the student (fingerprint), template and dtype: it prefixes every
    cache key, so a different student or dtype never reuses a score.
    """

    def __init__(
        self,
        model,
        tokenizer,
        *,
        template: str = "chat",
        window: str | WindowSpec = "fixed:4",
        namespace: str = "",
        cache: ScoreCache | None = None,
        row_tokens: int | None = None,
        batch_tokens: int | None = None,
        attn_budget: int | None = None,
        group_tokens: int | None = None,
        galp: bool = True,
        approx: bool = False,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.template = template
        self.window = WindowSpec.parse(window)
        self.namespace = namespace
        self.cache = cache
        self.galp = galp
        # Opt-in approximation (never the default): one pass per response with a step-sliding
        # attention mask. Context tokens then see a different history than in their own
        # window, so scores differ from the exact definition; the benchmark reports by how much.
        self.approx = approx
        self.device = next(model.parameters()).device
        on_gpu = self.device.type == "cuda"
        # Budgets: rows short enough that block-diagonal attention waste stays small on a CPU.
        self.row_tokens = row_tokens or (4096 if on_gpu else 1024)
        self.batch_tokens = batch_tokens or (65536 if on_gpu else 4096)
        # Max query x key elements per attention chunk (bounds the attention matrix).
        self.attn_budget = attn_budget or (1 << 26 if on_gpu else 1 << 22)
        self.group_tokens = group_tokens or (262144 if on_gpu else 16384)
        self.head = model.get_output_embeddings()
        self.softcap = getattr(model.config, "final_logit_softcapping", None)
        self.eager = getattr(model.config, "_attn_implementation", "sdpa") == "eager"
        self.pad_id = 0
        self.stats = EngineStats()
        self._on_batch = None
        self._t0 = time.perf_counter()

    # -- public ---------------------------------------------------------------------------

    def score(
        self,
        items: Sequence[ScoreItem],
        progress: Callable[[int, int, EngineStats], None] | None = None,
    ) -> Iterator[ScoredChunk]:
        """Score items; yields one complete `ScoredChunk` per group of prompts."""
        t0 = self._t0 = time.perf_counter()
        by_prompt: dict[str, list[int]] = defaultdict(list)
        for idx, it in enumerate(items):
            if not it.spans:
                raise ValueError(f"response {it.response_id}: no steps to score")
            by_prompt[it.prompt].append(idx)
        # Group whole prompts (the unit of prefix reuse and of commit) up to a token budget.
        # Work estimate: ~3 characters per token, and windows re-read context (x2-3).
        groups, cur, est_tokens = [], [], 0.0
        for prompt, idxs in by_prompt.items():
            cur.append(prompt)
            est_tokens += sum(len(items[i].text) for i in idxs) * (2 if self.window.kind == "fixed" else 3) / 3
            if est_tokens >= self.group_tokens:
                groups.append(cur)
                cur, est_tokens = [], 0.0
        if cur:
            groups.append(cur)
        total = sum(len(it.spans) + (1 if self.galp else 0) for it in items)
        done = 0
        for prompts in groups:
            idxs = [i for p in prompts for i in by_prompt[p]]
            n_group = sum(len(items[i].spans) + (1 if self.galp else 0) for i in idxs)
            if progress:  # within a group, report by the share of its token-forwards done
                self._on_batch = lambda frac, d=done, n=n_group: progress(d + int(n * frac), total, self.stats)
            chunk = self._score_group(prompts, [items[i] for i in idxs])
            self._on_batch = None
            done += n_group
            self.stats.seconds = time.perf_counter() - t0
            if progress:
                progress(done, total, self.stats)
            yield chunk

    def score_all(self, items: Sequence[ScoreItem], progress=None) -> ScoredChunk:
        steps, responses, rows = [], [], []
        for c in self.score(items, progress):
            steps += c.steps
            responses += c.responses
            rows += c.new_cache_rows
        return ScoredChunk(steps, responses, rows)

    # -- one group of prompts -------------------------------------------------------------

    def _score_group(self, prompts: list[str], items: list[ScoreItem]) -> ScoredChunk:
        tok = self.tokenizer
        prompt_index = {p: k for k, p in enumerate(prompts)}
        prefixes = [prefix_ids(tok, p, self.template) for p in prompts]

        # 1. Every window text and every candidate unit text, tokenized in one batch.
        texts: list[str] = []
        text_id: dict[str, int] = {}

        def need(s: str) -> int:
            if s not in text_id:
                text_id[s] = len(texts)
                texts.append(s)
            return text_id[s]

        plans = []  # per item: list of (step, a, window text id, lo, hi) and galp text id
        for it in items:
            spans = list(it.spans)
            wins = []
            for i, (lo, hi) in enumerate(spans):
                a = spans[self.window.start(i)][0]
                wins.append((i, a, need(it.text[a:hi]), lo, hi))
            plans.append((wins, need(it.text) if self.galp else None))
        toks = tokenize_many(tok, texts)

        # 2. Tasks with cache keys; look them up.
        tasks: list[_Task] = []
        max_ctx = getattr(getattr(self.model, "config", None), "max_position_embeddings", None)
        for n, (it, (wins, galp_tid)) in enumerate(zip(items, plans)):
            pre = prefixes[prompt_index[it.prompt]]
            if max_ctx:  # never truncated, but past the trained context scores lose meaning: count them
                over = [tid for _, _, tid, _, _ in wins] + ([galp_tid] if galp_tid is not None else [])
                self.stats.windows_over_context += sum(len(pre) + len(toks[t][0]) > max_ctx for t in over)
            for i, a, tid, lo, hi in wins:
                ids, starts = toks[tid]
                j0, j1 = scored_range(starts, lo - a, hi - a)
                tasks.append(_Task(window_key(self.namespace, pre, ids, j0, j1), n, i))
            if galp_tid is not None:
                ids, _ = toks[galp_tid]
                tasks.append(_Task(window_key(self.namespace + "|galp", pre, ids, 0, len(ids)), n, GALP_STEP))
        if self.approx:
            # An approximate step score depends on the text and step boundaries up to the step
            # (context tokens see their own windows); keyed apart so it never poses as exact.
            for t in tasks:
                if t.step != GALP_STEP:
                    it = items[t.item]
                    spans = list(it.spans)[: t.step + 1]
                    h = hashlib.sha256(f"{self.namespace}|approx|{self.window}|{it.prompt}|{spans}|".encode())
                    h.update(it.text[: spans[-1][1]].encode())
                    t.key = "approx-" + h.hexdigest()[:32]
        hits = self.cache.lookup([t.key for t in tasks]) if self.cache is not None else {}
        self.stats.windows_total += len(tasks)
        todo = [k for k, t in enumerate(tasks) if t.key not in hits]
        self.stats.windows_cached += len(tasks) - len(todo)
        self.stats.windows_scored += len(todo)

        # 3. Units: the missing windows of one response that share a start step.
        if self.approx:
            units = self._build_approx_units(items, plans, toks, tasks, todo, prompt_index)
        else:
            units = self._build_units(items, plans, toks, tasks, todo, prompt_index)
        # 4. Forward passes.
        if units:
            self._run_units(units, prefixes, tasks)

        # 5. Assemble results (cached and fresh) per response.
        new_rows = [(tasks[k].key, tasks[k].sum, tasks[k].count) for k in todo]
        per_item: dict[int, dict[int, tuple[float, int, bool]]] = defaultdict(dict)
        for k, t in enumerate(tasks):
            if t.key in hits:
                s, c = hits[t.key]
                per_item[t.item][t.step] = (float(s), int(c), True)
            else:
                per_item[t.item][t.step] = (t.sum, t.count, False)
        steps_out, resp_out = [], []
        for n, it in enumerate(items):
            res = per_item[n]
            means = []
            for i in range(len(it.spans)):
                s, c, cached = res[i]
                steps_out.append(StepScore(it.response_id, i, c, s, cached))
                if c:
                    means.append(s / c)
            lalp = float(np.mean(means)) if means else float("nan")
            gs, gc, _ = res.get(GALP_STEP, (float("nan"), 0, False))
            resp_out.append(ResponseScore(it.response_id, len(it.spans), lalp, gs / gc if gc else float("nan"), gc))
        return ScoredChunk(steps_out, resp_out, new_rows)

    def _build_units(self, items, plans, toks, tasks, todo, prompt_index) -> list[_Unit]:
        tok = self.tokenizer
        # todo tasks grouped by (item, start char of their window)
        groups: dict[tuple[int, int], list[int]] = defaultdict(list)
        win_of: dict[int, tuple[int, int, int, int]] = {}
        task_pos = {}
        k = 0
        for n, (wins, galp_tid) in enumerate(plans):
            for i, a, tid, lo, hi in wins:
                task_pos[k] = (n, i, a, tid, lo, hi)
                k += 1
            if galp_tid is not None:
                task_pos[k] = (n, GALP_STEP, 0, galp_tid, 0, len(items[n].text))
                k += 1
        for k in todo:
            n, i, a, tid, lo, hi = task_pos[k]
            groups[(n, a)].append(k)
            win_of[k] = (tid, lo, hi, a)

        # The unit's trunk is the text from the start to the furthest end any member needs.
        trunk_texts: dict[tuple[int, int], str] = {}
        for (n, a), ks in groups.items():
            end = max(win_of[k][2] for k in ks)
            trunk_texts[(n, a)] = items[n].text[a:end]
        extra = [s for s in set(trunk_texts.values())]
        known = {}
        # reuse tokenizations already done for window texts
        text_of_tid = {}
        for n, (wins, galp_tid) in enumerate(plans):
            for i, a, tid, lo, hi in wins:
                text_of_tid.setdefault(tid, items[n].text[a:hi])
            if galp_tid is not None:
                text_of_tid.setdefault(galp_tid, items[n].text)
        for tid, s in text_of_tid.items():
            known[s] = toks[tid]
        missing = [s for s in extra if s not in known]
        for s, t in zip(missing, tokenize_many(tok, missing)):
            known[s] = t

        units = []
        for (n, a), ks in groups.items():
            trunk_ids, _ = known[trunk_texts[(n, a)]]
            branches: list[tuple[int, list[int]]] = []
            targets: list[tuple[int, int, int]] = []
            branch_targets: list[tuple[int, int, int, int]] = []  # (branch no, pos in branch, tok, task)
            trunk_need = 0
            for kk in ks:
                tid, lo, hi, a_ = win_of[kk]
                ids, starts = toks[tid]
                j0, j1 = scored_range(starts, lo - a_, hi - a_)
                if j1 <= j0:
                    continue
                d = _common_prefix(ids, trunk_ids)
                b = None
                if j1 - 1 > d:  # branch inputs U[d : j1-1]
                    b = len(branches)
                    branches.append((d, ids[d : j1 - 1]))
                    trunk_need = max(trunk_need, d)
                for j in range(j0, j1):
                    if j == 0:
                        targets.append((-1, ids[j], kk))
                    elif j - 1 < d:
                        targets.append((j - 1, ids[j], kk))
                        trunk_need = max(trunk_need, j)
                    else:
                        branch_targets.append((b, j - 1 - d, ids[j], kk))
            trunk = trunk_ids[:trunk_need]
            # branch positions are laid out after the trunk, in order
            offsets, off = [], len(trunk)
            for _, bids in branches:
                offsets.append(off)
                off += len(bids)
            for b, p, t, kk in branch_targets:
                targets.append((offsets[b] + p, t, kk))
            units.append(_Unit(prompt_index[items[n].prompt], trunk, branches, targets))
        return units

    def _build_approx_units(self, items, plans, toks, tasks, todo, prompt_index) -> list[_Unit]:
        """One pass per response over its full tokenization; position q (which predicts token
        q+1) attends only to tokens from the start of token q+1's window. GALP runs exact."""
        import bisect

        by_item: dict[int, list[int]] = defaultdict(list)
        for k in todo:
            by_item[tasks[k].item].append(k)
        units = []
        for n, ks in by_item.items():
            it = items[n]
            ids, starts = tokenize_many(self.tokenizer, [it.text])[0]
            spans = list(it.spans)
            step_of = [max(0, bisect.bisect_right([lo for lo, _ in spans], s) - 1) for s in starts]
            first_tok = [bisect.bisect_left(starts, lo) for lo, _ in spans]
            lo = [first_tok[self.window.start(step_of[min(q + 1, len(ids) - 1)])] for q in range(len(ids))]
            targets = []
            galp_targets = []
            for k in ks:
                if tasks[k].step == GALP_STEP:
                    galp_targets = [(j - 1 if j else -1, ids[j], k) for j in range(len(ids))]
                    continue
                a, b = spans[tasks[k].step]
                j0, j1 = bisect.bisect_left(starts, a), bisect.bisect_left(starts, b)
                targets += [(j - 1 if j else -1, ids[j], k) for j in range(j0, j1)]
            if targets:
                need = max(p for p, _, _ in targets) + 1
                units.append(_Unit(prompt_index[it.prompt], ids[:need], [], targets, lo[:need]))
            if galp_targets:
                need = max(p for p, _, _ in galp_targets) + 1
                units.append(_Unit(prompt_index[it.prompt], ids[:need], [], galp_targets))
        return units

    # -- forward machinery ----------------------------------------------------------------

    def _pack_rows(self, units: list[_Unit]) -> list[list[_Unit]]:
        """First-fit-decreasing packing of a prompt's units into rows of `row_tokens`."""
        rows: list[tuple[int, int, list[_Unit]]] = []  # (prompt, used, units)
        for u in sorted(units, key=lambda u: -u.length):
            for r, (p, used, us) in enumerate(rows):
                if p == u.prompt and used + u.length <= self.row_tokens:
                    rows[r] = (p, used + u.length, us + [u])
                    break
            else:
                rows.append((u.prompt, u.length, [u]))
        return [us for _, _, us in rows]

    @torch.no_grad()
    def _run_units(self, units: list[_Unit], prefixes: list[list[int]], tasks: list[_Task]):
        used_prompts = sorted({u.prompt for u in units})
        pre_kv, pre_len, pre_logp = self._prefix_forward([prefixes[p] for p in used_prompts])
        slot = {p: k for k, p in enumerate(used_prompts)}
        sums = np.zeros(len(tasks), dtype=np.float64)
        counts = np.zeros(len(tasks), dtype=np.int64)
        # Targets predicted by the prefix's last position (first token of a window).
        for u in units:
            for pos, t, kk in u.targets:
                if pos < 0:
                    sums[kk] += float(pre_logp[slot[u.prompt], t])
                    counts[kk] += 1
        rows = self._pack_rows(units)
        rows.sort(key=lambda r: -sum(u.length for u in r))
        work = sum(u.length for u in units) or 1
        work_done = 0
        batch: list[list[_Unit]] = []
        for r in rows + [None]:
            if r is not None:
                width = max([sum(u.length for u in x) for x in batch + [r]])
                if not batch or width * (len(batch) + 1) <= self.batch_tokens:
                    batch.append(r)
                    continue
            if batch:
                self._run_batch(batch, pre_kv, pre_len, slot, sums, counts)
                work_done += sum(u.length for row in batch for u in row)
                if self._on_batch and work_done < work:
                    self.stats.seconds = time.perf_counter() - self._t0
                    self._on_batch(work_done / work)
            batch = [r] if r is not None else []
        for k, t in enumerate(tasks):
            if counts[k]:
                t.sum, t.count = float(sums[k]), int(counts[k])

    def _prefix_forward(self, prefixes: list[list[int]]):
        """Right-padded batched prefix pass: per-layer KV [P, kvh, Lmax, hd], lengths, and the
        log-softmax at each prefix's last position (it predicts the first token of a window)."""
        P, L = len(prefixes), max(len(p) for p in prefixes)
        ids = torch.full((P, L), self.pad_id, dtype=torch.long)
        am = torch.zeros((P, L), dtype=torch.long)
        for k, p in enumerate(prefixes):
            ids[k, : len(p)] = torch.tensor(p)
            am[k, : len(p)] = 1
        ids, am = ids.to(self.device), am.to(self.device)
        out = self.model.model(input_ids=ids, attention_mask=am, use_cache=True)
        self.stats.forward_calls += 1
        self.stats.prefix_tokens += sum(len(p) for p in prefixes)
        lens = torch.tensor([len(p) for p in prefixes], device=self.device)
        last = out.last_hidden_state[torch.arange(P, device=self.device), lens - 1]
        logp = self._logprobs(last)
        kv = [(k_, v_) for k_, v_, *_ in out.past_key_values]
        return kv, lens, logp.cpu()

    def _logprobs(self, h: torch.Tensor) -> torch.Tensor:
        logits = self.head(h).float()
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return torch.log_softmax(logits, dim=-1)

    def _run_batch(self, batch, pre_kv, pre_len, slot, sums, counts):
        try:
            self._forward_batch(batch, pre_kv, pre_len, slot, sums, counts, self.attn_budget)
        except torch.OutOfMemoryError:
            self.stats.oom_retries += 1
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            if len(batch) > 1:
                log.warning("out of memory on %d rows: halving the batch and retrying", len(batch))
                half = len(batch) // 2
                self._run_batch(batch[:half], pre_kv, pre_len, slot, sums, counts)
                self._run_batch(batch[half:], pre_kv, pre_len, slot, sums, counts)
            elif self.attn_budget > 1 << 14:
                log.warning("out of memory on one row: halving the attention chunk and retrying")
                self.attn_budget //= 2
                self._run_batch(batch, pre_kv, pre_len, slot, sums, counts)
            else:
                raise

    def _forward_batch(self, batch, pre_kv, pre_len, slot, sums, counts, attn_budget):
        dev = self.device
        B = len(batch)
        T = max(sum(u.length for u in r) for r in batch)
        ids = np.full((B, T), self.pad_id, dtype=np.int64)
        pos = np.zeros((B, T), dtype=np.int64)
        unit = np.zeros((B, T), dtype=np.int64)
        br = np.full((B, T), -1, dtype=np.int64)
        tpos = np.zeros((B, T), dtype=np.int64)
        lim = np.zeros((B, T), dtype=np.int64)
        tlo = np.zeros((B, T), dtype=np.int64)
        bidx = np.zeros((B, T), dtype=np.int64)
        tgt_b, tgt_p, tgt_t, tgt_k = [], [], [], []
        row_slot = []
        for b, r in enumerate(batch):
            s = slot[r[0].prompt]
            row_slot.append(s)
            L = int(pre_len[s])
            off, uid, bid = 0, 0, 0
            for u in r:
                n = len(u.trunk)
                sl = slice(off, off + n)
                ids[b, sl] = u.trunk
                pos[b, sl] = L + np.arange(n)
                unit[b, sl] = uid
                tpos[b, sl] = np.arange(n)
                lim[b, sl] = np.arange(n)
                if u.lo is not None:
                    tlo[b, sl] = u.lo
                boff = off + n
                for d, bids in u.branches:
                    m = len(bids)
                    sl = slice(boff, boff + m)
                    ids[b, sl] = bids
                    pos[b, sl] = L + d + np.arange(m)
                    unit[b, sl] = uid
                    br[b, sl] = bid
                    lim[b, sl] = d - 1
                    bidx[b, sl] = np.arange(m)
                    bid += 1
                    boff += m
                for p, t, kk in u.targets:
                    if p >= 0:
                        tgt_b.append(b)
                        tgt_p.append(off + p)
                        tgt_t.append(t)
                        tgt_k.append(kk)
                off += u.length
                uid += 1
            # padding: each pad token is its own unit, attending only to itself
            unit[b, off:] = -1 - np.arange(T - off)
        self.stats.tokens_forwarded += int(sum(sum(u.length for u in r) for r in batch))
        self.stats.scored_tokens += len(tgt_t)

        t = lambda a: torch.from_numpy(a).to(dev)  # noqa: E731
        ids_t, pos_t, unit_t, br_t, tpos_t, lim_t, bidx_t, tlo_t = map(t, (ids, pos, unit, br, tpos, lim, bidx, tlo))
        rs = torch.tensor(row_slot, device=dev)
        Lp = pre_kv[0][0].shape[2]
        from transformers import DynamicCache

        cache = DynamicCache(ddp_cache_data=[(k[rs], v[rs]) for k, v in pre_kv])
        pre_valid = torch.arange(Lp, device=dev)[None, :] < pre_len[rs][:, None]  # [B, Lp]
        tgt_b = np.asarray(tgt_b, dtype=np.int64)
        tgt_p = np.asarray(tgt_p, dtype=np.int64)
        tgt_t = np.asarray(tgt_t, dtype=np.int64)
        tgt_k = np.asarray(tgt_k, dtype=np.int64)
        dtype = next(self.model.parameters()).dtype
        q0 = 0
        while q0 < T:
            # query chunk so that B x chunk x keys stays within the attention budget
            chunk = max(16, attn_budget // max(1, B * (Lp + T)))
            q1 = min(T, q0 + chunk)
            sq = slice(q0, q1)
            same = unit_t[:, sq, None] == unit_t[:, None, :q1]
            key_trunk = br_t[:, None, :q1] < 0
            ok_trunk = key_trunk & (tpos_t[:, None, :q1] <= lim_t[:, sq, None]) & (tpos_t[:, None, :q1] >= tlo_t[:, sq, None])
            ok_branch = (~key_trunk) & (br_t[:, None, :q1] == br_t[:, sq, None]) & (bidx_t[:, None, :q1] <= bidx_t[:, sq, None])
            tok_mask = same & (ok_trunk | ok_branch)
            mask = torch.cat([pre_valid[:, None, :].expand(B, q1 - q0, Lp), tok_mask], dim=-1)[:, None]
            if self.eager:
                mask = torch.zeros(mask.shape, dtype=dtype, device=dev).masked_fill(~mask, torch.finfo(dtype).min)
            out = self.model.model(
                input_ids=ids_t[:, sq], position_ids=pos_t[:, sq], attention_mask=mask, cache=cache, use_cache=True
            )
            self.stats.forward_calls += 1
            h = out.last_hidden_state
            sel = np.nonzero((tgt_p >= q0) & (tgt_p < q1))[0]
            for s0 in range(0, len(sel), 512):
                part = sel[s0 : s0 + 512]
                hb = h[torch.from_numpy(tgt_b[part]).to(dev), torch.from_numpy(tgt_p[part] - q0).to(dev)]
                lp = self._logprobs(hb).gather(1, torch.from_numpy(tgt_t[part]).to(dev)[:, None])[:, 0]
                np.add.at(sums, tgt_k[part], lp.double().cpu().numpy())
                np.add.at(counts, tgt_k[part], 1)
            q0 = q1


def lalp_of(step_means: Sequence[float]) -> float:
    vals = [m for m in step_means if not math.isnan(m)]
    return float(np.mean(vals)) if vals else float("nan")
