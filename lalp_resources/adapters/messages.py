"""Reader for the ``messages`` format: chat transcripts, OpenAI ``{role, content}`` or
ShareGPT ``{from, value}`` turns, plus ``teacher`` (or ``model``) and optional ``prompt_id``,
``reference_answer``, ``final_answer``; in JSONL, a JSON list, Parquet or Arrow (see
:mod:`.rows`).

prompt = the last user turn before the final assistant turn; response = that final assistant
turn (a ``<think>`` block stays: it is part of what the teacher wrote); system turns are not
part of the prompt. prompt_id defaults to the first 16 hex characters of the sha256 of the
prompt (:func:`prompt_hash`), so the same question gets the same id in every file and format.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from lalp_resources.adapters.common import (
    IngestResult,
    ReadContext,
    RowError,
    as_id,
    as_optional_answer,
    as_text,
    check_limit,
    check_limits,
    require,
    type_name,
)
from lalp_resources.adapters.rows import read_rows

ASSISTANT_ROLES = {"assistant", "gpt", "model", "bot", "chatgpt"}
USER_ROLES = {"user", "human"}


def turn(t: Any, k: int, field: str = "messages") -> tuple[str, str]:
    """(role, content) of one chat turn, OpenAI {role, content} or ShareGPT {from, value}."""
    if not isinstance(t, dict):
        raise RowError("invalid_type", f"{field}[{k}] must be an object, got {type_name(t)}")
    # a null key falls through to the other style: Parquet structs carry every key of the column
    role = t.get("role") if t.get("role") is not None else t.get("from")
    if not isinstance(role, str):
        raise RowError("invalid_type" if role is not None else "missing_field",
                       f"{field}[{k}] has no string 'role' (or 'from')")
    content = t.get("content") if t.get("content") is not None else t.get("value")
    if content is None:
        content = ""
    elif isinstance(content, list):
        # OpenAI multi-part content: keep the text parts.
        parts = [p.get("text") for p in content if isinstance(p, dict) and isinstance(p.get("text"), str)]
        content = "".join(parts)
    elif not isinstance(content, str):
        raise RowError("invalid_type", f"{field}[{k}] content must be a string, got {type_name(content)}")
    return role.strip().lower(), content


def exchange(turns: list[tuple[str, str]], field: str = "messages") -> tuple[str, str]:
    """(prompt, response) of a conversation: the final assistant turn and the last user turn
    before it. System turns and the turns before that user turn are context, not the prompt."""
    last_asst = max((k for k, (r, _) in enumerate(turns) if r in ASSISTANT_ROLES), default=None)
    if last_asst is None:
        raise RowError("missing_field", f"no assistant turn in '{field}'")
    last_user = max((k for k, (r, _) in enumerate(turns[:last_asst]) if r in USER_ROLES), default=None)
    if last_user is None:
        raise RowError("missing_field", "no user turn before the final assistant turn")
    return turns[last_user][1], turns[last_asst][1]


def prompt_hash(prompt: str) -> str:
    """The default prompt_id: the first 16 hex characters of the sha256 of the prompt's text."""
    return hashlib.sha256(prompt.encode("utf-8", "surrogatepass")).hexdigest()[:16]


def row_prompt_id(obj: dict, prompt: str) -> str:
    """The row's own ``prompt_id``, else :func:`prompt_hash` of its prompt."""
    if obj.get("prompt_id") is not None:
        return as_id(obj["prompt_id"], "prompt_id")
    return prompt_hash(prompt)


def row_teacher(obj: dict, ctx: ReadContext, default: str | None = None) -> str:
    """The row's ``teacher`` (or ``model``), else ``default`` (the file's); missing_field when
    neither is there."""
    teacher = obj.get("teacher") if obj.get("teacher") is not None else obj.get("model")
    if teacher is None:
        if default is None:
            raise RowError("missing_field", "missing field 'teacher' (or 'model')")
        teacher = default
    teacher = as_text(teacher, "teacher")
    check_limit(ctx.limits, "teacher", teacher)
    return teacher


def messages_fields(obj: Any, ctx: ReadContext) -> dict:
    if not isinstance(obj, dict):
        raise RowError("invalid_type", f"expected a JSON object, got {type_name(obj)}")
    msgs = require(obj, "messages")
    if not isinstance(msgs, list):
        raise RowError("invalid_type", f"field 'messages' must be a list, got {type_name(msgs)}")
    teacher = row_teacher(obj, ctx)
    prompt, response = exchange([turn(t, k) for k, t in enumerate(msgs)])
    check_limits(ctx.limits, prompt=prompt, response=response)
    prompt_id = row_prompt_id(obj, prompt)
    return {
        "prompt_id": prompt_id,
        "teacher": teacher,
        "prompt": prompt,
        "response": response,
        "reference_answer": as_optional_answer(obj.get("reference_answer"), "reference_answer"),
        "final_answer": as_optional_answer(obj.get("final_answer"), "final_answer"),
    }


def read_messages(path: Path, ctx: ReadContext) -> IngestResult:
    """Chat transcripts from one file (JSONL rows numbered by physical line, 1-based; others by
    position, 0-based)."""
    return read_rows(path, ctx, "messages", lambda o: messages_fields(o, ctx))
