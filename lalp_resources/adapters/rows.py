"""Row containers: one file -> its rows as Python objects, whatever the file holds them in.

A row format (canonical, messages, sharegpt, alpaca) says what one row means; the container says
how rows are stored: JSONL (rows numbered by physical line, 1-based), a JSON list (by position,
0-based), Parquet (by position, 0-based; the Hugging Face hub's shards) or Arrow IPC (by position,
0-based; the ``data-*.arrow`` files of a ``datasets.save_to_disk`` folder). :func:`read_rows` reads
any of them through a :class:`~lalp_resources.adapters.common.Collector`, so every row read is
accepted or quarantined, and a file that cannot be opened is one quarantine row.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Iterator

from lalp_resources.adapters.common import (
    Collector,
    IngestResult,
    ReadContext,
    iter_jsonl,
    sha256_file,
    type_name,
)

PARQUET_MAGIC = b"PAR1"
ARROW_FILE_MAGIC = b"ARROW1"
ARROW_STREAM_CONTINUATION = b"\xff\xff\xff\xff"  # an Arrow IPC stream's first message starts with it
# Rows per Arrow batch: bounded so that a batch of long rows stays small in memory.
BATCH_ROWS = 256
UNITS = {"jsonl": "line", "json": "record", "parquet": "row", "arrow": "row"}


def container_of(path: Path) -> str:
    """``jsonl`` / ``json`` (a JSON list) / ``parquet`` / ``arrow``: by extension, and for a
    ``.json`` file by its first character (a ``.json`` file of objects, one a line, is JSONL);
    a file of another extension by its magic number (JSONL when none matches)."""
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return "parquet"
    if suffix == ".arrow":
        return "arrow"
    with open(path, "rb") as f:
        head = f.read(4096)
    if suffix == ".jsonl":
        return "jsonl"
    if suffix == ".json":
        return "json" if head.removeprefix(b"\xef\xbb\xbf").lstrip().startswith(b"[") else "jsonl"
    if head[:4] == PARQUET_MAGIC:
        return "parquet"
    if head[:6] == ARROW_FILE_MAGIC or head[:4] == ARROW_STREAM_CONTINUATION:
        return "arrow"
    return "jsonl"


def read_rows(path: Path, ctx: ReadContext, fmt: str, to_fields: Callable[[Any], dict],
              teacher: str | None = None) -> IngestResult:
    """Every row of one file through ``to_fields`` (raising RowError for a bad row). ``teacher``
    names the rows' teacher in quarantine rows when the rows do not (a file-level default)."""
    path = Path(path)
    kind = container_of(path)
    col = Collector(ctx.uri(path), sha256_file(path), fmt, UNITS[kind], ctx.limits)
    for row, raw, obj in ITERATORS[kind](path, col, teacher):
        col.keep_or_reject(row, raw, obj, to_fields, teacher=teacher)
    return col.result()


def _jsonl(path: Path, col: Collector, teacher: str | None) -> Iterator[tuple[int, Any, Any]]:
    yield from iter_jsonl(path, col)


def _json_list(path: Path, col: Collector, teacher: str | None) -> Iterator[tuple[int, Any, Any]]:
    """A JSON list of row objects (ShareGPT's and Alpaca's original files). A file that is not
    UTF-8, not JSON or not a list is one quarantine row."""
    data = path.read_bytes()
    try:
        records = json.loads(data.decode("utf-8-sig"))
    except UnicodeDecodeError as exc:
        col.fail_file("undecodable_bytes", f"file is not valid UTF-8 (offset {exc.start})", data[:1200], teacher)
        return
    except Exception as exc:  # noqa: BLE001 - JSONDecodeError, RecursionError, huge ints
        col.fail_file("invalid_json", f"file is not valid JSON: {str(exc)[:200]}", data[:1200], teacher)
        return
    del data
    if not isinstance(records, list):
        col.fail_file("invalid_type", f"expected a JSON list of rows, got {type_name(records)}", records, teacher)
        return
    for i, rec in enumerate(records):
        col.n_read += 1
        yield i, rec, rec


def _parquet(path: Path, col: Collector, teacher: str | None) -> Iterator[tuple[int, Any, Any]]:
    """Parquet rows. A file that cannot be opened (truncated, not Parquet) is one
    ``invalid_parquet`` row; a failure part-way keeps the rows read before it."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError, ValueError) as exc:
        col.fail_file("invalid_parquet", f"cannot open as Parquet: {str(exc)[:300]}", teacher=teacher)
        return
    row = 0
    try:
        for batch in pf.iter_batches(batch_size=BATCH_ROWS):
            for obj in batch.to_pylist():
                col.n_read += 1
                yield row, obj, obj
                row += 1
    except (pa.ArrowException, OSError, ValueError) as exc:
        col.fail_file("invalid_parquet", f"cannot read past row {row}: {str(exc)[:300]}", teacher=teacher)
    finally:
        pf.close()


def _arrow_batches(path: Path):
    """The record batches of an Arrow IPC stream (what ``datasets`` writes) or IPC file."""
    import pyarrow as pa

    source = pa.memory_map(str(path))
    try:
        try:
            return source, iter(pa.ipc.open_stream(source))
        except (pa.ArrowException, OSError, ValueError):
            source.seek(0)
            reader = pa.ipc.open_file(source)
            return source, (reader.get_batch(i) for i in range(reader.num_record_batches))
    except BaseException:
        source.close()
        raise


def _arrow(path: Path, col: Collector, teacher: str | None) -> Iterator[tuple[int, Any, Any]]:
    """Arrow IPC rows. A file that cannot be opened or read is one ``invalid_arrow`` row (after
    the rows read before the failure)."""
    import pyarrow as pa

    try:
        source, batches = _arrow_batches(path)
    except (pa.ArrowException, OSError, ValueError) as exc:
        col.fail_file("invalid_arrow", f"cannot open as Arrow IPC: {str(exc)[:300]}", teacher=teacher)
        return
    row = 0
    try:
        for batch in batches:
            for lo in range(0, batch.num_rows, BATCH_ROWS):
                for obj in batch.slice(lo, BATCH_ROWS).to_pylist():
                    col.n_read += 1
                    yield row, obj, obj
                    row += 1
    except (pa.ArrowException, OSError, ValueError) as exc:
        col.fail_file("invalid_arrow", f"cannot read past row {row}: {str(exc)[:300]}", teacher=teacher)
    finally:
        source.close()


ITERATORS = {"jsonl": _jsonl, "json": _json_list, "parquet": _parquet, "arrow": _arrow}


def column_names(path: Path) -> list[str] | None:
    """The columns of a Parquet or Arrow file (its schema, without reading rows); None when the
    file cannot be opened as either."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    kind = container_of(path)
    try:
        if kind == "parquet":
            return list(pq.read_schema(path).names)
        if kind == "arrow":
            with pa.memory_map(str(path)) as source:
                try:
                    return list(pa.ipc.open_stream(source).schema.names)
                except (pa.ArrowException, OSError, ValueError):
                    source.seek(0)
                    return list(pa.ipc.open_file(source).schema.names)
    except (pa.ArrowException, OSError, ValueError):
        return None
    return None
