"""The exact LALP/GALP scoring engine.

It computes the same numbers as `lalp_resources.reference` (the definition in docs/method.md) with
far fewer token-forwards:

- **Shared prefix.** The templated prompt is computed once per prompt and group; every window of
  every teacher's answer to it attends to those keys.
- **Merged windows.** Windows that start at the same step form one *unit*: a single pass over
  the text from that start step to the last step that needs it scores all of them. For `fixed:K`
  the first K+1 steps and GALP come from one pass over the whole response.
- **Exact even where BPE is not prefix-stable.** A window's own tokenization can differ from the
  unit's near the window end; the differing tail runs as a *branch* (see `plan.build_units`).
- **Attention over what a window sees.** Units are packed into flat batches and attention runs
  over the keys each query sees (`attention.sparse_attention`); a dense-mask path is the
  fallback where that is unavailable (`attention.sparse_supported`).
- **Head only where needed, exact and chunked.** log p = logit[target] - logsumexp over the
  positions that predict scored tokens (`head.target_logprobs`).
- **No host stalls.** Sums and counts accumulate on the device and come back once per batch,
  after the next batch has been launched, so packing batch k+1 overlaps batch k on a GPU.
- **No truncation.** Tiles are chunked, so memory is bounded by the chunk size and the
  (linear) key lists, never by a quadratic attention matrix.
- **Cache.** Every window has a key over the student namespace and its exact tokens; windows
  found in the cache never reach the model.
- **One tokenization per response.** A window's tokens are its response's, with two short
  pieces re-tokenized at its edges and joined where both agree (`plan.window_tokens`): the same
  tokens and keys as tokenizing each window on its own, at about one response pass of work.
  The key hashes the namespace and prefix once per prompt (`tokenization.key_base`).

The opt-in approximate mode lives in `approx.py` (`ApproximateScoringEngine`); this module has
no approximate branch. `ScoringEngine(..., approx=True)` still returns one, for callers that
pick the mode with a flag.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
import weakref
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import numpy as np
import torch

from lalp_resources.engine import attention as attn
from lalp_resources.engine.cpu_kernels import fast_cpu
from lalp_resources.engine.head import DeviceAccumulator, target_logprobs
from lalp_resources.engine.plan import (
    GALP_STEP, Layout, Task, Unit, batch_rows, block_tokens, build_units, dense_layout, pack_rows, pack_sparse,
    split_tiles, token_ranges,
)
from lalp_resources.engine.prefetch import Planner, Planners
from lalp_resources.engine.types import (
    EngineStats, ResponseScore, ScoreCache, ScoredChunk, ScoreItem, StepScore, cache_row,
)
from lalp_resources.method.tokenization import key_base, window_key_from
from lalp_resources.method.windows import WindowSpec

log = logging.getLogger("lalp.engine")

ATTENTION_PATHS = ("auto", "sparse", "dense")
# Groups planned together (one tokenizer batch, one cache lookup): bounded in groups and responses
BLOCK_GROUPS, BLOCK_ITEMS = 16, 512


@dataclass
class GroupPlan:
    """One group of prompts, planned: its windows' tokens (`toks` by text id, shared by the block)
    and tasks, and the cache's hits among them."""

    prompts: list[str]
    items: list[ScoreItem]
    prompt_index: dict[str, int]
    prefixes: list[list[int]]
    plans: list
    toks: list
    tasks: list[Task]
    hits: dict = field(default_factory=dict)


