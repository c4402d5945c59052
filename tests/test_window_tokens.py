"""Window tokens derived from one tokenization per response (engine/plan.window_tokens) equal
tokenizing every window on its own, as the engine did before; cache keys are unchanged.

On the real ZeroEval traces with the real SmolLM2 tokenizer, for the `paragraph` and `sentence`
segmenters and the `fixed:4` and `fraction:0.25` windows. The reference below is the code the
engine ran before (one tokenizer call per window text, Python token starts, one hash per key)."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from helpers import zeroeval_traces as read_zeroeval

pytestmark = pytest.mark.data


def _old_tokenize(tokenizer, texts):
    """The engine's tokenization before: the tokenizer's own call, starts in Python."""
    from lalp_resources.method.tokenization import TEXT, token_starts

    enc = tokenizer(texts, return_offsets_mapping=True, **TEXT)
    return [(list(ids), token_starts(offs)) for ids, offs in zip(enc["input_ids"], enc["offset_mapping"])]


def _old_key(namespace, prefix, window, j0, j1):
    h = hashlib.sha256(namespace.encode())
    h.update(np.asarray(prefix, dtype=np.int64).tobytes())
    h.update(b"|")
    h.update(np.asarray(window, dtype=np.int64).tobytes())
    h.update(f"|{j0}:{j1}".encode())
    return h.hexdigest()[:32]


@pytest.fixture(scope="module")
def zeroeval_traces():
    t = read_zeroeval()
    return [(rid, p, r) for k, (rid, p, r) in enumerate(t.select("response_id", "prompt", "response").iter_rows())
            if k % 7 == 0 and r and not r.isspace()]


@pytest.mark.parametrize("segmenter", ["paragraph", "sentence"])
@pytest.mark.parametrize("window", ["fixed:4", "fraction:0.25"])
def test_window_tokens_equal_each_window_tokenized(zeroeval_traces, smol_tokenizer, segmenter, window):
    from lalp_resources.engine.plan import window_plans, window_tokens
    from lalp_resources.engine.types import ScoreItem
    from lalp_resources.method.segmentation import segment
    from lalp_resources.method.tokenization import key_base, merge_unscored_steps, prefix_ids, window_key_from
    from lalp_resources.method.windows import WindowSpec

    tok = smol_tokenizer
    items = [ScoreItem(rid, p, r, merge_unscored_steps(tok, r, segment(r, segmenter))) for rid, p, r in zeroeval_traces]
    plans, texts, _ = window_plans(items, WindowSpec.parse(window), True)
    got, alone = window_tokens(tok, items, plans, texts)
    ref = _old_tokenize(tok, texts)
    assert len(got) == len(ref) == len(texts)
    bad = [k for k, ((ids, st), (rid, rst)) in enumerate(zip(got, ref)) if ids.tolist() != rid or st.tolist() != rst]
    assert not bad, f"{len(bad)} of {len(texts)} windows differ, e.g. {texts[bad[0]][:80]!r}"
    assert alone < len(texts) // 10, "most windows are derived from their response's tokens"
    # the cache keys: the same as one hash per window over lists
    prompt = items[0].prompt
    pre = prefix_ids(tok, prompt, "chat")
    base = key_base("ns", pre)
    for n, (wins, _) in enumerate(plans[:20]):
        for i, a, tid, lo, hi in wins:
            ids, st = got[tid]
            j0, j1 = (int(j) for j in np.searchsorted(st, (lo - a, hi - a)))
            assert window_key_from(base, ids, j0, j1) == _old_key("ns", pre, ref[tid][0], j0, j1)


def test_window_tokens_fall_back_where_pieces_disagree(smol_tokenizer):
    """Short windows, long words and runs without spaces are tokenized on their own, and equal."""
    from lalp_resources.engine.plan import window_plans, window_tokens
    from lalp_resources.engine.types import ScoreItem
    from lalp_resources.method.windows import WindowSpec

    texts = ["a b\n\nc d e\n\n" + "x" * 300 + "\n\nshort.\n\n" + "=" * 80 + " one two three four five six seven.",
             "Word " * 40 + "\n\n" + "1234567890" * 20 + "\n\n" + " two  spaces  between  words  here  now  ok." * 3]
    items = []
    for k, t in enumerate(texts):
        cuts = [i + 2 for i in range(len(t) - 1) if t[i:i + 2] == "\n\n"]
        pts = [0] + cuts + [len(t)]
        items.append(ScoreItem(f"r{k}", "p", t, [(pts[i], pts[i + 1]) for i in range(len(pts) - 1)]))
    plans, wtexts, _ = window_plans(items, WindowSpec.parse("fixed:1"), True)
    got, _ = window_tokens(smol_tokenizer, items, plans, wtexts)
    for (ids, st), (rid, rst) in zip(got, _old_tokenize(smol_tokenizer, wtexts)):
        assert ids.tolist() == rid and st.tolist() == rst
