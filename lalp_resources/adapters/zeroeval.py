"""Reader for the ``zeroeval`` format: one JSON list per model, as in WildEval/ZeroEval
``result_dirs``; records numbered by position (0-based).

Mapping: teacher = file stem; prompt_id = str(id); prompt = problem; reference_answer =
answer; response = the ``reasoning`` parsed out of ``output[0]``; final_answer = its
``answer``. Outputs that are empty, truncated or not the expected JSON are quarantined as
``unparsable_output`` (see :func:`~lalp_resources.adapters.json_output.parse_json_output`).
``output[0]`` itself must fit ``max_response_chars``: the response is cut from it, and the
check runs before the parse. A file that is not UTF-8, not JSON or not a list is one
quarantine row.
"""

from __future__ import annotations

import json
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
    require,
    sha256_file,
    type_name,
)
from lalp_resources.adapters.json_output import parse_json_output


def zeroeval_fields(rec: Any, teacher: str, ctx: ReadContext) -> dict:
    if not isinstance(rec, dict):
        raise RowError("invalid_type", f"expected a JSON object, got {type_name(rec)}")
    prompt_id = as_id(require(rec, "id"), "id")
    prompt = as_text(require(rec, "problem"), "problem")
    check_limits(ctx.limits, prompt_id=prompt_id, teacher=teacher, prompt=prompt)
    reference = as_optional_answer(rec.get("answer"), "answer")
    check_limit(ctx.limits, "reference_answer", reference, "answer")
    output = require(rec, "output")
    if isinstance(output, str):
        output = [output]  # tolerate a bare string
    if not isinstance(output, list):
        raise RowError("invalid_type", f"field 'output' must be a list, got {type_name(output)}")
    if not output:
        raise RowError("unparsable_output", "field 'output' is an empty list")
    if not isinstance(output[0], str):
        raise RowError("invalid_type", f"output[0] must be a string, got {type_name(output[0])}")
    check_limit(ctx.limits, "response", output[0], "output[0]")
    try:
        reasoning, answer = parse_json_output(output[0])
    except ValueError as exc:
        raise RowError("unparsable_output", str(exc)) from None
    return {
        "prompt_id": prompt_id,
        "teacher": teacher,
        "prompt": prompt,
        "response": reasoning,
        "reference_answer": reference,
        "final_answer": answer,
    }


def read_zeroeval(path: Path, ctx: ReadContext) -> IngestResult:
    """One ZeroEval result file (a JSON list, one record per problem, one file per model)."""
    path = Path(path)
    teacher = ctx.logical(path).stem
    col = Collector(ctx.uri(path), sha256_file(path), "zeroeval", "record", ctx.limits)
    data = path.read_bytes()
    try:
        records = json.loads(data.decode("utf-8-sig"))
    except UnicodeDecodeError as exc:
        col.fail_file("undecodable_bytes", f"file is not valid UTF-8 (offset {exc.start})", data[:1200], teacher)
        return col.result()
    except Exception as exc:  # noqa: BLE001 - JSONDecodeError, RecursionError, huge ints
        col.fail_file("invalid_json", f"file is not valid JSON: {str(exc)[:200]}", data[:1200], teacher)
        return col.result()
    del data
    if not isinstance(records, list):
        col.fail_file("invalid_type", f"expected a JSON list of records, got {type_name(records)}", records, teacher)
        return col.result()
    for i, rec in enumerate(records):
        col.n_read += 1
        try:
            fields = zeroeval_fields(rec, teacher, ctx)
        except RowError as err:
            pid = rec.get("id") if isinstance(rec, dict) else None
            col.reject(i, err.reason, err.detail, rec, pid, teacher)
            continue
        col.accept(i, rec, **fields)
    return col.result()
