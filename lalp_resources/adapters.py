"""Teacher-trace adapters: input files -> canonical trace rows + a quarantine, losing nothing.

Pure logic (no Dagster). Every row read from an input ends up in exactly one of
``IngestResult.traces`` (columns ``TRACE_COLUMNS``) or ``IngestResult.quarantine``
(columns ``QUARANTINE_COLUMNS``, with a short ``reason`` code and a human ``detail``),
so ``n_read == traces.height + quarantine.height`` always holds. Bad rows never raise;
only whole-source problems do (missing file, unknown or undetectable format, a Parquet
file that cannot be opened, an unknown CHAMP setting) and they raise ``ValueError``.

Formats (``format="auto"`` detects them, see :func:`detect_format`):

* ``canonical``: JSONL or Parquet with ``prompt_id, prompt, teacher, response`` and
  optional ``reference_answer``, ``final_answer``.
* ``messages``: JSONL chat transcripts (OpenAI ``{role, content}`` or ShareGPT
  ``{from, value}``) plus ``teacher`` (or ``model``), optional ``prompt_id``,
  ``reference_answer``, ``final_answer``.
* ``zeroeval``: one JSON list per model, as in WildEval/ZeroEval ``result_dirs``; see
  :func:`read_zeroeval` and :func:`parse_json_output`.
* ``champ``: the CHAMP dataset shipped by the ``champ-dataset`` package; see
  :func:`read_champ`.

Source rows are numbered 1-based by physical line for JSONL and 0-based by position
for JSON lists, Parquet and CHAMP conversations. A whole-file problem in a JSON source
(not UTF-8, not JSON, not a list) is one quarantine row with a null ``source_row``.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import polars as pl

from lalp_resources.method.answers import annotate

__all__ = [
    "TRACE_COLUMNS",
    "QUARANTINE_COLUMNS",
    "REASONS",
    "FORMATS",
    "CHAMP_ZERO_SHOT",
    "IngestResult",
    "read_source",
    "ingest",
    "dedupe",
    "response_id",
    "discover_teachers",
    "detect_format",
    "read_canonical",
    "read_messages",
    "read_zeroeval",
    "read_champ",
    "parse_json_output",
    "champ_path",
]

TRACE_SCHEMA: dict[str, pl.DataType] = {
    "response_id": pl.Utf8,
    "prompt_id": pl.Utf8,
    "teacher": pl.Utf8,
    "prompt": pl.Utf8,
    "response": pl.Utf8,
    "reference_answer": pl.Utf8,
    "final_answer": pl.Utf8,
    "is_correct": pl.Boolean,
    "verify_reason": pl.Utf8,
    "source_uri": pl.Utf8,
    "source_sha256": pl.Utf8,
    "source_row": pl.Int64,
    "format": pl.Utf8,
}
TRACE_COLUMNS: list[str] = list(TRACE_SCHEMA)

QUARANTINE_SCHEMA: dict[str, pl.DataType] = {
    "source_uri": pl.Utf8,
    "source_sha256": pl.Utf8,
    "source_row": pl.Int64,
    "format": pl.Utf8,
    "reason": pl.Utf8,
    "detail": pl.Utf8,
    "raw_excerpt": pl.Utf8,
    "prompt_id": pl.Utf8,
    "teacher": pl.Utf8,
}
QUARANTINE_COLUMNS: list[str] = list(QUARANTINE_SCHEMA)

REASONS = (
    "invalid_json",
    "undecodable_bytes",
    "missing_field",
    "invalid_type",
    "empty_response",
    "empty_prompt",
    "too_large",
    "unparsable_output",
    "duplicate",
    "conflicting_duplicate",
)
FORMATS = ("canonical", "messages", "zeroeval", "champ")
CHAMP_ZERO_SHOT = "0-Shot"
EXCERPT_CHARS = 300
# Per-source files skipped when a directory is given (ZeroEval's accuracy table).
_SKIP_IN_DIR = {"summary.json"}
_DIR_SUFFIXES = {".json", ".jsonl", ".parquet"}


# --------------------------------------------------------------------------- result type


@dataclass
class IngestResult:
    traces: pl.DataFrame  # columns TRACE_COLUMNS
    quarantine: pl.DataFrame  # columns QUARANTINE_COLUMNS
    n_read: int  # rows read; == traces.height + quarantine.height

    def summary(self) -> dict:
        by_reason = Counter(self.quarantine.get_column("reason").to_list())
        return {
            "read": self.n_read,
            "accepted": self.traces.height,
            "quarantined": self.quarantine.height,
            "by_reason": dict(sorted(by_reason.items())),
        }


def response_id(prompt_id: str, teacher: str, prompt: str, response: str) -> str:
    """Content hash of a trace: sha256 of the 4 fields joined by U+001F, first 16 hex chars."""
    joined = "\x1f".join((prompt_id, teacher, prompt, response))
    # surrogatepass: never fails, even on strings that are not valid Unicode.
    return hashlib.sha256(joined.encode("utf-8", "surrogatepass")).hexdigest()[:16]


# --------------------------------------------------------------------------- helpers


class _RowError(Exception):
    """A row-level problem: becomes one quarantine row, never escapes this module."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def _clean(s: Any) -> str | None:
    """A string safe for Arrow/Polars: lone surrogates (from JSON '\\ud800' escapes) -> U+FFFD."""
    if s is None:
        return None
    s = str(s)
    return s.encode("utf-8", "surrogatepass").decode("utf-8", "replace")


