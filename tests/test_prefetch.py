"""Planning ahead in planner processes (engine/prefetch.py) changes nothing in the results.

The real ZeroEval traces and the real SmolLM2 tokenizer, a tiny random Llama: the same items
scored with `host_workers=0` (every block planned in the scoring process) and `host_workers=1`
and `2` (blocks after the first tokenized by spawned planners) give the same step scores,
response scores, new cache rows and statistics, with part of the windows already in the cache
so hits and forwards mix. A planner killed mid-run leaves the scorer to plan the rest itself,
with the same results."""

from __future__ import annotations

import os
import signal

import pytest

from helpers import zeroeval_traces as read_zeroeval

pytestmark = pytest.mark.data


@pytest.fixture(scope="module")
def items(smol_tokenizer):
    from lalp_resources.engine import ScoreItem
    from lalp_resources.method.segmentation import segment
    from lalp_resources.method.tokenization import merge_unscored_steps

    t = read_zeroeval()
    rows = [(rid, p, r) for k, (rid, p, r) in enumerate(t.select("response_id", "prompt", "response").iter_rows())
            if k % 41 == 0 and r and not r.isspace()][:30]
    return [ScoreItem(rid, p, r, merge_unscored_steps(smol_tokenizer, r, segment(r, "paragraph"))) for rid, p, r in rows]


@pytest.fixture
def small_blocks(monkeypatch):
    """Blocks of at most 2 groups and 6 responses, groups of about one prompt: many blocks."""
    from lalp_resources.engine import exact

    monkeypatch.setattr(exact, "BLOCK_GROUPS", 2)
    monkeypatch.setattr(exact, "BLOCK_ITEMS", 6)


def _score(model, tokenizer, items, workers, cache_rows, kill_planner=False):
    from lalp_resources.engine import DictCache, ScoringEngine

    cache = DictCache()
    cache.store(list(cache_rows))
    eng = ScoringEngine(model, tokenizer, window="fixed:2", namespace="ns", cache=cache, group_tokens=256,
                        host_workers=workers)
    steps, responses, rows, planners = [], [], [], []
    real = eng._planner

    def spy(blocks):
        p = real(blocks)
        planners.append(p)
        return p

    eng._planner = spy
    try:
        for n, chunk in enumerate(eng.score(items)):
            if kill_planner and n == 1:
                for proc in list(eng._planners.pool._processes.values()):
                    os.kill(proc.pid, signal.SIGKILL)
            steps += chunk.steps
            responses += chunk.responses
            rows += chunk.new_cache_rows
            cache.store(chunk.new_cache_rows)  # as the asset's commit does
    finally:
        if eng._planners:
            eng._planners.close()
    if planners and planners[0] is not None and not kill_planner:
        assert not eng._planners.broken and eng._planners.blocks_ahead > 0, "blocks came from the planners"
    return steps, responses, rows, eng.stats, planners


def _same(a, b):
    (s0, r0, c0, st0, _), (s1, r1, c1, st1, _) = a, b
    assert s1 == s0
    assert [(r.response_id, r.n_steps, r.lalp, r.galp_tokens) for r in r1] == \
           [(r.response_id, r.n_steps, r.lalp, r.galp_tokens) for r in r0]
    assert [r.galp for r in r1] == pytest.approx([r.galp for r in r0], nan_ok=True, rel=0, abs=0)
    assert c1 == c0
    for f in ("windows_total", "windows_cached", "windows_scored", "windows_tokenized_alone", "windows_over_context"):
        assert getattr(st1, f) == getattr(st0, f), f


@pytest.mark.parametrize("workers", [1, 2])
def test_planned_ahead_equals_planned_in_process(tiny_model, smol_tokenizer, items, small_blocks, workers):
    # a cache holding the windows of every other response: some windows hit, the rest are forwarded
    warm = _score(tiny_model, smol_tokenizer, items[::2], 0, [])[2]
    here = _score(tiny_model, smol_tokenizer, items, 0, warm)
    ahead = _score(tiny_model, smol_tokenizer, items, workers, warm)
    assert here[4] == [None] and ahead[4][0] is not None, "in-process vs planner processes"
    assert 0 < here[3].windows_cached < here[3].windows_total
    _same(here, ahead)


def test_a_killed_planner_leaves_the_scorer_to_plan(tiny_model, smol_tokenizer, items, small_blocks, caplog):
    here = _score(tiny_model, smol_tokenizer, items, 0, [])
    with caplog.at_level("WARNING", logger="lalp.engine"):
        killed = _score(tiny_model, smol_tokenizer, items, 1, [], kill_planner=True)
    assert caplog.text.count("planner process stopped") == 1
    _same(here, killed)


def test_few_blocks_start_no_planner_and_later_calls_reuse_it(tiny_model, smol_tokenizer, items, small_blocks):
    from lalp_resources.engine import ScoringEngine

    eng = ScoringEngine(tiny_model, smol_tokenizer, window="fixed:2", group_tokens=256, host_workers=1)
    list(eng.score(items[:6]))   # one block or two: planned here, no planner started
    assert eng._planners.pool is None
    list(eng.score(items))       # many blocks: a planner starts
    pool = eng._planners.pool
    assert pool is not None
    list(eng.score(items[:6]))   # a later call, however small, uses the running planner
    assert eng._planners.pool is pool
    eng._planners.close()
