"""What every reader shares: frame schemas, reason codes, limits, the per-file collector, ids.

A reader turns one file into an :class:`IngestResult` through a :class:`Collector`: each row
read is either accepted (:meth:`Collector.accept`) or quarantined (:meth:`Collector.reject`),
and a problem with the whole file is one quarantine row (:meth:`Collector.fail_file`). Row
problems are raised inside a reader as :class:`RowError` and never leave it.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Iterator

import polars as pl

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
    # one row
    "invalid_json",
    "undecodable_bytes",
    "missing_field",
    "invalid_type",
    "empty_response",
    "empty_prompt",
    "unparsable_output",
    "prompt_too_long",
    "response_too_long",
    "teacher_too_long",
    "prompt_id_too_long",
    "answer_too_long",
    "duplicate",
    "conflicting_duplicate",
    # one whole file (source_row is null)
    "unreadable_file",
    "unknown_format",
    "invalid_parquet",
    "invalid_arrow",
    "reader_error",
)
EXCERPT_CHARS = 300


# --------------------------------------------------------------------------- limits


@dataclass(frozen=True)
class Limits:
    """Largest field sizes, in characters, for anything that reaches the model or memory.

    No defaults here: the pipeline's defaults live in :mod:`lalp_resources.settings`. A row
    with a longer field is quarantined (``prompt_too_long``, ``response_too_long``,
    ``teacher_too_long``, ``prompt_id_too_long``; ``answer_too_long`` for a reference or
    given final answer over ``max_response_chars``) before any answer verification.
    """

    max_prompt_chars: int
    max_response_chars: int
    max_teacher_chars: int
    max_prompt_id_chars: int

    def __post_init__(self) -> None:
        for name in ("max_prompt_chars", "max_response_chars", "max_teacher_chars", "max_prompt_id_chars"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"Limits.{name} must be a positive integer, got {v!r}")


# field -> (Limits attribute, the setting's variable, reason)
_LIMITED: dict[str, tuple[str, str, str]] = {
    "prompt_id": ("max_prompt_id_chars", "LALP_MAX_PROMPT_ID_CHARS", "prompt_id_too_long"),
    "teacher": ("max_teacher_chars", "LALP_MAX_TEACHER_CHARS", "teacher_too_long"),
    "prompt": ("max_prompt_chars", "LALP_MAX_PROMPT_CHARS", "prompt_too_long"),
    "response": ("max_response_chars", "LALP_MAX_RESPONSE_CHARS", "response_too_long"),
    "reference_answer": ("max_response_chars", "LALP_MAX_RESPONSE_CHARS", "answer_too_long"),
    "final_answer": ("max_response_chars", "LALP_MAX_RESPONSE_CHARS", "answer_too_long"),
}


def check_limit(limits: Limits, field: str, value: Any, label: str | None = None) -> None:
    """Raise :class:`RowError` when string ``value`` of ``field`` is longer than its limit.

    ``label`` names the value in the detail when it is not the field itself (for example
    ``output[0]``, from which a ZeroEval response is cut).
    """
    if not isinstance(value, str):
        return
    attr, env, reason = _LIMITED[field]
    limit = getattr(limits, attr)
    if len(value) > limit:
        raise RowError(reason, f"{label or field} is {len(value):,} characters; limit {env}={limit}")


def check_limits(limits: Limits, **fields: Any) -> None:
    """:func:`check_limit` for each given field, in the order given."""
    for field, value in fields.items():
        check_limit(limits, field, value)


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


def frame(rows: list[dict], schema: dict[str, pl.DataType]) -> pl.DataFrame:
    return pl.DataFrame({c: [r[c] for r in rows] for c in schema}, schema=schema)


def response_id(prompt_id: str, teacher: str, prompt: str, response: str) -> str:
    """Content hash of a trace: the first 16 hex characters of the sha256 of the JSON array
    ``[prompt_id, teacher, prompt, response]`` (compact, not ASCII-escaped, UTF-8).

    JSON quotes and escapes every field, so no choice of field values can make two different
    4-tuples encode alike (a separator character inside a field stays inside its string).
    """
    encoded = json.dumps([prompt_id, teacher, prompt, response], ensure_ascii=False, separators=(",", ":"))
    # surrogatepass: never fails, even on strings that are not valid Unicode.
    return hashlib.sha256(encoded.encode("utf-8", "surrogatepass")).hexdigest()[:16]


# --------------------------------------------------------------------------- row errors and field checks


class RowError(Exception):
    """A row-level problem: becomes one quarantine row, never leaves the reader."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        assert reason in REASONS, reason
        self.reason = reason
        self.detail = detail


_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def clean(s: Any) -> str | None:
    """A string safe for Arrow/Polars: each lone surrogate (from a JSON '\\ud800' escape)
    becomes one U+FFFD, so the length is unchanged."""
    if s is None:
        return None
    return _LONE_SURROGATE.sub("\ufffd", str(s))