def _is_valid_unicode(s: str) -> bool:
    try:
        s.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def _excerpt(raw: Any) -> str:
    """First EXCERPT_CHARS characters of a raw row (bytes decoded with errors='replace')."""
    if isinstance(raw, (bytes, bytearray)):
        # 4 bytes per char at most: slicing first keeps huge lines cheap.
        text = bytes(raw[: EXCERPT_CHARS * 4]).decode("utf-8", "replace")
    elif isinstance(raw, str):
        text = raw
    else:
        try:
            text = json.dumps(raw, ensure_ascii=False, default=str)
        except Exception:  # noqa: BLE001 - e.g. RecursionError on absurd nesting
            text = repr(raw)
    return _clean(text[:EXCERPT_CHARS]) or ""


def _type_name(v: Any) -> str:
    return {
        dict: "object",
        list: "list",
        str: "string",
        bool: "boolean",
        int: "integer",
        float: "number",
        type(None): "null",
    }.get(type(v), type(v).__name__)


def _as_id(v: Any, field: str) -> str:
    """prompt_id-like field: string, or integer (also an integral float, as pandas writes)."""
    if isinstance(v, bool):
        raise _RowError("invalid_type", f"field '{field}' must be a string or integer, got boolean")
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    if isinstance(v, str):
        if not v.strip():
            raise _RowError("missing_field", f"field '{field}' is empty")
        return v
    raise _RowError("invalid_type", f"field '{field}' must be a string or integer, got {_type_name(v)}")


def _as_text(v: Any, field: str) -> str:
    if not isinstance(v, str):
        raise _RowError("invalid_type", f"field '{field}' must be a string, got {_type_name(v)}")
    return v


def _as_optional_answer(v: Any, field: str) -> str | None:
    """Optional answer-like field: null, string, or a number (cast to string)."""
    if v is None:
        return None
    if isinstance(v, str):
        return v
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return str(v)
    raise _RowError("invalid_type", f"field '{field}' must be a string or number, got {_type_name(v)}")


def _require(obj: dict, field: str) -> Any:
    if field not in obj or obj[field] is None:
        raise _RowError("missing_field", f"missing field '{field}'")
    return obj[field]


def _file_uri(path: Path) -> str:
    return path.resolve().as_uri()


def _sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class _Collector:
    """Accumulates accepted rows and quarantine rows for one source file."""

    def __init__(self, source_uri: str, source_sha256: str, fmt: str, unit: str, max_response_chars: int):
        self.source_uri = source_uri
        self.source_sha256 = source_sha256
        self.fmt = fmt
        self.unit = unit  # "line" / "record" / "row" / "conversation": used in details
        self.max_response_chars = max_response_chars
        self.accepted: list[dict] = []
        self.rejected: list[dict] = []
        self.n_read = 0

    def _where(self, row: int | None) -> str:
        return "whole file" if row is None else f"{self.unit} {row}"

    def reject(self, row: int | None, reason: str, detail: str, raw: Any,
               prompt_id: Any = None, teacher: Any = None) -> None:
        assert reason in REASONS, reason
        self.rejected.append(
            {
                "source_uri": self.source_uri,
                "source_sha256": self.source_sha256,
                "source_row": row,
                "format": self.fmt,
                "reason": reason,
                "detail": _clean(f"{self._where(row)}: {detail}"),
                "raw_excerpt": _excerpt(raw),
                "prompt_id": _clean(prompt_id) if isinstance(prompt_id, (str, int)) and not isinstance(prompt_id, bool) else None,
                "teacher": _clean(teacher) if isinstance(teacher, str) else None,
            }
        )

    def accept(self, row: int, raw: Any, *, prompt_id: str, teacher: str, prompt: str, response: str,
               reference_answer: str | None = None, final_answer: str | None = None) -> None:
        """Checks shared by every format, then keeps the row (or quarantines it)."""
        fields = {
            "prompt_id": prompt_id,
            "teacher": teacher,
            "prompt": prompt,
            "response": response,
            "reference_answer": reference_answer,
            "final_answer": final_answer,
        }
        for name, value in fields.items():
            if value is not None and not _is_valid_unicode(value):
                self.reject(row, "undecodable_bytes",
                            f"field '{name}' is not valid Unicode (lone surrogate escape)",
                            raw, prompt_id, teacher)
                return
        if not teacher.strip():
            self.reject(row, "missing_field", "field 'teacher' is empty", raw, prompt_id, teacher)
            return
        if not prompt.strip():
            self.reject(row, "empty_prompt", "prompt is empty or whitespace only", raw, prompt_id, teacher)
            return
        if not response.strip():
            self.reject(row, "empty_response", "response is empty or whitespace only", raw, prompt_id, teacher)
            return
        if len(response) > self.max_response_chars:
            self.reject(row, "too_large",
                        f"response has {len(response)} characters, over the limit of {self.max_response_chars}",
                        raw, prompt_id, teacher)
            return
        if final_answer is not None and not final_answer.strip():
            final_answer = None  # an empty given answer is no answer: let extraction try
        self.accepted.append(
            {
                "response_id": response_id(prompt_id, teacher, prompt, response),
                **fields,
                "final_answer": final_answer,
                "is_correct": None,
                "verify_reason": None,
                "source_uri": self.source_uri,
                "source_sha256": self.source_sha256,
                "source_row": row,
                "format": self.fmt,
            }
        )

    def result(self) -> IngestResult:
        return IngestResult(_frame(self.accepted, TRACE_SCHEMA), _frame(self.rejected, QUARANTINE_SCHEMA), self.n_read)


