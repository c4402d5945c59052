"""The format registry (name -> reader), format detection and source expansion.

A reader is ``reader(path, ctx) -> IngestResult``: one file in, every row accepted or
quarantined out; see :mod:`lalp_resources.adapters.common`.
"""

from __future__ import annotations

import errno
import json
from pathlib import Path
from typing import Callable, Iterable

from lalp_resources import objectstore
from lalp_resources.adapters.alpaca import read_alpaca
from lalp_resources.adapters.canonical import read_canonical
from lalp_resources.adapters.champ import champ_path, is_champ_spec, read_champ
from lalp_resources.adapters.common import ConfigError, IngestResult, ReadContext, sha256_file, type_name
from lalp_resources.adapters.hf import INPUT_SUFFIXES, SKIP_IN_FOLDER, LocalTree, expand_folder  # noqa: F401
from lalp_resources.adapters.messages import read_messages
from lalp_resources.adapters.rows import ARROW_FILE_MAGIC, ARROW_STREAM_CONTINUATION, PARQUET_MAGIC, column_names
from lalp_resources.adapters.sharegpt import read_sharegpt
from lalp_resources.adapters.zeroeval import read_zeroeval

Reader = Callable[[Path, ReadContext], IngestResult]

READERS: dict[str, Reader] = {
    "canonical": read_canonical,
    "messages": read_messages,
    "sharegpt": read_sharegpt,
    "alpaca": read_alpaca,
    "zeroeval": read_zeroeval,
    "champ": read_champ,
}
FORMATS = tuple(READERS)

_SNIFF_BYTES = 1 << 20  # the first MiB tells JSONL kinds apart
_SNIFF_LINES = 200
CANONICAL_FIELDS = {"prompt_id", "prompt", "teacher", "response"}


def row_kind(keys) -> str:
    """The row format a row's keys (or a table's columns) say: ``messages``, ``sharegpt``
    (``conversations``), ``alpaca`` (``instruction`` and ``output``), else ``canonical``."""
    keys = set(keys)
    if "messages" in keys:
        return "messages"
    if "conversations" in keys:
        return "sharegpt"
    if {"instruction", "output"} <= keys:
        return "alpaca"
    return "canonical"


def _sniff_jsonl(head: bytes) -> str:
    """The :func:`row_kind` of the first parseable object ('canonical' when there is none)."""
    for n, line in enumerate(head.split(b"\n")):
        if n >= _SNIFF_LINES:
            break
        try:
            obj = json.loads(line.decode("utf-8-sig"))
        except Exception:  # noqa: BLE001
            continue
        if isinstance(obj, dict):
            return row_kind(obj)
    return "canonical"


def _sniff_json_list(start: bytes) -> str:
    """A JSON list: the :func:`row_kind` of its first element when that element is a ShareGPT,
    Alpaca, messages or canonical row and fits in the sniffed head, else 'zeroeval' (one file per
    model; its reader quarantines a broken list whole)."""
    text = start.decode("utf-8", "ignore")
    i = 1
    while i < len(text) and text[i].isspace():
        i += 1
    try:
        first, _ = json.JSONDecoder().raw_decode(text, i)
    except (ValueError, RecursionError):
        return "zeroeval"
    if isinstance(first, dict):
        kind = row_kind(first)
        if kind != "canonical" or CANONICAL_FIELDS <= set(first):
            return kind
    return "zeroeval"


def _table_kind(path: Path) -> str:
    """A Parquet or Arrow file's :func:`row_kind` by its columns (canonical when it cannot be
    opened: the reader quarantines it)."""
    names = column_names(path)
    return row_kind(names) if names is not None else "canonical"


def _head(path: Path, n: int = _SNIFF_BYTES) -> bytes:
    with open(path, "rb") as f:
        return f.read(n)


