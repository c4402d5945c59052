"""Hugging Face dataset layouts on disk (or in an object store): which files a folder's rows are
in, and which dataset a file belongs to. Nothing here downloads: a hub dataset is fetched
beforehand with the hub's own client (README, "Hugging Face datasets").

Layouts recognised in a source folder, in this order:

* ``datasets.DatasetDict.save_to_disk``: ``dataset_dict.json`` lists the splits, each a folder of
  the next layout; every split is read, in the order listed.
* ``datasets.Dataset.save_to_disk``: ``state.json`` lists the ``data-NNNNN-of-NNNNN.arrow`` shards
  (Arrow IPC streams); they are read in that order.
* the hub's repository layout: a ``data/`` folder of shards (``data/train-00000-of-00002.parquet``,
  JSONL or JSON too), read in name order, subfolders included. Files of other configs (OpenThoughts'
  ``metadata/``) are not read: point a source at such a folder to read it.
* any other folder: its own ``*.json`` / ``*.jsonl`` / ``*.parquet`` / ``*.arrow`` files, sorted.

The dataset a file belongs to names its rows' teacher when the rows do not (ShareGPT, Alpaca):
the folder above ``data/`` (for a shard named after its split), the ``save_to_disk`` folder, or
the hub cache's repository name; else the file's stem.
"""

from __future__ import annotations

import json
import re
from pathlib import Path, PurePath
from typing import Protocol

INPUT_SUFFIXES = (".json", ".jsonl", ".parquet", ".arrow")
# Files a folder may hold that are not traces: ZeroEval's per-folder accuracy table and the
# metadata files that `datasets` and the hub write beside the data.
SKIP_IN_FOLDER = {"summary.json", "dataset_info.json", "dataset_infos.json", "state.json", "dataset_dict.json"}
SPLIT_NAMES = {"train", "test", "validation", "valid", "dev", "eval"}
_ARROW_SHARD = re.compile(r"data-\d+-of-\d+\.arrow$")
# a hub shard is named after its split: train-00000-of-00002.parquet, test.jsonl, ...
_HUB_SHARD = re.compile(r"^(?:train|test|validation|valid|dev|eval)(?:[-_.]|$)")
_HUB_CACHE_REPO = re.compile(r"datasets--(?:[^/]+--)?(?P<name>[^/]+)$")


class Tree(Protocol):
    """The few file-system operations a layout needs (a local folder or an object-store prefix)."""

    def join(self, folder: str, name: str) -> str: ...
    def is_dir(self, path: str) -> bool: ...
    def files(self, folder: str) -> list[str]: ...     # names of the regular files directly inside
    def dirs(self, folder: str) -> list[str]: ...      # names of the folders directly inside
    def read_text(self, path: str) -> str: ...


class LocalTree:
    def join(self, folder: str, name: str) -> str:
        return str(Path(folder) / name)

    def is_dir(self, path: str) -> bool:
        return Path(path).is_dir()

    def files(self, folder: str) -> list[str]:
        return [p.name for p in Path(folder).iterdir() if p.is_file()]

    def dirs(self, folder: str) -> list[str]:
        return [p.name for p in Path(folder).iterdir() if p.is_dir()]

    def read_text(self, path: str) -> str:
        return Path(path).read_text(encoding="utf-8")


def _inputs(names: list[str]) -> list[str]:
    return sorted(n for n in names if n.lower().endswith(INPUT_SUFFIXES) and n not in SKIP_IN_FOLDER
                  and not n.startswith("."))


def _json_field(tree: Tree, path: str, field: str):
    try:
        return json.loads(tree.read_text(path)).get(field)
    except (OSError, ValueError, AttributeError):
        return None


def expand_folder(tree: Tree, folder: str) -> list[str]:
    """The files holding a folder's rows, in reading order (see the module docstring); empty
    when it holds none."""
    names = set(tree.files(folder))
    if "dataset_dict.json" in names:
        splits = _json_field(tree, tree.join(folder, "dataset_dict.json"), "splits")
        if not isinstance(splits, list) or not all(isinstance(s, str) for s in splits):
            splits = sorted(tree.dirs(folder))
        return [f for s in splits if tree.is_dir(tree.join(folder, s)) for f in expand_folder(tree, tree.join(folder, s))]
    if "state.json" in names:
        listed = _json_field(tree, tree.join(folder, "state.json"), "_data_files")
        shards = [d.get("filename") for d in listed if isinstance(d, dict)] if isinstance(listed, list) else []
        shards = [s for s in shards if isinstance(s, str) and s in names] or sorted(
            n for n in names if n.endswith(".arrow"))
        return [tree.join(folder, s) for s in shards]
    top = _inputs(list(names))
    if not top and "data" in tree.dirs(folder):
        return _walk(tree, tree.join(folder, "data"))
    return [tree.join(folder, n) for n in top]


def _walk(tree: Tree, folder: str, depth: int = 0) -> list[str]:
    out = [tree.join(folder, n) for n in _inputs(tree.files(folder))]
    if depth < 3:
        for d in sorted(tree.dirs(folder)):
            if not d.startswith("."):
                out += _walk(tree, tree.join(folder, d), depth + 1)
    return out


def dataset_root(path: PurePath, local: bool) -> PurePath | None:
    """The folder of the dataset a file belongs to, or None for a file on its own. ``local``:
    the marker files beside it can be checked (``dataset_dict.json``)."""
    parents = list(path.parents)[:4]
    if _ARROW_SHARD.search(path.name):
        root = path.parent
        above = root.parent
        if (local and Path(above, "dataset_dict.json").is_file()) or (not local and root.name in SPLIT_NAMES):
            root = above
        return _named(root)
    if _HUB_SHARD.match(path.name):  # (a plain file that happens to sit in a `data` folder keeps its own name)
        for anc in parents[:3]:
            if anc.name == "data" and anc.parent != anc:
                return _named(anc.parent)
    return None


def _named(root: PurePath) -> PurePath:
    # the hub cache: .../datasets--org--name/snapshots/<revision>/
    if root.parent.name == "snapshots" and _HUB_CACHE_REPO.search(root.parent.parent.name):
        return root.parent.parent
    return root


def dataset_name(path: PurePath, local: bool) -> str:
    """The name of the dataset a file belongs to (its folder's name, the hub cache's repository
    name), else the file's stem: the teacher of rows that do not name one."""
    root = dataset_root(path, local)
    if root is None or not root.name:
        return path.stem
    m = _HUB_CACHE_REPO.search(root.name)
    return m.group("name") if m else root.name
