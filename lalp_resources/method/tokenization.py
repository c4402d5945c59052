"""Tokenization as docs/method.md defines it, shared by the reference and the engine.

- prefix: the student's chat template on one user turn with the generation prompt (`chat`),
  or `prompt + "\\n\\n"` (`plain`); no special tokens beyond what the template renders.
- window text (context steps + step) is tokenized as one string with offsets.
- a token belongs to the step holding its first character.
"""

from __future__ import annotations

import hashlib
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


def prefix_ids(tokenizer, prompt: str, template: str) -> list[int]:
    return list(tokenizer(prefix_text(tokenizer, prompt, template), add_special_tokens=False)["input_ids"])


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
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return list(enc["input_ids"]), token_starts(enc["offset_mapping"])


def tokenize_many(tokenizer, texts: list[str]) -> list[tuple[list[int], list[int]]]:
    """Batched `tokenize_with_starts` (the fast tokenizer parallelises a batch)."""
    if not texts:
        return []
    enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
    return [(list(ids), token_starts(offs)) for ids, offs in zip(enc["input_ids"], enc["offset_mapping"])]


def scored_range(starts: list[int], lo: int, hi: int) -> tuple[int, int]:
    """Indices [j0, j1) of tokens whose first character lies in [lo, hi). Starts are sorted."""
    import bisect

    return bisect.bisect_left(starts, lo), bisect.bisect_left(starts, hi)


def window_key(namespace: str, prefix: Sequence[int], window: Sequence[int], j0: int, j1: int) -> str:
    """Cache key of one scored window: the student/template/dtype namespace plus the exact tokens."""
    h = hashlib.sha256(namespace.encode())
    h.update(np.asarray(prefix, dtype=np.int64).tobytes())
    h.update(b"|")
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