def pin_threads() -> int:
    """Intra-op threads = the cores this process may run on (torch's default counts the
    machine's, not the affinity mask's, and oversubscribes a restricted process)."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n


def compile_layers(model) -> bool:
    """`torch.compile` each decoder layer (dynamic shapes), once per model: it fuses the
    memory-bound elementwise work around the matmuls (RMSNorm, rotary, SiLU, residuals). The
    sparse attention call is left out of the graph (`attention.sparse_attention` is
    `torch.compiler.disable`d: its bucket loop varies per batch). A layer that cannot compile runs
    eagerly (dynamo's `suppress_errors`). Returns False where the model has no layer list."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None:
        return False
    if not getattr(model, "_lalp_compiled", False):
        import torch._dynamo

        torch._dynamo.config.suppress_errors = True
        for layer in layers:
            layer.forward = torch.compile(layer.forward, dynamic=True)
        model._lalp_compiled = True
    return True


class ScoringEngine:
    """Exact, batched LALP/GALP scoring for one student model.

    `namespace` should identify the student (fingerprint), template and dtype: it prefixes every
    cache key, so a different student or dtype never reuses a score. `attention` picks the path:
    `auto` (sparse where supported, else dense), `sparse` or `dense`. `compile=True` compiles the
    student's decoder layers on the sparse path (`compile_layers`; a one-off cost per process).
    `cpu_kernels=True` runs the model's work on CPU in float32 with packed oneDNN GEMMs and fused
    MLP and RMSNorm (`cpu_kernels.FastCPU`; an extra copy of the linear weights).
    `host_workers` > 0 tokenizes the windows of later blocks in that many planner processes while
    this one scores (`prefetch.Planner`; the results are the same).
    """

    def __new__(cls, *args, approx: bool = False, **kwargs):
        if approx and cls is ScoringEngine:
            from lalp_resources.engine.approx import ApproximateScoringEngine

            return super().__new__(ApproximateScoringEngine)
        return super().__new__(cls)

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
        attention: str = "auto",
        query_chunk: int | None = None,
        approx: bool = False,
        compile: bool = False,
        cpu_kernels: bool = True,
        host_workers: int = 0,
    ):
        self._init_definition(model, tokenizer, template, window, namespace, cache, galp, host_workers)
        self.device = next(model.parameters()).device
        on_gpu = self.device.type == "cuda"
        if attention not in ATTENTION_PATHS:
            raise ValueError(f"attention={attention!r}: expected one of {ATTENTION_PATHS}")
        ok, why = attn.sparse_supported(model)
        if attention == "sparse" and not ok:
            raise ValueError(f"the sparse attention path cannot run this model: {why}")
        self.attention = "sparse" if (attention == "sparse" or (attention == "auto" and ok)) else "dense"
        if attention == "auto" and not ok:
            log.info("dense attention mask (the sparse path cannot run this model: %s)", why)
        # Budgets. Sparse: flat batches of batch_tokens (no padding). Dense: rows of row_tokens.
        self.row_tokens = row_tokens or (4096 if on_gpu else 1024)
        self.batch_tokens = batch_tokens or (65536 if on_gpu else 4096)
        # Max (query x key) elements of one attention block (a bucket, or a dense query chunk).
        self.attn_budget = attn_budget or (1 << 26 if on_gpu else 1 << 22)
        self.query_chunk = query_chunk or (512 if on_gpu else 128)  # sparse: queries per tile
        self.group_tokens = group_tokens or (262144 if on_gpu else 16384)
        self.head = model.get_output_embeddings()
        self.softcap = getattr(model.config, "final_logit_softcapping", None)
        self.eager = getattr(model.config, "_attn_implementation", "sdpa") == "eager"
        self._dtype = next(model.parameters()).dtype
        cfg = model.config
        self._n_layers = int(getattr(cfg, "num_hidden_layers", 0) or 0)
        hd = getattr(cfg, "head_dim", None) or (cfg.hidden_size // cfg.num_attention_heads)
        self._attn_width = int(getattr(cfg, "num_attention_heads", 0) or 0) * int(hd)
        self.pad_id = 0
        self.stats = EngineStats(attention=self.attention)
        if self.device.type == "cpu":
            pin_threads()
        self.compiled = compile and self.attention == "sparse" and compile_layers(model)
        if compile and not self.compiled:
            log.info("compile: not applied (the %s attention path runs the model as transformers does)", self.attention)
        # oneDNN packed GEMMs and fused MLP/RMSNorm on CPU (cpu_kernels.py); compiled layers fuse on their own
        self.fast = fast_cpu(model) if cpu_kernels and not self.compiled else None

    def _init_definition(self, model, tokenizer, template, window, namespace, cache, galp, host_workers=0) -> None:
        """What every backend shares (engine/backends.py too): the student, the definition's
        parameters and the cache."""
        self.model = model
        self.tokenizer = tokenizer
        self.template = template
        self.window = WindowSpec.parse(window)
        self.namespace = namespace
        self.cache = cache
        self.galp = galp
        self.host_workers = host_workers  # planner processes (engine/prefetch.py); 0: plan in-process
        self._planners: Planners | None = None
        self._on_batch = None
        self._t0 = time.perf_counter()
        self._model_seconds = 0.0

    # -- public ---------------------------------------------------------------------------

    def score(
        self,
        items: Sequence[ScoreItem],
        progress: Callable[[int, int, EngineStats], None] | None = None,
    ) -> Iterator[ScoredChunk]:
        """Score items; yields one complete `ScoredChunk` per group of prompts."""
        t0 = self._t0 = time.perf_counter()
        by_prompt, groups = self._groups(items)
        total = sum(len(it.spans) + (1 if self.galp else 0) for it in items)
        done = 0
        # the block's groups are planned together: their responses tokenized in one batch and
        # their windows looked up in the cache at once (per-call costs paid per block)
        blocks = [[(prompts, [items[i] for p in prompts for i in by_prompt[p]]) for prompts in block]
                  for block in self._blocks(groups, by_prompt)]
        planner = self._planner(blocks)
        try:
            for k, block in enumerate(blocks):
                self._fresh = {}  # windows scored by this block's groups so far
                h0 = time.perf_counter()  # a planner's block, or waiting for it, is host time too
                tokens = planner.tokens(k) if planner else None
                self.stats.host_seconds += time.perf_counter() - h0
                planned = self._plan_block(block, tokens)
                for plan in planned:
                    n_group = sum(len(it.spans) + (1 if self.galp else 0) for it in plan.items)
                    if progress:  # within a group, report by the share of its token-forwards done
                        self._on_batch = lambda frac, d=done, n=n_group: progress(d + int(n * frac), total, self.stats)
                    chunk = self._finish_group(plan)
                    self._on_batch = None
                    done += n_group
                    self.stats.seconds = time.perf_counter() - t0
                    if progress:
                        progress(done, total, self.stats)
                    yield chunk
        finally:
            if planner:
                planner.close()

    def _planner(self, blocks) -> Planner | None:
        """Planner processes for the blocks after the first (engine/prefetch.py), where there are
        enough blocks to repay their start."""
        if self._planners is None:
            self._planners = Planners(self.tokenizer, self.template, self.window, self.galp, self.host_workers)
            weakref.finalize(self, self._planners.close)
        return self._planners.ahead(
            [([prompts for prompts, _ in block], [it for _, its in block for it in its]) for block in blocks])

    def _blocks(self, groups: list[list[str]], by_prompt: dict[str, list[int]]) -> Iterator[list[list[str]]]:
        """Consecutive groups planned together: up to BLOCK_GROUPS groups and BLOCK_ITEMS items."""
        block, n = [], 0
        for prompts in groups:
            block.append(prompts)
            n += sum(len(by_prompt[p]) for p in prompts)
            if len(block) >= BLOCK_GROUPS or n >= BLOCK_ITEMS:
                yield block
                block, n = [], 0
        if block:
            yield block

    def groups(self, items: Sequence[ScoreItem]) -> list[list[str]]:
        """The prompt texts `score` takes together, group by group. Grouping is greedy in item
        order, so it is the same from any group's first prompt on: a caller that feeds items in
        batches and holds back each batch's last group (joining it to the next batch) gets the
        groups, and so the forwards and scores, of one call over everything."""
        return self._groups(items)[1]

    def _groups(self, items: Sequence[ScoreItem]) -> tuple[dict[str, list[int]], list[list[str]]]:
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
        return by_prompt, groups

    def score_all(self, items: Sequence[ScoreItem], progress=None) -> ScoredChunk:
        steps, responses, rows = [], [], []
        for c in self.score(items, progress):
            steps += c.steps
            responses += c.responses
            rows += c.new_cache_rows
        return ScoredChunk(steps, responses, rows)

    # -- planning (host) ------------------------------------------------------------------

    def _make_tasks(self, items, plans, toks, prefixes, prompt_index) -> list[Task]:
        """One task per window and per GALP pass, keyed over the namespace and exact tokens."""
        tasks: list[Task] = []
        bases: dict[int, tuple] = {}
        max_ctx = getattr(getattr(self.model, "config", None), "max_position_embeddings", None)
        for n, (it, (wins, galp_tid)) in enumerate(zip(items, plans)):
            pre = prefixes[prompt_index[it.prompt]]
            if max_ctx:  # never truncated, but past the trained context scores lose meaning: count them
                over = [tid for _, _, tid, _, _ in wins] + ([galp_tid] if galp_tid is not None else [])
                self.stats.windows_over_context += sum(len(pre) + len(toks[t][0]) > max_ctx for t in over)
            p = prompt_index[it.prompt]
            if p not in bases:  # the namespace and prefix are hashed once per prompt
                bases[p] = (key_base(self.namespace, pre), key_base(self.namespace + "|galp", pre))
            base, galp_base = bases[p]
            for i, a, tid, lo, hi in wins:
                ids, starts = toks[tid]
                j0, j1 = (int(j) for j in np.searchsorted(starts, (lo - a, hi - a), "left"))
                tasks.append(Task(window_key_from(base, ids, j0, j1), n, i))
            if galp_tid is not None:
                ids, _ = toks[galp_tid]
                tasks.append(Task(window_key_from(galp_base, ids, 0, len(ids)), n, GALP_STEP))
        return tasks

    def _build_units(self, items, plans, toks, tasks, todo, prompt_index) -> list[Unit]:
        return build_units(self.tokenizer, items, plans, toks, todo, prompt_index)

    def _plan_block(self, groups: list[tuple[list[str], list[ScoreItem]]], tokens=None) -> list[GroupPlan]:
        """Windows, their tokens and cache keys for each (prompts, items) group, and the cache's
        answer for all of them in one lookup. `tokens`: the block's `block_tokens`, where a
        planner process computed them ahead."""
        h0 = time.perf_counter()
        every = [it for _, its in groups for it in its]
        if tokens is None:
            tokens = block_tokens(self.tokenizer, self.template, self.window, self.galp,
                                  [prompts for prompts, _ in groups], every)
        plans, toks, alone, block_prefixes = tokens
        self.stats.windows_tokenized_alone += alone
        out, at = [], 0
        for prompts, its in groups:
            prompt_index = {p: k for k, p in enumerate(prompts)}
            prefixes = block_prefixes[len(out)]
            g_plans = plans[at:at + len(its)]
            at += len(its)
            tasks = self._make_tasks(its, g_plans, toks, prefixes, prompt_index)
            out.append(GroupPlan(prompts, its, prompt_index, prefixes, g_plans, toks, tasks))
        if self.cache is not None:
            hits = self.cache.lookup([t.key for plan in out for t in plan.tasks])
            for plan in out:
                plan.hits = {t.key: hits[t.key] for t in plan.tasks if t.key in hits}
        self.stats.host_seconds += time.perf_counter() - h0
        return out

    def _finish_group(self, plan: GroupPlan) -> ScoredChunk:
        """A planned group's missing windows through the model, and its chunk. A window scored by an
        earlier group of the same block (looked up before that group ran) is taken from it, as a
        lookup after that group's commit would have found it."""
        h0 = time.perf_counter()
        model_s0 = self._model_seconds = 0.0
        items, plans, toks, tasks, prompt_index, prefixes = plan.items, plan.plans, plan.toks, plan.tasks, plan.prompt_index, plan.prefixes
        hits = plan.hits
        if self.cache is not None and self._fresh:
            hits = hits | {t.key: self._fresh[t.key] for t in tasks if t.key in self._fresh and t.key not in hits}
        self.stats.windows_total += len(tasks)
        todo = [k for k, t in enumerate(tasks) if t.key not in hits]
        self.stats.windows_cached += len(tasks) - len(todo)
        self.stats.windows_scored += len(todo)
        units = self._build_units(items, plans, toks, tasks, todo, prompt_index)
        if units:
            # per task: sum, count, head1, head2 (see head.DeviceAccumulator)
            totals = np.zeros((4, len(tasks)), dtype=np.float64)
            with torch.no_grad():
                self._run(units, prefixes, totals)
            sums, counts, head1, head2 = totals
            for k, t in enumerate(tasks):
                if counts[k]:
                    t.sum, t.count = float(sums[k]), int(counts[k])
                    t.head1 = float(head1[k])
                    t.head2 = float(head2[k]) if counts[k] >= 2 else None
        out = self._assemble(items, tasks, todo, hits)
        if self.cache is not None:
            self._fresh.update((k, (s, c, h1, h2)) for k, s, c, h1, h2 in out.new_cache_rows)
        self.stats.host_seconds += time.perf_counter() - h0 - (self._model_seconds - model_s0)
        return out

    def _assemble(self, items, tasks, todo, hits) -> ScoredChunk:
        new_rows = [(tasks[k].key, tasks[k].sum, tasks[k].count, tasks[k].head1, tasks[k].head2) for k in todo]
        per_item: dict[int, dict[int, tuple]] = defaultdict(dict)
        for t in tasks:
            if t.key in hits:
                s, c, h1, h2 = cache_row(hits[t.key])
                per_item[t.item][t.step] = (float(s), int(c), True, h1, h2)
            else:
                per_item[t.item][t.step] = (t.sum, t.count, False, t.head1, t.head2)
        steps_out, resp_out = [], []
        for n, it in enumerate(items):
            res = per_item[n]
            means = []
            for i in range(len(it.spans)):
                s, c, cached, h1, h2 = res[i]
                steps_out.append(StepScore(it.response_id, i, c, s, cached, h1, h2))
                if c:
                    means.append(s / c)
            lalp = float(np.mean(means)) if means else float("nan")
            gs, gc, *_ = res.get(GALP_STEP, (float("nan"), 0, False))
            resp_out.append(ResponseScore(it.response_id, len(it.spans), lalp, gs / gc if gc else float("nan"), gc))
        return ScoredChunk(steps_out, resp_out, new_rows)

    def _run(self, units, prefixes, totals) -> None:
        """The model's work for a group: the units' log-probs summed into the tasks' totals (sum,
        count, head1, head2 per task; the vLLM and server backends, engine/backends.py, replace
        this and `_build_units`)."""
        with self.fast.active() if self.fast else contextlib.nullcontext():
            if self.attention == "sparse":
                self._run_sparse(units, prefixes, totals)
            else:
                self._run_dense(units, prefixes, totals)

    # -- device helpers -------------------------------------------------------------------

    def _to_device(self, a: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(np.ascontiguousarray(a))
        if self.device.type == "cuda":
            return t.pin_memory().to(self.device, non_blocking=True)
        return t.to(self.device)

    def _head_into(self, acc: DeviceAccumulator, h: torch.Tensor, rows, pos, toks, local, ranks) -> None:
        """Log-probs of `toks` predicted by h[rows, pos], added to the batch's accumulator."""
        if len(toks) == 0:
            return
        hb = h[self._to_device(rows), self._to_device(pos)] if h.dim() == 3 else h[self._to_device(pos)]
        lp = target_logprobs(self.head, hb, self._to_device(toks), softcap=self.softcap)
        acc.add(self._to_device(local), lp, self._to_device(ranks))
        self.stats.head_positions += len(toks)

    def _collect(self, pending, totals) -> None:
        """The batch's one device-to-host copy, then host-side scatter into the group's tasks
        (totals: sum, count, head1, head2 rows)."""
        acc, tasks = pending
        fetched = acc.fetch()
        self.stats.host_copies += 1
        for row, got in zip(totals, fetched):
            np.add.at(row, tasks, got[: len(tasks)])

    def _progress(self, done: int, work: int) -> None:
        if self._on_batch and done < work:
            self.stats.seconds = time.perf_counter() - self._t0
            self._on_batch(done / work)

    def _account(self, lay: Layout) -> None:
        self.stats.batches += 1
        self.stats.tokens_forwarded += lay.real_tokens
        self.stats.prefix_tokens += lay.prefix_tokens
        self.stats.scored_tokens += len(lay.tgt_tok)
        self.stats.attention_flops += 4.0 * self._n_layers * self._attn_width * lay.visible_keys()

    # -- sparse path ----------------------------------------------------------------------

    def _run_sparse(self, units: list[Unit], prefixes, totals) -> None:
        layouts = pack_sparse(units, prefixes, self.batch_tokens)
        work = sum(u.length for u in units) or 1
        done, pending = 0, None
        stash: dict = {}
        last_use = {p: b for b, lay in enumerate(layouts) for p in lay.ext_prefixes}
        for b, lay in enumerate(layouts):
            # packing this batch (host) ran while the previous one was on the device
            launched = self._launch_sparse(lay, stash)
            for key in [k for k in stash if last_use.get(k[1], -1) <= b]:
                del stash[key]  # no later batch reads this prompt's prefix keys
            if pending is not None:
                self._collect(pending, totals)
            pending = launched
            done += lay.real_tokens
            self._progress(done, work)
        if pending is not None:
            self._collect(pending, totals)

    def _launch_sparse(self, lay: Layout, stash: dict):
        try:
            return self._forward_sparse(lay, stash)
        except torch.OutOfMemoryError:
            self.stats.oom_retries += 1
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            if self.query_chunk > 16:
                log.warning("out of memory on a batch of %d tokens: halving the attention blocks and retrying",
                            lay.ids.shape[1])
                self.query_chunk //= 2
                self.attn_budget //= 2
                return self._launch_sparse(lay, stash)
            raise

    def _forward_sparse(self, lay: Layout, stash: dict):
        tiles = split_tiles(lay.tiles, self.query_chunk)
        buckets = attn.build_buckets(tiles, lay.k_offset, self.attn_budget, lay.ids.shape[1], self._dtype,
                                     self._to_device)
        keep = [(p, a, b) for p, a, b in lay.own_rows if p in lay.keep_prefixes]
        plan = attn.SparsePlan(lay.ids.shape[1], buckets, stash, ext=list(lay.ext_prefixes), keep=keep)
        acc = DeviceAccumulator(len(lay.tasks), self.device)
        ids, pos = self._to_device(lay.ids), self._to_device(lay.pos)
        t0 = time.perf_counter()  # model and head from here (host-side planning and packing above)
        with attn.sparse_attention_enabled(self.model):
            out = self.model.model(input_ids=ids, position_ids=pos, use_cache=False, lalp_plan=plan)
        self.stats.forward_calls += 1
        self._head_into(acc, out.last_hidden_state[0], lay.tgt_row, lay.tgt_pos, lay.tgt_tok, lay.tgt_task, lay.tgt_rank)
        self._account(lay)
        self._model_seconds += time.perf_counter() - t0
        return acc, lay.tasks

    # -- dense path (fallback) ------------------------------------------------------------

    def _run_dense(self, units: list[Unit], prefixes, totals) -> None:
        used = sorted({u.prompt for u in units})
        slot = {p: k for k, p in enumerate(used)}
        pre_kv, pre_len = self._prefix_forward([prefixes[p] for p in used], units, slot, totals)
        batches = batch_rows(pack_rows(units, self.row_tokens), self.batch_tokens)
        work = sum(u.length for u in units) or 1
        done, pending = 0, None
        for batch in batches:
            launched = self._launch_dense(batch, pre_kv, pre_len, slot)
            if pending is not None:
                self._collect(pending, totals)
            pending = launched
            done += sum(u.length for r in batch for u in r)
            self._progress(done, work)
        if pending is not None:
            self._collect(pending, totals)

    def _prefix_forward(self, prefixes: list[list[int]], units, slot, totals):
        """Right-padded batched prefix pass: per-layer KV [P, kvh, Lmax, hd], lengths, and the
        log-probs of every window's first token (predicted by its prefix's last position)."""
        t0 = time.perf_counter()
        P, L = len(prefixes), max(len(p) for p in prefixes)
        ids = np.full((P, L), self.pad_id, dtype=np.int64)
        am = np.zeros((P, L), dtype=np.int64)
        for k, p in enumerate(prefixes):
            ids[k, : len(p)] = p
            am[k, : len(p)] = 1
        # a ready 4D mask (causal, padding masked): transformers then reads nothing back from it
        valid = self._to_device(am).bool()
        mask = torch.ones((L, L), dtype=torch.bool, device=self.device).tril()[None, None] & valid[:, None, None, :]
        mask |= torch.eye(L, dtype=torch.bool, device=self.device)[None, None]  # padded rows see themselves
        if self.eager:
            dtype = next(self.model.parameters()).dtype
            mask = torch.zeros(mask.shape, dtype=dtype, device=self.device).masked_fill(~mask, torch.finfo(dtype).min)
        out = self.model.model(input_ids=self._to_device(ids), attention_mask=mask, use_cache=True)
        self.stats.forward_calls += 1
        self.stats.prefix_tokens += sum(len(p) for p in prefixes)
        self.stats.padded_tokens += P * L - sum(len(p) for p in prefixes)
        targets = [(slot[u.prompt], len(prefixes[slot[u.prompt]]) - 1, t, kk, r) for u in units for q, t, kk, r in u.targets if q < 0]
        if targets:
            a = np.asarray(targets, dtype=np.int64)
            tasks, local = np.unique(a[:, 3], return_inverse=True)
            acc = DeviceAccumulator(len(tasks), self.device)
            self._head_into(acc, out.last_hidden_state, a[:, 0], a[:, 1], a[:, 2], local, a[:, 4])
            self._collect((acc, tasks), totals)
        kv = [(layer[0], layer[1]) for layer in _cache_layers(out)]
        self._model_seconds += time.perf_counter() - t0
        return kv, [len(p) for p in prefixes]

    def _launch_dense(self, batch, pre_kv, pre_len, slot):
        try:
            return self._forward_dense(batch, pre_kv, pre_len, slot, self.attn_budget)
        except torch.OutOfMemoryError:
            self.stats.oom_retries += 1
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            if len(batch) > 1:
                log.warning("out of memory on %d rows: halving the batch and retrying", len(batch))
                half = len(batch) // 2
                a = self._launch_dense(batch[:half], pre_kv, pre_len, slot)
                b = self._launch_dense(batch[half:], pre_kv, pre_len, slot)
                return _merge_pending(a, b)
            if self.attn_budget > 1 << 14:
                log.warning("out of memory on one row: halving the attention chunk and retrying")
                self.attn_budget //= 2
                return self._launch_dense(batch, pre_kv, pre_len, slot)
            raise

    def _forward_dense(self, batch, pre_kv, pre_len, slot, attn_budget):
        from transformers import DynamicCache

        dev = self.device
        row_slot = [slot[r[0].prompt] for r in batch]
        Lp = pre_kv[0][0].shape[2]
        lay = dense_layout(batch, [pre_len[s] for s in row_slot], Lp)
        B, T = lay.ids.shape
        self.stats.padded_tokens += B * T - lay.real_tokens
        ids_t, pos_t = self._to_device(lay.ids), self._to_device(lay.pos)
        ranges = self._to_device(token_ranges(lay))
        rs = self._to_device(np.asarray(row_slot, dtype=np.int64))
        cache = DynamicCache(ddp_cache_data=[(k[rs], v[rs]) for k, v in pre_kv])
        dtype = next(self.model.parameters()).dtype
        acc = DeviceAccumulator(len(lay.tasks), dev)
        t0 = time.perf_counter()
        q0 = 0
        while q0 < T:
            # query chunk so that B x chunk x keys stays within the attention budget
            chunk = max(16, attn_budget // max(1, B * (Lp + T)))
            q1 = min(T, q0 + chunk)
            mask = attn.dense_mask(ranges, q0, q1, Lp + q1, Lp)
            if self.eager:
                mask = torch.zeros(mask.shape, dtype=dtype, device=dev).masked_fill(~mask, torch.finfo(dtype).min)
            out = self.model.model(input_ids=ids_t[:, q0:q1], position_ids=pos_t[:, q0:q1], attention_mask=mask,
                                   cache=cache, use_cache=True)
            self.stats.forward_calls += 1
            sel = np.nonzero((lay.tgt_pos >= q0) & (lay.tgt_pos < q1))[0]
            self._head_into(acc, out.last_hidden_state, lay.tgt_row[sel], lay.tgt_pos[sel] - q0, lay.tgt_tok[sel],
                            lay.tgt_task[sel], lay.tgt_rank[sel])
            q0 = q1
        self._account(lay)
        self._model_seconds += time.perf_counter() - t0
        return acc, lay.tasks


def _cache_layers(out):
    cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
    if hasattr(cache, "layers"):
        return [(layer.keys, layer.values) for layer in cache.layers]
    return [(k, v) for k, v, *_ in cache]


def _merge_pending(a, b):
    """Two halves of a batch retried after an out-of-memory error: collect both."""
    (acc_a, tasks_a), (acc_b, tasks_b) = a, b
    return _PairAccumulator(acc_a, acc_b, len(tasks_a)), np.concatenate([tasks_a, tasks_b])


class _PairAccumulator:
    def __init__(self, a, b, n_a):
        self.a, self.b, self.n_a = a, b, n_a

    def fetch(self):
        return tuple(np.concatenate([x[: self.n_a], y]) for x, y in zip(self.a.fetch(), self.b.fetch()))
