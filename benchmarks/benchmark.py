"""Throughput and memory benchmark: the packed engine against the plain reference.

    python -m benchmarks.benchmark [--prompts N] [--teachers T1 T2 ...] [--window fixed:4]
        [--template chat] [--dtype float32] [--device auto] [--segmenter paragraph] [--memory]
        [--compile] [--host-rate] [--vs-float32] [--write-bundle DIR | --bundle DIR [--random-weights]]

(`make bench BENCH_ARGS="..."` runs the same.)

**Throughput.** A deterministic sample of real traces (the first N prompt ids, in natural order,
among the prompts that every selected teacher answered, so the engine can reuse each prompt's
prefix across teachers) is segmented, merged with `merge_unscored_steps`, and scored twice in
the same process with the same model: by `reference_score` (one plain forward per window, plus
GALP), then by `ScoringEngine.score_all`. The model is warmed up first on a tiny item so neither
pays first-call costs (with `--compile`, the engine's one-off `torch.compile` is run on 4 items
first and printed, not timed). Both throughputs count the same tokens: the scored response tokens (sum
over steps of n_tokens, plus the GALP tokens) divided by wall seconds. Step means are compared
step by step.

**Efficiency**, in the same run: the machine's matmul rate on the student's own weight shapes
is timed just before and just after the engine (the faster counts), and `peak_fraction` is the
engine's model FLOPs per second (decoder weights per token-forward, attention over the keys each
query sees, the head on scored positions; padding and masked work not counted) over that rate.
`floor_ratio` is the positions the engine ran through the model (padding included) over the
exact floor: the token-forwards the window definition forces (`exact_floor`). The LAST printed
line is always

    speedup=<engine tok/s / reference tok/s, 2 decimals> max_abs_diff=<%.2e> peak_fraction=<%.3f> floor_ratio=<%.3f>

**Memory (`--memory`).** Synthetic long traces built from the real ones (a few huge paragraphs,
so windows are long but few) are scored by the engine only, GALP included; the reference would
not fit. On CUDA the peak is `torch.cuda.max_memory_allocated` above the resident model; on the
CPU each size runs in a fresh subprocess that samples its RSS in a background thread during the
call (and reports `ru_maxrss`). Default sizes: 1k, 8k and 32k tokens on CUDA; 1k, 4k and 8k on
the CPU, where 32k takes long in float32: `--memory-only --memory-sizes 1000,8000,32000
--memory-steps 2 --threads 1` measured 305 / 722 / 1,922 MB peak RSS growth, the 32k trace in 28 min.

Inputs: the shared ZeroEval MATH level 5 traces (`ZEROEVAL_DIR`, or `--data`); if they are absent, the
embedded CHAMP traces (`ingest("champ")`), with a message saying so. Or a bundle (see
"bundles" below and `benchmarks/gpu_check.py`): what a GPU lease can carry.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import re
import resource
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

REPO = Path(__file__).resolve().parents[1]
ZEROEVAL_DIR = REPO.parent / "shared" / "data" / "zeroeval-math-l5"
DEFAULT_PROMPTS = 4
DEFAULT_WINDOW = "fixed:4"
CPU_MEMORY_SIZES = (1000, 4000, 8000)
GPU_MEMORY_SIZES = (1000, 8000, 32000)
MEMORY_STEPS = 8
FINAL_LINE_RE = re.compile(r"^speedup=(\d+\.\d{2}|inf|nan) max_abs_diff=(\d\.\d{2}e[+-]\d{2}|inf|nan) "
                           r"peak_fraction=(\d+\.\d{3}|nan) floor_ratio=(\d+\.\d{3}|nan)"
                           r"(?: vs_vllm=(\d+\.\d{2}|inf|nan))?$")
_MEMORY_TAG = "LALP_MEMORY_RESULT "

# Dense bf16 peak FLOP/s (no sparsity) by GPU name; the first matching key wins.
GPU_PEAK_BF16: list[tuple[str, float]] = [
    ("GH200", 989e12),
    ("H200", 989e12),
    ("H100 PCIE", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),
    ("H800", 989e12),
    ("B200", 2250e12),
    ("B100", 1750e12),
    ("A100", 312e12),
    ("A800", 312e12),
    ("L40S", 362e12),
    ("L40", 181e12),
    ("L4", 121e12),
    ("A10G", 70e12),
    ("A10", 125e12),
    ("RTX 4090", 165e12),
    ("RTX 3090", 71e12),
    ("V100", 125e12),  # fp16 tensor cores; V100 has no bf16
    ("T4", 65e12),     # fp16 tensor cores
]


# --------------------------------------------------------------------------- pure helpers


def natural_key(s: str):
    """Sort key: numeric ids in numeric order ("2" < "10"), others after, lexically."""
    return (0, int(s), "") if s.isdigit() else (1, 0, s)


def format_final_line(speedup: float, max_abs_diff: float, peak_fraction: float = math.nan,
                      floor_ratio: float = math.nan, vs_vllm: float | None = None) -> str:
    sp = f"{speedup:.2f}" if math.isfinite(speedup) else ("inf" if speedup > 0 else "nan")
    md = f"{max_abs_diff:.2e}" if math.isfinite(max_abs_diff) else ("inf" if max_abs_diff > 0 else "nan")
    pf = f"{peak_fraction:.3f}" if math.isfinite(peak_fraction) else "nan"
    fr = f"{floor_ratio:.3f}" if math.isfinite(floor_ratio) else "nan"
    line = f"speedup={sp} max_abs_diff={md} peak_fraction={pf} floor_ratio={fr}"
    if vs_vllm is not None:
        line += " vs_vllm=" + (f"{vs_vllm:.2f}" if math.isfinite(vs_vllm) else ("inf" if vs_vllm > 0 else "nan"))
    return line


def throughput(tokens: int, seconds: float) -> float:
    return tokens / seconds if seconds > 0 else float("inf")


def gpu_peak_flops(name: str) -> tuple[float | None, str]:
    """(peak dense bf16 FLOP/s, the table key that matched) for a CUDA device name."""
    up = name.upper()
    for key, peak in GPU_PEAK_BF16:
        if key in up:
            return peak, key
    return None, ""


def sample_traces(traces, n_prompts: int, teachers: Sequence[str] | None = None):
    """The first `n_prompts` prompt ids (natural order) answered by every selected teacher, and
    every selected teacher's trace for them, ordered by (prompt id, teacher).

    `traces` is a Polars frame with at least prompt_id, teacher, prompt, response, response_id.
    Returns (rows as dicts, the teachers used, the prompt ids used).
    """
    import polars as pl

    have = sorted(traces.get_column("teacher").unique().to_list())
    if teachers:
        missing = [t for t in teachers if t not in have]
        if missing:
            raise ValueError(f"unknown teacher(s) {missing}; the data has {have}")
        use = list(dict.fromkeys(teachers))
    else:
        use = have
    sub = traces.filter(pl.col("teacher").is_in(use))
    per_prompt = sub.group_by("prompt_id").agg(pl.col("teacher").n_unique().alias("n"))
    full = per_prompt.filter(pl.col("n") == len(use)).get_column("prompt_id").to_list()
    if not full:  # no prompt shared by all of them: fall back to any prompt
        full = per_prompt.get_column("prompt_id").to_list()
    pids = sorted(full, key=natural_key)[: max(0, n_prompts)]
    order = {p: k for k, p in enumerate(pids)}
    rank = {t: k for k, t in enumerate(use)}
    rows = [r for r in sub.filter(pl.col("prompt_id").is_in(pids)).iter_rows(named=True)]
    rows.sort(key=lambda r: (order[r["prompt_id"]], rank[r["teacher"]], r["response_id"]))
    return rows, use, pids


def make_items(rows, tokenizer, segmenter: str = "paragraph"):
    """ScoreItems for trace rows: segmented, then `merge_unscored_steps` with the student tokenizer."""
    from lalp_resources.method.segmentation import segment
    from lalp_resources.engine import ScoreItem
    from lalp_resources.method.tokenization import merge_unscored_steps

    if segmenter == "llm":
        raise ValueError("the benchmark uses rule-based segmenters only (paragraph, line, sentence)")
    items = []
    for r in rows:
        text = r["response"]
        spans = merge_unscored_steps(tokenizer, text, segment(text, segmenter))
        items.append(ScoreItem(r["response_id"], r["prompt"], text, spans))
    return items


def reference_forward_tokens(tokenizer, item, window: str = DEFAULT_WINDOW, template: str = "chat") -> tuple[int, int]:
    """(token-forwards, forward calls) that `reference_score` spends on one item."""
    from lalp_resources.method.windows import WindowSpec
    from lalp_resources.method.tokenization import prefix_ids, scored_range, tokenize_with_starts

    w = WindowSpec.parse(window)
    npre = len(prefix_ids(tokenizer, item.prompt, template))
    spans = list(item.spans)
    total, calls = 0, 0
    for i, (lo, hi) in enumerate(spans):
        a = spans[w.start(i)][0]
        _, starts = tokenize_with_starts(tokenizer, item.text[a:hi])
        j0, j1 = scored_range(starts, lo - a, hi - a)
        if j1 > j0:
            total += npre + j1
            calls += 1
    ids, _ = tokenize_with_starts(tokenizer, item.text)
    if ids:
        total += npre + len(ids)
        calls += 1
    return total, calls


# --------------------------------------------------------------------------- efficiency
# Two yardsticks, measured in the same run as the engine:
# - the hardware: the machine's matmul rate on the student's own weight shapes (one decoder
#   layer's linear maps at the engine's batch rows, the LM head at its chunk rows), in the dtype
#   and thread count of the run. `peak_fraction` = the engine's model FLOPs per second over that
#   rate, where model FLOPs = 2 x decoder weights per token-forward + 4 x layers x heads x
#   head_dim per (query, visible key) pair + 2 x d x vocab per head position. Padding and masked
#   attention are not counted: they are waste.
# - the exact floor: the token-forwards the window definition forces (see `exact_floor`).
#   `floor_ratio` = every position the engine ran through the model (padding included) over it.


@dataclass
class ModelFlops:
    body: float   # per token-forward: 2 x the decoder layers' weight-matrix parameters
    head: float   # per head position: 2 x hidden x vocab
    pair: float   # per (query, visible key) pair: 4 x layers x heads x head_dim (QK^T and PV)


def model_flops(model) -> ModelFlops:
    import torch

    cfg = model.config
    layers = model.model.layers
    body = sum(2 * m.weight.numel() for m in layers.modules() if isinstance(m, torch.nn.Linear))
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return ModelFlops(float(body), 2.0 * model.get_output_embeddings().weight.numel(),
                      4.0 * cfg.num_hidden_layers * cfg.num_attention_heads * hd)


def engine_flops(mf: ModelFlops, stats: dict) -> dict[str, float]:
    body = mf.body * (stats["tokens_forwarded"] + stats["prefix_tokens"])
    head = mf.head * stats["head_positions"]
    attn = float(stats.get("attention_flops", 0.0))
    return {"body": body, "head": head, "attention": attn, "total": body + head + attn}


def matmul_rates(model, rows: int, head_rows: int, seconds: float = 1.0) -> dict[str, float]:
    """Best sustained FLOP/s of `F.linear` on the student's own weights: a decoder layer's linear
    maps at `rows` rows (`body`) and the LM head at `head_rows` rows (`head`)."""
    import torch
    import torch.nn.functional as F

    dev = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    weights = [m.weight for m in model.model.layers[0].modules() if isinstance(m, torch.nn.Linear)]
    head = model.get_output_embeddings().weight

    def rate(ws, m):
        xs = {w.shape[1]: torch.randn(m, w.shape[1], dtype=dtype, device=dev) for w in ws}
        flops = sum(2.0 * m * w.numel() for w in ws)
        best, spent = math.inf, 0.0
        with torch.no_grad():
            for w in ws:  # warm
                F.linear(xs[w.shape[1]], w)
            while spent < seconds or best == math.inf:
                _sync(dev)
                t0 = time.perf_counter()
                for w in ws:
                    F.linear(xs[w.shape[1]], w)
                _sync(dev)
                dt = time.perf_counter() - t0
                best, spent = min(best, dt), spent + dt
        return flops / best

    return {"body": rate(weights, rows), "head": rate([head], head_rows)}


def ceiling_rate(flops: dict[str, float], rates: dict[str, float]) -> float:
    """FLOP/s the run would reach if every FLOP ran at the matmul rate of its kind (attention
    at the body rate)."""
    t = (flops["body"] + flops["attention"]) / rates["body"] + flops["head"] / rates["head"]
    return flops["total"] / t if t > 0 else math.nan


def _trie_nodes(seqs: list[list[int]]) -> int:
    """Nodes of the trie of token sequences: the distinct (prefix) states to compute."""
    seqs = sorted(seqs)
    total, prev = 0, []
    for s_ in seqs:
        n = min(len(s_), len(prev))
        i = 0
        while i < n and s_[i] == prev[i]:
            i += 1
        total += len(s_) - i
        prev = s_
    return total


def exact_floor(tokenizer, items, window: str = DEFAULT_WINDOW, template: str = "chat") -> dict[str, int]:
    """The token-forwards the definition forces, computed from the tokenization alone.

    A window scoring tokens j0..j1-1 of its own tokenization needs its predictors, tokens
    0..j1-2, computed with the context that starts at the window's first step. Windows with the
    same start share what their token sequences share (a trie per start; GALP starts at 0), and
    every prompt's prefix is needed once. Returns response, prefix and total token-forwards."""
    from lalp_resources.method.tokenization import prefix_ids, scored_range, tokenize_with_starts
    from lalp_resources.method.windows import WindowSpec

    w = WindowSpec.parse(window)
    prefix = sum(len(prefix_ids(tokenizer, p, template)) for p in dict.fromkeys(it.prompt for it in items))
    response = 0
    for it in items:
        spans = list(it.spans)
        by_start: dict[int, list[list[int]]] = {}
        for i, (lo, hi) in enumerate(spans):
            a = spans[w.start(i)][0]
            ids, starts = tokenize_with_starts(tokenizer, it.text[a:hi])
            j0, j1 = scored_range(starts, lo - a, hi - a)
            if j1 > j0:
                by_start.setdefault(a, []).append(ids[: j1 - 1])
        ids, _ = tokenize_with_starts(tokenizer, it.text)
        if ids:
            by_start.setdefault(spans[0][0], []).append(ids[:-1])
        response += sum(_trie_nodes(v) for v in by_start.values())
    return {"response": response, "prefix": prefix, "total": response + prefix}


