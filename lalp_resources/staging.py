"""Where scoring workers put their results: straight into DuckDB, or into per-partition Parquet
that one serialized step loads into DuckDB.

DuckDB allows one writing process. On a laptop one scoring run at a time writes the warehouse
directly, chunk by chunk (`DuckDBSink`). On a cluster many scoring pods run at once, so workers
never open the warehouse for writing: each chunk lands as Parquet under a shared staging folder
(`ParquetSink`), and `load_staged` (called by `response_scores`, which runs in the `warehouse`
pool with limit 1) moves them into DuckDB in one transaction per load.

Staging layout, one folder per scoring run, Hive-style per teacher partition:

    <staging>/<run_id>/_STARTED.json                       teachers, started_at
    <staging>/<run_id>/step_scores/teacher=<t>/chunk-00001.parquet
    <staging>/<run_id>/galp_scores/teacher=<t>/chunk-00001.parquet
    <staging>/<run_id>/score_cache/chunk-00001.parquet
    <staging>/<run_id>/_COMPLETE.json                      written last: teachers, row counts

Files are written under a temporary name and renamed, so a killed worker never leaves a torn
file. A run folder without `_COMPLETE.json` is never loaded as scores (its worker may still be
running, or died), but its cache rows are visible to later workers (`StagedCache`), so a killed
run resumes without re-scoring. A folder is removed once every teacher it covers has been loaded from
it or from a newer run, and its worker is done (complete, or its Dagster run is over); its cache
rows are loaded first. The `staged_loads` table records per teacher which run was loaded last, so
an older run's scores never replace a newer one's.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import urllib.parse
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import polars as pl

from lalp_resources.warehouse import Warehouse, cached_scores, insert, query, transaction

STARTED, COMPLETE = "_STARTED.json", "_COMPLETE.json"
PER_TEACHER_TABLES = ("step_scores", "galp_scores")
CACHE_TABLE = "score_cache"


def _now() -> str:
    return datetime.now(timezone.utc).isoformat()


def _teacher_dir(name: str) -> str:
    # teacher names are free text (e.g. "org/model"); keep one path segment per teacher
    return "teacher=" + urllib.parse.quote(name, safe="")


def _write_atomic(df: pl.DataFrame, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    df.write_parquet(tmp)
    os.replace(tmp, path)


def _write_json_atomic(obj: dict, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


class DuckDBSink:
    """Local mode: each chunk is one transaction in the warehouse (cache and scores together)."""

    def __init__(self, warehouse: Warehouse, teachers: list[str]):
        self.wh, self.teachers = warehouse, list(teachers)

    def begin(self) -> None:
        # Start from a clean slate for these teachers; chunks are committed as they finish.
        with self.wh.connect() as con:
            for table in PER_TEACHER_TABLES:
                con.execute(f"DELETE FROM {table} WHERE teacher IN (SELECT unnest(?))", [self.teachers])

    def write(self, frames: dict[str, pl.DataFrame]) -> None:
        with self.wh.connect() as con, transaction(con):
            for table, df in frames.items():
                insert(con, table, df, mode="replace")

    def finish(self) -> None:
        pass

    def written(self, table: str) -> pl.DataFrame:
        with self.wh.connect(read_only=True) as con:
            return query(con, f"SELECT * FROM {table} WHERE teacher IN (SELECT unnest(?))", [self.teachers])

    def describe(self) -> str:
        return f"duckdb:{self.wh.path}"


class ParquetSink:
    """Cluster mode: chunks become Parquet files in this run's staging folder; no DuckDB writes."""

    def __init__(self, root: str | Path, run_id: str, teachers: list[str]):
        self.dir = Path(root) / run_id
        self.run_id, self.teachers = run_id, list(teachers)
        self.n_chunks = 0
        self.rows: dict[str, int] = {t: 0 for t in (*PER_TEACHER_TABLES, CACHE_TABLE)}

    def begin(self) -> None:
        if self.dir.exists():
            # The same run id again (a step retry): its scores are redone, its cache rows are kept
            # (they are what lets the retry skip finished windows) and chunk numbers continue.
            (self.dir / COMPLETE).unlink(missing_ok=True)
            for table in PER_TEACHER_TABLES:
                shutil.rmtree(self.dir / table, ignore_errors=True)
            done = [int(f.stem.split("-")[1]) for f in (self.dir / CACHE_TABLE).glob("chunk-*.parquet")]
            self.n_chunks = max(done, default=0)
        self.dir.mkdir(parents=True, exist_ok=True)
        _write_json_atomic({"run_id": self.run_id, "teachers": self.teachers, "started_at": _now()}, self.dir / STARTED)

    def write(self, frames: dict[str, pl.DataFrame]) -> None:
        if not (self.dir / STARTED).is_file():
            raise RuntimeError(
                f"staging folder {self.dir} was removed while run {self.run_id} was writing to it; "
                "re-run this partition (the loader only removes folders of finished runs)"
            )
        self.n_chunks += 1
        name = f"chunk-{self.n_chunks:05d}.parquet"
        for table, df in frames.items():
            if df.height == 0:
                continue
            self.rows[table] += df.height
            if table == CACHE_TABLE:
                _write_atomic(df, self.dir / table / name)
                continue
            for (teacher,), part in df.partition_by("teacher", as_dict=True).items():
                _write_atomic(part, self.dir / table / _teacher_dir(teacher) / name)

    def finish(self) -> None:
        _write_json_atomic(
            {"run_id": self.run_id, "teachers": self.teachers, "finished_at": _now(), "rows": self.rows},
            self.dir / COMPLETE,
        )

    def written(self, table: str) -> pl.DataFrame:
        return _read(sorted((self.dir / table).glob("teacher=*/*.parquet")))

    def describe(self) -> str:
        return f"parquet:{self.dir}"


