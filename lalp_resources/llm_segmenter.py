"""LLM step segmentation (paper v2): an OpenAI-compatible chat endpoint groups sentences into
logical reasoning steps.

The response is first cut into sentences with the rule-based, math-aware
``segment_sentence`` (paper v1). The sentences are numbered and sent to the endpoint, which
returns JSON grouping consecutive sentence indices into steps, e.g.
``{"steps": [[0, 1], [2], [3, 4, 5]]}``. The groups are mapped back to character spans through
the sentence spans, so the steps tile the response exactly, and tiny steps are merged
(``merge_tiny``). A reply that lists step *texts* instead of indices
(``{"steps": ["...", "..."]}``) is mapped with ``spans_from_groups``.

Whatever goes wrong with the endpoint (HTTP error, timeout, no JSON, groups that are not a
complete, in-order partition, texts that do not match the response), ``segment`` does not
raise: it falls back to ``segment_sentence`` and returns the reason, which is also logged on
the ``lalp.segmentation`` logger.

Standard library only (``urllib``), no Dagster import. The Dagster resource wrapper lives in
``lalp_resources.resources``.
"""

from __future__ import annotations

import http.client
import json
import logging
import re
import socket
import time
import urllib.error
import urllib.request
from typing import Any

from lalp_resources.method.segmentation import (
    SEGMENTER_VERSIONS,
    Span,
    check_tiling,
    merge_tiny,
    segment_sentence,
    spans_from_groups,
)

logger = logging.getLogger("lalp.segmentation")

__all__ = ["LLMSegmenter", "PROMPT_VERSION", "SYSTEM_PROMPT", "build_user_prompt", "parse_reply"]

# Where the prompt comes from: arXiv 2510.03988 v2 says that the LLM segmenter groups the
# response's sentences into logical reasoning steps, but its exact prompt text could not be
# retrieved while writing this module (the stored copies of the paper only reach the
# introduction). The prompt below was therefore written for this project from that
# description, not copied from the paper: it numbers the sentences and asks for a JSON
# partition of consecutive sentence indices. Bump PROMPT_VERSION whenever it changes: it is
# part of LLMSegmenter.version, which is stored with the data.
PROMPT_VERSION = "group-sentences@1"

SYSTEM_PROMPT = (
    "You segment worked solutions into reasoning steps. You never rewrite, summarise or drop "
    "text; you only decide where one step ends and the next begins. You answer with JSON only."
)

_USER_TEMPLATE = """\
Below is a solution written by a language model, split into numbered sentences ({first} to {last}).
Group the sentences into logical reasoning steps. A reasoning step is a run of consecutive
sentences that together make one move in the solution, for example: restating what is given,
choosing an approach, setting up an equation, carrying out one calculation, checking or
correcting an earlier result, or stating the final answer. A sentence that only announces the
next move ("Let's compute the sum.") belongs to the step that makes that move. A step may be a
single sentence.

Rules:
- Use every sentence index from {first} to {last} exactly once.
- Each step is a list of consecutive indices, and the steps are in order.
- Answer with JSON only, in this form (an example for sentences 0 to 5):
  {{"steps": [[0, 1], [2], [3, 4, 5]]}}

Sentences:
{numbered}"""

_WS_RE = re.compile(r"\s+")
_FENCE_RE = re.compile(r"```[ \t]*(?:json|JSON)?[ \t]*\r?\n?(.*?)```", re.DOTALL)
_THINK_RE = re.compile(r"<think>.*?</think>", re.DOTALL)


def _one_line(s: str) -> str:
    return _WS_RE.sub(" ", s).strip()


def build_user_prompt(sentences: list[str], first_index: int = 0) -> str:
    """The user message: the sentences numbered ``[i] text`` (whitespace runs folded to one
    space so that every sentence sits on one line)."""
    last = first_index + len(sentences) - 1
    numbered = "\n".join(f"[{first_index + i}] {_one_line(s)}" for i, s in enumerate(sentences))
    return _USER_TEMPLATE.format(first=first_index, last=last, numbered=numbered)


class _Fallback(Exception):
    """An unusable reply; the message is the fallback reason."""


