"""Step segmentation (docs/method.md, "Steps").

A response is cut into *steps*: contiguous character spans ``(start, end)`` (end exclusive) that
tile the response exactly. Every character belongs to exactly one step, a separator (the
whitespace after a paragraph, line or sentence) belongs to the step it ends, and no step is
whitespace-only.

Segmenters (``SEGMENTERS``):

* ``paragraph``: cut after every maximal whitespace run that holds >= 2 line breaks.
* ``line``: cut after every maximal whitespace run that holds >= 1 line break.
* ``sentence`` (paper v1): cut after sentence-final punctuation (``.``, ``!``, ``?``, optionally
  followed by closing quotes/brackets) plus the whitespace run after it, and always at paragraph
  breaks. It is math-aware: it never cuts after common abbreviations ("e.g.", "i.e.", "etc.",
  "vs.", "Fig. 2", "Eq. (3)", "Dr.", "approx.", "cf.", ...), after a lone capital initial, before
  a lowercase continuation, nor inside LaTeX math (``$...$``, ``$$...$$``, ``\\(...\\)``,
  ``\\[...\\]``, ``\\begin{env}...\\end{env}``).
* ``llm`` (paper v2): an OpenAI-compatible endpoint groups the sentences into logical steps; see
  ``lalp_resources.llm_segmenter.LLMSegmenter``. ``segment(text, "llm", llm=segmenter)`` returns
  its spans (which fall back to ``sentence`` when the reply is unusable).

Every rule-based segmenter then applies ``merge_tiny``: a fragment that is only an enumerator
("1.", "2)", "(a)", "-", "Step 3:") or has fewer than 3 non-whitespace characters merges into
the NEXT step (the last one merges into the previous step), and a whitespace-only piece merges
into the previous step (into the next one when it leads the text).

Line breaks are those of ``str.splitlines`` ("\\r\\n" counts as one). Whitespace is
``str.isspace``. Pure Python and ``re``; no Dagster import. Linear-ish time: a 100k-character
trace segments in a few milliseconds.

Bump ``SEGMENTER_VERSIONS`` whenever a rule changes: the version is stored with the data.
"""

from __future__ import annotations

import bisect
import re
from typing import Protocol

__all__ = [
    "SEGMENTERS",
    "SEGMENTER_VERSIONS",
    "Span",
    "segment",
    "segment_paragraph",
    "segment_line",
    "segment_sentence",
    "merge_tiny",
    "check_tiling",
    "spans_from_groups",
    "is_tiny",
]

SEGMENTERS: tuple[str, ...] = ("paragraph", "line", "sentence", "llm")
SEGMENTER_VERSIONS: dict[str, str] = {
    "paragraph": "paragraph@1",
    "line": "line@1",
    "sentence": "sentence@1",
    # The LLM segmenter's full identity also includes the endpoint's model and prompt version:
    # see LLMSegmenter.version.
    "llm": "llm@1",
}

Span = tuple[int, int]


class _SegmenterLike(Protocol):
    def segment(self, text: str) -> tuple[list[Span], str | None]: ...


# --------------------------------------------------------------------------------------------
# Shared helpers
# --------------------------------------------------------------------------------------------

# Line boundaries of str.splitlines; "\r\n" is one break.
_LINE_BREAK_CHARS = "\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"
_LINE_BREAK_RE = re.compile(rf"\r\n|[{_LINE_BREAK_CHARS}]")
# A maximal whitespace run that holds a line break: it starts where no whitespace precedes, then
# whitespace that breaks no line, a break, and the rest of the run. Possessive, so a long run
# without a break is rejected in one pass (linear, whatever the input).
_BREAK_RUN_RE = re.compile(rf"(?<!\s)[^\S{_LINE_BREAK_CHARS}]*+[{_LINE_BREAK_CHARS}]\s*+")
_NONWS_RE = re.compile(r"\S")


def _require_text(text: str) -> None:
    if not isinstance(text, str):
        raise TypeError(f"text must be str, got {type(text).__name__}")
    if not text or text.isspace():
        raise ValueError("cannot segment empty or whitespace-only text")