@dataclass
class StagedRun:
    dir: Path
    run_id: str
    teachers: list[str]
    started_at: str
    finished_at: str | None  # None: still running, or died

    @property
    def complete(self) -> bool:
        return self.finished_at is not None


def staged_runs(root: str | Path) -> list[StagedRun]:
    """Every run folder under the staging root, oldest first."""
    out = []
    root = Path(root)
    if not root.is_dir():
        return out
    for d in root.iterdir():
        if not (d / STARTED).is_file():
            continue
        started = json.loads((d / STARTED).read_text())
        done = json.loads((d / COMPLETE).read_text()) if (d / COMPLETE).is_file() else None
        out.append(StagedRun(d, started["run_id"], started["teachers"], started["started_at"],
                             done["finished_at"] if done else None))
    return sorted(out, key=lambda r: r.started_at)


def _read(files: list[Path]) -> pl.DataFrame:
    return pl.concat([pl.read_parquet(f) for f in files], how="vertical_relaxed") if files else pl.DataFrame()


@dataclass
class LoadReport:
    loaded: dict[str, str] = field(default_factory=dict)    # teacher -> run_id whose scores were loaded
    rows: dict[str, int] = field(default_factory=dict)      # table -> rows inserted
    removed: list[str] = field(default_factory=list)        # run folders removed after the load
    waiting: list[str] = field(default_factory=list)        # incomplete run folders left in place
    seconds: float = 0.0

    def describe(self) -> str:
        if not self.loaded:
            return "no staged scores to load for these teachers"
        return (f"loaded {self.rows} from staged runs {sorted(set(self.loaded.values()))} for {sorted(self.loaded)} "
                f"in {self.seconds:.1f}s; removed {len(self.removed)} staged folder(s), "
                f"{len(self.waiting)} incomplete left in place")


