"""Reader for the ``alpaca`` format: rows with ``instruction``, optional ``input`` and ``output``
(Stanford Alpaca and the many instruction sets in its shape); in JSONL, a JSON list (Alpaca's own
``alpaca_data.json``), Parquet or Arrow, see :mod:`.rows`.

Mapping:

* prompt = ``instruction``, then a blank line and ``input`` when ``input`` is not empty (the
  input is part of the question: "Summarise this:" + the text); response = ``output``.
* a ``system`` field and a ``history`` of earlier turns are not part of the prompt (as system
  turns are not in :mod:`.messages`).
* teacher and prompt_id as in :mod:`.sharegpt`: the row's ``teacher`` (or ``model``), else the
  dataset's or file's name; the row's ``prompt_id``, else the hash of the prompt.
* optional ``reference_answer`` and ``final_answer``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lalp_resources.adapters.common import (
    IngestResult,
    ReadContext,
    RowError,
    as_optional_answer,
    as_text,
    check_limits,
    require,
    type_name,
)
from lalp_resources.adapters.messages import row_prompt_id, row_teacher
from lalp_resources.adapters.rows import read_rows
from lalp_resources.adapters.sharegpt import file_teacher


def alpaca_prompt(instruction: str, inp: str | None) -> str:
    return instruction if inp is None or not inp.strip() else f"{instruction}\n\n{inp}"


def alpaca_fields(obj: Any, ctx: ReadContext, default_teacher: str) -> dict:
    if not isinstance(obj, dict):
        raise RowError("invalid_type", f"expected a JSON object, got {type_name(obj)}")
    instruction = as_text(require(obj, "instruction"), "instruction")
    response = as_text(require(obj, "output"), "output")
    inp = obj.get("input")
    if inp is not None:
        inp = as_text(inp, "input")
    teacher = row_teacher(obj, ctx, default_teacher)
    # the parts are checked before they are joined: a 50 MB input costs no copy
    check_limits(ctx.limits, prompt=instruction, response=response)
    if inp is not None:
        check_limits(ctx.limits, prompt=inp)
    prompt = alpaca_prompt(instruction, inp)
    check_limits(ctx.limits, prompt=prompt)
    return {
        "prompt_id": row_prompt_id(obj, prompt),
        "teacher": teacher,
        "prompt": prompt,
        "response": response,
        "reference_answer": as_optional_answer(obj.get("reference_answer"), "reference_answer"),
        "final_answer": as_optional_answer(obj.get("final_answer"), "final_answer"),
    }


def read_alpaca(path: Path, ctx: ReadContext) -> IngestResult:
    """Alpaca-style instruction rows from one file."""
    teacher = file_teacher(Path(path), ctx)
    return read_rows(path, ctx, "alpaca", lambda o: alpaca_fields(o, ctx, teacher), teacher=teacher)
