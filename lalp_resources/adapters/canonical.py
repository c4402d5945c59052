"""Reader for the ``canonical`` format: JSONL or Parquet rows with ``prompt_id, prompt,
teacher, response`` and optional ``reference_answer``, ``final_answer``.

JSONL rows are numbered by physical line (1-based), Parquet rows by position (0-based).
"""

from __future__ import annotations

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
    check_limits,
    file_uri,
    iter_jsonl,
    require,
    sha256_file,
    type_name,
)

PARQUET_MAGIC = b"PAR1"
# Rows per Arrow batch: bounded so that a batch of long rows stays small in memory.
_BATCH_ROWS = 256


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


def is_parquet(path: Path) -> bool:
    """By extension (``.parquet`` yes, ``.jsonl`` / ``.json`` no), else by the Parquet magic
    number at the start of the file."""
    suffix = path.suffix.lower()
    if suffix in (".parquet", ".jsonl", ".json"):
        return suffix == ".parquet"
    with open(path, "rb") as f:
        return f.read(4) == PARQUET_MAGIC


def read_canonical(path: Path, ctx: ReadContext) -> IngestResult:
    """Canonical rows from one JSONL or Parquet file."""
    path = Path(path)
    if is_parquet(path):
        return read_canonical_parquet(path, ctx)
    col = Collector(file_uri(path), sha256_file(path), "canonical", "line", ctx.limits)
    for i, head, obj in iter_jsonl(path, col):
        col.keep_or_reject(i, head, obj, lambda o: canonical_fields(o, ctx))
    return col.result()


def read_canonical_parquet(path: Path, ctx: ReadContext) -> IngestResult:
    """Canonical rows from Parquet. A file that cannot be opened (truncated, not Parquet) is
    one ``invalid_parquet`` row; a failure part-way keeps the rows read before it."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    col = Collector(file_uri(path), sha256_file(path), "canonical", "row", ctx.limits)
    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError, ValueError) as exc:
        col.fail_file("invalid_parquet", f"cannot open as Parquet: {str(exc)[:300]}")
        return col.result()
    row = 0
    try:
        for batch in pf.iter_batches(batch_size=_BATCH_ROWS):
            for obj in batch.to_pylist():
                col.n_read += 1
                col.keep_or_reject(row, obj, obj, lambda o: canonical_fields(o, ctx))
                row += 1
    except (pa.ArrowException, OSError, ValueError) as exc:
        col.fail_file("invalid_parquet", f"cannot read past row {row}: {str(exc)[:300]}")
    finally:
        pf.close()
    return col.result()