def load_staged(warehouse: Warehouse, root: str | Path, teachers: list[str],
                run_finished: Callable[[str], bool] = lambda run_id: False) -> LoadReport:
    """Load the newest complete staged scores of `teachers` into DuckDB, in one transaction.

    For each teacher, the newest complete run that covers it replaces its rows in `step_scores`
    and `galp_scores`, unless a run at least as new was loaded before (the `staged_loads` table
    records, per teacher, the run last loaded; it is written in the same transaction). The cache
    rows of that run and of every folder being removed are upserted. A folder is removed once
    every teacher it covers has been loaded from it or from a newer run, and only if it is
    complete or `run_finished(run_id)` says its run is over (a live worker's folder is never
    touched). Callers serialize loads (the `warehouse` pool); the DuckDB lock-retry is the
    second guard."""
    t0 = time.perf_counter()
    rep = LoadReport()
    runs = staged_runs(root)
    if not runs:
        return rep
    newest: dict[str, StagedRun] = {}
    for r in runs:  # oldest first, so the newest complete one wins
        if r.complete:
            for t in r.teachers:
                newest[t] = r
    with warehouse.connect() as con:
        last = {t: s for t, s in con.execute("SELECT teacher, started_at FROM staged_loads").fetchall()}
        chosen = {t: r for t, r in newest.items() if t in teachers and r.started_at > last.get(t, "")}
        after = {**last, **{t: r.started_at for t, r in chosen.items()}}
        removable = [
            r for r in runs
            if (r.complete or run_finished(r.run_id)) and all(after.get(t, "") >= r.started_at for t in r.teachers)
        ]
        rep.waiting = [r.run_id for r in runs if not r.complete and r not in removable]
        if not chosen and not removable:
            return rep
        frames = {}
        for table in PER_TEACHER_TABLES:
            files = [f for t, r in chosen.items() for f in sorted((r.dir / table / _teacher_dir(t)).glob("*.parquet"))]
            frames[table] = _read(files)
        with_cache = {r.dir: r for r in [*removable, *chosen.values()]}.values()
        frames[CACHE_TABLE] = _read([f for r in with_cache for f in sorted((r.dir / CACHE_TABLE).glob("*.parquet"))])
        now = datetime.now(timezone.utc).replace(tzinfo=None)
        record = pl.DataFrame(
            [{"teacher": t, "run_id": r.run_id, "started_at": r.started_at, "loaded_at": now} for t, r in chosen.items()],
            schema={"teacher": pl.Utf8, "run_id": pl.Utf8, "started_at": pl.Utf8, "loaded_at": pl.Datetime("us")},
        )
        with transaction(con):
            insert(con, CACHE_TABLE, frames[CACHE_TABLE], mode="replace")
            if chosen:
                for table in PER_TEACHER_TABLES:
                    con.execute(f"DELETE FROM {table} WHERE teacher IN (SELECT unnest(?))", [sorted(chosen)])
                    insert(con, table, frames[table], mode="replace")
                insert(con, "staged_loads", record, mode="replace")
    # only after the commit: a failed load leaves the staging as it was
    rep.loaded = {t: r.run_id for t, r in sorted(chosen.items())}
    rep.rows = {t: df.height for t, df in frames.items()}
    for r in removable:
        shutil.rmtree(r.dir, ignore_errors=True)
        rep.removed.append(r.run_id)
    rep.seconds = time.perf_counter() - t0
    return rep


class StagedCache:
    """The engine's score cache in cluster mode: the warehouse's `score_cache` (read-only) plus
    the cache rows other workers have staged but not yet loaded (e.g. a killed run's). Staged
    files never change once renamed into place, so each is read once; one that the loader removes
    meanwhile is skipped (its rows are in DuckDB by then)."""

    def __init__(self, warehouse: Warehouse, root: str | Path):
        self.warehouse, self.root = warehouse, Path(root)
        self._read_files: set[Path] = set()
        self._staged: dict[str, tuple[float, int]] = {}

    def _read_new_files(self) -> None:
        for f in self.root.glob(f"*/{CACHE_TABLE}/*.parquet"):
            if f in self._read_files:
                continue
            try:
                df = pl.read_parquet(f, columns=["key", "sum_logprob", "n_tokens"])
            except FileNotFoundError:
                continue
            self._read_files.add(f)
            self._staged.update({k: (s, n) for k, s, n in df.iter_rows()})

    def lookup(self, keys: list[str]) -> dict[str, tuple[float, int]]:
        if not keys:
            return {}
        self._read_new_files()
        found = {k: self._staged[k] for k in keys if k in self._staged}
        found.update(cached_scores(self.warehouse, keys))
        return found