def _break_cuts(text: str, min_breaks: int) -> list[int]:
    """Positions right after each maximal whitespace run holding >= ``min_breaks`` line breaks."""
    n = len(text)
    cuts = []
    # only the runs that hold a line break reach Python (one match per run, not one per space)
    for m in _BREAK_RUN_RE.finditer(text):
        end = m.end()
        if end < n and (min_breaks <= 1 or len(_LINE_BREAK_RE.findall(m.group())) >= min_breaks):
            cuts.append(end)
    return cuts


def _spans_from_cuts(n: int, cuts) -> list[Span]:
    points = [0] + sorted(c for c in set(cuts) if 0 < c < n) + [n]
    return [(points[i], points[i + 1]) for i in range(len(points) - 1)]


# --------------------------------------------------------------------------------------------
# Tiny fragments
# --------------------------------------------------------------------------------------------

_ENUM_CORE = (
    r"(?:"
    r"\(?\d{1,3}(?:\.\d{1,3})*[.):]"  # 1.  2)  (3)  1.2.  4:
    r"|\(\d{1,3}\)"
    r"|\(?[A-Za-z][.)]"  # a.  b)  (c)
    r"|\([A-Za-z]\)"
    r"|\(?(?:[ivxlcdm]{1,6}|[IVXLCDM]{1,6})[.)]"  # iv.  (ii)  III)
    r"|[-*+\u2022\u00b7\u2023\u25aa\u25e6\u2013\u2014>]"  # bullets, dashes, quote marker
    r"|\#{1,6}"  # bare markdown heading marker
    r"|(?i:step|case|part|stage|phase)\s*\d{1,3}(?:\.\d{1,3})*\s*[.:)]?"  # Step 3:
    r")"
)
_ENUM_RE = re.compile(r"[*_]{0,2}" + _ENUM_CORE + r"[*_]{0,2}")
_MIN_NONWS = 3


def is_tiny(piece: str) -> bool:
    """True when ``piece`` is too small to be a step on its own: whitespace-only, fewer than 3
    non-whitespace characters, or just an enumerator ("1.", "2)", "(a)", "-", "Step 3:")."""
    stripped = piece.strip()
    if len(stripped) < _MIN_NONWS:
        return True
    nonws = 0
    for _ in _NONWS_RE.finditer(stripped):
        nonws += 1
        if nonws >= _MIN_NONWS:
            break
    if nonws < _MIN_NONWS:
        return True
    if len(stripped) > 24:
        return False
    return _ENUM_RE.fullmatch(stripped) is not None


def merge_tiny(text: str, spans: list[Span]) -> list[Span]:
    """Merge tiny fragments into their neighbours.

    ``spans`` must be contiguous and cover ``text`` from 0 to ``len(text)`` (they may contain
    whitespace-only pieces). Rules, applied left to right:

    * a whitespace-only piece joins the previous step, or the next one when nothing precedes it;
    * a tiny piece (see ``is_tiny``) joins the NEXT step; consecutive tiny pieces all join the
      next non-tiny piece;
    * tiny pieces left at the end join the previous step (or form the only step).
    """
    _require_text(text)
    _check_contiguous(text, spans)
    out: list[Span] = []
    pending: int | None = None  # start of tiny pieces waiting for the next real step
    for s, e in spans:
        if s == e:
            continue
        piece = text[s:e]
        if piece.isspace():
            if pending is None and out:
                out[-1] = (out[-1][0], e)
            elif pending is None:
                pending = s
            continue
        if is_tiny(piece):
            if pending is None:
                pending = s
            continue
        out.append((pending if pending is not None else s, e))
        pending = None
    if pending is not None:
        if out:
            out[-1] = (out[-1][0], len(text))
        else:
            out.append((pending, len(text)))
    return out


def _check_contiguous(text: str, spans: list[Span]) -> None:
    if not spans:
        raise ValueError("no spans")
    pos = 0
    for i, (s, e) in enumerate(spans):
        if s != pos:
            raise ValueError(f"span {i} starts at {s}, expected {pos}")
        if e < s:
            raise ValueError(f"span {i} ends before it starts: {(s, e)}")
        pos = e
    if pos != len(text):
        raise ValueError(f"spans end at {pos}, text has {len(text)} characters")