# --------------------------------------------------------------------------- dtype agreement


def _ranks(xs: Sequence[float]) -> list[float]:
    """Ranks from 1, ties given their average rank."""
    order = sorted(range(len(xs)), key=lambda i: xs[i])
    r = [0.0] * len(xs)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and xs[order[j + 1]] == xs[order[i]]:
            j += 1
        for k in range(i, j + 1):
            r[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return r


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    ra, rb = _ranks(a), _ranks(b)
    n = len(ra)
    if n < 2:
        return math.nan
    ma, mb = sum(ra) / n, sum(rb) / n
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    va, vb = sum((x - ma) ** 2 for x in ra), sum((y - mb) ** 2 for y in rb)
    return cov / math.sqrt(va * vb) if va > 0 and vb > 0 else math.nan


def kendall_tau_b(a: Sequence[float], b: Sequence[float]) -> float:
    n, conc, disc, ta, tb = len(a), 0, 0, 0, 0
    for i in range(n):
        for j in range(i + 1, n):
            da, db = a[i] - a[j], b[i] - b[j]
            if da == 0 and db == 0:
                continue
            if da == 0:
                ta += 1
            elif db == 0:
                tb += 1
            elif (da > 0) == (db > 0):
                conc += 1
            else:
                disc += 1
    den = math.sqrt((conc + disc + ta) * (conc + disc + tb))
    return (conc - disc) / den if den > 0 else math.nan


def dtype_agreement(low: RunResult, ref: RunResult, rows) -> dict[str, float]:
    """How far a lower-precision engine run is from a float32 one: step scores, response LALP,
    teacher means (the ranking) and the per-prompt pick (argmax LALP)."""
    keys = [k for k in ref.step_means if k in low.step_means
            and not math.isnan(ref.step_means[k]) and not math.isnan(low.step_means[k])]
    a = [low.step_means[k] for k in keys]
    b = [ref.step_means[k] for k in keys]
    diffs = [abs(x - y) for x, y in zip(a, b)]
    meta = {r["response_id"]: (r["teacher"], r["prompt_id"]) for r in rows}

    def lalp(run):
        per: dict[str, list[float]] = {}
        for (rid, _), m in run.step_means.items():
            if not math.isnan(m):
                per.setdefault(rid, []).append(m)
        return {rid: sum(v) / len(v) for rid, v in per.items()}

    la, lb = lalp(low), lalp(ref)
    rids = sorted(set(la) & set(lb) & set(meta))
    teachers = sorted({meta[r][0] for r in rids})
    ta = [sum(la[r] for r in rids if meta[r][0] == t) / sum(meta[r][0] == t for r in rids) for t in teachers]
    tb = [sum(lb[r] for r in rids if meta[r][0] == t) / sum(meta[r][0] == t for r in rids) for t in teachers]
    prompts = sorted({meta[r][1] for r in rids})
    same_pick = sum(
        max((r for r in rids if meta[r][1] == p), key=la.get) == max((r for r in rids if meta[r][1] == p), key=lb.get)
        for p in prompts)
    return {
        "steps": len(keys), "step_max_abs": max(diffs) if diffs else math.nan,
        "step_mean_abs": sum(diffs) / len(diffs) if diffs else math.nan,
        "step_spearman": spearman(a, b), "step_kendall": kendall_tau_b(a, b),
        "response_spearman": spearman([la[r] for r in rids], [lb[r] for r in rids]),
        "response_kendall": kendall_tau_b([la[r] for r in rids], [lb[r] for r in rids]),
        "teachers": len(teachers), "teacher_spearman": spearman(ta, tb), "teacher_kendall": kendall_tau_b(ta, tb),
        "teacher_order_equal": [t for _, t in sorted(zip(ta, teachers), reverse=True)]
        == [t for _, t in sorted(zip(tb, teachers), reverse=True)],
        "prompts": len(prompts), "same_pick": same_pick,
    }


# --------------------------------------------------------------------------- host-side rate


def host_rate(tokenizer, items, window: str = DEFAULT_WINDOW, template: str = "chat", repeats: int = 3) -> dict:
    """The engine's host-side rate with a tiny model (1 layer, width 16: its device work is
    negligible next to the host's): tokenization, planning, cache keys, packing, tile and bucket
    building, result assembly. Returns token-forwards per second of wall time and of host time
    (wall minus the time inside the model and head), best of `repeats`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from lalp_resources.engine import ScoringEngine

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=1 << 16)
    model = LlamaForCausalLM(cfg).eval()
    model.config._attn_implementation = "sdpa"
    best = None
    for _ in range(repeats):
        eng = ScoringEngine(model, tokenizer, window=window, template=template, namespace="host-rate")
        t0 = time.perf_counter()
        eng.score_all(items)
        wall = time.perf_counter() - t0
        st = eng.stats
        fwd = st.tokens_forwarded + st.prefix_tokens
        r = {"token_forwards": fwd, "wall_s": wall, "host_s": st.host_seconds, "device_s": wall - st.host_seconds,
             "wall_rate": fwd / wall, "host_rate": fwd / max(st.host_seconds, 1e-9)}
        if best is None or r["host_rate"] > best["host_rate"]:
            best = r
    return best


# --------------------------------------------------------------------------- the two runs


@dataclass
class RunResult:
    name: str
    seconds: float
    step_means: dict[tuple[str, int], float]   # (response_id, step) -> mean log-prob (nan: no tokens)
    step_tokens: dict[tuple[str, int], int]
    galp: dict[str, float]
    galp_tokens: dict[str, int]
    extra: dict = field(default_factory=dict)
    cpu_seconds: float = math.nan  # process CPU time (all threads): steadier than wall time on a busy CPU

    @property
    def steps(self) -> int:
        return len(self.step_means)

    @property
    def tokens(self) -> int:
        """Scored response tokens: sum over steps of n_tokens, plus the GALP tokens."""
        return sum(self.step_tokens.values()) + sum(self.galp_tokens.values())

    @property
    def tokens_per_s(self) -> float:
        return throughput(self.tokens, self.seconds)


def _sync(device) -> None:
    import torch

    if getattr(device, "type", str(device)).startswith("cuda"):
        torch.cuda.synchronize()


def run_reference(model, tokenizer, items, window: str = DEFAULT_WINDOW, template: str = "chat") -> RunResult:
    from lalp_resources.reference import reference_score

    dev = next(model.parameters()).device
    means, toks, galp, galp_toks = {}, {}, {}, {}
    _sync(dev)
    t0, c0 = time.perf_counter(), time.process_time()
    for it in items:
        r = reference_score(model, tokenizer, it.prompt, it.text, it.spans, window=window, template=template)
        for i, (m, n) in enumerate(zip(r.step_means, r.step_counts)):
            means[(it.response_id, i)] = m
            toks[(it.response_id, i)] = n
        galp[it.response_id] = r.galp
        galp_toks[it.response_id] = r.galp_count
    _sync(dev)
    return RunResult("reference", time.perf_counter() - t0, means, toks, galp, galp_toks,
                     cpu_seconds=time.process_time() - c0)


def run_engine(model, tokenizer, items, window: str = DEFAULT_WINDOW, template: str = "chat", **engine_kw) -> RunResult:
    from lalp_resources.engine import ScoringEngine

    dev = next(model.parameters()).device
    engine = ScoringEngine(model, tokenizer, template=template, window=window, namespace="benchmark",
                           cache=None, **engine_kw)
    _sync(dev)
    t0, c0 = time.perf_counter(), time.process_time()
    out = engine.score_all(items)
    _sync(dev)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    means = {(s.response_id, s.step_index): s.mean_logprob for s in out.steps}
    toks = {(s.response_id, s.step_index): s.n_tokens for s in out.steps}
    galp = {r.response_id: r.galp for r in out.responses}
    galp_toks = {r.response_id: r.galp_tokens for r in out.responses}
    return RunResult("engine", seconds, means, toks, galp, galp_toks,
                     {"stats": engine.stats.as_dict(), "batch_tokens": engine.batch_tokens}, cpu)


@dataclass
class Comparison:
    max_abs_diff: float          # over step means
    galp_max_diff: float
    mean_abs_diff: float
    n_steps: int
    missing: int                 # steps present in one run only
    count_mismatches: int        # steps whose scored-token counts differ
    nan_mismatches: int          # a mean is nan in one run only
    worst: tuple[str, int] | None


def compare(ref: RunResult, eng: RunResult) -> Comparison:
    keys = set(ref.step_means) | set(eng.step_means)
    missing = len(keys ^ (set(ref.step_means) & set(eng.step_means)))
    worst, worst_d, total, n, nan_mis, cnt_mis = None, 0.0, 0.0, 0, 0, 0
    for k in sorted(keys):
        if k not in ref.step_means or k not in eng.step_means:
            continue
        a, b = ref.step_means[k], eng.step_means[k]
        if ref.step_tokens[k] != eng.step_tokens[k]:
            cnt_mis += 1
        if math.isnan(a) or math.isnan(b):
            if math.isnan(a) != math.isnan(b):
                nan_mis += 1
            continue
        d = abs(a - b)
        total += d
        n += 1
        if d > worst_d or worst is None:
            worst, worst_d = k, d
    gd = 0.0
    for rid in set(ref.galp) | set(eng.galp):
        g, h = ref.galp.get(rid, math.nan), eng.galp.get(rid, math.nan)
        if ref.galp_tokens.get(rid) != eng.galp_tokens.get(rid):
            cnt_mis += 1
        if math.isnan(g) and math.isnan(h):
            continue
        gd = math.inf if (math.isnan(g) or math.isnan(h)) else max(gd, abs(g - h))
    mad = worst_d if (missing == 0 and nan_mis == 0) else float("inf")
    return Comparison(mad, gd, total / n if n else float("nan"), len(keys), missing, cnt_mis, nan_mis, worst)


@dataclass
class BenchResult:
    reference: RunResult
    engine: RunResult
    comparison: Comparison
    n_items: int
    n_params: int
    device: str
    dtype: str
    reference_forward_tokens: int = 0
    reference_forward_calls: int = 0
    peak_flops: float | None = None
    peak_name: str = ""
    flops: dict = field(default_factory=dict)      # the engine's model FLOPs by kind (`engine_flops`)
    rates: list = field(default_factory=list)      # matmul rates measured before and after the engine
    floor: dict = field(default_factory=dict)      # `exact_floor`

    @property
    def ceiling(self) -> float:
        """The run's matmul ceiling (FLOP/s): the faster of the two measurements (conservative)."""
        cs = [ceiling_rate(self.flops, r) for r in self.rates] if self.flops else []
        return max(cs) if cs else math.nan

    @property
    def achieved_flops(self) -> float:
        return self.flops.get("total", math.nan) / self.engine.seconds if self.flops else math.nan

    @property
    def peak_fraction(self) -> float:
        return self.achieved_flops / self.ceiling if self.rates else math.nan

    @property
    def engine_work(self) -> int:
        st = self.engine.extra["stats"]
        return st["tokens_forwarded"] + st["prefix_tokens"] + st.get("padded_tokens", 0)

    @property
    def floor_ratio(self) -> float:
        return self.engine_work / self.floor["total"] if self.floor.get("total") else math.nan

    @property
    def speedup(self) -> float:
        # Both count the same tokens (the reference's counts; the comparison flags any mismatch).
        return throughput(self.reference.tokens, self.engine.seconds) / throughput(self.reference.tokens, self.reference.seconds)

    @property
    def final_line(self) -> str:
        return format_final_line(self.speedup, self.comparison.max_abs_diff, self.peak_fraction, self.floor_ratio)

    def mfu(self) -> dict[str, float] | None:
        if self.peak_flops is None:
            return None
        st = self.engine.extra["stats"]
        eng = 2 * self.n_params * (st["tokens_forwarded"] + st["prefix_tokens"]) / self.engine.seconds
        ref = 2 * self.n_params * self.reference_forward_tokens / self.reference.seconds
        return {"engine": eng / self.peak_flops, "reference": ref / self.peak_flops}

    def report(self) -> list[str]:
        ref, eng, c = self.reference, self.engine, self.comparison
        st = eng.extra["stats"]
        lines = [
            f"{'':10s} {'items':>6s} {'steps':>6s} {'tokens':>8s} {'seconds':>9s} {'tokens/s':>9s} "
            f"{'cpu_s':>9s} {'windows':>8s} {'fwd_tokens':>10s} {'fwd_calls':>9s} {'fwd_tok/s':>9s}",
        ]
        rows = [
            (ref, self.n_items + self.comparison.n_steps, self.reference_forward_tokens, self.reference_forward_calls),
            (eng, st["windows_total"], st["tokens_forwarded"] + st["prefix_tokens"], st["forward_calls"]),
        ]
        for r, windows, fwd, calls in rows:
            lines.append(
                f"{r.name:10s} {self.n_items:6d} {r.steps:6d} {r.tokens:8d} {r.seconds:9.2f} {r.tokens_per_s:9.1f} "
                f"{r.cpu_seconds:9.2f} {windows:8d} {fwd:10d} {calls:9d} {throughput(fwd, r.seconds):9.1f}"
            )
        lines.append("(tokens = scored response tokens: step tokens + GALP tokens; cpu_s = process CPU seconds, "
                      "all threads; fwd_tokens = token-forwards through the model, prefixes included; "
                      "reference windows = steps + one GALP pass per item)")
        lines.append(
            "engine stats: " + ", ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in st.items())
        )
        lines.append(
            f"work ratio (reference fwd_tokens / engine fwd_tokens) = "
            f"{self.reference_forward_tokens / max(1, st['tokens_forwarded'] + st['prefix_tokens']):.2f}; "
            f"per-token-forward speed ratio = "
            f"{throughput(st['tokens_forwarded'] + st['prefix_tokens'], eng.seconds) / max(1e-9, throughput(self.reference_forward_tokens, ref.seconds)):.2f}"
        )
        if ref.cpu_seconds > 0 and eng.cpu_seconds > 0:
            lines.append(f"speedup by wall time = {self.speedup:.2f}; by process CPU time = "
                         f"{ref.cpu_seconds / eng.cpu_seconds:.2f} (steadier than wall time when other work shares the CPU, with --threads 1)")
        m = self.mfu()
        if m is not None:
            lines.append(
                f"MFU (2 * {self.n_params / 1e6:.1f}M params * fwd_tokens / s, over an assumed peak of "
                f"{self.peak_flops / 1e12:.0f} TFLOP/s bf16 dense for '{self.peak_name}'): "
                f"engine {100 * m['engine']:.2f}%, reference {100 * m['reference']:.2f}%"
            )
        if self.rates:
            f = self.flops
            lines.append(
                f"hardware: matmul on the student's shapes ({self.dtype}, {self.rates[0].get('threads', '?')} threads), "
                + "; ".join(f"{k} {r['body'] / 1e9:.1f} / head {r['head'] / 1e9:.1f} GFLOP/s"
                            for k, r in zip(("before", "after"), self.rates))
                + f" -> ceiling {self.ceiling / 1e9:.1f} GFLOP/s for this mix")
            lines.append(
                f"engine model FLOPs: body {f['body'] / 1e12:.3f} + attention {f['attention'] / 1e12:.3f} + head "
                f"{f['head'] / 1e12:.3f} = {f['total'] / 1e12:.3f} TFLOP in {self.engine.seconds:.2f}s = "
                f"{self.achieved_flops / 1e9:.1f} GFLOP/s -> peak_fraction {self.peak_fraction:.3f}")
        if self.floor:
            fl = self.floor
            lines.append(
                f"exact floor: {fl['response']} response + {fl['prefix']} prefix = {fl['total']} token-forwards; "
                f"engine ran {self.engine_work} (padding {st.get('padded_tokens', 0)}) -> floor_ratio {self.floor_ratio:.3f}")
        lines.append(
            f"agreement: step max |diff| = {c.max_abs_diff:.2e} (worst {c.worst}), mean |diff| = {c.mean_abs_diff:.2e}, "
            f"GALP max |diff| = {c.galp_max_diff:.2e}, steps compared = {c.n_steps}, missing = {c.missing}, "
            f"token-count mismatches = {c.count_mismatches}, nan mismatches = {c.nan_mismatches}"
        )
        if ref.tokens != eng.tokens:
            lines.append(f"WARNING: token counts differ: reference {ref.tokens}, engine {eng.tokens}")
        return lines


def _warmup(model, tokenizer, window: str, template: str) -> None:
    """One tiny reference call and one tiny engine call: first-call costs paid by neither run."""
    from lalp_resources.engine import ScoreItem

    text = "We add the numbers.\n\nSo 2 + 3 = 5.\n\nThe answer is 5."
    spans = [(0, 21), (21, 36), (36, len(text))]
    item = ScoreItem("warmup", "What is 2 + 3?", text, spans)
    run_reference(model, tokenizer, [item], window, template)
    run_engine(model, tokenizer, [item], window, template)


def run_benchmark(model, tokenizer, items, *, window: str = DEFAULT_WINDOW, template: str = "chat",
                  warmup: bool = True, dtype: str = "", peak_flops: float | None = None,
                  engine_kw: dict | None = None, log: Callable[[str], None] = print,
                  measure_hardware: bool = True) -> BenchResult:
    """The core: warm up, run the reference then the engine on the same items, compare."""
    import torch

    dev = next(model.parameters()).device
    if warmup:
        _warmup(model, tokenizer, window, template)
    fwd, calls = 0, 0
    for it in items:
        f, c = reference_forward_tokens(tokenizer, it, window, template)
        fwd += f
        calls += c
    log(f"reference: {len(items)} items ... (load average {_loadavg()})")
    ref = run_reference(model, tokenizer, items, window, template)
    log(f"reference: {ref.seconds:.1f}s, {ref.tokens_per_s:.1f} tok/s; engine ... (load average {_loadavg()})")
    gc.collect()
    from lalp_resources.engine.head import head_rows

    batch_rows_ = (engine_kw or {}).get("batch_tokens") or (65536 if dev.type == "cuda" else 4096)
    vocab = model.get_output_embeddings().weight.shape[0]
    rates = []
    if measure_hardware:
        rates.append(dict(matmul_rates(model, batch_rows_, head_rows(vocab)), threads=torch.get_num_threads()))
        log(f"matmul rate: {rates[0]['body'] / 1e9:.1f} GFLOP/s (layer shapes), {rates[0]['head'] / 1e9:.1f} (head); "
            f"engine ... (load average {_loadavg()})")
    if (engine_kw or {}).get("compile"):
        # the one-off compile runs on a few items first and is reported, not timed with the engine
        t0 = time.perf_counter()
        run_engine(model, tokenizer, items[:4], window, template, **engine_kw)
        log(f"compile (torch.compile of the decoder layers, on 4 items): {time.perf_counter() - t0:.1f}s")
    eng = run_engine(model, tokenizer, items, window, template, **(engine_kw or {}))
    log(f"engine: {eng.seconds:.1f}s, {eng.tokens_per_s:.1f} tok/s (load average {_loadavg()})")
    if measure_hardware:
        rates.append(dict(matmul_rates(model, batch_rows_, head_rows(vocab)), threads=torch.get_num_threads()))
    flops = engine_flops(model_flops(model), eng.extra["stats"])
    floor = exact_floor(tokenizer, items, window, template)
    peak_name = ""
    if dev.type == "cuda" and peak_flops is None:
        peak_flops, peak_name = gpu_peak_flops(torch.cuda.get_device_name(dev))
        peak_name = f"{torch.cuda.get_device_name(dev)} -> {peak_name or 'unknown'}"
    elif peak_flops is not None:
        peak_name = "--peak-flops"
    return BenchResult(
        ref, eng, compare(ref, eng), len(items), sum(p.numel() for p in model.parameters()),
        str(dev), dtype or str(next(model.parameters()).dtype).removeprefix("torch."),
        fwd, calls, peak_flops, peak_name, flops, rates, floor,
    )


# --------------------------------------------------------------------------- rounds (interleaved)


def run_vllm(llm, tokenizer, items, window: str = DEFAULT_WINDOW, template: str = "chat", merge: bool = False) -> RunResult:
    """vLLM (in-process `LLM`, prefix caching off) on the same windows: `merge=False` one request
    per window (a plain script around `prompt_logprobs`), `merge=True` the engine's units."""
    from lalp_resources.engine.backends import VLLMScoringEngine

    engine = VLLMScoringEngine(llm, tokenizer, template=template, window=window, namespace="benchmark", merge=merge)
    t0, c0 = time.perf_counter(), time.process_time()
    out = engine.score_all(items)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    return RunResult("vllm_merged" if merge else "vllm_window", seconds,
                     {(s.response_id, s.step_index): s.mean_logprob for s in out.steps},
                     {(s.response_id, s.step_index): s.n_tokens for s in out.steps},
                     {r.response_id: r.galp for r in out.responses}, {r.response_id: r.galp_tokens for r in out.responses},
                     {"stats": engine.stats.as_dict()}, cpu)


def median_spread(xs: Sequence[float]) -> tuple[float, float, float]:
    """(median, min, max) of the finite values."""
    v = sorted(x for x in xs if not math.isnan(x))
    if not v:
        return math.nan, math.nan, math.nan
    n = len(v)
    med = v[n // 2] if n % 2 else 0.5 * (v[n // 2 - 1] + v[n // 2])
    return med, v[0], v[-1]


@dataclass
class Rounds:
    """Every contender once per round on the same items, in an order that rotates; the matmul
    ceiling timed inside each round. Ratios are per round, reported as median and spread."""

    results: list[BenchResult]                    # per round: reference, engine, that round's ceiling
    peers: list[dict[str, RunResult]]             # per round: vLLM's runs by name

    def ratios(self) -> dict[str, list[float]]:
        out: dict[str, list[float]] = {"speedup": [], "speedup_cpu": [], "peak_fraction": []}
        for r, peers in zip(self.results, self.peers):
            out["speedup"].append(r.reference.seconds / r.engine.seconds)
            out["speedup_cpu"].append(r.reference.cpu_seconds / r.engine.cpu_seconds)
            out["peak_fraction"].append(r.peak_fraction)
            for name, p in peers.items():
                out.setdefault(f"vs_{name}", []).append(p.seconds / r.engine.seconds)
                out.setdefault(f"vs_{name}_cpu", []).append(p.cpu_seconds / r.engine.cpu_seconds)
        return out

    def median(self, key: str) -> float:
        return median_spread(self.ratios().get(key, []))[0]

    @property
    def max_abs_diff(self) -> float:
        return max(r.comparison.max_abs_diff for r in self.results)

    def peer_diffs(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for r, peers in zip(self.results, self.peers):
            for name, p in peers.items():
                c = compare(r.reference, p)
                out[name] = max(out.get(name, 0.0), c.max_abs_diff, c.galp_max_diff)
        return out

    @property
    def final_line(self) -> str:
        r0 = self.results[0]
        vs = self.median("vs_vllm_window") if self.peers and "vllm_window" in self.peers[0] else None
        return format_final_line(self.median("speedup"), self.max_abs_diff, self.median("peak_fraction"),
                                 r0.floor_ratio, vs)

    def report(self) -> list[str]:
        lines = [f"{len(self.results)} rounds, contenders interleaved (the order rotates each round), same items:"]
        head = f"{'round':>5s} {'contender':12s} {'seconds':>8s} {'cpu_s':>8s} {'tokens/s':>9s} {'fwd_tokens':>10s} {'requests':>8s}"
        lines.append(head)
        for k, (r, peers) in enumerate(zip(self.results, self.peers)):
            runs = [r.reference, r.engine] + list(peers.values())
            for run in runs:
                st = run.extra.get("stats", {})
                fwd = (st.get("tokens_forwarded", 0) + st.get("prefix_tokens", 0)) if st else r.reference_forward_tokens
                calls = st.get("forward_calls", r.reference_forward_calls) if st else r.reference_forward_calls
                lines.append(f"{k + 1:5d} {run.name:12s} {run.seconds:8.2f} {run.cpu_seconds:8.2f} "
                             f"{r.reference.tokens / run.seconds:9.1f} {fwd:10d} {calls:8d}")
            lines.append(f"{'':5s} ceiling {r.ceiling / 1e9:.1f} GFLOP/s in this round -> engine peak_fraction "
                         f"{r.peak_fraction:.3f}")
        lines.append("(tokens/s: the reference's scored tokens over each contender's wall seconds; fwd_tokens: "
                     "token-forwards, prefixes included; requests: model forward calls, or vLLM requests)")
        for key, xs in self.ratios().items():
            med, lo, hi = median_spread(xs)
            what = "wall" if not key.endswith("_cpu") else "CPU"
            lines.append(f"{key:22s} per round {', '.join(f'{x:.3f}' for x in xs)}; median {med:.3f}, spread "
                         f"{lo:.3f}..{hi:.3f} ({what} seconds)")
        for name, d in self.peer_diffs().items():
            lines.append(f"{name}: max |diff| vs the reference (step means and GALP) = {d:.2e}")
        return lines


def run_rounds(model, tokenizer, items, *, rounds: int = 3, window: str = DEFAULT_WINDOW, template: str = "chat",
               dtype: str = "", engine_kw: dict | None = None, llm=None, log: Callable[[str], None] = print) -> Rounds:
    """`rounds` rounds of: the matmul ceiling, then the reference, the engine and (with `llm`) vLLM
    per window and merged, in an order rotated by one each round, all on the same items."""
    import torch

    from lalp_resources.engine.head import head_rows

    dev = next(model.parameters()).device
    engine_kw = engine_kw or {}
    _warmup(model, tokenizer, window, template)
    names = ["reference", "engine"] + (["vllm_window", "vllm_merged"] if llm is not None else [])
    if llm is not None:
        run_vllm(llm, tokenizer, items[:1], window, template)  # first-call costs paid outside the rounds
    if engine_kw.get("compile"):
        t0 = time.perf_counter()
        run_engine(model, tokenizer, items[:4], window, template, **engine_kw)
        log(f"compile (torch.compile of the decoder layers, on 4 items): {time.perf_counter() - t0:.1f}s")
    fwd = calls = 0
    for it in items:
        f, c = reference_forward_tokens(tokenizer, it, window, template)
        fwd, calls = fwd + f, calls + c
    floor = exact_floor(tokenizer, items, window, template)
    batch_rows_ = engine_kw.get("batch_tokens") or (65536 if dev.type == "cuda" else 4096)
    vocab = model.get_output_embeddings().weight.shape[0]
    results, peers = [], []
    for k in range(rounds):
        order = names[k % len(names):] + names[: k % len(names)]
        rate = dict(matmul_rates(model, batch_rows_, head_rows(vocab)), threads=torch.get_num_threads())
        got: dict[str, RunResult] = {}
        for name in order:
            gc.collect()
            log(f"round {k + 1}/{rounds}: {name} ... (load average {_loadavg()})")
            if name == "reference":
                got[name] = run_reference(model, tokenizer, items, window, template)
            elif name == "engine":
                got[name] = run_engine(model, tokenizer, items, window, template, **engine_kw)
            else:
                got[name] = run_vllm(llm, tokenizer, items, window, template, merge=name == "vllm_merged")
        ref, eng = got["reference"], got["engine"]
        results.append(BenchResult(
            ref, eng, compare(ref, eng), len(items), sum(p.numel() for p in model.parameters()), str(dev),
            dtype or str(next(model.parameters()).dtype).removeprefix("torch."), fwd, calls,
            flops=engine_flops(model_flops(model), eng.extra["stats"]), rates=[rate], floor=floor))
        peers.append({n: got[n] for n in names[2:]})
    return Rounds(results, peers)


def vllm_for_bench(student, threads: int, batch_tokens: int = 2048, kv_cache_gb: int = 2):
    """The peer: vLLM on the student's own weights and dtype, prefix caching off, bounded memory."""
    from lalp_resources.settings import Settings

    Settings.export_vllm_env(kv_cache_gb, threads)
    from lalp_resources.engine.backends import vllm_llm

    path = student.path
    if not path or not Path(path).is_dir():  # --random-weights: the same seeded weights, saved for vLLM
        import tempfile

        path = tempfile.mkdtemp(prefix="lalp-bench-vllm-")
        student.model.save_pretrained(path)
        student.tokenizer.save_pretrained(path)
    # on a GPU the engine's model shares the device: vLLM takes half of its memory, not 90%
    gpu_memory = 0.5 if str(student.device).startswith("cuda") else 0.9
    return vllm_llm(path, dtype=student.dtype, batch_tokens=batch_tokens, gpu_memory=gpu_memory)


def _loadavg() -> str:
    try:
        return "%.2f %.2f %.2f" % os.getloadavg()
    except OSError:
        return "n/a"


# --------------------------------------------------------------------------- inputs


def load_traces(data_dir: Path | None = None, log: Callable[[str], None] = print):
    """(traces frame, description): the ZeroEval traces, or CHAMP when they are absent."""
    data_dir = Path(data_dir) if data_dir else ZEROEVAL_DIR
    if data_dir.is_dir():
        return _ingest(data_dir, "zeroeval").traces, f"zeroeval ({data_dir})"
    log(f"NOTE: {data_dir} is absent; falling back to the embedded CHAMP traces (ingest('champ')).")
    return _ingest("champ", "auto").traces, "champ (embedded fallback)"


def _ingest(source, fmt: str):
    """`adapters.ingest` with the pipeline's default teacher mode and size limits (settings)."""
    import inspect

    from lalp_resources import adapters

    params = inspect.signature(adapters.ingest).parameters
    kw = {"verify": False}
    if "teacher_mode" in params or "limits" in params:
        from lalp_resources.settings import Settings

        st = Settings()
        if "teacher_mode" in params:
            kw["teacher_mode"] = st.teacher_mode
        if "limits" in params:
            kw["limits"] = adapters.Limits(
                max_prompt_chars=st.max_prompt_chars, max_response_chars=st.max_response_chars,
                max_teacher_chars=st.max_teacher_chars, max_prompt_id_chars=st.max_prompt_id_chars)
    return adapters.ingest(source, fmt, **kw)


# --------------------------------------------------------------------------- bundles
# A GPU lease takes at most 64 MiB of files and reaches no network: neither ../shared/data nor
# the student's 98 MB GGUF can travel. A bundle is what can: the sampled trace rows and the
# student's config and tokenizer (a few MB). With --random-weights the student's architecture is
# built from that config with seeded random weights: speed, MFU and engine == reference do not
# depend on the weight values, but the scores themselves are not the student's.


def write_bundle(out: Path, student, rows, source: str, teachers, pids) -> Path:
    out = Path(out)
    (out / "student").mkdir(parents=True, exist_ok=True)
    with open(out / "rows.jsonl", "w") as f:
        for r in rows:
            f.write(json.dumps({k: r[k] for k in ("response_id", "prompt_id", "teacher", "prompt", "response")}) + "\n")
    student.model.config.save_pretrained(out / "student")
    student.tokenizer.save_pretrained(out / "student")
    (out / "bundle.json").write_text(json.dumps(
        {"source": source, "teachers": list(teachers), "prompts": list(pids), "responses": len(rows),
         "student": student.fingerprint}, indent=1))
    return out


def read_bundle(path: Path) -> tuple[list[dict], dict]:
    path = Path(path)
    if not (path / "rows.jsonl").is_file():
        raise FileNotFoundError(f"{path} is not a benchmark bundle (no rows.jsonl); write one with --write-bundle")
    rows = [json.loads(line) for line in (path / "rows.jsonl").read_text().splitlines() if line.strip()]
    return rows, json.loads((path / "bundle.json").read_text())


def random_student(bundle: Path, device: str = "auto", dtype: str = "auto", seed: int = 0):
    """The bundled student's architecture and tokenizer with seeded random weights."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from lalp_resources.student import Student, resolve_device, resolve_dtype

    device = resolve_device(device)
    dtype_name, torch_dtype = resolve_dtype(dtype, device)
    src = Path(bundle) / "student"
    cfg = AutoConfig.from_pretrained(src)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch_dtype, attn_implementation="sdpa").to(device).eval()
    return Student(model, AutoTokenizer.from_pretrained(src), f"random-weights:{src}", f"seed{seed}".ljust(16, "0"),
                   device, dtype_name)


def load_bench_student(args):
    if args.random_weights:
        if not args.bundle:
            raise SystemExit("--random-weights needs --bundle (the student's config and tokenizer)")
        return random_student(args.bundle, args.device, args.dtype)
    from lalp_resources.student import load_student

    return load_student(args.model, args.device, args.dtype)


def load_inputs(args, log: Callable[[str], None] = print):
    """(rows, texts for synthetic long traces, source, teachers, prompt ids), from a bundle or the data."""
    if args.bundle:
        all_rows, meta = read_bundle(args.bundle)
        pids = list(dict.fromkeys(r["prompt_id"] for r in all_rows))[: max(0, args.prompts)]
        rows = [r for r in all_rows if r["prompt_id"] in pids]
        teachers = list(dict.fromkeys(r["teacher"] for r in rows))
        return rows, [r["response"] for r in all_rows], f"bundle {args.bundle} (from {meta['source']})", teachers, pids
    traces, source = load_traces(args.data, log=log)
    rows, teachers, pids = sample_traces(traces, args.prompts, _teachers(args.teachers))
    return rows, traces.get_column("response").head(400).to_list(), source, teachers, pids


# --------------------------------------------------------------------------- memory


def synthetic_trace(texts: Sequence[str], tokenizer, target_tokens: int, n_steps: int = MEMORY_STEPS,
                    segmenter: str = "paragraph"):
    """A long trace of about `target_tokens` tokens made of real text, in `n_steps` huge
    paragraphs: real responses' lines are concatenated (their blank lines removed) and split into
    `n_steps` groups of about equal token count. Returns (text, spans, n_tokens)."""
    from lalp_resources.method.segmentation import segment
    from lalp_resources.method.tokenization import merge_unscored_steps

    # Real lines, cut at spaces into pieces of at most ~200 characters so that the total lands
    # near the target and every paragraph gets many pieces.
    lines = []
    for t in texts:
        for ln in t.splitlines():
            words, cur = ln.split(), ""
            for w in words:
                if cur and len(cur) + 1 + len(w) > 200:
                    lines.append(cur)
                    cur = w
                else:
                    cur = f"{cur} {w}" if cur else w
            if cur:
                lines.append(cur)
    if not lines:
        raise ValueError("no text to build a synthetic trace from")
    counts = [len(x) for x in tokenizer(lines, add_special_tokens=False)["input_ids"]]
    chosen, cost, have, k = [], [], 0, 0
    while have < target_tokens:
        chosen.append(lines[k % len(lines)])
        cost.append(counts[k % len(lines)] + 1)
        have += cost[-1]
        k += 1
    n_steps = max(1, min(n_steps, len(chosen)))
    # n_steps contiguous groups of about have / n_steps tokens each (none empty)
    groups, cur, acc = [], [], 0
    for j, (ln, c) in enumerate(zip(chosen, cost)):
        cur.append(ln)
        acc += c
        left = len(chosen) - j - 1
        need = n_steps - len(groups) - 1  # groups still to open after this one
        if need > 0 and (acc >= have * (len(groups) + 1) / n_steps or left == need):
            groups.append(cur)
            cur = []
    if cur:
        groups.append(cur)
    text = "\n\n".join("\n".join(g) for g in groups)
    spans = merge_unscored_steps(tokenizer, text, segment(text, segmenter))
    n_tokens = len(tokenizer(text, add_special_tokens=False)["input_ids"])
    return text, spans, n_tokens


def current_rss() -> int:
    """Resident set size of this process in bytes (psutil, else /proc/self/statm)."""
    try:
        import psutil

        return psutil.Process().memory_info().rss
    except ImportError:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class RssSampler:
    """Peak resident set size of this process, sampled in a background thread."""

    def __init__(self, interval: float = 0.005):
        self.interval = interval
        self.baseline = self.peak = current_rss()
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, current_rss())
            self._stop.wait(self.interval)

    def __enter__(self):
        self.baseline = self.peak = current_rss()
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, current_rss())


def memory_one(model, tokenizer, prompt: str, texts: Sequence[str], target_tokens: int, *,
               window: str = DEFAULT_WINDOW, template: str = "chat", n_steps: int = MEMORY_STEPS) -> dict:
    """Score one synthetic trace with the engine only; measure its time and peak memory."""
    import torch

    from lalp_resources.engine import ScoreItem, ScoringEngine

    text, spans, n_tok = synthetic_trace(texts, tokenizer, target_tokens, n_steps)
    item = ScoreItem(f"synthetic-{target_tokens}", prompt, text, spans)
    dev = next(model.parameters()).device
    engine = ScoringEngine(model, tokenizer, template=template, window=window, namespace="benchmark-memory")
    gc.collect()
    res = {"target": target_tokens, "tokens": n_tok, "steps": len(spans), "device": str(dev)}
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
        t0 = time.perf_counter()
        out = engine.score_all([item])
        torch.cuda.synchronize()
        res["seconds"] = time.perf_counter() - t0
        res["peak_mb"] = (torch.cuda.max_memory_allocated(dev) - base) / 2**20
        res["peak_total_mb"] = torch.cuda.max_memory_allocated(dev) / 2**20
    else:
        with RssSampler() as s:
            t0 = time.perf_counter()
            out = engine.score_all([item])
            res["seconds"] = time.perf_counter() - t0
        res["peak_mb"] = (s.peak - s.baseline) / 2**20
        res["peak_total_mb"] = s.peak / 2**20
        res["ru_maxrss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    res["lalp"] = out.responses[0].lalp
    res["galp_tokens"] = out.responses[0].galp_tokens
    st = engine.stats
    res.update(tokens_forwarded=st.tokens_forwarded, forward_calls=st.forward_calls, windows=st.windows_total)
    return res


def _memory_worker(args) -> None:
    """Subprocess body for one CPU memory size: prints one tagged JSON line."""
    student = load_bench_student(args)
    rows, texts, _, _, _ = load_inputs(args, log=lambda m: print(m, file=sys.stderr))
    _warmup(student.model, student.tokenizer, args.window, args.template)
    res = memory_one(student.model, student.tokenizer, rows[0]["prompt"], texts, args.memory_worker,
                     window=args.window, template=args.template, n_steps=args.memory_steps)
    print(_MEMORY_TAG + json.dumps(res), flush=True)


def run_memory(args, student, texts: list[str], rows, log: Callable[[str], None] = print) -> list[dict]:
    dev = student.device
    sizes = [int(s) for s in args.memory_sizes.split(",")] if args.memory_sizes else list(
        GPU_MEMORY_SIZES if dev.startswith("cuda") else CPU_MEMORY_SIZES
    )
    results = []
    for size in sizes:
        log(f"memory: ~{size} tokens, {args.memory_steps} steps ... (load average {_loadavg()})")
        if dev.startswith("cuda"):
            try:
                r = memory_one(student.model, student.tokenizer, rows[0]["prompt"], texts, size,
                               window=args.window, template=args.template, n_steps=args.memory_steps)
            except Exception as exc:  # noqa: BLE001 (an OOM is a result here)
                r = {"target": size, "error": f"{type(exc).__name__}: {str(exc)[:200]}"}
        else:
            r = _memory_subprocess(args, size)
        log("memory: " + json.dumps(r))
        results.append(r)
    return results


def _memory_subprocess(args, size: int) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.benchmark", "--memory-worker", str(size),
           "--model", args.model, "--device", args.device, "--dtype", args.dtype, "--window", args.window,
           "--template", args.template, "--threads", str(args.threads or 0), "--memory-steps", str(args.memory_steps), "--prompts", str(max(1, args.prompts))]
    if args.data:
        cmd += ["--data", str(args.data)]
    if args.bundle:
        cmd += ["--bundle", str(args.bundle)] + (["--random-weights"] if args.random_weights else [])
    if args.teachers:
        cmd += ["--teachers", *args.teachers]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=args.memory_timeout, cwd=REPO)
    except subprocess.TimeoutExpired:
        return {"target": size, "error": f"timeout after {args.memory_timeout}s"}
    for line in reversed(p.stdout.splitlines()):
        if line.startswith(_MEMORY_TAG):
            return json.loads(line[len(_MEMORY_TAG):])
    return {"target": size, "error": f"worker exited {p.returncode}: {p.stderr.strip()[-400:]}"}


def memory_table(results: list[dict]) -> list[str]:
    lines = [f"{'target':>7s} {'tokens':>7s} {'steps':>5s} {'seconds':>8s} {'peak MB':>9s} {'total MB':>9s} "
             f"{'fwd_tokens':>10s} {'fwd_calls':>9s}"]
    for r in results:
        if "error" in r:
            lines.append(f"{r['target']:7d}  {r['error']}")
            continue
        lines.append(
            f"{r['target']:7d} {r['tokens']:7d} {r['steps']:5d} {r['seconds']:8.1f} {r['peak_mb']:9.1f} "
            f"{r['peak_total_mb']:9.1f} {r['tokens_forwarded']:10d} {r['forward_calls']:9d}"
        )
    if results and any(r.get("device", "").startswith("cuda") for r in results):
        lines.append("(peak MB = torch.cuda.max_memory_allocated above the resident model; total MB = absolute)")
    else:
        lines.append("(CPU: peak MB = peak RSS growth during the call, sampled every 5 ms in a fresh subprocess; "
                     "total MB = peak RSS of that process)")
    return lines


# --------------------------------------------------------------------------- CLI


def _teachers(values: Sequence[str] | None) -> list[str] | None:
    if not values:
        return None
    out = [t.strip() for v in values for t in v.split(",") if t.strip()]
    return out or None


def parse_args(argv: Sequence[str] | None = None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.benchmark", description=__doc__.split("\n\n")[0])
    p.add_argument("--prompts", type=int, default=DEFAULT_PROMPTS,
                   help=f"number of prompts (first ids, natural order; default {DEFAULT_PROMPTS})")
    p.add_argument("--teachers", nargs="+", default=None, help="teachers (space or comma separated; default: all)")
    p.add_argument("--window", default=DEFAULT_WINDOW)
    p.add_argument("--template", default="chat", choices=("chat", "plain"))
    p.add_argument("--dtype", default="float32", choices=("auto", "float32", "bfloat16", "float16"))
    p.add_argument("--device", default="auto")
    p.add_argument("--segmenter", default="paragraph", choices=("paragraph", "line", "sentence"))
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: the cores this process may run on; 1 is steadier on a CPU "
                   "shared with other work)")
    p.add_argument("--row-tokens", type=int, default=None, help="engine row_tokens (default: the engine's)")
    p.add_argument("--batch-tokens", type=int, default=None, help="engine batch_tokens (default: the engine's)")
    p.add_argument("--model", default="smollm2", help="student spec for load_student (default: smollm2)")
    p.add_argument("--data", type=Path, default=None, help=f"ZeroEval directory (default {ZEROEVAL_DIR})")
    p.add_argument("--peak-flops", type=float, default=None, help="peak FLOP/s for MFU (default: by GPU name)")
    p.add_argument("--rounds", type=int, default=3,
                   help="rounds of every contender on the same items, interleaved (ratios: median and spread)")
    p.add_argument("--vs-vllm", action="store_true",
                   help="add vLLM (prefix caching off; one request per window, and the engine's merged units) as "
                        "contenders; the last line gains vs_vllm (needs the vLLM venv: make setup-vllm)")
    p.add_argument("--vs-float32", action="store_true",
                   help="with --dtype bfloat16/float16: also run the engine in float32 and report step-score and "
                   "ranking agreement (Spearman/Kendall of steps, responses and teacher means; per-prompt picks)")
    p.add_argument("--compile", action="store_true",
                   help="the engine with compile=True (LALP_COMPILE=1): decoder layers under torch.compile; the "
                   "one-off compile is run first on 4 items and reported separately")
    p.add_argument("--host-rate", action="store_true",
                   help="also report the engine's host-side rate (planning, packing, keys, assembly) with a tiny model")
    p.add_argument("--memory", action="store_true", help="also measure peak memory on long synthetic traces")
    p.add_argument("--memory-only", action="store_true", help="only the memory table (no final speedup line)")
    p.add_argument("--memory-sizes", default=None,
                   help="comma-separated token counts (default 1000,8000,32000 on CUDA, 1000,4000,8000 on CPU)")
    p.add_argument("--memory-steps", type=int, default=MEMORY_STEPS, help="paragraphs per synthetic trace")
    p.add_argument("--memory-timeout", type=int, default=1800, help="seconds per CPU memory subprocess")
    p.add_argument("--memory-worker", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--write-bundle", type=Path, default=None,
                   help="write the sampled rows + the student's config and tokenizer to this folder, then exit")
    p.add_argument("--bundle", type=Path, default=None, help="read inputs from a bundle (instead of --data)")
    p.add_argument("--random-weights", action="store_true",
                   help="with --bundle: the student's architecture with seeded random weights (for a machine "
                   "the weights cannot reach; speed and exactness hold, scores are not the student's)")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    else:
        from lalp_resources.engine.exact import pin_threads

        pin_threads()
    if args.memory_worker is not None:
        _memory_worker(args)
        return 0

    t_start = time.perf_counter()
    student = load_bench_student(args)
    dev = student.device
    print(f"student: {student.model_id} on {dev}/{student.dtype}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads" + (f", {torch.cuda.get_device_name(dev)}" if dev.startswith("cuda") else ""))
    rows, texts, source, teachers, pids = load_inputs(args)
    if not rows:
        print("no traces selected", file=sys.stderr)
        return 2
    print(f"data: {source}; {len(pids)} prompt(s) {pids}; {len(teachers)} teacher(s); {len(rows)} responses; "
          f"window={args.window} template={args.template} segmenter={args.segmenter}")
    if args.write_bundle:
        out = write_bundle(args.write_bundle, student, rows, source, teachers, pids)
        size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
        print(f"wrote bundle {out} ({size / 2**20:.1f} MiB)")
        return 0

    final = None
    if not args.memory_only:
        items = make_items(rows, student.tokenizer, args.segmenter)
        engine_kw = {k: v for k, v in (("row_tokens", args.row_tokens), ("batch_tokens", args.batch_tokens),
                                       ("compile", args.compile)) if v}
        llm = None
        if args.vs_vllm:
            rss0 = current_rss()
            llm = vllm_for_bench(student, torch.get_num_threads())
            print(f"vLLM: loaded (prefix caching off); process RSS {rss0 / 2**20:.0f} -> {current_rss() / 2**20:.0f} MB")
        rounds = run_rounds(student.model, student.tokenizer, items, rounds=args.rounds, window=args.window,
                            template=args.template, dtype=student.dtype, engine_kw=engine_kw, llm=llm)
        res = rounds.results[0]
        res.peak_flops, res.peak_name = (args.peak_flops, "--peak-flops") if args.peak_flops else (None, "")
        if dev.startswith("cuda") and args.peak_flops is None:
            res.peak_flops, name = gpu_peak_flops(torch.cuda.get_device_name(dev))
            res.peak_name = f"{torch.cuda.get_device_name(dev)} -> {name or 'unknown'}"
        print()
        print("round 1 in detail:")
        for line in res.report():
            print(line)
        print()
        for line in rounds.report():
            print(line)
        if llm is not None:
            print(f"peak RSS of the process (reference, engine and vLLM together): "
                  f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")
        final = rounds.final_line
        if args.vs_float32 and student.dtype != "float32":
            import torch

            ref_args = argparse.Namespace(**{**vars(args), "dtype": "float32"})
            fp32 = load_bench_student(ref_args)
            print(f"float32 engine for agreement ... (load average {_loadavg()})")
            e32 = run_engine(fp32.model, fp32.tokenizer, items, args.window, args.template, **engine_kw)
            ag = dtype_agreement(res.engine, e32, rows)
            print(f"{student.dtype} vs float32 (engine, same items): {student.dtype} {res.engine.seconds:.1f}s vs "
                  f"float32 {e32.seconds:.1f}s ({e32.seconds / res.engine.seconds:.2f}x); "
                  + ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in ag.items()))
            del fp32, torch
        if args.host_rate:
            hr = host_rate(student.tokenizer, items, args.window, args.template)
            print(f"host-side rate (tiny 1-layer model): {hr['token_forwards']} token-forwards, wall {hr['wall_s']:.3f}s "
                  f"(host {hr['host_s']:.3f}s + model {hr['device_s']:.3f}s): {hr['host_rate']:,.0f} token-forwards/s of "
                  f"host work, {hr['wall_rate']:,.0f} end to end")
    if args.memory or args.memory_only:
        results = run_memory(args, student, texts, rows)
        print()
        for line in memory_table(results):
            print(line)
    print(f"total wall time {time.perf_counter() - t_start:.0f}s")
    if final is not None:
        print(final)
    return 0


if __name__ == "__main__":
    sys.exit(main())