def _frame(rows: list[dict], schema: dict[str, pl.DataType]) -> pl.DataFrame:
    return pl.DataFrame({c: [r[c] for r in rows] for c in schema}, schema=schema)


def _iter_jsonl(data: bytes, col: _Collector) -> Iterable[tuple[int, bytes, Any]]:
    """Yield (line_no, raw_line, parsed_json) for each non-blank line that parses.

    Blank lines are skipped and not counted; undecodable and invalid-JSON lines are
    quarantined here. Splitting the bytes (not the decoded text) keeps one bad byte
    from spoiling its neighbours.
    """
    for i, line in enumerate(data.split(b"\n"), start=1):
        if i == 1 and line.startswith(b"\xef\xbb\xbf"):
            line = line[3:]  # UTF-8 byte-order mark
        if not line.strip():
            continue
        col.n_read += 1
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as exc:
            col.reject(i, "undecodable_bytes",
                       f"not valid UTF-8 (byte 0x{line[exc.start]:02x} at offset {exc.start})", line)
            continue
        try:
            obj = json.loads(text)
        except Exception as exc:  # noqa: BLE001 - JSONDecodeError, RecursionError, huge ints
            col.reject(i, "invalid_json", f"invalid JSON: {str(exc)[:200]}", line)
            continue
        yield i, line, obj


# --------------------------------------------------------------------------- canonical


def _canonical_fields(obj: Any) -> dict:
    if not isinstance(obj, dict):
        raise _RowError("invalid_type", f"expected a JSON object, got {_type_name(obj)}")
    for f in ("prompt_id", "prompt", "teacher", "response"):
        _require(obj, f)
    return {
        "prompt_id": _as_id(obj["prompt_id"], "prompt_id"),
        "teacher": _as_text(obj["teacher"], "teacher"),
        "prompt": _as_text(obj["prompt"], "prompt"),
        "response": _as_text(obj["response"], "response"),
        "reference_answer": _as_optional_answer(obj.get("reference_answer"), "reference_answer"),
        "final_answer": _as_optional_answer(obj.get("final_answer"), "final_answer"),
    }


def _keep_or_reject(col: _Collector, row: int, raw: Any, obj: Any, to_fields) -> None:
    try:
        fields = to_fields(obj)
    except _RowError as err:
        pid = obj.get("prompt_id") if isinstance(obj, dict) else None
        teacher = (obj.get("teacher") or obj.get("model")) if isinstance(obj, dict) else None
        col.reject(row, err.reason, err.detail, raw, pid, teacher)
        return
    col.accept(row, raw, **fields)


def read_canonical(path: str | Path, *, max_response_chars: int = 200_000) -> IngestResult:
    """Canonical rows from JSONL (1-based line numbers) or Parquet (0-based row index)."""
    path = Path(path)
    data = _read_bytes(path)
    if path.suffix.lower() == ".parquet" or data[:4] == b"PAR1":  # extension or Parquet magic
        return _read_canonical_parquet(path, data, max_response_chars)
    col = _Collector(_file_uri(path), _sha256_bytes(data), "canonical", "line", max_response_chars)
    for i, line, obj in _iter_jsonl(data, col):
        _keep_or_reject(col, i, line, obj, _canonical_fields)
    return col.result()