def check_tiling(text: str, spans: list[Span]) -> None:
    """Raise ValueError naming the first problem unless ``spans`` tile ``text`` exactly: first
    span starts at 0, each starts where the previous ended, the last ends at ``len(text)``, and
    every span is non-empty and not whitespace-only."""
    if not isinstance(text, str) or not text:
        raise ValueError("text is empty")
    if not spans:
        raise ValueError("no spans for a non-empty text")
    pos = 0
    for i, span in enumerate(spans):
        try:
            s, e = span
        except (TypeError, ValueError):
            raise ValueError(f"span {i} is not a (start, end) pair: {span!r}") from None
        if not (isinstance(s, int) and isinstance(e, int)) or isinstance(s, bool) or isinstance(e, bool):
            raise ValueError(f"span {i} has non-integer bounds: {span!r}")
        if i == 0 and s != 0:
            raise ValueError(f"first span starts at {s}, not 0")
        if s != pos:
            kind = "gap" if s > pos else "overlap"
            raise ValueError(f"span {i} starts at {s} but the previous span ended at {pos} ({kind})")
        if e <= s:
            raise ValueError(f"span {i} is empty or reversed: {(s, e)}")
        if e > len(text):
            raise ValueError(f"span {i} ends at {e}, past the end of the text ({len(text)})")
        if text[s:e].isspace():
            raise ValueError(f"span {i} {(s, e)} is whitespace-only")
        pos = e
    if pos != len(text):
        raise ValueError(f"last span ends at {pos}, text has {len(text)} characters")


# --------------------------------------------------------------------------------------------
# Paragraph and line
# --------------------------------------------------------------------------------------------


def segment_paragraph(text: str) -> list[Span]:
    """Cut after every maximal whitespace run that contains >= 2 line breaks (a blank line)."""
    _require_text(text)
    return merge_tiny(text, _spans_from_cuts(len(text), _break_cuts(text, 2)))


def segment_line(text: str) -> list[Span]:
    """Cut after every maximal whitespace run that contains >= 1 line break."""
    _require_text(text)
    return merge_tiny(text, _spans_from_cuts(len(text), _break_cuts(text, 1)))


# --------------------------------------------------------------------------------------------
# Sentence (math-aware)
# --------------------------------------------------------------------------------------------

# Sentence-final punctuation, optional closers (quotes, brackets, markdown emphasis), then the
# whitespace run that follows: the cut goes after the run.
_SENT_END_RE = re.compile(r"[.!?]+[\"'\u201d\u2019)\]}\u00bb*_]*\s+")

# Abbreviations after which a period never ends a sentence (compared lowercased, without the
# final period).
_ABBREVIATIONS = frozenset(
    """
    e.g eg i.e ie etc vs vs cf viz approx appr ca esp incl resp w.r.t wrt et al
    fig figs eq eqs eqn eqns ref refs sec sect thm lem prop cor defn def
    dr mr mrs ms prof st jr sr mt
    jan feb mar apr jun jul aug sep sept oct nov dec
    """.split()
)
# Abbreviations that only hold before a number or an opening bracket ("No. 5", "p. 12").
_NUMBER_ABBREVIATIONS = frozenset("no nos vol vols pp p ch art ex sec secs col".split())
_INITIALISM_RE = re.compile(r"(?:[A-Za-z]\.)+[A-Za-z]")  # e.g, i.e, U.S, w.r.t
_OPENERS = "([{\"'\u201c\u2018\u00ab*_"
# A following character that says the sentence goes on.
_CONTINUATION_CHARS = frozenset("=,;:<>/^|)]}")


def _escaped(text: str, i: int) -> bool:
    """True when the character at ``i`` is preceded by an odd number of backslashes."""
    k = i - 1
    while k >= 0 and text[k] == "\\":
        k -= 1
    return (i - 1 - k) % 2 == 1


