"""Reader for the ``canonical`` format: rows with ``prompt_id, prompt, teacher, response`` and
optional ``reference_answer``, ``final_answer``, in JSONL, Parquet, a JSON list or Arrow.

JSONL rows are numbered by physical line (1-based), the others by position (0-based).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lalp_resources.adapters.common import (
    IngestResult,
    ReadContext,
    RowError,
    as_id,
    as_optional_answer,
    as_text,
    check_limits,
    require,
    type_name,
)
from lalp_resources.adapters.rows import PARQUET_MAGIC, read_rows  # noqa: F401  (PARQUET_MAGIC re-exported)


def canonical_fields(obj: Any, ctx: ReadContext) -> dict:
    if not isinstance(obj, dict):
        raise RowError("invalid_type", f"expected a JSON object, got {type_name(obj)}")
    for f in ("prompt_id", "prompt", "teacher", "response"):
        require(obj, f)
    fields = {
        "prompt_id": as_id(obj["prompt_id"], "prompt_id"),
        "teacher": as_text(obj["teacher"], "teacher"),
        "prompt": as_text(obj["prompt"], "prompt"),
        "response": as_text(obj["response"], "response"),
    }
    check_limits(ctx.limits, **fields)
    fields["reference_answer"] = as_optional_answer(obj.get("reference_answer"), "reference_answer")
    fields["final_answer"] = as_optional_answer(obj.get("final_answer"), "final_answer")
    return fields


def read_canonical(path: Path, ctx: ReadContext) -> IngestResult:
    """Canonical rows from one JSONL, JSON-list, Parquet or Arrow file (see :mod:`.rows`): a
    Parquet or Arrow file that cannot be opened is one ``invalid_parquet`` / ``invalid_arrow``
    row, and a failure part-way keeps the rows read before it."""
    return read_rows(path, ctx, "canonical", lambda o: canonical_fields(o, ctx))