def _read_canonical_parquet(path: Path, data: bytes, max_response_chars: int) -> IngestResult:
    import pyarrow as pa
    import pyarrow.parquet as pq

    col = _Collector(_file_uri(path), _sha256_bytes(data), "canonical", "row", max_response_chars)
    try:
        pf = pq.ParquetFile(pa.BufferReader(data))
        row = 0
        for batch in pf.iter_batches(batch_size=4096):
            for obj in batch.to_pylist():
                col.n_read += 1
                _keep_or_reject(col, row, obj, obj, _canonical_fields)
                row += 1
    except (pa.ArrowException, OSError) as exc:
        raise ValueError(f"{path}: cannot read Parquet file: {exc}") from exc
    return col.result()


# --------------------------------------------------------------------------- messages

_ASSISTANT_ROLES = {"assistant", "gpt", "model", "bot", "chatgpt"}
_USER_ROLES = {"user", "human"}


def _turn(t: Any, k: int) -> tuple[str, str]:
    """(role, content) of one chat turn, OpenAI {role, content} or ShareGPT {from, value}."""
    if not isinstance(t, dict):
        raise _RowError("invalid_type", f"messages[{k}] must be an object, got {_type_name(t)}")
    role = t.get("role", t.get("from"))
    if not isinstance(role, str):
        raise _RowError("invalid_type" if role is not None else "missing_field",
                        f"messages[{k}] has no string 'role' (or 'from')")
    content = t.get("content", t.get("value"))
    if content is None:
        content = ""
    elif isinstance(content, list):
        # OpenAI multi-part content: keep the text parts.
        parts = [p.get("text") for p in content if isinstance(p, dict) and isinstance(p.get("text"), str)]
        content = "".join(parts)
    elif not isinstance(content, str):
        raise _RowError("invalid_type", f"messages[{k}] content must be a string, got {_type_name(content)}")
    return role.strip().lower(), content


def _messages_fields(obj: Any) -> dict:
    if not isinstance(obj, dict):
        raise _RowError("invalid_type", f"expected a JSON object, got {_type_name(obj)}")
    msgs = _require(obj, "messages")
    if not isinstance(msgs, list):
        raise _RowError("invalid_type", f"field 'messages' must be a list, got {_type_name(msgs)}")
    teacher = obj.get("teacher") if obj.get("teacher") is not None else obj.get("model")
    if teacher is None:
        raise _RowError("missing_field", "missing field 'teacher' (or 'model')")
    teacher = _as_text(teacher, "teacher")
    turns = [_turn(t, k) for k, t in enumerate(msgs)]
    last_asst = max((k for k, (r, _) in enumerate(turns) if r in _ASSISTANT_ROLES), default=None)
    if last_asst is None:
        raise _RowError("missing_field", "no assistant turn in 'messages'")
    last_user = max((k for k, (r, _) in enumerate(turns[:last_asst]) if r in _USER_ROLES), default=None)
    if last_user is None:
        raise _RowError("missing_field", "no user turn before the final assistant turn")
    prompt = turns[last_user][1]
    # The response keeps any <think>...</think> block: it is part of what the teacher wrote.
    response = turns[last_asst][1]
    if obj.get("prompt_id") is not None:
        prompt_id = _as_id(obj["prompt_id"], "prompt_id")
    else:
        prompt_id = hashlib.sha256(prompt.encode("utf-8", "surrogatepass")).hexdigest()[:16]
    return {
        "prompt_id": prompt_id,
        "teacher": teacher,
        "prompt": prompt,
        "response": response,
        "reference_answer": _as_optional_answer(obj.get("reference_answer"), "reference_answer"),
        "final_answer": _as_optional_answer(obj.get("final_answer"), "final_answer"),
    }


def read_messages(path: str | Path, *, max_response_chars: int = 200_000) -> IngestResult:
    """Chat transcripts (JSONL). prompt = last user turn before the final assistant turn;
    response = that final assistant turn; prompt_id defaults to a hash of the prompt."""
    path = Path(path)
    data = _read_bytes(path)
    col = _Collector(_file_uri(path), _sha256_bytes(data), "messages", "line", max_response_chars)
    for i, line, obj in _iter_jsonl(data, col):
        _keep_or_reject(col, i, line, obj, _messages_fields)
    return col.result()


# --------------------------------------------------------------------------- zeroeval

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
        raise ValueError(f"JSON is a {_type_name(obj)}, not an object")
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