class _Finder:
    """Amortised search for the next unescaped occurrence of fixed closers (``$$``, ``\\]``)."""

    def __init__(self, text: str):
        self.text = text
        self.cache: dict[str, tuple[int, int]] = {}

    def next(self, needle: str, start: int) -> int:
        hit = self.cache.get(needle)
        if hit is not None:
            frm, found = hit
            if found == -1 and start >= frm:
                return -1
            if frm <= start <= found:
                return found
        text = self.text
        i = text.find(needle, start)
        while i != -1 and _escaped(text, i):
            i = text.find(needle, i + 1)
        self.cache[needle] = (start, i)
        return i


# LaTeX environments that hold prose rather than math: sentences inside them still split.
_TEXT_ENVIRONMENTS = frozenset(
    """
    document itemize enumerate description proof quote quotation verse abstract center
    flushleft flushright theorem lemma proposition corollary definition remark example solution
    """.split()
)
_ENV_RE = re.compile(r"\\(begin|end)\{([^{}\n]{1,40})\}")
_MATH_OPEN_RE = re.compile(r"\$\$|\\\[|\\\(|\\begin\{[^{}\n]{1,40}\}|\$")


def _math_regions(text: str, paragraph_cuts: list[int]) -> list[Span]:
    """Non-overlapping, sorted character ranges of LaTeX math.

    ``$$...$$``, ``\\[...\\]``, ``\\(...\\)`` and paired ``\\begin{env}...\\end{env}`` (non-prose
    environments) may span lines. Inline ``$...$`` follows Pandoc's rule (the opening ``$`` has a
    non-space character to its right; the closing ``$`` has a non-space character to its left
    and no digit right after it) and never crosses a paragraph break, so prices such as
    "$5 and $10" are not math. Unclosed openers are plain text.
    """
    if "$" not in text and "\\" not in text:
        return []
    n = len(text)
    finder = _Finder(text)

    env_end: dict[int, int] = {}
    if "\\begin{" in text:
        stacks: dict[str, list[int]] = {}
        for m in _ENV_RE.finditer(text):
            if _escaped(text, m.start()):
                continue
            kind, name = m.group(1), m.group(2)
            if name.rstrip("*") in _TEXT_ENVIRONMENTS:
                continue
            if kind == "begin":
                stacks.setdefault(name, []).append(m.start())
            else:
                stack = stacks.get(name)
                if stack:
                    env_end[stack.pop()] = m.end()

    closers: list[int] = []
    if "$" in text:
        i = text.find("$")
        while i != -1:
            if (
                i > 0
                and not text[i - 1].isspace()
                and text[i - 1] != "$"
                and (i + 1 >= n or (not text[i + 1].isdigit() and text[i + 1] != "$"))
                and not _escaped(text, i)
            ):
                closers.append(i)
            i = text.find("$", i + 1)

    regions: list[Span] = []
    pos = 0
    for m in _MATH_OPEN_RE.finditer(text):
        start = m.start()
        if start < pos or _escaped(text, start):
            continue
        tok = m.group()
        end = -1
        if tok == "$$":
            j = finder.next("$$", m.end())
            end = j + 2 if j != -1 else -1
        elif tok == "\\[":
            j = finder.next("\\]", m.end())
            end = j + 2 if j != -1 else -1
        elif tok == "\\(":
            j = finder.next("\\)", m.end())
            end = j + 2 if j != -1 else -1
        elif tok == "$":
            if start + 1 < n and not text[start + 1].isspace():
                k = bisect.bisect_left(closers, start + 2)
                if k < len(closers):
                    j = closers[k]
                    b = bisect.bisect_right(paragraph_cuts, start)
                    if b >= len(paragraph_cuts) or paragraph_cuts[b] > j:
                        end = j + 1
        else:  # \begin{env}
            end = env_end.get(start, -1)
        if end != -1:
            regions.append((start, end))
            pos = end
    return regions


def _no_cut_after_period(text: str, punct_start: int, cut: int) -> bool:
    """True when the single period at ``punct_start`` belongs to an abbreviation or initial."""
    k = punct_start
    lo = max(0, punct_start - 40)
    while k > lo and not text[k - 1].isspace():
        k -= 1
    word = text[k:punct_start].lstrip(_OPENERS)
    if not word:
        return False
    low = word.lower()
    if low in _ABBREVIATIONS or _INITIALISM_RE.fullmatch(word):
        return True
    if len(word) == 1 and word.isupper():  # lone initial: "J. Smith"
        return True
    if low in _NUMBER_ABBREVIATIONS and cut < len(text):
        nxt = text[cut]
        return nxt.isdigit() or nxt in "(["
    return False