def is_valid_unicode(s: str) -> bool:
    try:
        s.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def type_name(v: Any) -> str:
    return {
        dict: "object",
        list: "list",
        str: "string",
        bool: "boolean",
        int: "integer",
        float: "number",
        type(None): "null",
    }.get(type(v), type(v).__name__)


def as_id(v: Any, field: str) -> str:
    """prompt_id-like field: string, or integer (also an integral float, as pandas writes)."""
    if isinstance(v, bool):
        raise RowError("invalid_type", f"field '{field}' must be a string or integer, got boolean")
    if isinstance(v, int):
        try:
            return str(v)
        except ValueError:  # an integer with more digits than Python will print
            raise RowError("prompt_id_too_long", f"field '{field}' is an integer too long to print") from None
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    if isinstance(v, str):
        if not v.strip():
            raise RowError("missing_field", f"field '{field}' is empty")
        return v
    raise RowError("invalid_type", f"field '{field}' must be a string or integer, got {type_name(v)}")


def as_text(v: Any, field: str) -> str:
    if not isinstance(v, str):
        raise RowError("invalid_type", f"field '{field}' must be a string, got {type_name(v)}")
    return v


def as_optional_answer(v: Any, field: str) -> str | None:
    """Optional answer-like field: null, string, or a number (cast to string)."""
    if v is None:
        return None
    if isinstance(v, str):
        return v
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        try:
            return str(v)
        except ValueError:  # an integer with more digits than Python will print
            raise RowError("answer_too_long", f"field '{field}' is an integer too long to print") from None
    raise RowError("invalid_type", f"field '{field}' must be a string or number, got {type_name(v)}")


def require(obj: dict, field: str) -> Any:
    if field not in obj or obj[field] is None:
        raise RowError("missing_field", f"missing field '{field}'")
    return obj[field]


# --------------------------------------------------------------------------- excerpts


class _Full(Exception):
    pass


def short_json(obj: Any, limit: int = EXCERPT_CHARS) -> str:
    """Roughly ``json.dumps(obj)[:limit]``, without ever serializing more than ``limit``
    characters: a row holding a 50 MB string costs no more to excerpt than a small one."""
    parts: list[str] = []
    size = 0

    def put(s: str) -> None:
        nonlocal size
        s = s[: limit - size]
        parts.append(s)
        size += len(s)
        if size >= limit:
            raise _Full

    def walk(o: Any, depth: int) -> None:
        if depth > 16:
            put("…")
        elif isinstance(o, dict):
            put("{")
            for k, (key, val) in enumerate(o.items()):
                put(", " if k else "")
                put(json.dumps(str(key)[:limit], ensure_ascii=False) + ": ")
                walk(val, depth + 1)
            put("}")
        elif isinstance(o, (list, tuple)):
            put("[")
            for k, val in enumerate(o):
                put(", " if k else "")
                walk(val, depth + 1)
            put("]")
        elif isinstance(o, str):
            put(json.dumps(o[:limit], ensure_ascii=False))
        elif isinstance(o, (bytes, bytearray, memoryview)):
            put(repr(bytes(o[:limit])))
        else:
            try:
                put(json.dumps(o))
            except (TypeError, ValueError):  # ValueError: an integer too long to print
                put(f"<{type_name(o)}>")

    try:
        walk(obj, 0)
    except _Full:
        pass
    except RecursionError:
        parts.append("…")
    return "".join(parts)[:limit]


def excerpt(raw: Any) -> str:
    """First EXCERPT_CHARS characters of a raw row (bytes decoded with errors='replace')."""
    if isinstance(raw, (bytes, bytearray, memoryview)):
        # 4 bytes per char at most: slicing first keeps huge lines cheap.
        text = bytes(raw[: EXCERPT_CHARS * 4]).decode("utf-8", "replace").rstrip("\r\n")
    elif isinstance(raw, str):
        text = raw[:EXCERPT_CHARS]
    else:
        text = short_json(raw)
    return clean(text[:EXCERPT_CHARS]) or ""


# --------------------------------------------------------------------------- files


def file_uri(path: Path) -> str:
    return path.resolve().as_uri()