def detect_format(source: str | Path) -> str:
    """The format of one file (or ``"champ"`` for the CHAMP spec string).

    A row's keys (a table's columns) decide between the row formats (:func:`row_kind`):
    ``messages`` -> messages, ``conversations`` -> sharegpt, ``instruction`` + ``output`` ->
    alpaca, else canonical. ``.parquet`` / ``.arrow`` -> by their columns; ``.jsonl`` -> by the
    first parseable row; ``.json`` -> a JSON list by its first element (zeroeval unless that is
    a row of another format; a broken list is zeroeval, whose reader quarantines it whole),
    champ (an object with ``problems``), or JSONL content sniffed as above; any other extension
    -> by its columns when the file starts with the Parquet or Arrow magic number. Raises
    ValueError when it cannot tell and OSError when the file cannot be read.
    """
    if is_champ_spec(source):
        return "champ"
    path = Path(source)
    suffix = path.suffix.lower()
    head = _head(path)
    if suffix in (".parquet", ".arrow"):
        return _table_kind(path)
    if suffix == ".jsonl":
        return _sniff_jsonl(head)
    if suffix != ".json":
        if head[:4] == PARQUET_MAGIC or head[:6] == ARROW_FILE_MAGIC or head[:4] == ARROW_STREAM_CONTINUATION:
            return _table_kind(path)
        raise ValueError(f"cannot detect the format of {path}: unknown extension {suffix!r}; pass format=")
    start = head.removeprefix(b"\xef\xbb\xbf").lstrip()
    if start.startswith(b"["):
        return _sniff_json_list(start)
    if not start.startswith(b"{"):
        raise ValueError(f"cannot detect the format of {path}: not JSON or JSONL (starts with {start[:20]!r})")
    try:
        obj = json.loads(path.read_bytes().decode("utf-8-sig"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        first = start.split(b"\n", 1)[0]
        try:
            if isinstance(json.loads(first), dict):
                return _sniff_jsonl(head)  # JSONL content in a .json file
        except (UnicodeDecodeError, ValueError, RecursionError):
            pass
        raise ValueError(f"cannot detect the format of {path}: not JSON or JSONL; pass format=") from None
    if isinstance(obj, dict) and "problems" in obj:
        return "champ"
    if isinstance(obj, dict) and ({"messages", "response", "conversations", "instruction"} & set(obj)):
        return _sniff_jsonl(head)  # a one-line JSONL file
    raise ValueError(f"cannot detect the format of {path}: a JSON {type_name(obj)} of no known layout; pass format=")


def expand_sources(sources: Iterable[str | Path] | str | Path) -> list[str]:
    """Source specs -> the items to read, in order: a file (or an object, ``s3://...``) as given; a folder as the files of its
    Hugging Face dataset layout (a ``save_to_disk`` folder, a hub download's ``data/`` shards),
    else its ``*.json`` / ``*.jsonl`` / ``*.parquet`` / ``*.arrow`` files, sorted (``summary.json``
    and the datasets' metadata files skipped; see :mod:`.hf`); the CHAMP spec (``"champ"`` /
    ``"champ:v0"``) as is. An object-store prefix (``s3://bucket/prefix``) is expanded as a folder
    (:mod:`lalp_resources.objectstore`).

    A path that does not exist raises FileNotFoundError and a folder without input files
    raises ConfigError (a ValueError): both are configuration mistakes, caught here rather than read as data.
    """
    if isinstance(sources, (str, Path)):
        sources = [sources]
    items: list[str] = []
    for src in sources:
        if is_champ_spec(src):
            items.append(str(src))
            continue
        if objectstore.is_remote(src):
            found = objectstore.expand(str(src), expand_folder)
            if found is None:
                raise FileNotFoundError(errno.ENOENT, f"trace source not found: {src}", str(src))
            if not found:
                raise ConfigError(f"{src} holds no *.json / *.jsonl / *.parquet / *.arrow object "
                                  "(nor a Hugging Face dataset layout)")
            items.extend(found)
            continue
        path = Path(src)
        if path.is_dir():
            files = expand_folder(LocalTree(), str(path))
            if not files:
                raise ConfigError(f"directory {path} holds no *.json / *.jsonl / *.parquet / *.arrow input "
                                  "(nor a Hugging Face dataset layout)")
            items.extend(files)
        elif path.exists() or path.is_symlink():
            items.append(str(path))
        else:
            raise FileNotFoundError(errno.ENOENT, f"trace source not found: {path}", str(path))
    return items


def item_path(item: str | Path) -> Path:
    """The file an item stands for (the packaged CHAMP file for the CHAMP spec)."""
    return champ_path() if is_champ_spec(item) else Path(item)


def file_sha256(item: str | Path) -> str:
    """sha256 of the bytes of an item's file or object (the packaged CHAMP file for the CHAMP
    spec), streamed. Raises OSError when it cannot be read (:func:`read_one` quarantines it)."""
    if objectstore.is_remote(item):
        return objectstore.sha256(str(item))
    return sha256_file(item_path(item))