def read_zeroeval(path: str | Path, *, max_response_chars: int = 200_000) -> IngestResult:
    """One ZeroEval result file (a JSON list, one record per problem, one file per model).

    Mapping: teacher = file stem; prompt_id = str(id); prompt = problem;
    reference_answer = answer; response = the ``reasoning`` parsed out of ``output[0]``;
    final_answer = its ``answer``. Outputs that are empty, truncated or not the expected
    JSON are quarantined as ``unparsable_output`` (see :func:`parse_json_output`).
    """
    path = Path(path)
    data = _read_bytes(path)
    teacher = path.stem
    col = _Collector(_file_uri(path), _sha256_bytes(data), "zeroeval", "record", max_response_chars)
    try:
        records = json.loads(data.decode("utf-8-sig"))
    except UnicodeDecodeError as exc:
        col.n_read += 1
        col.reject(None, "undecodable_bytes", f"file is not valid UTF-8 (offset {exc.start})", data, None, teacher)
        return col.result()
    except Exception as exc:  # noqa: BLE001
        col.n_read += 1
        col.reject(None, "invalid_json", f"file is not valid JSON: {str(exc)[:200]}", data, None, teacher)
        return col.result()
    if not isinstance(records, list):
        col.n_read += 1
        col.reject(None, "invalid_type", f"expected a JSON list of records, got {_type_name(records)}",
                   records, None, teacher)
        return col.result()
    for i, rec in enumerate(records):
        col.n_read += 1
        try:
            fields = _zeroeval_fields(rec, teacher)
        except _RowError as err:
            pid = rec.get("id") if isinstance(rec, dict) else None
            col.reject(i, err.reason, err.detail, rec, pid, teacher)
            continue
        col.accept(i, rec, **fields)
    return col.result()


def _zeroeval_fields(rec: Any, teacher: str) -> dict:
    if not isinstance(rec, dict):
        raise _RowError("invalid_type", f"expected a JSON object, got {_type_name(rec)}")
    prompt_id = _as_id(_require(rec, "id"), "id")
    prompt = _as_text(_require(rec, "problem"), "problem")
    reference = _as_optional_answer(rec.get("answer"), "answer")
    output = _require(rec, "output")
    if isinstance(output, str):
        output = [output]  # tolerate a bare string
    if not isinstance(output, list):
        raise _RowError("invalid_type", f"field 'output' must be a list, got {_type_name(output)}")
    if not output:
        raise _RowError("unparsable_output", "field 'output' is an empty list")
    if not isinstance(output[0], str):
        raise _RowError("invalid_type", f"output[0] must be a string, got {_type_name(output[0])}")
    try:
        reasoning, answer = parse_json_output(output[0])
    except ValueError as exc:
        raise _RowError("unparsable_output", str(exc)) from None
    return {
        "prompt_id": prompt_id,
        "teacher": teacher,
        "prompt": prompt,
        "response": reasoning,
        "reference_answer": reference,
        "final_answer": answer,
    }


# --------------------------------------------------------------------------- champ

_CHAMP_SUMMARY_PROMPT = "Now, summarize the answer above"


def champ_path() -> Path:
    """The packaged CHAMP file (``champ_dataset/dataset_files/v0.json``), read in place."""
    spec = importlib.util.find_spec("champ_dataset")
    if spec is None or spec.origin is None:
        raise ValueError("source 'champ' needs the champ-dataset package (pip install champ-dataset)")
    path = Path(spec.origin).parent / "dataset_files" / "v0.json"
    if not path.is_file():
        raise ValueError(f"champ-dataset is installed but {path} is missing")
    return path


def _champ_uri(path: Path) -> str:
    if path == champ_path():
        try:
            version = importlib.metadata.version("champ-dataset")
        except importlib.metadata.PackageNotFoundError:
            version = "unknown"
        return f"champ-dataset=={version}:champ_dataset/dataset_files/v0.json"
    return _file_uri(path)


