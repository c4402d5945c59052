"""Final-answer extraction and verification for teacher traces.

Pure logic (no Dagster). Used by :mod:`lalp_resources.adapters` to fill the
``final_answer``, ``is_correct`` and ``verify_reason`` columns.

Verification uses HuggingFace ``math_verify`` (``parse`` + ``verify``). Two of its
properties shape this module:

* Its timeouts are ``signal.alarm`` based, which only works in the main thread and
  raises ``ValueError`` elsewhere (Dagster runs ops in worker threads in some
  executors). We pass a timeout only when running in the main thread and pass
  ``None`` otherwise; as a guard for the no-timeout case we refuse inputs longer than
  ``MAX_VERIFY_CHARS`` (pathological sympy inputs are long ones).
* It is slow-ish (milliseconds per call), so ``annotate`` caches parses per string and
  verdicts per ``(answer, reference)`` pair, and short-circuits exact string matches.
"""

from __future__ import annotations

import logging
import re
import threading

import polars as pl

__all__ = ["extract_final_answer", "verify_answer", "annotate", "MAX_VERIFY_CHARS"]

# Answers / references longer than this are not handed to sympy (see module docstring).
MAX_VERIFY_CHARS = 1_000
# Per-call timeout (seconds) for math_verify, only honoured in the main thread.
_TIMEOUT_S = 5

# math_verify logs a warning every time timeouts are disabled; that is expected here.
logging.getLogger("math_verify").setLevel(logging.ERROR)


# --------------------------------------------------------------------------- extraction

_BOXED_RE = re.compile(r"\\(?:boxed|fbox)\s*\{")
# "The final answer is 42", "final answer: 42", "Answer: 42", "the answer is 42".
_ANSWER_PATTERNS = [
    re.compile(r"final\s+answer\s*(?:is|:|=)\s*(.+)", re.IGNORECASE),
    re.compile(r"\banswer\s*(?:is|:)\s*(.+)", re.IGNORECASE),
]


def _balanced_group(text: str, open_idx: int) -> str | None:
    """Return the text inside the braces whose ``{`` is at ``open_idx``; None if unbalanced."""
    depth = 0
    i = open_idx
    while i < len(text):
        c = text[i]
        if c == "\\":
            i += 2  # skip the escaped character: \{ and \} are literal braces
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return text[open_idx + 1 : i]
        i += 1
    return None


def _clean_answer(ans: str) -> str | None:
    ans = ans.strip()
    # Trailing sentence punctuation and math delimiters around a short answer.
    ans = ans.rstrip(" .;,")
    for left, right in (("$", "$"), ("\\(", "\\)"), ("\\[", "\\]"), ("**", "**")):
        if ans.startswith(left) and ans.endswith(right) and len(ans) > len(left) + len(right):
            ans = ans[len(left) : len(ans) - len(right)].strip()
    ans = ans.rstrip(" .;,")
    return ans or None


def extract_final_answer(response: str | None) -> str | None:
    """The final answer stated in a free-text response, or None.

    Order: the content of the last ``\\boxed{...}`` (balanced braces, so nested
    ``\\frac{a}{b}`` survives); else the last "final answer is X" / "answer: X" /
    "the answer is X" (X = rest of that line, trimmed of ``$`` and trailing dots).
    """
    if not isinstance(response, str) or not response:
        return None
    last_boxed = None
    for m in _BOXED_RE.finditer(response):
        inner = _balanced_group(response, m.end() - 1)
        if inner is not None and inner.strip():
            last_boxed = inner.strip()
    if last_boxed is not None:
        return last_boxed
    for pat in _ANSWER_PATTERNS:
        matches = list(pat.finditer(response))
        if matches:
            # The pattern runs to end of line ('.' does not match newline).
            ans = _clean_answer(matches[-1].group(1))
            if ans:
                return ans
    return None


# --------------------------------------------------------------------------- verification


def _timeout() -> int | None:
    # signal.alarm only works in the main thread; elsewhere math_verify raises unless
    # the timeout is disabled.
    return _TIMEOUT_S if threading.current_thread() is threading.main_thread() else None


def _wrap(text: str) -> str:
    """Put a bare answer in math mode, the form math_verify's LaTeX extractor expects."""
    if "$" in text or "\\boxed" in text or "\\(" in text or "\\[" in text:
        return text
    return f"${text}$"


