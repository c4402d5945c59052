"""Final-answer extraction and verification for teacher traces.

Pure logic (no Dagster). Used by :mod:`lalp_resources.adapters` to fill the
``final_answer``, ``is_correct`` and ``verify_reason`` columns.

Verification uses HuggingFace ``math_verify`` (``parse`` + ``verify``). Two of its
properties shape this module:

* Its timeouts are ``signal.alarm`` based: they only work in the main thread, and a
  timeout requested elsewhere raises ``ValueError`` (Dagster runs steps in worker
  threads under some executors). Without a timeout one pathological pair can run for
  minutes, so verification runs here with timeouts in the main thread, and in a spawned
  child process (main thread there) when called from any other thread. Inputs longer
  than ``MAX_VERIFY_CHARS`` are not handed to sympy at all.
* It costs milliseconds per call, so ``annotate`` verifies each distinct
  ``(answer, reference)`` pair once, caches parses per string, and settles exact string
  matches and yes/no answers without sympy.
"""

from __future__ import annotations

import re
import threading

import polars as pl

__all__ = ["extract_final_answer", "verify_answer", "annotate", "MAX_VERIFY_CHARS"]

# Answers / references longer than this are not handed to sympy (see module docstring).
MAX_VERIFY_CHARS = 1_000
# Timeout (seconds) per math_verify parse / verify call.
_TIMEOUT_S = 2


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


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


_INLINE_MATH = re.compile(r"\$[^$]*\$")
_LATEX_CMD = re.compile(r"\\[A-Za-z]+")
_TWO_WORDS = re.compile(r"[A-Za-z]{2,}[\s,;:]+[A-Za-z]{2,}")


def _is_prose(text: str) -> bool:
    """True for sentences ("The limit is 2"), False for expressions ("x=2, y=1", "\\text{Devon}").

    Prose must not be wrapped in $...$ (it would parse as a product of letters);
    math_verify then reads its last expression instead.
    """
    t = _LATEX_CMD.sub(" ", _INLINE_MATH.sub(" ", text))
    return _TWO_WORDS.search(t) is not None


def _wrap(text: str) -> str:
    """Put a bare answer in math mode, the form math_verify's LaTeX extractor expects."""
    if "$" in text or "\\boxed" in text or "\\(" in text or "\\[" in text or _is_prose(text):
        return text
    return f"${text}$"


# Reference answers written as prose (the CHAMP style): "100 (i.e., all values)",
# "C(10, 5), or equivalently 252", "3 is the only possible value", "0 pairs".
_PROSE_PAREN = re.compile(r"\s*\((?:i\.e\.|e\.g\.|[^()]*[A-Za-z]{2,}\s+[A-Za-z]{2,})[^()]*\)\s*$")
_EQUIVALENTLY = re.compile(r",?\s+or\s+equivalently\s+", re.IGNORECASE)
_LEADING_NUMBER = re.compile(r"^\s*(-?\d+(?:\.\d+)?(?:/\d+)?)\s+(?=[A-Za-z]{2,})")


def _reference_variants(reference: str) -> list[str]:
    """Equivalent checkable forms of a reference; an answer matching any of them is correct.

    Prose that cannot be reduced to an expression ("Always greater than 20", "No such
    values") yields no variant: comparing its last number would give wrong verdicts.
    """
    ref = _PROSE_PAREN.sub("", reference.strip()) or reference.strip()
    variants = []
    for part in _EQUIVALENTLY.split(ref):
        m = _LEADING_NUMBER.match(part)
        part = m.group(1) if m else _answer_core(part.strip())  # "... is equal to 3" -> "3"
        if part and not _is_prose(part):
            variants.append(part)
    return list(dict.fromkeys(variants))


_THERE_ARE = re.compile(r"^\s*there\s+(?:are|is|exists?)\s+(?:exactly\s+|only\s+)?(-?\d[\d,]*)\b", re.IGNORECASE)
_COPULA = re.compile(r"\b(?:is|are|equals|equal\s+to)\b|=")


def _answer_core(answer: str) -> str:
    """The answer part of a one-sentence answer ("... is 771." -> "771"); other text unchanged."""
    if not _is_prose(answer):
        return answer
    m = _THERE_ARE.match(answer)
    if m:
        return m.group(1).replace(",", "")
    tail = _COPULA.split(answer)[-1].strip().rstrip(".").strip()
    if tail and re.search(r"[\d$]", tail) and len(tail) < len(answer):
        return tail
    return answer


def _yes_no(text: str) -> str | None:
    m = re.match(r"^[\s$*(]*(?:\\text\{)?\s*(yes|no)\b", text, re.IGNORECASE)
    return m.group(1).lower() if m else None


def _parse(text: str, cache: dict, timeout: int | None) -> list:
    """math_verify.parse of the wrapped text (falling back to the bare text); [] on failure."""
    if text in cache:
        return cache[text]
    from math_verify import parse  # imported lazily: it pulls in sympy (~1 s)

    result: list = []
    for candidate in dict.fromkeys((_wrap(text), text)):  # dedupes when nothing was wrapped
        try:
            result = parse(candidate, parsing_timeout=timeout)
        except Exception:  # noqa: BLE001 - math_verify/sympy can raise anything
            result = []
        if result:
            break
    cache[text] = result
    return result


def _norm(s: str) -> str:
    """Cheap normalisation for the exact-match short-cut."""
    s = s.strip().strip("$").strip()
    for tok in ("\\left", "\\right", "\\!", "\\,", "\\;", " "):
        s = s.replace(tok, "")
    return s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac").rstrip(".").lower()