def read_champ(path: str | Path | None = None, *, teacher_mode: str = "model",
               champ_settings: tuple[str, ...] | None = None,
               max_response_chars: int = 200_000) -> IngestResult:
    """CHAMP (Mao et al. 2024; ``champ-dataset`` on PyPI, MIT) as teacher traces.

    File structure (``v0.json``): ``{"problems": {id: problem}, "concepts": ..., "hints": ...}``.
    Each of the 270 problems has ``identifier`` ("P_Combinatorics_1"), ``_text`` (problem,
    ``@@`` math markers removed), ``_answer`` (reference answer, plain text), ``solution``,
    ``fws_annotations`` and ``conversations``: 72 entries keyed ``"<model>|<setting>"`` for
    4 models (GPT-3.5, GPT-4, GPT-4 Turbo, PaLM 2 Medium) x 18 prompt settings ("0-Shot",
    "5-Shot", "1/3 Soln", ...). A conversation is ``{"messages": [{role, text, error}]}``
    with roles System / User / Imputation / ``Model.<model>``; it ends with the model's
    solution, a User turn "Now, summarize the answer above in one sentence..." and the
    model's one-sentence summary. ``error == "LENGTH_CURRENT"`` marks a solution cut by
    the length limit (its summary is then null, ``"LENGTH_PREVIOUS"``).

    Mapping: prompt_id = identifier; prompt = ``_text`` (the problem alone, not the
    setting-specific user turn); reference_answer = ``_answer``; response = the model turn
    just before the summarize request (or the last model turn); final_answer = the
    summary sentence (null if absent, then extracted from the response downstream).
    teacher = model (``teacher_mode="model"``, default settings: 0-shot only) or
    ``"model/setting"`` (``teacher_mode="model+setting"``, default: all 18 settings).
    In "model" mode with several settings, later settings of a (problem, model) pair are
    quarantined as ``conflicting_duplicate`` by dedupe (one response per teacher and prompt).
    source_row = 0-based index of the conversation over the whole file (problem order,
    then conversation order), whatever settings are selected; n_read counts only the
    selected conversations (1,080 by default, 19,440 for all settings).
    """
    path = Path(path) if path is not None else champ_path()
    if teacher_mode not in ("model", "model+setting"):
        raise ValueError(f"unknown teacher_mode {teacher_mode!r}; use 'model' or 'model+setting'")
    data = _read_bytes(path)
    col = _Collector(_champ_uri(path), _sha256_bytes(data), "champ", "conversation", max_response_chars)
    try:
        root = json.loads(data.decode("utf-8"))
        problems = root["problems"]
        assert isinstance(problems, dict)
    except Exception as exc:  # noqa: BLE001
        raise ValueError(f"{path}: not a CHAMP dataset file (expected {{'problems': {{...}}}}): {exc}") from exc

    all_settings = []
    for p in problems.values():
        for key in (p.get("conversations") or {}) if isinstance(p, dict) else ():
            setting = key.split("|", 1)[-1]
            if setting not in all_settings:
                all_settings.append(setting)
    if champ_settings is None:
        selected = set(all_settings) if teacher_mode == "model+setting" else {CHAMP_ZERO_SHOT}
    else:
        unknown = [s for s in champ_settings if s not in all_settings]
        if unknown:
            raise ValueError(f"unknown CHAMP setting(s) {unknown}; known: {all_settings}")
        selected = set(champ_settings)

    idx = -1
    for pkey, p in problems.items():
        convs = p.get("conversations") if isinstance(p, dict) else None
        if not isinstance(convs, dict):
            continue
        for ckey, conv in convs.items():
            idx += 1
            model, _, setting = ckey.partition("|")
            if setting not in selected:
                continue
            col.n_read += 1
            teacher = model if teacher_mode == "model" else f"{model}/{setting}"
            raw = {"problem": pkey, "conversation": ckey,
                   "messages": conv.get("messages") if isinstance(conv, dict) else conv}
            try:
                fields = _champ_fields(p, conv, teacher)
            except _RowError as err:
                col.reject(idx, err.reason, f"{pkey} / {ckey}: {err.detail}", raw, p.get("identifier", pkey), teacher)
                continue
            col.accept(idx, raw, **fields)
    return col.result()


def _champ_fields(p: dict, conv: Any, teacher: str) -> dict:
    prompt_id = _as_id(_require(p, "identifier"), "identifier")
    prompt = _as_text(_require(p, "_text"), "_text")
    reference = _as_optional_answer(p.get("_answer"), "_answer")
    msgs = conv.get("messages") if isinstance(conv, dict) else None
    if not isinstance(msgs, list) or not all(isinstance(m, dict) for m in msgs):
        raise _RowError("invalid_type", "conversation has no list of message objects")
    is_model = [str(m.get("role", "")).startswith("Model.") for m in msgs]
    summ = max(
        (k for k, m in enumerate(msgs)
         if m.get("role") == "User" and str(m.get("text") or "").startswith(_CHAMP_SUMMARY_PROMPT)),
        default=None,
    )
    if summ is not None and summ > 0 and is_model[summ - 1]:
        resp_k = summ - 1
        summary = msgs[summ + 1].get("text") if summ + 1 < len(msgs) and is_model[summ + 1] else None
    else:
        resp_k = max((k for k, flag in enumerate(is_model) if flag), default=None)
        summary = None
        if resp_k is None:
            raise _RowError("missing_field", "conversation has no model turn")
    text = msgs[resp_k].get("text")
    if text is None:
        raise _RowError("empty_response", f"model turn has no text (error={msgs[resp_k].get('error')!r})")
    return {
        "prompt_id": prompt_id,
        "teacher": teacher,
        "prompt": prompt,
        "response": _as_text(text, "text"),
        "reference_answer": reference,
        "final_answer": summary if isinstance(summary, str) else None,
    }


# --------------------------------------------------------------------------- dispatch


def _read_bytes(path: Path) -> bytes:
    if not path.is_file():
        raise ValueError(f"source not found or not a file: {path}")
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read source {path}: {exc}") from exc