def _extract_json(content: str) -> Any:
    """Parse JSON from a chat reply: a bare JSON value, JSON inside a ```json fence, or the first
    JSON object/array embedded in prose (``<think>`` blocks are ignored)."""
    text = _THINK_RE.sub("", content).strip()
    candidates = [m.group(1).strip() for m in _FENCE_RE.finditer(text)]
    candidates.append(text)
    for cand in candidates:
        try:
            return json.loads(cand)
        except ValueError:
            pass
    decoder = json.JSONDecoder()
    tries = 0
    for m in re.finditer(r"[\[{]", text):
        tries += 1
        if tries > 64:
            break
        try:
            value, _end = decoder.raw_decode(text, m.start())
        except ValueError:
            continue
        if isinstance(value, dict) and "steps" in value or isinstance(value, list) and value:
            return value
    raise _Fallback("reply not JSON")


def parse_reply(content: str) -> list:
    """The list of groups in a reply: ``{"steps": [...]}`` (also ``groups``/``segments``) or a
    bare list. Raises _Fallback with the reason when there is none."""
    value = _extract_json(content)
    if isinstance(value, dict):
        for key in ("steps", "groups", "segments"):
            if key in value:
                value = value[key]
                break
        else:
            raise _Fallback("reply has no steps")
    if not isinstance(value, list) or not value:
        raise _Fallback("reply has no steps")
    return value