def _quick_verdict(final_answer: str | None, reference: str | None) -> tuple[bool | None, str] | None:
    """Verdicts that need no sympy; None when math_verify must decide."""
    if reference is None or not str(reference).strip():
        return None, "no_reference"
    if final_answer is None or not str(final_answer).strip():
        return None, "no_final_answer"
    reference, final_answer = str(reference), str(final_answer)
    variants = _reference_variants(reference)
    if not variants:
        return None, "parse_error: reference is prose, not checkable automatically"
    core = _answer_core(final_answer)
    if any(_norm(v) in (_norm(final_answer), _norm(core)) for v in variants):
        return True, "verified"
    ref_yn = _yes_no(variants[0]) if len(variants) == 1 and len(variants[0].split()) == 1 else None
    if ref_yn is not None:  # a yes/no question: compare the answer's leading yes/no
        return (True, "verified") if _yes_no(final_answer) == ref_yn else (False, "mismatch")
    if len(reference) > MAX_VERIFY_CHARS:
        return None, f"parse_error: reference longer than {MAX_VERIFY_CHARS} chars"
    if len(final_answer) > MAX_VERIFY_CHARS:
        return False, f"parse_error: answer longer than {MAX_VERIFY_CHARS} chars"
    return None


def _math_verdict(final_answer: str, reference: str, cache: dict, timeout: int | None) -> tuple[bool | None, str]:
    try:
        from math_verify import verify

        golds = [g for g in (_parse(v, cache, timeout) for v in _reference_variants(reference)) if g]
        if not golds:
            return None, "parse_error: reference not parsable"
        pred = _parse(_answer_core(final_answer), cache, timeout)
        if not pred:
            return False, "parse_error: answer not parsable"
        ok = any(verify(gold, pred, timeout_seconds=timeout) for gold in golds)
        return (True, "verified") if ok else (False, "mismatch")
    except Exception as exc:  # noqa: BLE001 - never let a verifier bug kill ingestion
        return None, f"parse_error: {type(exc).__name__}: {str(exc)[:200]}"


def _verify_pairs(pairs: list[tuple[str, str]]) -> list[tuple[bool | None, str]]:
    """math_verify verdicts for (answer, reference) pairs, with timeouts that always work.

    In the main thread: here, with signal-based timeouts. In any other thread: in a
    spawned child process, whose main thread can use them. Without a timeout a single
    pathological pair (e.g. comparing against ``(x+y+z)^{1999}``) runs for minutes.
    If the child cannot be started, the pairs are left unverified rather than risking
    a hang.
    """
    if not pairs:
        return []
    if _in_main_thread():
        cache: dict = {}
        return [_math_verdict(fa, ref, cache, _TIMEOUT_S) for fa, ref in pairs]
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    try:
        with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as ex:
            return ex.submit(_verify_pairs, pairs).result()
    except Exception as exc:  # noqa: BLE001
        why = f"parse_error: verifier unavailable outside the main thread ({type(exc).__name__})"
        return [(None, why)] * len(pairs)


def verify_answer(final_answer: str | None, reference: str | None) -> tuple[bool | None, str]:
    """Is ``final_answer`` mathematically equal to ``reference``?

    Returns ``(is_correct, reason)``:

    * ``(None, "no_reference")`` / ``(None, "no_final_answer")`` when either is missing;
    * ``(True, "verified")`` / ``(False, "mismatch")``: normalised string match, yes/no
      match, else math_verify (``parse`` + ``verify``) with both sides in math mode;
    * ``(None, "parse_error: ...")`` when the reference cannot be parsed (truth unknown),
      ``(False, "parse_error: ...")`` when only the answer cannot (an unreadable answer
      counts as wrong).

    Prose is handled for references written as sentences (CHAMP): a trailing "(i.e.,
    ...)" is dropped, "X, or equivalently Y" accepts X or Y, "0 pairs" means 0; and for
    one-sentence answers the part after the last "is"/"are"/"=" is compared. Never raises.
    """
    quick = _quick_verdict(final_answer, reference)
    if quick is not None:
        return quick
    return _verify_pairs([(str(final_answer), str(reference))])[0]


def annotate(traces: pl.DataFrame) -> pl.DataFrame:
    """Fill ``final_answer`` (where null, from ``response``), ``is_correct`` and ``verify_reason``.

    Needs columns ``response`` and ``reference_answer`` (absent: treated as null); sets
    the three output columns. Non-null ``final_answer`` values (given separately by the
    source format) are kept. Verdicts are computed once per distinct
    ``(final_answer, reference)`` pair within this call.
    """
    n = traces.height
    responses = traces.get_column("response").to_list()
    refs = traces.get_column("reference_answer").to_list() if "reference_answer" in traces.columns else [None] * n
    given = traces.get_column("final_answer").to_list() if "final_answer" in traces.columns else [None] * n
    finals = [fa if fa is not None and str(fa).strip() else extract_final_answer(resp)
              for resp, fa in zip(responses, given)]
    verdicts: dict[tuple, tuple[bool | None, str]] = {}
    pending: list[tuple[str, str]] = []
    for key in dict.fromkeys(zip(finals, refs)):
        quick = _quick_verdict(*key)
        if quick is None:
            pending.append((str(key[0]), str(key[1])))
        else:
            verdicts[key] = quick
    # One batch, so that outside the main thread a single child process does all of it.
    for key, verdict in zip(pending, _verify_pairs(pending)):
        verdicts[key] = verdict
    out = [verdicts[key] for key in zip(finals, refs)]
    return traces.with_columns(
        pl.Series("final_answer", finals, dtype=pl.Utf8),
        pl.Series("is_correct", [v[0] for v in out], dtype=pl.Boolean),
        pl.Series("verify_reason", [v[1] for v in out], dtype=pl.Utf8),
    )