def _is_champ_spec(source: str | Path) -> bool:
    return isinstance(source, str) and source.strip().lower() in ("champ", "champ:v0")


def _sniff_jsonl(data: bytes) -> str:
    """'messages' if the first parseable object has a 'messages' key, else 'canonical'."""
    for n, line in enumerate(data[: 1 << 20].split(b"\n")):  # the first MiB is plenty
        if n >= 200:
            break
        try:
            obj = json.loads(line.decode("utf-8-sig"))
        except Exception:  # noqa: BLE001
            continue
        if isinstance(obj, dict):
            return "messages" if "messages" in obj else "canonical"
    return "canonical"


def detect_format(source: str | Path) -> str:
    """Format of one file (or the CHAMP spec string). Raises ValueError when it cannot tell.

    ``.parquet`` -> canonical; ``.jsonl`` -> messages if rows have ``messages`` else
    canonical; ``.json`` -> zeroeval (a JSON list), champ (an object with ``problems``),
    or JSONL content sniffed as above.
    """
    if _is_champ_spec(source):
        return "champ"
    path = Path(source)
    if not path.is_file():
        raise ValueError(f"source not found or not a file: {path}")
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return "canonical"
    if suffix == ".jsonl":
        return _sniff_jsonl(path.read_bytes())
    if suffix == ".json":
        data = path.read_bytes()
        try:
            obj = json.loads(data.decode("utf-8-sig"))
        except Exception:  # noqa: BLE001
            obj = None
            if data.lstrip().startswith(b"["):
                return "zeroeval"  # a broken JSON list: the adapter quarantines it whole
            head = data.lstrip().split(b"\n", 1)[0]
            try:
                if isinstance(json.loads(head), dict):
                    return _sniff_jsonl(data)  # JSONL content in a .json file
            except Exception:  # noqa: BLE001
                pass
            raise ValueError(f"cannot detect the format of {path}: not JSON or JSONL; pass format=")
        if isinstance(obj, list):
            return "zeroeval"
        if isinstance(obj, dict) and "problems" in obj:
            return "champ"
        if isinstance(obj, dict) and ("messages" in obj or "response" in obj):
            return _sniff_jsonl(data)  # a one-line JSONL file
        raise ValueError(f"cannot detect the format of {path}: JSON {_type_name(obj)}; pass format=")
    raise ValueError(f"cannot detect the format of {path}: unknown extension {suffix!r}; pass format=")


def _expand(source: str | Path) -> list[str | Path]:
    """A source spec -> the files (or CHAMP spec) it stands for."""
    if _is_champ_spec(source):
        return [source]
    path = Path(source)
    if path.is_dir():
        files = sorted(
            p for p in path.iterdir()
            if p.is_file() and p.suffix.lower() in _DIR_SUFFIXES and p.name not in _SKIP_IN_DIR
        )
        if not files:
            raise ValueError(f"directory {path} holds no *.json / *.jsonl / *.parquet input")
        return list(files)
    if not path.exists():
        raise ValueError(f"source not found: {path}")
    return [path]


def _read_raw(item: str | Path, fmt: str, *, teacher_mode: str, champ_settings, max_response_chars: int) -> IngestResult:
    """One file (or the CHAMP spec), without dedupe or verification."""
    if fmt == "auto":
        fmt = detect_format(item)
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; use one of {FORMATS} or 'auto'")
    if fmt == "champ":
        return read_champ(None if _is_champ_spec(item) else item, teacher_mode=teacher_mode,
                          champ_settings=champ_settings, max_response_chars=max_response_chars)
    reader = {"canonical": read_canonical, "messages": read_messages, "zeroeval": read_zeroeval}[fmt]
    return reader(item, max_response_chars=max_response_chars)


def _finish(parts: list[IngestResult], verify: bool) -> IngestResult:
    """Concatenate per-file results, dedupe across all, verify answers, reconcile counts."""
    traces = pl.concat([p.traces for p in parts]) if parts else _frame([], TRACE_SCHEMA)
    quarantine = pl.concat([p.quarantine for p in parts]) if parts else _frame([], QUARANTINE_SCHEMA)
    n_read = sum(p.n_read for p in parts)
    kept, dups = dedupe(traces)
    if verify:
        kept = annotate(kept).select(TRACE_COLUMNS)
    result = IngestResult(kept, pl.concat([quarantine, dups]), n_read)
    if result.n_read != result.traces.height + result.quarantine.height:
        raise AssertionError(f"ingest lost rows: read {result.n_read}, accepted {result.traces.height}, "
                             f"quarantined {result.quarantine.height}")
    return result