def _parse(text: str, cache: dict | None = None) -> list:
    """math_verify.parse of the wrapped text (falling back to the bare text); [] on failure."""
    if cache is not None and text in cache:
        return cache[text]
    from math_verify import parse  # imported lazily: it pulls in sympy (~1 s)

    result: list = []
    for candidate in dict.fromkeys((_wrap(text), text)):  # dedupes when already wrapped
        try:
            result = parse(candidate, parsing_timeout=_timeout())
        except Exception:  # noqa: BLE001 - math_verify/sympy can raise anything
            result = []
        if result:
            break
    if cache is not None:
        cache[text] = result
    return result


def _norm(s: str) -> str:
    """Cheap normalisation for the exact-match short-cut."""
    s = s.strip().strip("$").strip()
    for tok in ("\\left", "\\right", "\\!", "\\,", "\\;", " "):
        s = s.replace(tok, "")
    return s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac").rstrip(".")


def verify_answer(
    final_answer: str | None, reference: str | None, *, _parse_cache: dict | None = None
) -> tuple[bool | None, str]:
    """Is ``final_answer`` mathematically equal to ``reference``?

    Returns ``(is_correct, reason)``:

    * ``(None, "no_reference")`` / ``(None, "no_final_answer")`` when either is missing;
    * ``(True, "verified")`` / ``(False, "mismatch")`` from math_verify;
    * ``(None, "parse_error: ...")`` when the reference cannot be parsed (unknown truth),
      ``(False, "parse_error: ...")`` when only the answer cannot (an unreadable answer
      is counted wrong).
    Never raises.
    """
    if reference is None or not str(reference).strip():
        return None, "no_reference"
    if final_answer is None or not str(final_answer).strip():
        return None, "no_final_answer"
    reference, final_answer = str(reference), str(final_answer)
    if _norm(final_answer) == _norm(reference):
        return True, "verified"
    if len(reference) > MAX_VERIFY_CHARS:
        return None, f"parse_error: reference longer than {MAX_VERIFY_CHARS} chars"
    if len(final_answer) > MAX_VERIFY_CHARS:
        return False, f"parse_error: answer longer than {MAX_VERIFY_CHARS} chars"
    try:
        from math_verify import verify

        gold = _parse(reference, _parse_cache)
        if not gold:
            return None, "parse_error: reference not parsable"
        pred = _parse(final_answer, _parse_cache)
        if not pred:
            return False, "parse_error: answer not parsable"
        ok = verify(gold, pred, timeout_seconds=_timeout())
        return (True, "verified") if ok else (False, "mismatch")
    except Exception as exc:  # noqa: BLE001 - never let a verifier bug kill ingestion
        return None, f"parse_error: {type(exc).__name__}: {str(exc)[:200]}"


def annotate(traces: pl.DataFrame) -> pl.DataFrame:
    """Fill ``final_answer`` (where null, from ``response``), ``is_correct`` and ``verify_reason``.

    Needs columns ``response`` and ``reference_answer``; adds the three output columns
    when absent. Existing non-null ``final_answer`` values (given separately by the
    source format) are kept. Verification results are cached for identical
    ``(final_answer, reference)`` pairs within this call.
    """
    n = traces.height
    responses = traces.get_column("response").to_list()
    refs = (
        traces.get_column("reference_answer").to_list()
        if "reference_answer" in traces.columns
        else [None] * n
    )
    given = (
        traces.get_column("final_answer").to_list() if "final_answer" in traces.columns else [None] * n
    )
    finals: list[str | None] = []
    correct: list[bool | None] = []
    reasons: list[str] = []
    verdicts: dict[tuple[str | None, str | None], tuple[bool | None, str]] = {}
    parse_cache: dict = {}
    for resp, ref, fa in zip(responses, refs, given):
        if fa is None or not str(fa).strip():
            fa = extract_final_answer(resp)
        key = (fa, ref)
        if key not in verdicts:
            verdicts[key] = verify_answer(fa, ref, _parse_cache=parse_cache)
        ok, why = verdicts[key]
        finals.append(fa)
        correct.append(ok)
        reasons.append(why)
    return traces.with_columns(
        pl.Series("final_answer", finals, dtype=pl.Utf8),
        pl.Series("is_correct", correct, dtype=pl.Boolean),
        pl.Series("verify_reason", reasons, dtype=pl.Utf8),
    )
