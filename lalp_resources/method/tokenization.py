"""Tokenization as docs/method.md defines it, shared by the reference and the engine.

- prefix: the student's chat template on one user turn with the generation prompt (`chat`),
  or `prompt + "\\n\\n"` (`plain`); no special tokens beyond what the template renders.
- window text (context steps + step) is tokenized as one string with offsets.
- a token belongs to the step holding its first character.
- text is text: trace text (prompt, response, steps, windows) is tokenized with
  `split_special_tokens=True`, so a literal `<|im_end|>` written by a teacher is plain
  characters, never the student's control token. Only the chat template's own markup is
  tokenized as control tokens (`prefix_ids`).
"""

from __future__ import annotations

import copy
import hashlib
from itertools import chain
from typing import Sequence

import numpy as np

TEMPLATES = ("chat", "plain")


def prefix_text(tokenizer, prompt: str, template: str) -> str:
    if template == "plain":
        return prompt + "\n\n"
    if template == "chat":
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("template=chat needs a tokenizer with a chat template; use template=plain")
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
    raise ValueError(f"unknown template {template!r}; expected one of {TEMPLATES}")


# every call on a tokenizer passes the same flag: transformers keeps it as state on the Rust
# tokenizer and flips it per call, so mixing values on one object from two threads would race
TEXT = {"add_special_tokens": False, "split_special_tokens": True}


def text_ids(tokenizer, texts):
    """Token ids of trace text, control-token strings as plain characters."""
    return tokenizer(texts, return_attention_mask=False, **TEXT)["input_ids"]


def _markup_tokenizer(tokenizer):
    """A copy of `tokenizer` that reads special-token strings as control tokens: for the chat
    template's own markup only. Kept on the tokenizer, so the flag of either copy never flips."""
    markup = getattr(tokenizer, "_lalp_markup", None)
    if markup is None:
        markup = copy.deepcopy(tokenizer)
        tokenizer._lalp_markup = markup
    return markup


def _markup_ids(tokenizer, text: str) -> list[int]:
    if not text:
        return []
    enc = _markup_tokenizer(tokenizer)(text, add_special_tokens=False, split_special_tokens=False,
                                       return_attention_mask=False)
    return list(enc["input_ids"])


SENTINEL = "\ue000LALP-PROMPT\ue001"  # private-use characters: no template or prompt holds them


def prefix_ids(tokenizer, prompt: str, template: str, control: Sequence[str] | None = None) -> list[int]:
    """tokens(prefix). The template's markup is control tokens; the prompt is text. A prompt with
    no control-token string is tokenized inside the rendered template as one string, exactly as
    the template's own tokenization would (so clean prompts keep their ids and cache keys); one
    holding such a string is tokenized on its own as text, between the markup's tokens."""
    if template == "plain":
        return list(text_ids(tokenizer, prompt + "\n\n"))
    rendered = prefix_text(tokenizer, prompt, template)
    strings = control_strings(tokenizer, template) if control is None else control
    if not any(c in prompt for c in strings):
        return _markup_ids(tokenizer, rendered)
    pre, sep, post = prefix_text(tokenizer, SENTINEL, template).partition(SENTINEL)
    if not sep or pre + prompt + post != rendered:
        raise ValueError("the chat template changes the prompt's text (it trims or escapes the content), so a prompt "
                         "with control-token strings cannot be kept as text; use LALP_CONTROL_TOKENS=quarantine")
    return _markup_ids(tokenizer, pre) + list(text_ids(tokenizer, prompt)) + _markup_ids(tokenizer, post)