def _is_index(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _index_groups(groups: list, lo: int, hi: int) -> list[list[int]]:
    """Validate index groups over sentences ``lo..hi-1``: non-empty lists (a bare index is a
    one-sentence group) whose concatenation is exactly ``lo, lo+1, ..., hi-1``. A reply that is
    uniformly 1-based relative to ``lo`` (``lo+1..hi``) is accepted and shifted."""
    norm: list[list[int]] = []
    for g in groups:
        if _is_index(g):
            g = [g]
        if not isinstance(g, list) or not g or not all(_is_index(x) for x in g):
            raise _Fallback("groups not contiguous/complete")
        norm.append(list(g))
    flat = [x for g in norm for x in g]
    if flat == list(range(lo, hi)):
        return norm
    if flat == list(range(lo + 1, hi + 1)):
        return [[x - 1 for x in g] for g in norm]
    raise _Fallback("groups not contiguous/complete")


class LLMSegmenter:
    """Groups sentences into reasoning steps with an OpenAI-compatible chat endpoint.

    ``base_url`` is the API root, e.g. ``"http://127.0.0.1:8000/v1"``; requests go to
    ``{base_url}/chat/completions``. ``timeout`` is the socket timeout of one attempt (seconds);
    connection errors, timeouts, HTTP 429 and 5xx are retried ``max_retries`` times with
    exponential backoff starting at ``retry_backoff`` seconds. Texts with more than
    ``max_sentences`` sentences are sent in consecutive chunks (a step never crosses a chunk
    edge); any unusable chunk makes the whole text fall back.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: str | None = None,
        timeout: float = 60.0,
        max_retries: int = 2,
        temperature: float = 0.0,
        *,
        retry_backoff: float = 0.5,
        max_sentences: int = 300,
    ):
        if not base_url:
            raise ValueError("base_url is required")
        if not model:
            raise ValueError("model is required")
        if max_sentences < 2:
            raise ValueError("max_sentences must be >= 2")
        self.base_url = base_url
        self.model = model
        self.api_key = api_key
        self.timeout = float(timeout)
        self.max_retries = max(0, int(max_retries))
        self.temperature = float(temperature)
        self.retry_backoff = max(0.0, float(retry_backoff))
        self.max_sentences = int(max_sentences)

    @property
    def url(self) -> str:
        return f"{self.base_url.rstrip('/')}/chat/completions"

    @property
    def version(self) -> str:
        """Identity stored with the data: segmenter version, prompt version and model."""
        return f"{SEGMENTER_VERSIONS['llm']}+{PROMPT_VERSION}+{self.model}"

    def __repr__(self) -> str:  # never show the api key
        return f"LLMSegmenter(url={self.url!r}, model={self.model!r})"

    # ---------------------------------------------------------------------------------------

    def messages(self, sentences: list[str], first_index: int = 0) -> list[dict[str, str]]:
        return [
            {"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": build_user_prompt(sentences, first_index)},
        ]

    def segment(self, text: str) -> tuple[list[Span], str | None]:
        """``(spans, fallback_reason)``. ``fallback_reason`` is None when the endpoint's grouping
        was used, else a short reason ("http error 500", "timeout", "reply not JSON",
        "groups not contiguous/complete", "groups do not map to text", ...) and the spans are
        ``segment_sentence(text)``. Raises ValueError only for empty text."""
        sentence_spans = segment_sentence(text)  # raises ValueError on empty text
        if len(sentence_spans) == 1:
            return sentence_spans, None
        try:
            spans: list[Span] = []
            for lo in range(0, len(sentence_spans), self.max_sentences):
                hi = min(lo + self.max_sentences, len(sentence_spans))
                spans.extend(self._segment_chunk(text, sentence_spans, lo, hi))
            spans = merge_tiny(text, spans)
            check_tiling(text, spans)
        except _Fallback as exc:
            reason = str(exc)
        except ValueError as exc:  # defensive: a mapping bug must not lose the row
            reason = f"internal tiling error: {exc}"
        else:
            return spans, None
        logger.warning(
            "LLM segmentation fell back to sentence segmentation (%s): model=%s url=%s chars=%d",
            reason,
            self.model,
            self.url,
            len(text),
        )
        return sentence_spans, reason

    def _segment_chunk(self, text: str, sentence_spans: list[Span], lo: int, hi: int) -> list[Span]:
        chunk_spans = sentence_spans[lo:hi]
        if hi - lo == 1:
            return list(chunk_spans)
        sentences = [text[s:e] for s, e in chunk_spans]
        content = self._complete(self.messages(sentences, lo))
        groups = parse_reply(content)
        if all(isinstance(g, str) for g in groups) or (
            all(isinstance(g, list) and g and all(isinstance(x, str) for x in g) for g in groups)
        ):
            texts = [g if isinstance(g, str) else " ".join(g) for g in groups]
            c0, c1 = chunk_spans[0][0], chunk_spans[-1][1]
            local = spans_from_groups(text[c0:c1], texts)
            if local is None:
                raise _Fallback("groups do not map to text")
            return [(c0 + s, c0 + e) for s, e in local]
        idx = _index_groups(groups, lo, hi)
        return [(sentence_spans[g[0]][0], sentence_spans[g[-1]][1]) for g in idx]

    # ---------------------------------------------------------------------------------------

    def _complete(self, messages: list[dict[str, str]]) -> str:
        """POST one chat completion (with retries) and return choices[0].message.content."""
        body = json.dumps(
            {"model": self.model, "messages": messages, "temperature": self.temperature}
        ).encode("utf-8")
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        reason = "no attempt made"
        for attempt in range(self.max_retries + 1):
            if attempt:
                time.sleep(self.retry_backoff * (2 ** (attempt - 1)))
            req = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    raw = resp.read()
            except urllib.error.HTTPError as exc:
                reason = f"http error {exc.code}"
                try:
                    exc.close()
                except Exception:  # pragma: no cover
                    pass
                if exc.code == 429 or exc.code >= 500:
                    logger.info("segmentation endpoint: %s (attempt %d)", reason, attempt + 1)
                    continue
                raise _Fallback(reason) from None
            except (TimeoutError, socket.timeout):
                reason = "timeout"
            except urllib.error.URLError as exc:
                if isinstance(exc.reason, (TimeoutError, socket.timeout)):
                    reason = "timeout"
                else:
                    reason = f"connection error: {exc.reason}"
            except (http.client.HTTPException, ConnectionError, OSError) as exc:
                reason = f"connection error: {type(exc).__name__}"
            else:
                return self._content(raw)
            logger.info("segmentation endpoint: %s (attempt %d)", reason, attempt + 1)
        raise _Fallback(reason)

    @staticmethod
    def _content(raw: bytes) -> str:
        try:
            payload = json.loads(raw.decode("utf-8"))
            content = payload["choices"][0]["message"]["content"]
        except (ValueError, UnicodeDecodeError):
            raise _Fallback("response body not JSON") from None
        except (KeyError, IndexError, TypeError):
            raise _Fallback("reply has no choices[0].message.content") from None
        if not isinstance(content, str) or not content.strip():
            raise _Fallback("reply has no content")
        return content