def _sentence_cuts(text: str) -> list[int]:
    n = len(text)
    paragraph_cuts = _break_cuts(text, 2)
    regions = _math_regions(text, paragraph_cuts)
    region_starts = [r[0] for r in regions]
    cuts = list(paragraph_cuts)
    for m in _SENT_END_RE.finditer(text):
        cut = m.end()
        if cut >= n:
            continue
        start = m.start()
        if regions:
            r = bisect.bisect_right(region_starts, start) - 1
            if r >= 0 and regions[r][1] > start:
                continue  # inside math
        nxt = text[cut]
        if nxt.islower() or nxt in _CONTINUATION_CHARS:
            continue  # "... and so on. then", "5! = 120"
        if text[start] == "." and (start + 1 == n or text[start + 1] != "."):
            if _no_cut_after_period(text, start, cut):
                continue
        cuts.append(cut)
    return cuts


def segment_sentence(text: str) -> list[Span]:
    """Math-aware sentence segmentation (paper v1); always cuts at paragraph breaks."""
    _require_text(text)
    return merge_tiny(text, _spans_from_cuts(len(text), _sentence_cuts(text)))


# --------------------------------------------------------------------------------------------
# LLM groups -> spans
# --------------------------------------------------------------------------------------------


def spans_from_groups(text: str, groups: list[str]) -> list[Span] | None:
    """Map step texts returned by an LLM back onto exact spans of ``text``.

    Each group is matched whitespace-insensitively, in order, against ``text``: its
    non-whitespace characters must equal the next non-whitespace characters of ``text``. A step
    starts at its first non-whitespace character (the first step at 0: leading whitespace
    belongs to it) and runs up to the next step's start (whitespace after a step belongs to it),
    so the spans tile ``text`` exactly. Groups that are empty after removing whitespace are
    skipped. Returns None when the groups do not reproduce the text's non-whitespace characters
    exactly, in order and completely.
    """
    if not isinstance(text, str) or not text or text.isspace():
        return None
    if not isinstance(groups, (list, tuple)):
        return None
    positions = [m.start() for m in _NONWS_RE.finditer(text)]
    compact = "".join(text[p] for p in positions)
    cursor = 0
    starts: list[int] = []
    for g in groups:
        if not isinstance(g, str):
            return None
        needle = "".join(g.split())
        if not needle:
            continue
        if not compact.startswith(needle, cursor):
            return None
        starts.append(positions[cursor])
        cursor += len(needle)
    if cursor != len(compact) or not starts:
        return None
    starts[0] = 0
    bounds = starts + [len(text)]
    return [(bounds[i], bounds[i + 1]) for i in range(len(starts))]


# --------------------------------------------------------------------------------------------
# Dispatch
# --------------------------------------------------------------------------------------------

_RULE_SEGMENTERS = {
    "paragraph": segment_paragraph,
    "line": segment_line,
    "sentence": segment_sentence,
}


def segment(text: str, method: str = "paragraph", *, llm: _SegmenterLike | None = None) -> list[Span]:
    """Segment ``text`` into step spans with ``method`` (one of ``SEGMENTERS``).

    ``method="llm"`` needs ``llm``, an object with ``segment(text) -> (spans, fallback_reason)``
    such as ``lalp_resources.llm_segmenter.LLMSegmenter``; it falls back to ``sentence`` on its
    own when the endpoint's reply is unusable. Raises ValueError for empty text or an unknown
    method.
    """
    _require_text(text)
    fn = _RULE_SEGMENTERS.get(method)
    if fn is not None:
        return fn(text)
    if method == "llm":
        if llm is None:
            raise ValueError("segment(..., 'llm') needs llm=<LLMSegmenter>")
        spans, _reason = llm.segment(text)
        spans = [(int(s), int(e)) for s, e in spans]
        check_tiling(text, spans)
        return spans
    raise ValueError(f"unknown segmenter {method!r}; expected one of {SEGMENTERS}")
