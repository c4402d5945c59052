"""The format registry (name -> reader), format detection and source expansion.

A reader is ``reader(path, ctx) -> IngestResult``: one file in, every row accepted or
quarantined out; see :mod:`lalp_resources.adapters.common`.
"""

from __future__ import annotations

import errno
import json
from pathlib import Path
from typing import Callable, Iterable

from lalp_resources.adapters.canonical import PARQUET_MAGIC, read_canonical
from lalp_resources.adapters.champ import champ_path, is_champ_spec, read_champ
from lalp_resources.adapters.common import ConfigError, IngestResult, ReadContext, sha256_file, type_name
from lalp_resources.adapters.messages import read_messages
from lalp_resources.adapters.zeroeval import read_zeroeval

Reader = Callable[[Path, ReadContext], IngestResult]

READERS: dict[str, Reader] = {
    "canonical": read_canonical,
    "messages": read_messages,
    "zeroeval": read_zeroeval,
    "champ": read_champ,
}
FORMATS = tuple(READERS)

# Files a folder may hold; ZeroEval's per-folder accuracy table is not a trace file.
INPUT_SUFFIXES = (".json", ".jsonl", ".parquet")
SKIP_IN_FOLDER = {"summary.json"}
_SNIFF_BYTES = 1 << 20  # the first MiB tells JSONL kinds apart
_SNIFF_LINES = 200


def _sniff_jsonl(head: bytes) -> str:
    """'messages' if the first parseable object has a 'messages' key, else 'canonical'."""
    for n, line in enumerate(head.split(b"\n")):
        if n >= _SNIFF_LINES:
            break
        try:
            obj = json.loads(line.decode("utf-8-sig"))
        except Exception:  # noqa: BLE001
            continue
        if isinstance(obj, dict):
            return "messages" if "messages" in obj else "canonical"
    return "canonical"


def _head(path: Path, n: int = _SNIFF_BYTES) -> bytes:
    with open(path, "rb") as f:
        return f.read(n)


def detect_format(source: str | Path) -> str:
    """The format of one file (or ``"champ"`` for the CHAMP spec string).

    ``.parquet`` -> canonical; ``.jsonl`` -> messages if rows have ``messages`` else canonical;
    ``.json`` -> zeroeval (a JSON list, even a broken one: its reader quarantines it whole),
    champ (an object with ``problems``), or JSONL content sniffed as above; any other
    extension -> canonical when the file starts with the Parquet magic number. Raises
    ValueError when it cannot tell and OSError when the file cannot be read.
    """
    if is_champ_spec(source):
        return "champ"
    path = Path(source)
    suffix = path.suffix.lower()
    head = _head(path)
    if suffix == ".parquet":
        return "canonical"
    if suffix == ".jsonl":
        return _sniff_jsonl(head)
    if suffix != ".json":
        if head[:4] == PARQUET_MAGIC:
            return "canonical"
        raise ValueError(f"cannot detect the format of {path}: unknown extension {suffix!r}; pass format=")
    start = head.removeprefix(b"\xef\xbb\xbf").lstrip()
    if start.startswith(b"["):
        return "zeroeval"
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
    if isinstance(obj, dict) and ("messages" in obj or "response" in obj):
        return _sniff_jsonl(head)  # a one-line JSONL file
    raise ValueError(f"cannot detect the format of {path}: a JSON {type_name(obj)} of no known layout; pass format=")


def expand_sources(sources: Iterable[str | Path] | str | Path) -> list[str]:
    """Source specs -> the items to read, in order: a file as given; a folder as its
    ``*.json`` / ``*.jsonl`` / ``*.parquet`` files, sorted (``summary.json`` skipped); the
    CHAMP spec (``"champ"`` / ``"champ:v0"``) as is.

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
        path = Path(src)
        if path.is_dir():
            files = sorted(
                p for p in path.iterdir()
                if p.is_file() and p.suffix.lower() in INPUT_SUFFIXES and p.name not in SKIP_IN_FOLDER
            )
            if not files:
                raise ConfigError(f"directory {path} holds no *.json / *.jsonl / *.parquet input")
            items.extend(str(p) for p in files)
        elif path.exists() or path.is_symlink():
            items.append(str(path))
        else:
            raise FileNotFoundError(errno.ENOENT, f"trace source not found: {path}", str(path))
    return items


def item_path(item: str | Path) -> Path:
    """The file an item stands for (the packaged CHAMP file for the CHAMP spec)."""
    return champ_path() if is_champ_spec(item) else Path(item)


def file_sha256(item: str | Path) -> str:
    """sha256 of the bytes of an item's file (the packaged CHAMP file for the CHAMP spec),
    streamed. Raises OSError when the file cannot be read (:func:`read_one` quarantines it)."""
    return sha256_file(item_path(item))
