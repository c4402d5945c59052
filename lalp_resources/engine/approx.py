"""The opt-in approximate mode (never the default): one pass per response with a step-sliding
attention mask.

Position q (which predicts token q+1) attends to the prompt prefix and to the response's tokens
from the start of token q+1's window. Context tokens then see a different history than in their
own window, so step scores differ from the exact definition (the benchmark and tests report by
how much); GALP stays exact. Scores are keyed apart in the cache (`approx-...`) so that they are
never served as exact ones. Everything else (packing, attention paths, head) is the exact
engine's: a sliding unit only lays itself out as different tiles.
"""

from __future__ import annotations

import bisect
import hashlib
from collections import defaultdict
from dataclasses import dataclass

from lalp_resources.engine.exact import ScoringEngine
from lalp_resources.engine.plan import GALP_STEP, Unit
from lalp_resources.method.tokenization import tokenize_many


@dataclass
class SlidingUnit(Unit):
    lo: list[int] | None = None  # first trunk position each position may see

    def tiles(self, q_base: int, k_base: int, chunk: int):
        """One tile per run of positions with the same first visible position (a step's window)."""
        out, n, a = [], len(self.trunk), 0
        while a < n:
            b = a
            while b < n and self.lo[b] == self.lo[a] and b - a < chunk:
                b += 1
            out.append((q_base + a, q_base + b, k_base + self.lo[a], 0, 0))
            a = b
        return out


class ApproximateScoringEngine(ScoringEngine):
    """`ScoringEngine` with the step-sliding single pass (see the module doc)."""

    def __init__(self, model, tokenizer, **kwargs):
        kwargs.pop("approx", None)
        super().__init__(model, tokenizer, **kwargs)

    def _make_tasks(self, items, plans, toks, prefixes, prompt_index):
        tasks = super()._make_tasks(items, plans, toks, prefixes, prompt_index)
        # An approximate step score depends on the text and step boundaries up to the step
        # (context tokens see their own windows); keyed apart so it never poses as exact.
        for t in tasks:
            if t.step != GALP_STEP:
                it = items[t.item]
                spans = list(it.spans)[: t.step + 1]
                h = hashlib.sha256(f"{self.namespace}|approx|{self.window}|{it.prompt}|{spans}|".encode())
                h.update(it.text[: spans[-1][1]].encode())
                t.key = "approx-" + h.hexdigest()[:32]
        return tasks

    def _build_units(self, items, plans, toks, tasks, todo, prompt_index):
        """One sliding unit per response over its full tokenization; GALP runs exact."""
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
            targets, galp_targets = [], []
            for k in ks:
                if tasks[k].step == GALP_STEP:
                    galp_targets = [(j - 1 if j else -1, ids[j], k, min(j, 2)) for j in range(len(ids))]
                    continue
                a, b = spans[tasks[k].step]
                j0, j1 = bisect.bisect_left(starts, a), bisect.bisect_left(starts, b)
                targets += [(j - 1 if j else -1, ids[j], k, min(j - j0, 2)) for j in range(j0, j1)]
            if targets:
                need = max(t[0] for t in targets) + 1
                units.append(SlidingUnit(prompt_index[it.prompt], ids[:need], [], targets, lo[:need]))
            if galp_targets:
                need = max(t[0] for t in galp_targets) + 1
                units.append(Unit(prompt_index[it.prompt], ids[:need], [], galp_targets))
        return units
