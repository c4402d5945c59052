"""Reader for the ``messages`` format: JSONL chat transcripts, OpenAI ``{role, content}`` or
ShareGPT ``{from, value}`` turns, plus ``teacher`` (or ``model``) and optional ``prompt_id``,
``reference_answer``, ``final_answer``.

prompt = the last user turn before the final assistant turn; response = that final assistant
turn (a ``<think>`` block stays: it is part of what the teacher wrote); prompt_id defaults to
the first 16 hex characters of the sha256 of the prompt.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from lalp_resources.adapters.common import (
    Collector,
    IngestResult,
    ReadContext,
    RowError,
    as_id,
    as_optional_answer,
    as_text,
    check_limit,
    check_limits,
    file_uri,
    iter_jsonl,
    require,
    sha256_file,
    type_name,
)

ASSISTANT_ROLES = {"assistant", "gpt", "model", "bot", "chatgpt"}
USER_ROLES = {"user", "human"}


def turn(t: Any, k: int) -> tuple[str, str]:
    """(role, content) of one chat turn, OpenAI {role, content} or ShareGPT {from, value}."""
    if not isinstance(t, dict):
        raise RowError("invalid_type", f"messages[{k}] must be an object, got {type_name(t)}")
    role = t.get("role", t.get("from"))
    if not isinstance(role, str):
        raise RowError("invalid_type" if role is not None else "missing_field",
                       f"messages[{k}] has no string 'role' (or 'from')")
    content = t.get("content", t.get("value"))
    if content is None:
        content = ""
    elif isinstance(content, list):
        # OpenAI multi-part content: keep the text parts.
        parts = [p.get("text") for p in content if isinstance(p, dict) and isinstance(p.get("text"), str)]
        content = "".join(parts)
    elif not isinstance(content, str):
        raise RowError("invalid_type", f"messages[{k}] content must be a string, got {type_name(content)}")
    return role.strip().lower(), content


def messages_fields(obj: Any, ctx: ReadContext) -> dict:
    if not isinstance(obj, dict):
        raise RowError("invalid_type", f"expected a JSON object, got {type_name(obj)}")
    msgs = require(obj, "messages")
    if not isinstance(msgs, list):
        raise RowError("invalid_type", f"field 'messages' must be a list, got {type_name(msgs)}")
    teacher = obj.get("teacher") if obj.get("teacher") is not None else obj.get("model")
    if teacher is None:
        raise RowError("missing_field", "missing field 'teacher' (or 'model')")
    teacher = as_text(teacher, "teacher")
    check_limit(ctx.limits, "teacher", teacher)
    turns = [turn(t, k) for k, t in enumerate(msgs)]
    last_asst = max((k for k, (r, _) in enumerate(turns) if r in ASSISTANT_ROLES), default=None)
    if last_asst is None:
        raise RowError("missing_field", "no assistant turn in 'messages'")
    last_user = max((k for k, (r, _) in enumerate(turns[:last_asst]) if r in USER_ROLES), default=None)
    if last_user is None:
        raise RowError("missing_field", "no user turn before the final assistant turn")
    prompt = turns[last_user][1]
    response = turns[last_asst][1]
    check_limits(ctx.limits, prompt=prompt, response=response)
    if obj.get("prompt_id") is not None:
        prompt_id = as_id(obj["prompt_id"], "prompt_id")
    else:
        prompt_id = hashlib.sha256(prompt.encode("utf-8", "surrogatepass")).hexdigest()[:16]
    return {
        "prompt_id": prompt_id,
        "teacher": teacher,
        "prompt": prompt,
        "response": response,
        "reference_answer": as_optional_answer(obj.get("reference_answer"), "reference_answer"),
        "final_answer": as_optional_answer(obj.get("final_answer"), "final_answer"),
    }


def read_messages(path: Path, ctx: ReadContext) -> IngestResult:
    """Chat transcripts from one JSONL file (rows numbered by physical line, 1-based)."""
    path = Path(path)
    col = Collector(file_uri(path), sha256_file(path), "messages", "line", ctx.limits)
    for i, head, obj in iter_jsonl(path, col):
        col.keep_or_reject(i, head, obj, lambda o: messages_fields(o, ctx))
    return col.result()
