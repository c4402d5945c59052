"""Planning ahead: the tokenizer's half of planning in planner processes, while the scoring
process works on the blocks before.

With every window in the score cache (a rerun after a change, a re-scoring with nothing new to
forward), step scoring is host work only, and most of it is tokenizing windows
(`plan.block_tokens`); the rest (cache keys, the cache lookup, assembly, the commits) stays in
the scoring process. On a GPU the same overlap keeps the device fed. `plan.block_tokens` is a
pure function of its arguments, so where it runs changes nothing in the results: planned ahead
or in-process, the tokens, keys and scores are the same (tests/test_prefetch.py).

Planner processes are spawned (never forked: the scoring process holds torch, DuckDB and
Dagster threads), each with its own copy of the tokenizer; as with any spawned process, a script
that scores must guard its entry point (`if __name__ == "__main__":`). A planner that dies
(killed, out of memory) or fails is not fatal: the scorer plans what is left itself and says so
in the log (a planning error then raises here, as it would have without planners).
"""

from __future__ import annotations

import logging
import multiprocessing
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

from lalp_resources.engine.plan import block_tokens

log = logging.getLogger("lalp.engine")

# Fewer blocks than this are planned in-process: a planner's start (a fresh interpreter importing
# the tokenizer's stack, seconds) would cost more than the overlap saves.
MIN_BLOCKS = 4

_WORKER: dict = {}


def _start(tokenizer, template: str, window, galp: bool) -> None:
    _WORKER.update(tokenizer=tokenizer, template=template, window=window, galp=galp)


def _plan(prompts_of_groups, items):
    w = _WORKER
    return block_tokens(w["tokenizer"], w["template"], w["window"], w["galp"], prompts_of_groups, items)


class Planners:
    """An engine's planner processes: started on first use and kept for its later `score` calls
    (a stage calls it once per batch of prompts), shut down by `close` or with the engine."""

    def __init__(self, tokenizer, template: str, window, galp: bool, workers: int):
        self.args = (tokenizer, template, window, galp)
        self.workers = workers
        self.pool: ProcessPoolExecutor | None = None
        self.broken = False
        self.blocks_ahead = 0   # blocks whose tokens came from a planner

    def ahead(self, blocks: list) -> "Planner | None":
        """A planner for one `score` call's blocks (per block: prompts of each group, items), or
        None where there is nothing to gain: no planner processes, too few blocks to repay their
        start, or planners that stopped."""
        if self.workers < 1 or self.broken or (self.pool is None and len(blocks) < MIN_BLOCKS):
            return None
        if self.pool is None:
            self.pool = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"),
                                            initializer=_start, initargs=self.args)
        return Planner(self, blocks)

    def stopped(self, e: BaseException) -> None:
        if not self.broken:  # once, though every block in flight reports it
            log.warning("the planner process stopped or failed (%s: %s); planning the remaining blocks in the "
                        "scoring process", type(e).__name__, e)
        self.broken = True
        self.close()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=False, cancel_futures=True)
            self.pool = None


class Planner:
    """One `score` call's blocks submitted ahead to the planner processes; `tokens(k)` gives block
    k's `block_tokens` result, from a planner where it was submitted, else computed here."""

    def __init__(self, planners: Planners, blocks: list):
        self._planners = planners
        self._blocks = blocks
        self._depth = planners.workers + 1   # blocks in flight: one per planner and the next one queued
        self._futures: dict[int, Future] = {}
        # block 0 is planned here (while planners start, or finish the previous call's last block)
        self._next = 1

    def tokens(self, k: int):
        pl = self._planners
        try:
            while pl.pool is not None and self._next < min(len(self._blocks), k + 1 + self._depth):
                self._futures[self._next] = pl.pool.submit(_plan, *self._blocks[self._next])
                self._next += 1
            fut = self._futures.pop(k, None)
            if fut is not None:
                out = fut.result()
                pl.blocks_ahead += 1
                return out
        except Exception as e:  # noqa: BLE001 - a dead planner, or one failing: what it failed on fails here too
            pl.stopped(e)
        return block_tokens(*pl.args, *self._blocks[k])

    def close(self) -> None:
        """The call is over (or was abandoned): blocks not started are dropped."""
        for fut in self._futures.values():
            fut.cancel()
        self._futures.clear()