def read_source(source: str | Path, format: str = "auto", *, teacher_mode: str = "model",
                champ_settings: tuple[str, ...] | None = None, max_response_chars: int = 200_000,
                verify: bool = True) -> IngestResult:
    """Read one source (a file, a directory of files, or ``"champ"`` / ``"champ:v0"``).

    Rows are deduplicated within the source and, unless ``verify=False``, answers are
    extracted and verified (:func:`lalp_resources.method.answers.annotate`); with
    ``verify=False`` the ``is_correct`` / ``verify_reason`` columns stay null.
    """
    return ingest([source], format, teacher_mode=teacher_mode, champ_settings=champ_settings,
                  max_response_chars=max_response_chars, verify=verify)


def ingest(sources: list[str | Path] | str | Path, format: str = "auto", *, teacher_mode: str = "model",
           champ_settings: tuple[str, ...] | None = None, max_response_chars: int = 200_000,
           verify: bool = True) -> IngestResult:
    """Read every source, concatenate, dedupe across all of them, verify, reconcile."""
    if isinstance(sources, (str, Path)):
        sources = [sources]
    kw = dict(teacher_mode=teacher_mode, champ_settings=champ_settings, max_response_chars=max_response_chars)
    parts = [_read_raw(item, format, **kw) for src in sources for item in _expand(src)]
    return _finish(parts, verify)


def discover_teachers(sources: list[str | Path] | str | Path, format: str = "auto", **kw) -> list[str]:
    """Sorted distinct teachers with at least one accepted trace."""
    kw.setdefault("verify", False)  # answers are not needed to list teachers
    result = ingest(sources, format, **kw)
    return sorted(result.traces.get_column("teacher").unique().to_list())


# --------------------------------------------------------------------------- dedupe


def dedupe(traces: pl.DataFrame) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Split ``traces`` into (kept, quarantined) by row order (the first occurrence wins).

    * ``duplicate``: the same (prompt_id, teacher, response) appeared earlier.
    * ``conflicting_duplicate``: the same (prompt_id, teacher) appeared earlier with a
      different response; the detail names the kept row's source and row.
    """
    if traces.height == 0:
        return traces, _frame([], QUARANTINE_SCHEMA)
    pair, triple = ["prompt_id", "teacher"], ["prompt_id", "teacher", "response"]
    df = traces.with_row_index("_i").with_columns(
        pl.col("_i").min().over(triple).alias("_first_triple"),
        pl.col("_i").min().over(pair).alias("_first_pair"),
        pl.col("source_uri").first().over(triple).alias("_t_uri"),
        pl.col("source_row").first().over(triple).alias("_t_row"),
        pl.col("source_uri").first().over(pair).alias("_p_uri"),
        pl.col("source_row").first().over(pair).alias("_p_row"),
    )
    is_dup = pl.col("_i") != pl.col("_first_triple")
    is_conflict = ~is_dup & (pl.col("_i") != pl.col("_first_pair"))
    kept = df.filter(~is_dup & ~is_conflict).select(traces.columns)
    def where(uri: pl.Expr, row: pl.Expr) -> pl.Expr:
        return pl.concat_str([uri, pl.lit(" row "), row.cast(pl.Utf8).fill_null("?")])

    bad = df.filter(is_dup | is_conflict).with_columns(
        pl.when(is_dup).then(pl.lit("duplicate")).otherwise(pl.lit("conflicting_duplicate")).alias("reason"),
        pl.when(is_dup)
        .then(pl.concat_str([pl.lit("identical (prompt_id, teacher, response) already read at "),
                             where(pl.col("_t_uri"), pl.col("_t_row")), pl.lit("; keeping the first")]))
        .otherwise(pl.concat_str([pl.lit("prompt_id '"), pl.col("prompt_id"), pl.lit("' / teacher '"),
                                  pl.col("teacher"), pl.lit("' already has a different response at "),
                                  where(pl.col("_p_uri"), pl.col("_p_row")), pl.lit("; keeping the first")]))
        .alias("detail"),
        pl.concat_str([pl.lit("prompt_id="), pl.col("prompt_id"), pl.lit(" teacher="), pl.col("teacher"),
                       pl.lit(" response="), pl.col("response")]).str.slice(0, EXCERPT_CHARS).alias("raw_excerpt"),
    )
    # Location prefix in the detail, worded like the adapters' details ("line 7: ...").
    unit = (
        pl.when(pl.col("format") == "zeroeval").then(pl.lit("record "))
        .when(pl.col("format") == "champ").then(pl.lit("conversation "))
        .when(pl.col("source_uri").str.to_lowercase().str.ends_with(".parquet")).then(pl.lit("row "))
        .otherwise(pl.lit("line "))
    )
    bad = bad.with_columns(
        pl.concat_str([unit, pl.col("source_row").cast(pl.Utf8).fill_null("?"), pl.lit(": "),
                       pl.col("detail")]).alias("detail")
    )
    return kept, bad.select(QUARANTINE_COLUMNS).cast(QUARANTINE_SCHEMA)