def control_strings(tokenizer, template: str = "chat") -> tuple[str, ...]:
    """The strings that a tokenizer called with default arguments turns into control tokens, and
    that a chat template would read as turn markup: every special token (`all_special_tokens` and
    the added tokens flagged special), plus any added token the chat template itself renders as
    markup (a role marker such as `<|user|>` that is added but not flagged special). Added tokens
    that are neither, such as `<think>` for a student trained with it, are plain vocabulary."""
    cached = getattr(tokenizer, "_lalp_control", None)
    if cached is not None and cached[0] == template:
        return cached[1]
    found = set(getattr(tokenizer, "all_special_tokens", []) or [])
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    found.update(t.content for t in added.values() if getattr(t, "special", False))
    if template == "chat" and getattr(tokenizer, "chat_template", None):
        markup = "".join(prefix_text(tokenizer, SENTINEL, "chat").split(SENTINEL))
        try:  # the assistant turn's own markup, where the template renders one
            markup += tokenizer.apply_chat_template(
                [{"role": "user", "content": SENTINEL}, {"role": "assistant", "content": SENTINEL}], tokenize=False)
        except Exception:  # noqa: BLE001 - a template that refuses a two-turn chat has no more markup to show
            pass
        found.update(t.content for t in added.values() if t.content in markup)
    out = tuple(sorted((s for s in found if s), key=lambda s: (-len(s), s)))
    tokenizer._lalp_control = (template, out)
    return out


def control_strings_in(text: str, strings: Sequence[str]) -> list[str]:
    """The control-token strings that occur in `text`, in `strings`' order."""
    return [s for s in strings if s in text]


def token_starts(offsets: Sequence[tuple[int, int]]) -> list[int]:
    """First character of each token.

    Byte-level BPE reports offsets with leading whitespace trimmed (" The" -> the "T"); byte
    fallback gives several tokens the same span. Tokens tile the text in order, so a token's true
    first character is min(its reported start, the previous token's end).
    """
    starts, prev_end = [], 0
    append = starts.append  # a hot loop (every window of every response): no min/max calls
    for s, e in offsets:
        append(s if s < prev_end else prev_end)
        if e > prev_end:
            prev_end = e
    return starts


def tokenize_with_starts(tokenizer, text: str) -> tuple[list[int], list[int]]:
    enc = tokenizer(text, return_offsets_mapping=True, **TEXT)
    return list(enc["input_ids"]), token_starts(enc["offset_mapping"])


def tokenize_many(tokenizer, texts: list[str]) -> list[tuple[list[int], list[int]]]:
    """Batched `tokenize_with_starts` (the fast tokenizer parallelises a batch)."""
    if not texts:
        return []
    return [(ids.tolist(), starts.tolist()) for ids, starts, _ in encode_arrays(tokenizer, texts)]


def _backend(tokenizer):
    """The Rust tokenizer behind a fast tokenizer, when calling it directly is what
    `tokenizer(texts, **TEXT)` does (no truncation or padding configured); else None."""
    bt = getattr(tokenizer, "_tokenizer", None)
    if bt is None or not hasattr(bt, "encode_batch") or getattr(bt, "truncation", None) or getattr(bt, "padding", None):
        return None
    return bt


def _encodings(tokenizer, texts: Sequence[str]):
    """(ids, offsets) per text as the tokenizer gives them, the Rust tokenizer's batch where there is one."""
    bt = _backend(tokenizer)
    if bt is None:
        enc = tokenizer(list(texts), return_offsets_mapping=True, **TEXT)
        return zip(enc["input_ids"], enc["offset_mapping"])
    if bt.encode_special_tokens is not True:  # what split_special_tokens=True sets
        bt.encode_special_tokens = True
    return ((e.ids, e.offsets) for e in bt.encode_batch(list(texts), add_special_tokens=False))


