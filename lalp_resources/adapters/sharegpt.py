"""Reader for the ``sharegpt`` format: rows with a ``conversations`` list of ShareGPT turns
``{"from": "human" | "gpt" | "system" | ..., "value": ...}`` (OpenAI ``{role, content}`` turns
too), as in OpenThoughts, Bespoke-Stratos and ShareGPT-style conversions of LIMO; in JSONL, a JSON
list, Parquet (the hub's shards) or Arrow (a ``save_to_disk`` folder), see :mod:`.rows`.

Mapping (the same as :mod:`.messages`, which reads ``messages`` rows):

* prompt = the last user turn (``human`` / ``user``) before the final assistant turn (``gpt`` /
  ``assistant``); response = that final assistant turn, its ``<think>`` block (or OpenThoughts'
  ``<|begin_of_thought|>`` section) kept: it is what the teacher wrote and what LALP scores.
* system turns, and a row's ``system`` field, are not part of the prompt: in these datasets they
  are one formatting instruction shared by every row, not the question the student is scored on.
* teacher = the row's ``teacher`` (or ``model``) when it has one, else the dataset's name: the
  folder of a hub download or ``save_to_disk`` folder (``traces/deepseek-r1/data/train-*.parquet``
  -> ``deepseek-r1``), else the file's stem, as for ZeroEval's one-file-per-model dumps
  (:func:`lalp_resources.adapters.hf.dataset_name`). These datasets hold one teacher's answers and
  do not name it; naming the download folder after the teacher names the partition.
* prompt_id = the row's ``prompt_id``, else the hash of the prompt (a ShareGPT ``id`` names a
  conversation, not a question): the same question gets the same id in every file and format, so
  teachers from different datasets are compared on the prompts they share.
* optional ``reference_answer`` and ``final_answer``, as in the other formats.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lalp_resources.adapters.common import (
    IngestResult,
    ReadContext,
    RowError,
    as_optional_answer,
    check_limits,
    require,
    type_name,
)
from lalp_resources.adapters.hf import dataset_name
from lalp_resources.adapters.messages import exchange, row_prompt_id, row_teacher, turn
from lalp_resources.adapters.rows import read_rows


def file_teacher(path: Path, ctx: ReadContext) -> str:
    """The teacher of rows that do not name one: the dataset's (or file's) name."""
    return dataset_name(ctx.logical(path), local=ctx.origin is None)


def sharegpt_fields(obj: Any, ctx: ReadContext, default_teacher: str) -> dict:
    if not isinstance(obj, dict):
        raise RowError("invalid_type", f"expected a JSON object, got {type_name(obj)}")
    conv = require(obj, "conversations")
    if not isinstance(conv, list):
        raise RowError("invalid_type", f"field 'conversations' must be a list, got {type_name(conv)}")
    teacher = row_teacher(obj, ctx, default_teacher)
    prompt, response = exchange([turn(t, k, "conversations") for k, t in enumerate(conv)], "conversations")
    check_limits(ctx.limits, prompt=prompt, response=response)
    return {
        "prompt_id": row_prompt_id(obj, prompt),
        "teacher": teacher,
        "prompt": prompt,
        "response": response,
        "reference_answer": as_optional_answer(obj.get("reference_answer"), "reference_answer"),
        "final_answer": as_optional_answer(obj.get("final_answer"), "final_answer"),
    }


def read_sharegpt(path: Path, ctx: ReadContext) -> IngestResult:
    """ShareGPT conversations from one file."""
    teacher = file_teacher(Path(path), ctx)
    return read_rows(path, ctx, "sharegpt", lambda o: sharegpt_fields(o, ctx, teacher), teacher=teacher)