def sha256_file(path: Path) -> str:
    """sha256 of a file's bytes, read in 1 MiB chunks (memory stays flat). Raises OSError."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


class ConfigError(ValueError):
    """A configuration mistake (unknown option, missing package): raised, never quarantined."""


@dataclass(frozen=True)
class ReadContext:
    """What a reader needs besides the file: the limits, the CHAMP options, and for a local copy
    of an object (``s3://...``) where the rows really come from: ``source_uri`` (what rows
    carry instead of the copy's ``file://`` URI) and ``origin`` (the object's URL, whose name a
    reader takes a file-level teacher from)."""

    limits: Limits
    teacher_mode: str = "model"
    champ_settings: tuple[str, ...] | None = None
    source_uri: str | None = None
    origin: str | None = None

    def uri(self, path: Path) -> str:
        return self.source_uri or file_uri(path)

    def logical(self, path: Path) -> PurePosixPath | Path:
        """The path whose name means something: the object key for a local copy, else ``path``."""
        if self.origin is None:
            return Path(path)
        return PurePosixPath(self.origin.split("://", 1)[-1])


# --------------------------------------------------------------------------- collector


class Collector:
    """Accumulates accepted rows and quarantine rows for one source file."""

    def __init__(self, source_uri: str, source_sha256: str | None, fmt: str | None, unit: str, limits: Limits):
        self.source_uri = source_uri
        self.source_sha256 = source_sha256
        self.fmt = fmt
        self.unit = unit  # "line" / "record" / "row" / "conversation": used in details
        self.limits = limits
        self.accepted: list[dict] = []
        self.rejected: list[dict] = []
        self.n_read = 0

    def _where(self, row: int | None) -> str:
        return "whole file" if row is None else f"{self.unit} {row}"

    def reject(self, row: int | None, reason: str, detail: str, raw: Any,
               prompt_id: Any = None, teacher: Any = None) -> None:
        assert reason in REASONS, reason
        if isinstance(prompt_id, int) and not isinstance(prompt_id, bool):
            try:
                prompt_id = str(prompt_id)
            except ValueError:  # too many digits to print
                prompt_id = None
        self.rejected.append(
            {
                "source_uri": self.source_uri,
                "source_sha256": self.source_sha256,
                "source_row": row,
                "format": self.fmt,
                "reason": reason,
                "detail": clean(f"{self._where(row)}: {detail}"),
                "raw_excerpt": excerpt(raw),
                # Cut to the limits: a 50 MB prompt_id must not ride along into the quarantine.
                "prompt_id": clean(prompt_id[: self.limits.max_prompt_id_chars]) if isinstance(prompt_id, str) else None,
                "teacher": clean(teacher[: self.limits.max_teacher_chars]) if isinstance(teacher, str) else None,
            }
        )

    def fail_file(self, reason: str, detail: str, raw: Any = None, teacher: Any = None) -> None:
        """A whole-file problem: one row read, one quarantined (``source_row`` null)."""
        self.n_read += 1
        self.reject(None, reason, detail, raw if raw is not None else "", None, teacher)

    def accept(self, row: int, raw: Any, *, prompt_id: str, teacher: str, prompt: str, response: str,
               reference_answer: str | None = None, final_answer: str | None = None) -> None:
        """Checks shared by every format, then keeps the row (or quarantines it).

        Sizes are checked first (a length is free), before Unicode validation and hashing.
        """
        fields = {
            "prompt_id": prompt_id,
            "teacher": teacher,
            "prompt": prompt,
            "response": response,
            "reference_answer": reference_answer,
            "final_answer": final_answer,
        }
        try:
            check_limits(self.limits, **fields)
        except RowError as err:
            self.reject(row, err.reason, err.detail, raw, prompt_id, teacher)
            return
        for name, value in fields.items():
            if value is not None and not is_valid_unicode(value):
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

    def keep_or_reject(self, row: int, raw: Any, obj: Any, to_fields, teacher: str | None = None) -> None:
        """``to_fields(obj)`` -> the fields for :meth:`accept`, or a quarantine row on RowError
        (its teacher: the row's own, else ``teacher``, the file's)."""
        try:
            fields = to_fields(obj)
        except RowError as err:
            pid = obj.get("prompt_id") if isinstance(obj, dict) else None
            own = (obj.get("teacher") or obj.get("model")) if isinstance(obj, dict) else None
            self.reject(row, err.reason, err.detail, raw, pid, own if isinstance(own, str) else teacher)
            return
        self.accept(row, raw, **fields)

    def result(self) -> IngestResult:
        return IngestResult(frame(self.accepted, TRACE_SCHEMA), frame(self.rejected, QUARANTINE_SCHEMA), self.n_read)


def iter_jsonl(path: Path, col: Collector) -> Iterator[tuple[int, bytes, Any]]:
    """Yield (line_no, raw_head, parsed_json) for each non-blank line of ``path`` that parses.

    The file is streamed line by line and only the first bytes of a line are kept for the
    excerpt, so a 50 MB line costs about its decoded text plus its parsed value. Blank lines
    are skipped and not counted; undecodable and invalid-JSON lines are quarantined here.
    Splitting the bytes (not the decoded text) keeps one bad byte from spoiling its neighbours.
    An OSError while reading (the file vanished or turned unreadable) propagates.
    """
    with open(path, "rb") as f:
        for i, line in enumerate(f, start=1):
            if i == 1 and line.startswith(b"\xef\xbb\xbf"):
                line = line[3:]  # UTF-8 byte-order mark
            if not line or line.isspace():
                continue
            col.n_read += 1
            head = line[: EXCERPT_CHARS * 4]
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError as exc:
                col.reject(i, "undecodable_bytes",
                           f"not valid UTF-8 (byte 0x{line[exc.start]:02x} at offset {exc.start})", head)
                continue
            del line
            try:
                obj = json.loads(text)
            except Exception as exc:  # noqa: BLE001 - JSONDecodeError, RecursionError, huge ints
                col.reject(i, "invalid_json", f"invalid JSON: {str(exc)[:200]}", head)
                continue
            finally:
                del text
            yield i, head, obj