def encode_arrays(tokenizer, texts: Sequence[str]) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Per text: token ids, first characters (`token_starts`) and reported ends, as int64 arrays.
    The same tokens as `tokenize_many`, straight from the Rust tokenizer where there is one (no
    per-token Python: the starts are a running maximum)."""
    if not texts:
        return []
    out = []
    for ids, offs in _encodings(tokenizer, texts):
        ids = np.array(ids, dtype=np.int64)
        # the (start, end) tuples flattened by an iterator: about twice as fast as np.asarray on them
        offs = np.fromiter(chain.from_iterable(offs), np.int64, 2 * len(offs)).reshape(-1, 2)
        out.append((ids, _starts(offs[:, 0], offs[:, 1]), offs[:, 1].copy()))
    return out


def encode_lists(tokenizer, texts: Sequence[str], shifts: Sequence[int] | None = None) -> list[tuple[list, list, list]]:
    """`encode_arrays` as Python lists, each text's starts and ends moved by its `shifts` entry:
    for many short texts (a few tokens each), where numpy's per-call cost is most of the work."""
    if not texts:
        return []
    out = []
    for (ids, offs), x in zip(_encodings(tokenizer, texts), shifts if shifts is not None else [0] * len(texts)):
        starts, ends, prev_end = [], [], 0
        for s, e in offs:
            starts.append((s if s < prev_end else prev_end) + x)
            ends.append(e + x)
            if e > prev_end:
                prev_end = e
        out.append((list(ids), starts, ends))
    return out


def _starts(s: np.ndarray, e: np.ndarray) -> np.ndarray:
    """`token_starts` vectorised: min(reported start, the largest end before the token)."""
    if len(s) == 0:
        return s.copy()
    prev = np.empty_like(e)
    prev[0] = 0
    np.maximum.accumulate(e[:-1], out=prev[1:])
    return np.minimum(s, prev)


def scored_range(starts: list[int], lo: int, hi: int) -> tuple[int, int]:
    """Indices [j0, j1) of tokens whose first character lies in [lo, hi). Starts are sorted."""
    import bisect

    return bisect.bisect_left(starts, lo), bisect.bisect_left(starts, hi)


def window_key(namespace: str, prefix: Sequence[int], window: Sequence[int], j0: int, j1: int) -> str:
    """Cache key of one scored window: the student/template/dtype namespace plus the exact tokens."""
    return window_key_from(key_base(namespace, prefix), window, j0, j1)


def key_base(namespace: str, prefix: Sequence[int]):
    """The hash state of `window_key` after the namespace and prefix: one per prompt, copied per
    window (every window of a prompt shares them)."""
    h = hashlib.sha256(namespace.encode())
    h.update(np.asarray(prefix, dtype=np.int64).tobytes())
    h.update(b"|")
    return h


def window_key_from(base, window: Sequence[int], j0: int, j1: int) -> str:
    h = base.copy()
    h.update(np.asarray(window, dtype=np.int64).tobytes())
    h.update(f"|{j0}:{j1}".encode())
    return h.hexdigest()[:32]


def merge_unscored_steps(tokenizer, text: str, spans: list[tuple[int, int]],
                         starts: Sequence[int] | None = None) -> list[tuple[int, int]]:
    """Merge steps in which no token of the response starts into the next step (the last such
    step into the previous one). A step of one short word after a space ("... so. Yes") gets no
    token of its own under byte-level BPE (" Yes" starts in the previous step's separator), and
    a step without scored tokens has no score. Spans still tile the text. `starts`: the text's
    token starts (`tokenize_with_starts`), when the caller tokenized it already (in a batch)."""
    if len(spans) <= 1:
        return list(spans)
    if starts is None:
        _, starts = tokenize_with_starts(tokenizer, text)
    import bisect

    owned = [bisect.bisect_left(starts, hi) - bisect.bisect_left(starts, lo) for lo, hi in spans]
    out: list[list[int]] = []
    carry = None
    for (lo, hi), n in zip(spans, owned):
        if carry is not None:
            lo = carry
            carry = None
        if n == 0 and hi != spans[-1][1]:
            carry = lo
            continue
        if n == 0 and out:
            out[-1][1] = hi
            continue
        out.append([lo, hi])
    return [(a, b) for a, b in out]
