"""Transform: a ZeroEval model output -> (reasoning, answer).

ZeroEval asks each model for ``{"reasoning": ..., "answer": ...}`` in a ```json fence; real
outputs drop fences, leave LaTeX backslashes unescaped (``\\sqrt``, and ``\\frac``, which
JSON would read as a form feed), put raw newlines in strings, or stop before the answer.
:func:`parse_json_output` reads them as a tolerant grader would.

Why not the ``json-repair`` library: put in this parser's place in the same reader, on the
ZeroEval MATH level-5 traces (5,768 records) it accepts 5,637 records against 5,515 here, but
409 of its rows have no answer (it closes cut-off outputs instead of rejecting them; 65 here),
so it yields 5,228 rows with an answer against 5,450; and of the 5,515 rows this parser reads
only 4,144 come out with the same response (it reads ``\\frac`` as a form feed and
``\\right`` as a carriage return, and picks up JSON-like prose before the fenced block).
"""

from __future__ import annotations

import json
import re
from typing import Any

from lalp_resources.adapters.common import type_name

__all__ = ["parse_json_output"]

_FENCE_RE = re.compile(r"```[ \t]*(?:json|JSON)?")
# LaTeX commands whose backslash collides with a valid JSON escape (\b \f \n \r \t):
# json.loads would silently turn "\frac" into form-feed + "rac". \b and \f before a
# letter are never meant as escapes; for \n, \r and \t (newline or tab before a word is
# common) only a list of LaTeX command names counts, so correctly escaped JSON
# round-trips unchanged.
_LATEX_LIKE_ESCAPE = re.compile(
    r"(?<!\\)((?:\\\\)*)\\(?=[bf][A-Za-z]"
    r"|n(?:eq|e|eg|u|abla|ot|otin|olimits|mid|geq|leq|subseteq|exists|ewline|oindent|parallel)(?![A-Za-z])"
    r"|t(?:imes|ext|extbf|extit|extrm|exttt|heta|an|anh|au|o|frac|binom|ilde|riangle|op|herefore)(?![A-Za-z])"
    r"|r(?:ight|ightarrow|ho|angle|floor|ceil|m|oot|brace|vert)(?![A-Za-z]))"
)
# Any backslash that does not start a valid JSON escape (\sqrt, \(, \cdot, ...).
_INVALID_ESCAPE = re.compile(r'(?<!\\)((?:\\\\)*)\\(?!["\\/bfnrt]|u[0-9a-fA-F]{4})')


def _repair_escapes(s: str) -> str:
    s = _LATEX_LIKE_ESCAPE.sub(lambda m: m.group(1) + "\\\\", s)
    return _INVALID_ESCAPE.sub(lambda m: m.group(1) + "\\\\", s)


def _loads_lenient(s: str) -> Any:
    # strict=False accepts raw newlines/tabs inside strings, which models emit often.
    return json.loads(s, strict=False)


def _decode_json_string(raw: str) -> str:
    try:
        out = _loads_lenient('"' + _repair_escapes(raw) + '"')
        return out if isinstance(out, str) else raw
    except Exception:  # noqa: BLE001
        return raw


def parse_json_output(text: str) -> tuple[str, str | None]:
    """(reasoning, answer) from a model output that should hold ``{"reasoning", "answer"}``.

    Tolerant like a real grader. Candidates, tried in order: the first ```json fenced
    block; the text from the first fence to the last one (the reasoning itself may hold
    a fenced block); the whole output with fence markers removed (models often drop the
    opening or the closing fence). For each candidate, the first ``{`` to the last ``}``
    is parsed after re-escaping LaTeX backslashes that are not valid JSON escapes
    (``\\sqrt``, and ``\\frac`` which JSON would read as a form feed), with raw control
    characters allowed. As a last resort the two fields are pulled out with regular
    expressions: ``"reasoning": "`` up to the last ``"answer":`` key, whose value must be
    present (so an output cut off before its answer stays unparsable).
    Raises ``ValueError`` naming the problem otherwise.
    """
    if not isinstance(text, str) or not text.strip():
        raise ValueError("empty output")
    s = text.strip()
    fences = list(_FENCE_RE.finditer(s))
    candidates = []
    if len(fences) >= 2:
        candidates.append(s[fences[0].end() : fences[1].start()])
    if len(fences) >= 3:
        candidates.append(s[fences[0].end() : fences[-1].start()])
    candidates.append(_FENCE_RE.sub("", s))

    first_error = None
    for cand in candidates:
        start, end = cand.find("{"), cand.rfind("}")
        if start < 0 or end < start:
            continue
        try:
            obj = _loads_lenient(_repair_escapes(cand[start : end + 1]))
        except Exception as exc:  # noqa: BLE001
            first_error = first_error or f"not valid JSON even after escape repair: {str(exc)[:160]}"
            continue
        try:
            return _reasoning_answer(obj)
        except ValueError as exc:
            first_error = first_error or str(exc)
    for cand in candidates:
        obj = _regex_fields(cand)
        if obj is not None:
            return _reasoning_answer(obj)
    if first_error:
        raise ValueError(first_error)
    if "{" not in s:
        raise ValueError("no JSON object in output")
    raise ValueError(f"truncated output: JSON object never closed and no answer field ({len(text)} chars)")


def _reasoning_answer(obj: Any) -> tuple[str, str | None]:
    if not isinstance(obj, dict):
        raise ValueError(f"JSON is a {type_name(obj)}, not an object")
    reasoning = obj.get("reasoning")
    if not isinstance(reasoning, str) or not reasoning.strip():
        raise ValueError("missing or empty 'reasoning' field")
    answer = obj.get("answer")
    if answer is None or isinstance(answer, str):
        pass
    elif isinstance(answer, (int, float)) and not isinstance(answer, bool):
        answer = str(answer)
    else:
        answer = json.dumps(answer, ensure_ascii=False)
    return reasoning, answer


_REASONING_KEY = re.compile(r'"reasoning"\s*:\s*"')
_ANSWER_KEY = re.compile(r'"answer"\s*:\s*')
_QUOTED = re.compile(r'"((?:[^"\\]|\\.)*)"', re.S)
_UNQUOTED = re.compile(r"([^,}\n]+)")


def _regex_fields(candidate: str) -> dict | None:
    """Last-resort field extraction for almost-JSON; None unless both fields are found."""
    m_reason = _REASONING_KEY.search(candidate)
    if m_reason is None:
        return None
    answer_keys = [m for m in _ANSWER_KEY.finditer(candidate) if m.start() >= m_reason.end()]
    if not answer_keys:
        return None
    m_answer = answer_keys[-1]
    value = _QUOTED.match(candidate, m_answer.end()) or _UNQUOTED.match(candidate, m_answer.end())
    if value is None or not value.group(1).strip():
        return None
    # The reasoning string runs to the answer key, minus the '",' that should close it.
    reasoning = candidate[m_reason.end() : m_answer.start()].rstrip()
    reasoning = reasoning.removesuffix(",").rstrip().removesuffix('"')
    return {"reasoning": _decode_json_string(reasoning), "answer": _decode_json_string(value.group(1)).strip()}
