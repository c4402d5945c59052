"""The warehouse: one table per asset, plus the score cache and the quarantine, on one of two backends
that run the same SQL.

Which backend is chosen by the warehouse string (`LALP_WAREHOUSE`, `Warehouse(path, ...)`):

  * a plain path, e.g. `dagster_home/lalp.duckdb`: **one DuckDB file** (the default, for a laptop).
    DuckDB allows one writing process, so `connect` waits while another process holds the file's
    lock and then fails with a message that says what to do (`WarehouseBusy`).
  * `ducklake:postgres:<libpq dsn>`, e.g.
    `ducklake:postgres:dbname=lake host=pg.lalp port=5432 user=lalp`: **DuckLake** with its catalog in
    PostgreSQL and its data as Parquet files under a shared data path, for a cluster: many processes
    read and commit at once. The data path is `Warehouse(..., data_path=...)` (`LALP_LAKE_DATA_PATH`),
    or a `data_path=<folder>` key inside the DSN (`ducklake:postgres:dbname=lake host=pg data_path=/data/lake/`);
    it is needed when the catalog is created and is read from the catalog afterwards. A URI DSN
    (`postgresql://user@host/db`) takes it as a `?data_path=` query parameter. A password belongs in
    the DSN's `password=` key or, better, in `PGPASSWORD`/`~/.pgpass`, which libpq reads.
  * `ducklake:<file>.ducklake`: DuckLake with its catalog in a local DuckDB file (data path default
    `<file>.ducklake.files/`): one writing process, like the plain file; handy for tests.

DuckLake has no PRIMARY KEY / UNIQUE constraints, no INSERT OR REPLACE / ON CONFLICT and no indexes,
so the same SQL serves both: the keys declared in `SCHEMA` are kept as metadata (`KEYS`), an upsert
(`insert(..., mode="replace")`) is DELETE-by-key + INSERT in one transaction, `mode="ignore"` inserts
only the keys not yet present, and a plain insert of a key already present fails on both backends
(`duckdb.ConstraintException`). The DuckDB file keeps its PRIMARY KEYs as a second guard. `score_cache`
rows are immutable (a key is a hash of everything that determines its score), so its upserts skip keys
already present instead of rewriting them.

Concurrency on DuckLake is optimistic: a transaction that collides with another's commit fails at
COMMIT. DuckLake detects conflicts per table (two transactions that both delete from a table, or one
deletes while the other inserts, collide) but not two inserts of the same new key; so every keyed or
replacing write also bumps a one-row "fence" table (`lalp_fence.<table>`), which turns that case
into a conflict too and makes upserts and partition replacements exactly-once. A conflicted
transaction is retried with jittered backoff by `run_transaction(con, fn)` (and by `insert`,
`replace_teachers` and `replace_all` when they own the transaction), a bounded number of times, then
`WarehouseConflict` says what happened. A `with transaction(con):` block cannot be re-run: on
conflict it raises `WarehouseConflict`; use `run_transaction` where other writers may be active.

`connect(read_only=True)` and `read()` never create anything: on a warehouse that does not exist
they raise `WarehouseMissing` (a FileNotFoundError naming LALP_WAREHOUSE); a writable `connect()`
creates the warehouse and its tables. On DuckLake-on-PostgreSQL each process keeps one attached
instance and hands out cursors (opening costs ~0.3 s once, then milliseconds).

Frames go in and out as Polars via Arrow. Extensions are loaded from the `duckdb-extension-ducklake`,
`duckdb-extension-postgres-scanner` and `duckdb-extension-httpfs` wheels (pinned with duckdb); nothing is
downloaded at run time. A DuckLake data path may be an object-store prefix (`LALP_LAKE_DATA_PATH=s3://bucket/lake/`):
httpfs reads and writes it, with an S3 secret made from the standard AWS variables when the catalog is attached.
"""

from __future__ import annotations

import contextlib
import errno
import importlib.util
import logging
import os
import random
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence, TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import duckdb
import polars as pl

log = logging.getLogger("lalp.warehouse")

T = TypeVar("T")

PROVENANCE = "source_uri VARCHAR, source_sha256 VARCHAR, ingest_run_id VARCHAR"
SCORE_CONFIG = (
    "student VARCHAR, segmenter VARCHAR, segmenter_version VARCHAR, window_spec VARCHAR, "
    "template VARCHAR, dtype VARCHAR"
)

# Columns of migration 5 (the diagnostics, lalp_resources/diagnostics.py), beside today's
HEAD_SUMS = (("head1_logprob", "DOUBLE"), ("head2_logprob", "DOUBLE"))
RESPONSE_DIAGNOSTIC_COLUMNS = (
    ("weakest_step", "INTEGER"), ("weakest_char_start", "INTEGER"), ("weakest_char_end", "INTEGER"),
    ("weakest_score", "DOUBLE"), ("weakest_gap", "DOUBLE"), ("drop1", "DOUBLE"), ("drop2", "DOUBLE"),
    ("casl_m", "DOUBLE"), ("casl_m_first", "DOUBLE"), ("casl_m_non", "DOUBLE"), ("casl_f", "DOUBLE"),
)
RANKING_DIAGNOSTIC_COLUMNS = (
    ("length_rho", "DOUBLE"), ("drop1_mean", "DOUBLE"), ("drop1_rank", "INTEGER"), ("drop2_mean", "DOUBLE"),
    ("drop2_rank", "INTEGER"), ("casl_mean", "DOUBLE"), ("casl_rank", "INTEGER"),
    ("n_responses_without_heads", "INTEGER"), ("same_family", "VARCHAR"),
)
RESPONSE_DIAGNOSTICS = ", ".join(f"{c} {t}" for c, t in RESPONSE_DIAGNOSTIC_COLUMNS)
RANKING_DIAGNOSTICS = ", ".join(f"{c} {t}" for c, t in RANKING_DIAGNOSTIC_COLUMNS)

SCHEMA: dict[str, str] = {
    "raw_teacher_traces": """
        response_id VARCHAR PRIMARY KEY, prompt_id VARCHAR NOT NULL, teacher VARCHAR NOT NULL,
        prompt VARCHAR, response VARCHAR, reference_answer VARCHAR, final_answer VARCHAR,
        is_correct BOOLEAN, verify_reason VARCHAR, source_uri VARCHAR, source_sha256 VARCHAR,
        source_row BIGINT, format VARCHAR, ingest_run_id VARCHAR, ingested_at TIMESTAMP""",
    # stage: 'read' (a file's rows; superseded when the file changes), 'assemble' (duplicates
    # across files, per teacher), 'steps' (over the token caps, per teacher)
    "quarantine": """
        source_uri VARCHAR, source_sha256 VARCHAR, source_row BIGINT, format VARCHAR,
        reason VARCHAR, detail VARCHAR, raw_excerpt VARCHAR, prompt_id VARCHAR, teacher VARCHAR,
        ingest_run_id VARCHAR, quarantined_at TIMESTAMP, stage VARCHAR""",
    # the ingest ledger: one row per file content (and per size/mtime seen for it), so a file is
    # parsed once per content hash whatever the number of partitions or runs
    "source_files": """
        item VARCHAR, source_uri VARCHAR, source_sha256 VARCHAR, size BIGINT, mtime_ns BIGINT,
        format VARCHAR, n_read BIGINT, n_accepted BIGINT, n_quarantined BIGINT, teachers VARCHAR,
        read_run_id VARCHAR, read_at TIMESTAMP, etag VARCHAR""",
    # the parsed, accepted rows of each file content, every teacher; partitions take theirs
    "source_traces": """
        response_id VARCHAR, prompt_id VARCHAR, teacher VARCHAR, prompt VARCHAR, response VARCHAR,
        reference_answer VARCHAR, final_answer VARCHAR, is_correct BOOLEAN, verify_reason VARCHAR,
        source_uri VARCHAR, source_sha256 VARCHAR, source_row BIGINT, format VARCHAR, read_run_id VARCHAR""",
    "ingest_runs": """
        ingest_run_id VARCHAR PRIMARY KEY, sources VARCHAR, n_read BIGINT, n_accepted BIGINT,
        n_quarantined BIGINT, by_reason VARCHAR, ingested_at TIMESTAMP""",
    "reasoning_steps": f"""
        response_id VARCHAR, prompt_id VARCHAR, teacher VARCHAR, step_index INTEGER,
        char_start INTEGER, char_end INTEGER, text VARCHAR, segmenter VARCHAR,
        segmenter_version VARCHAR, segment_note VARCHAR, {PROVENANCE}, steps_run_id VARCHAR,
        PRIMARY KEY (response_id, step_index)""",
    "score_cache": """
        key VARCHAR PRIMARY KEY, sum_logprob DOUBLE, n_tokens INTEGER, namespace VARCHAR,
        created_run_id VARCHAR, created_at TIMESTAMP, head1_logprob DOUBLE, head2_logprob DOUBLE""",
    "step_scores": f"""
        response_id VARCHAR, prompt_id VARCHAR, teacher VARCHAR, step_index INTEGER,
        n_tokens INTEGER, sum_logprob DOUBLE, mean_logprob DOUBLE, cache_hit BOOLEAN,
        {SCORE_CONFIG}, {PROVENANCE}, score_run_id VARCHAR, head1_logprob DOUBLE, head2_logprob DOUBLE,
        PRIMARY KEY (response_id, step_index)""",
    "galp_scores": """
        response_id VARCHAR PRIMARY KEY, teacher VARCHAR, galp DOUBLE, galp_tokens INTEGER,
        score_run_id VARCHAR""",
    "response_scores": f"""
        response_id VARCHAR PRIMARY KEY, prompt_id VARCHAR, teacher VARCHAR, n_steps INTEGER,
        lalp DOUBLE, galp DOUBLE, galp_tokens INTEGER, is_correct BOOLEAN,
        {SCORE_CONFIG}, {PROVENANCE}, score_run_id VARCHAR, {RESPONSE_DIAGNOSTICS}""",
    "teacher_rankings": f"""
        teacher VARCHAR PRIMARY KEY, lalp_rank INTEGER, galp_rank INTEGER, n_shared_prompts INTEGER,
        n_responses INTEGER, lalp_mean DOUBLE, lalp_ci_low DOUBLE, lalp_ci_high DOUBLE,
        galp_mean DOUBLE, galp_ci_low DOUBLE, galp_ci_high DOUBLE, accuracy DOUBLE,
        rank_run_id VARCHAR, n_conflicting_prompts INTEGER, {RANKING_DIAGNOSTICS}""",
    "selection_decisions": """
        prompt_id VARCHAR, response_id VARCHAR, teacher VARCHAR, lalp DOUBLE, is_correct BOOLEAN,
        eligible BOOLEAN, chosen BOOLEAN, reason VARCHAR, select_run_id VARCHAR,
        PRIMARY KEY (prompt_id, response_id)""",
    "curated_sft_dataset": f"""
        prompt_id VARCHAR PRIMARY KEY, response_id VARCHAR, teacher VARCHAR, lalp DOUBLE,
        galp DOUBLE, is_correct BOOLEAN, prompt VARCHAR, response VARCHAR, messages VARCHAR,
        n_candidates INTEGER, n_eligible INTEGER, reason VARCHAR, {PROVENANCE},
        score_run_id VARCHAR, select_run_id VARCHAR""",
}



@dataclass(frozen=True)
class Migration:
    """One step up the schema: the columns it adds to tables that exist (a table that does not
    exist yet is created at the current schema). Applied in order, in one transaction."""

    version: int
    note: str
    add_columns: tuple[tuple[str, str, str], ...] = ()  # (table, column, type)


# Version 1 is the schema of the releases before versions were recorded (a warehouse with tables
# and no `lalp_schema` table): SCHEMA without the columns the migrations below add. A release that
# changes SCHEMA adds a migration here and bumps SCHEMA_VERSION; the lineage view is recreated by
# every migration, so a new view definition needs a migration too.
MIGRATIONS: tuple[Migration, ...] = (
    Migration(2, "quarantine.stage: the stage that quarantined a row", (("quarantine", "stage", "VARCHAR"),)),
    Migration(3, "teacher_rankings.n_conflicting_prompts: prompt ids left out of the comparison",
              (("teacher_rankings", "n_conflicting_prompts", "INTEGER"),)),
    Migration(4, "source_files.etag: an object-store source's version (a file has mtime_ns)",
              (("source_files", "etag", "VARCHAR"),)),
    # Cache rows and step scores of an earlier release keep NULL head sums: their LALP/GALP stand,
    # DROP/CASL leave those responses out and count them (teacher_rankings.n_responses_without_heads)
    Migration(5, "diagnostics: head sums in score_cache/step_scores, the weakest step and DROP/CASL inputs in "
                 "response_scores, length bias, DROP/CASL and same-family in teacher_rankings",
              tuple((t, c, k) for t in ("score_cache", "step_scores") for c, k in HEAD_SUMS)
              + tuple(("response_scores", c, k) for c, k in RESPONSE_DIAGNOSTIC_COLUMNS)
              + tuple(("teacher_rankings", c, k) for c, k in RANKING_DIAGNOSTIC_COLUMNS)),
)
SCHEMA_VERSION = MIGRATIONS[-1].version
# the schema's history: one row per version reached (created, found, migrated), newest last
VERSION_TABLE = "lalp_schema"
VERSION_COLUMNS = "version INTEGER, note VARCHAR, applied_at TIMESTAMP"

# Tables whose rows never change once written (the key determines the row): upserts skip
# keys already present.
IMMUTABLE_ROWS = frozenset({"score_cache"})

LAKE_ALIAS = "lake"
FENCE_SCHEMA = "lalp_fence"
CONFLICT_RETRIES = 25          # attempts of one transaction on DuckLake before WarehouseConflict
CONFLICT_MAX_DELAY_S = 2.0

# see Warehouse.config; LALP_DUCKDB_MEMORY
DEFAULT_MEMORY_LIMIT = "1GB"
LOCK_HINTS = ("could not set lock", "conflicting lock", "database is locked")
CONFLICT_HINTS = ("transaction conflict", "write-write conflict", "conflict on tuple", "conflict on update",
                  "could not serialize access", "failed to commit ducklake transaction")


# ----------------------------------------------------------------------------- schema metadata


def _split_top_level(cols: str) -> list[str]:
    out, depth, cur = [], 0, []
    for ch in cols:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        if ch == "," and depth == 0:
            out.append("".join(cur).strip())
            cur = []
        else:
            cur.append(ch)
    if "".join(cur).strip():
        out.append("".join(cur).strip())
    return out


def _parse_schema(cols: str) -> tuple[tuple[str, ...], str]:
    """(declared key columns, the column list without PRIMARY KEY clauses; key columns NOT NULL)."""
    keys: list[str] = []
    plain: list[str] = []
    for item in _split_top_level(" ".join(cols.split())):
        m = re.fullmatch(r"PRIMARY KEY\s*\((.*)\)", item, flags=re.I)
        if m:
            keys += [k.strip() for k in m.group(1).split(",")]
            continue
        if re.search(r"\bPRIMARY KEY\b", item, flags=re.I):
            keys.append(item.split()[0])
            item = re.sub(r"\s*\bPRIMARY KEY\b", "", item, flags=re.I)
        plain.append(item)
    plain = [p if p.split()[0] not in keys or "NOT NULL" in p.upper() else f"{p} NOT NULL" for p in plain]
    return tuple(keys), ", ".join(plain)


KEYS: dict[str, tuple[str, ...]] = {}        # table -> its declared key columns (empty: no key)
LAKE_SCHEMA: dict[str, str] = {}             # SCHEMA without PRIMARY KEY clauses (for DuckLake)
COLUMNS: dict[str, tuple[str, ...]] = {}     # table -> its column names, in order
for _name, _cols in SCHEMA.items():
    KEYS[_name], LAKE_SCHEMA[_name] = _parse_schema(_cols)
    COLUMNS[_name] = tuple(c.split()[0] for c in _split_top_level(LAKE_SCHEMA[_name]))


# ----------------------------------------------------------------------------- errors


class WarehouseBusy(RuntimeError):
    pass


class WarehouseConflict(WarehouseBusy):
    """A DuckLake transaction kept colliding with other writers' commits (or could not be retried)."""


class WarehouseMissing(FileNotFoundError):
    """A read-only open of a warehouse that does not exist (nothing is created)."""


class WarehouseSchemaError(RuntimeError):
    """A warehouse this release cannot migrate (written by a newer release, or lacking columns no
    migration adds). Raised before anything is written: the warehouse is left as it was."""


class WarehouseDamaged(RuntimeError):
    """A DuckDB file that cannot be read (truncated, corrupted, not a DuckDB file). Never overwritten."""


class WarehouseFull(OSError):
    """The warehouse's disk is full: the write in progress was rolled back."""


DAMAGE_HINTS = ("not a valid duckdb database file", "corrupt database file", "could not read enough bytes",
                "does not match stored checksum")
FULL_HINTS = ("no space left on device", "disk quota exceeded")


def is_conflict(e: BaseException) -> bool:
    msg = str(e).lower()
    return isinstance(e, (duckdb.TransactionException, duckdb.Error)) and any(h in msg for h in CONFLICT_HINTS)


# ----------------------------------------------------------------------------- target parsing


@dataclass(frozen=True)
class Target:
    kind: str                 # "duckdb" | "ducklake"
    path: Path | None         # the DuckDB file, or the local DuckLake catalog file
    catalog: str | None       # DuckLake: what follows "ducklake:" in ATTACH ("postgres:<dsn>" or a file)
    data_path: str | None     # DuckLake: where Parquet files go (None: the catalog's / DuckLake's default)

    @property
    def postgres(self) -> bool:
        return bool(self.catalog and self.catalog.startswith("postgres:"))


_DATA_PATH_KV = re.compile(r"(?:^|\s)data_path\s*=\s*('(?:[^'\\]|\\.)*'|\S+)")


def parse_target(target: str | Path, data_path: str | None = None) -> Target:
    """Split a warehouse string into its backend and parts (see the module docstring)."""
    s = str(target)
    if not s.startswith("ducklake:"):
        return Target("duckdb", Path(s), None, None)
    rest = s[len("ducklake:"):]
    if rest.startswith("postgres:"):
        dsn = rest[len("postgres:"):].strip()
        if dsn.startswith(("postgres://", "postgresql://")):
            parts = urlsplit(dsn)
            q = parse_qsl(parts.query, keep_blank_values=True)
            found = [v for k, v in q if k == "data_path"]
            dsn = urlunsplit(parts._replace(query=urlencode([(k, v) for k, v in q if k != "data_path"])))
        else:
            found = [m.group(1) for m in _DATA_PATH_KV.finditer(dsn)]
            found = [f[1:-1].replace("\\'", "'").replace("\\\\", "\\") if f.startswith("'") else f for f in found]
            dsn = " ".join(_DATA_PATH_KV.sub(" ", dsn).split())
        if not dsn:
            raise ValueError(f"warehouse {_redact(s)!r}: `ducklake:postgres:` needs a libpq DSN, e.g. "
                             "'ducklake:postgres:dbname=lake host=127.0.0.1 user=lalp'")
        return Target("ducklake", None, f"postgres:{dsn}", data_path or (found[-1] if found else None))
    if rest.startswith(("sqlite:", "mysql:")):
        raise ValueError(f"warehouse {_redact(s)!r}: only PostgreSQL and local-file DuckLake catalogs are supported")
    if not rest:
        raise ValueError("warehouse 'ducklake:' needs a catalog: 'ducklake:postgres:<dsn>' or 'ducklake:<file>.ducklake'")
    return Target("ducklake", Path(rest), rest, data_path)


def _redact(s: str) -> str:
    s = re.sub(r"(password\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)", r"\1***", s)
    return re.sub(r"(://[^:/@\s]+:)[^@\s]+@", r"\1***@", s)


def _sql_str(s: str) -> str:
    return "'" + s.replace("'", "''") + "'"


def extension_path(name: str) -> Path:
    """The extension shipped in the `duckdb-extension-<name>` wheel for this duckdb version."""
    pkg = {"ducklake": "duckdb_extension_ducklake", "postgres_scanner": "duckdb_extension_postgres_scanner",
           "httpfs": "duckdb_extension_httpfs"}[name]
    spec = importlib.util.find_spec(pkg)
    wheel = f"duckdb-extension-{name.replace('_', '-')}=={duckdb.__version__}"
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"DuckLake needs the {name} extension here: pip install '{wheel}' (it is in pyproject.toml)")
    f = Path(list(spec.submodule_search_locations)[0]) / "extensions" / f"v{duckdb.__version__}" / f"{name}.duckdb_extension"
    if not f.is_file():
        raise RuntimeError(f"{f} is missing: the {name} extension wheel does not match duckdb {duckdb.__version__}; "
                           f"pip install '{wheel}'")
    return f


# ----------------------------------------------------------------------------- the warehouse

_BASES: dict[tuple, duckdb.DuckDBPyConnection] = {}   # attached DuckLake-on-PostgreSQL instances
_BASES_LOCK = threading.Lock()


class Warehouse:
    """`Warehouse(path, lock_timeout_s, data_path=None)`: `path` is the warehouse string (module
    docstring); `data_path` the DuckLake data folder (overrides one given in the string)."""

    def __init__(self, path: str | Path, lock_timeout_s: float = 120.0, data_path: str | None = None,
                 memory_limit: str = DEFAULT_MEMORY_LIMIT):
        self.target = parse_target(path, data_path)
        self.lock_timeout_s = lock_timeout_s
        # DuckDB's buffer pool (and the spill point of big joins and inserts) per connection;
        # DuckDB's own default is 80% of the machine, which a stage then holds on top of Python
        self.config = {"memory_limit": memory_limit} if memory_limit else {}
        self.spec = str(path)
        # a Path for the DuckDB file (as before); the display string (password hidden) for DuckLake
        self.path: Path | str = self.target.path if self.target.kind == "duckdb" else _redact(self.spec)

    @property
    def is_lake(self) -> bool:
        return self.target.kind == "ducklake"

    def describe(self) -> str:
        t = self.target
        if not self.is_lake:
            return f"duckdb:{t.path}"
        return f"ducklake:{_redact(t.catalog or '')}" + (f" (data {t.data_path})" if t.data_path else "")

    def __repr__(self) -> str:
        return f"Warehouse({self.describe()!r})"

    def exists(self) -> bool:
        """Whether the warehouse has been created (cheap for files; opens the catalog for PostgreSQL)."""
        t = self.target
        if t.path is not None:
            return t.path.exists()
        try:
            with self.connect(read_only=True):
                return True
        except WarehouseMissing:
            return False

    @contextlib.contextmanager
    def connect(self, read_only: bool = False) -> Iterator[duckdb.DuckDBPyConnection]:
        """A DuckDB connection where the warehouse tables are addressable by their plain names.
        Read-only on a warehouse that does not exist raises `WarehouseMissing` (a FileNotFoundError)
        and creates nothing; a writable open creates it and its tables."""
        t = self.target
        if read_only and t.path is not None and not t.path.exists():
            raise WarehouseMissing(
                f"warehouse {t.path} does not exist; check LALP_WAREHOUSE (and that the pipeline has ingested "
                f"at least once)" + (" -- a DuckLake catalog file" if self.is_lake else ""))
        if not read_only and t.path is not None:
            t.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            con = self._open_waiting(read_only)
        except (duckdb.Error, OSError) as e:
            raise self.explain(e) from e
        try:
            if not read_only:
                ensure_schema(con, self.describe())
            yield con
        except (duckdb.Error, OSError) as e:
            err = self.explain(e)
            if err is e:
                raise
            raise err from e
        finally:
            try:
                con.close()
            except (duckdb.Error, OSError) as e:  # a checkpoint on close can meet a full disk
                raise self.explain(e) from e

    def explain(self, e: BaseException) -> BaseException:
        """A clear error for a damaged file or a full disk (what happened, what was kept, what to
        do); any other error as it is."""
        low = str(e).lower()
        where = self.target.path.parent if self.target.path is not None else (self.target.data_path or self.describe())
        if isinstance(e, OSError) and e.errno == errno.ENOSPC or any(h in low for h in FULL_HINTS):
            return WarehouseFull(
                errno.ENOSPC,
                f"no space left on the warehouse's disk ({where}): the write in progress was rolled back and "
                f"everything committed before it is kept. Free space there, or set LALP_WAREHOUSE to a larger "
                f"disk, then rerun: it resumes from what was committed. ({e})")
        if self.target.path is not None and any(h in low for h in DAMAGE_HINTS):
            p = self.target.path
            return WarehouseDamaged(
                f"the warehouse file {p} cannot be read as a DuckDB database: it is truncated or corrupted ({e}). "
                f"It has not been changed, and lalp never overwrites it: keep it for recovery, restore it from a "
                f"backup, or move it aside (`mv {p} {p}.damaged`) and rerun to rebuild the warehouse from the "
                f"sources (scores are recomputed).")
        return e

    def _open_waiting(self, read_only: bool) -> duckdb.DuckDBPyConnection:
        """Open, waiting while another process holds a DuckDB file lock (the file backend, or a
        local DuckLake catalog file); retry a PostgreSQL catalog's first-use race."""
        deadline = time.monotonic() + self.lock_timeout_s
        delay = 0.2
        while True:
            try:
                return self._open(read_only)
            except duckdb.Error as e:
                low = str(e).lower()
                locked = any(h in low for h in LOCK_HINTS)
                racing = self.target.postgres and (is_conflict(e) or "duplicate key" in low or "already exists" in low)
                if self.is_lake and ("does not exist" in low and "creating a new ducklake is explicitly disabled" in low):
                    raise WarehouseMissing(
                        f"warehouse {self.describe()} does not exist (no DuckLake catalog there); check LALP_WAREHOUSE"
                    ) from e
                if not (locked or racing):
                    raise
                if time.monotonic() > deadline:
                    raise WarehouseBusy(
                        f"the warehouse {self.describe()} is locked by another process for over "
                        f"{self.lock_timeout_s:.0f}s (a DuckDB file allows one writer). Wait for the other "
                        f"run to finish, or give this run its own warehouse path, then retry. ({e})"
                    ) from e
                log.info("warehouse busy (%s); retrying in %.1fs", "locked" if locked else "catalog race", delay)
                time.sleep(delay * (0.5 + random.random()))
                delay = min(delay * 1.5, 5.0)

    def _open(self, read_only: bool) -> duckdb.DuckDBPyConnection:
        t = self.target
        if not self.is_lake:
            return duckdb.connect(str(t.path), read_only=read_only, config=self.config)
        if not t.postgres:
            return self._attach(read_only)  # a local catalog file: never held open between uses (its lock)
        # PostgreSQL catalog: loading the extensions and attaching costs ~0.3 s, so each process keeps
        # one attached in-memory instance per (catalog, mode) and hands out cursors on it (a cursor is
        # a connection of its own: its own transaction, `USE`, registrations).
        key = (os.getpid(), t.catalog, t.data_path, read_only)
        with _BASES_LOCK:
            base = _BASES.get(key)
            if base is None:
                base = _BASES[key] = self._attach(read_only)
        try:
            cur = base.cursor()
            cur.execute(f"USE {LAKE_ALIAS}")
            return cur
        except duckdb.Error:
            with _BASES_LOCK:  # a broken instance (e.g. the server restarted): start over next time
                if _BASES.get(key) is base:
                    del _BASES[key]
            raise

    def _attach(self, read_only: bool) -> duckdb.DuckDBPyConnection:
        t = self.target
        # nothing may be fetched at run time: extensions come from the wheels
        con = duckdb.connect(config={"autoinstall_known_extensions": False, "autoload_known_extensions": False, **self.config})
        try:
            if t.postgres:
                con.execute(f"LOAD {_sql_str(str(extension_path('postgres_scanner')))}")
            con.execute(f"LOAD {_sql_str(str(extension_path('ducklake')))}")
            if self._data_in_object_store():
                _load_object_store(con)
            opts = []
            if t.data_path and not read_only:
                opts.append(f"DATA_PATH {_sql_str(t.data_path)}")
            if read_only:
                opts.append("READ_ONLY")
            con.execute(f"ATTACH {_sql_str('ducklake:' + (t.catalog or ''))} AS {LAKE_ALIAS}"
                        + (f" ({', '.join(opts)})" if opts else ""))
            con.execute(f"USE {LAKE_ALIAS}")
        except BaseException:
            con.close()
            raise
        return con

    def _data_in_object_store(self) -> bool:
        """Whether DuckLake's Parquet files may be in an object store: the data path is a URL, or
        (a PostgreSQL catalog opened without one) the catalog's own data path may be."""
        from lalp_resources import objectstore

        t = self.target
        if t.data_path:
            return objectstore.is_remote(t.data_path)
        return t.postgres and importlib.util.find_spec("duckdb_extension_httpfs") is not None

    def read(self, sql: str, params: Sequence | None = None) -> pl.DataFrame:
        """One query on a read-only connection (a missing warehouse raises WarehouseMissing)."""
        with self.connect(read_only=True) as con:
            return query(con, sql, params)


def _load_object_store(con) -> None:
    """httpfs (from its wheel) and an S3 secret built from the standard AWS configuration
    (`lalp_resources.objectstore.duckdb_s3_secret`): DuckLake data under `s3://`. The secret
    lives in this in-memory instance only; nothing is written to disk or shown in settings."""
    from lalp_resources import objectstore

    con.execute(f"LOAD {_sql_str(str(extension_path('httpfs')))}")
    secret = objectstore.duckdb_s3_secret()
    if secret:
        con.execute(secret)


# ----------------------------------------------------------------------------- SQL helpers


def is_lake(con) -> bool:
    """Whether this connection's current database is a DuckLake catalog."""
    row = con.execute("SELECT type FROM duckdb_databases() WHERE database_name = current_database()").fetchone()
    return bool(row and row[0] == "ducklake")


@dataclass
class SchemaPlan:
    """What opening a warehouse for writing must do to bring it to SCHEMA_VERSION."""

    version: int | None                      # None: a new warehouse (no lalp tables yet)
    create: list[str]                        # SCHEMA tables that do not exist
    migrations: list[Migration]              # to apply, in order
    lacking: list[str]                       # "table.column" that no migration adds
    fences: list[str]                        # DuckLake: missing fence tables
    view: bool                               # the lineage view is missing
    columns: dict[str, set[str]]             # the columns each existing table has

    @property
    def done(self) -> bool:
        return (self.version == SCHEMA_VERSION and not (self.create or self.migrations or self.lacking or self.fences)
                and not self.view)


def schema_plan(con) -> SchemaPlan:
    lake = is_lake(con)
    have = {(sc, n) for sc, n in con.execute(
        "SELECT schema_name, table_name FROM duckdb_tables() WHERE database_name = current_database()").fetchall()}
    cols: dict[str, set[str]] = {}
    for t, c in con.execute("SELECT table_name, column_name FROM duckdb_columns() WHERE database_name = "
                            "current_database() AND schema_name = 'main'").fetchall():
        cols.setdefault(t, set()).add(c)
    view = not con.execute("SELECT count(*) FROM duckdb_views() WHERE database_name = current_database() "
                           "AND view_name = 'curated_lineage' AND NOT internal").fetchone()[0]
    present = [n for n in SCHEMA if ("main", n) in have]
    if ("main", VERSION_TABLE) in have:
        version = con.execute(f"SELECT max(version) FROM {VERSION_TABLE}").fetchone()[0] or 1
    else:
        version = 1 if present else None
    todo = [m for m in MIGRATIONS if version is not None and m.version > version]
    added = {(t, c) for m in todo for t, c, _ in m.add_columns}
    lacking = [f"{t}.{c}" for t in present for c in COLUMNS[t] if c not in cols.get(t, set()) and (t, c) not in added]
    fences = [n for n in SCHEMA if (FENCE_SCHEMA, n) not in have] if lake else []
    return SchemaPlan(version, [n for n in SCHEMA if n not in present], todo, lacking, fences, view, cols)


def ensure_schema(con: duckdb.DuckDBPyConnection, where: str = "the warehouse") -> None:
    """Bring a warehouse opened for writing to SCHEMA_VERSION, in one transaction: create missing
    tables, apply the migrations it lacks, record each version reached in `lalp_schema`. A
    warehouse this release cannot migrate (newer, or lacking a column no migration adds) raises
    WarehouseSchemaError before anything is written. Up to date, it costs three catalog queries."""
    plan = schema_plan(con)
    if plan.done:
        return
    _refuse(plan, where)
    lake = is_lake(con)

    def apply() -> SchemaPlan:
        plan = schema_plan(con)  # again inside the transaction: another writer may have migrated
        _refuse(plan, where)
        if plan.done:
            return plan
        for name in plan.create:
            con.execute(f"CREATE TABLE main.{name} ({LAKE_SCHEMA[name] if lake else SCHEMA[name]})")
        for m in plan.migrations:
            for table, column, kind in m.add_columns:
                if table not in plan.create and column not in plan.columns.get(table, ()):
                    con.execute(f"ALTER TABLE main.{table} ADD COLUMN {column} {kind}")
        con.execute(f"CREATE TABLE IF NOT EXISTS main.{VERSION_TABLE} ({VERSION_COLUMNS})")
        history = ([(SCHEMA_VERSION, "created")] if plan.version is None else
                   [(plan.version, "found (written before schema versions were recorded)")]
                   if plan.version == 1 and plan.migrations else [])
        history += [(m.version, f"migrated: {m.note}") for m in plan.migrations]
        for v, note in history:
            con.execute(f"INSERT INTO main.{VERSION_TABLE} VALUES (?, ?, now()::TIMESTAMP)", [v, note])
        if plan.fences:
            con.execute(f"CREATE SCHEMA IF NOT EXISTS {FENCE_SCHEMA}")
        for name in plan.fences:
            con.execute(f"CREATE TABLE {FENCE_SCHEMA}.{name} (generation BIGINT)")
            con.execute(f"INSERT INTO {FENCE_SCHEMA}.{name} VALUES (0)")
        con.execute(LINEAGE_VIEW)
        return plan

    done = run_transaction(con, apply)
    if done.migrations:
        log.warning("migrated %s from schema version %s to %s: %s", where, done.version, SCHEMA_VERSION,
                    "; ".join(m.note for m in done.migrations))


def _refuse(plan: SchemaPlan, where: str) -> None:
    if plan.version is not None and plan.version > SCHEMA_VERSION:
        raise WarehouseSchemaError(
            f"{where} has schema version {plan.version}, written by a newer lalp-pipeline release (this one "
            f"knows versions up to {SCHEMA_VERSION}); it was not changed. Upgrade lalp-pipeline, or point "
            f"LALP_WAREHOUSE at another warehouse.")
    if plan.lacking:
        raise WarehouseSchemaError(
            f"{where} (schema version {plan.version}) lacks column(s) {', '.join(plan.lacking)} that no migration "
            f"adds: it was changed outside lalp-pipeline; it was not changed. Restore it from a backup, or move it "
            f"aside and rerun (`lalp run` rebuilds it from the sources; scores are recomputed).")


def table_exists(con, name: str) -> bool:
    return bool(con.execute(
        "SELECT count(*) FROM duckdb_tables() WHERE database_name = current_database() AND table_name = ?",
        [name]).fetchone()[0])


def query(con, sql: str, params: Sequence | None = None) -> pl.DataFrame:
    rel = con.sql(sql, params=list(params)) if params else con.sql(sql)
    return pl.from_arrow(rel.to_arrow_table())


def columns(con, table: str) -> list[str]:
    return [r[0] for r in con.execute(f"DESCRIBE {table}").fetchall()]


def _fence(con, table: str) -> None:
    """DuckLake: make this transaction collide with any concurrent fenced write to `table`."""
    if table in SCHEMA and is_lake(con):
        con.execute(f"UPDATE {FENCE_SCHEMA}.{table} SET generation = generation + 1")


def in_transaction(con) -> bool:
    """Whether an explicit transaction is open (in autocommit every statement gets a new id).
    A failed BEGIN would abort the open transaction, so this asks instead of trying."""
    q = "SELECT current_transaction_id()"
    return con.execute(q).fetchone()[0] == con.execute(q).fetchone()[0]


def _begin(con) -> bool:
    """BEGIN unless a transaction is already open; True when this call opened it."""
    if in_transaction(con):
        return False
    con.execute("BEGIN TRANSACTION")
    return True


def _rollback_quietly(con) -> None:
    try:
        con.execute("ROLLBACK")
    except duckdb.TransactionException:
        pass  # a failed COMMIT has already rolled back


def run_transaction(con, fn: Callable[[], T], attempts: int = CONFLICT_RETRIES) -> T:
    """Run `fn()` in one transaction and commit; on a DuckLake conflict roll back and run it again
    (jittered exponential backoff, at most `attempts` times), then raise WarehouseConflict.
    `fn` must be safe to re-run (it should only touch the database). Inside an already open
    transaction `fn` just runs: the outer transaction commits (and cannot be retried here)."""
    delay = 0.05
    for attempt in range(1, attempts + 1):
        if not _begin(con):
            return fn()
        try:
            result = fn()
            con.execute("COMMIT")
            return result
        except BaseException as e:
            _rollback_quietly(con)
            if not is_conflict(e):
                raise
            if attempt == attempts:
                raise WarehouseConflict(
                    f"a warehouse transaction conflicted with other writers {attempts} times in a row; "
                    f"giving up (raise CONFLICT_RETRIES, or spread the writers out). Last error: {e}") from e
            log.info("warehouse transaction conflict (attempt %d/%d); retrying in ~%.2fs", attempt, attempts, delay)
            time.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, CONFLICT_MAX_DELAY_S)
    raise AssertionError("unreachable")


@contextlib.contextmanager
def transaction(con) -> Iterator[None]:
    """BEGIN ... COMMIT, or ROLLBACK on any error (the error is re-raised). A DuckLake commit that
    collides with another writer raises WarehouseConflict: the block cannot be re-run from here, so
    code that shares the warehouse with concurrent writers should use `run_transaction`."""
    con.execute("BEGIN TRANSACTION")
    try:
        yield
        con.execute("COMMIT")
    except BaseException as e:
        _rollback_quietly(con)
        if is_conflict(e) and not isinstance(e, WarehouseConflict):
            raise WarehouseConflict(
                f"the transaction collided with another writer's commit and was rolled back; run it again "
                f"(warehouse.run_transaction retries automatically). ({e})") from e
        raise


def _key_match(table: str, keys: Sequence[str], alias: str = "f") -> str:
    return " AND ".join(f"{table}.{k} = {alias}.{k}" for k in keys)


def insert(con, table: str, df: pl.DataFrame, mode: str = "insert") -> int:
    """Insert a Polars frame by column name; returns the frame's row count.

    mode 'insert': plain insert (a key already present, or repeated in the frame, raises
    duckdb.ConstraintException on both backends); 'replace': upsert on the table's declared key
    (DELETE-by-key + INSERT; a key repeated in the frame keeps its last row); 'ignore': insert only
    the keys not yet present. Upserts into IMMUTABLE_ROWS tables ('score_cache') behave as 'ignore'.
    Runs in its own transaction (retried on DuckLake conflicts) unless one is already open."""
    if mode not in ("insert", "replace", "ignore"):
        raise ValueError(f"insert mode {mode!r}: expected 'insert', 'replace' or 'ignore'")
    if df.height == 0:
        return 0
    keys = KEYS.get(table, ())
    if mode != "insert" and not keys:
        raise ValueError(f"table {table} has no declared key: mode {mode!r} needs one")
    if mode == "replace" and table in IMMUTABLE_ROWS:
        mode = "ignore"
    cols = [c for c in columns(con, table) if c in df.columns]
    frame = df.select(cols)
    if mode != "insert":
        missing_keys = [k for k in keys if k not in cols]
        if missing_keys:
            raise ValueError(f"{table}: the frame lacks key column(s) {missing_keys}")
        frame = frame.unique(subset=list(keys), keep="last", maintain_order=True)
    col_list = ", ".join(cols)
    lake = is_lake(con)

    def body() -> None:
        if lake and (keys or mode != "insert"):
            _fence(con, table)
        if mode == "replace":
            con.execute(f"DELETE FROM {table} USING _lalp_frame f WHERE {_key_match(table, keys)}")
            con.execute(f"INSERT INTO {table} ({col_list}) SELECT {col_list} FROM _lalp_frame")
        elif mode == "ignore":
            con.execute(f"INSERT INTO {table} ({col_list}) SELECT {col_list} FROM _lalp_frame f "
                        f"WHERE NOT EXISTS (SELECT 1 FROM {table} WHERE {_key_match(table, keys)})")
        else:
            if lake and keys:
                _check_new_keys(con, table, keys)
            con.execute(f"INSERT INTO {table} ({col_list}) SELECT {col_list} FROM _lalp_frame")

    _with_frame(con, frame, body)
    return df.height


def _with_frame(con, frame: pl.DataFrame, body: Callable[[], None]) -> None:
    """Run `body` in a transaction with `frame` registered as `_lalp_frame` (what the insert SQL reads)."""
    con.register("_lalp_frame", frame.to_arrow())
    try:
        run_transaction(con, body)
    finally:
        con.unregister("_lalp_frame")


def insert_from(con, table: str, keys: pl.DataFrame, select_sql: str, params: Sequence = ()) -> int:
    """Insert rows made inside the warehouse: `select_sql` (its columns by name) reads `keys`,
    registered as `_lalp_frame`, which names the rows and carries the table's key columns. For
    rows whose wide columns (the texts) should not pass through this process. Checks keys as
    `insert` does on DuckLake; runs in its own transaction unless one is already open."""
    if keys.height == 0:
        return 0
    table_keys = KEYS.get(table, ())
    lake = is_lake(con)

    def body() -> None:
        if lake and table_keys:
            _fence(con, table)
            _check_new_keys(con, table, table_keys)
        con.execute(f"INSERT INTO {table} BY NAME {select_sql}", list(params))

    _with_frame(con, keys, body)
    return keys.height


def _check_new_keys(con, table: str, keys: Sequence[str]) -> None:
    """DuckLake has no PRIMARY KEY: reject what the DuckDB file's key would reject."""
    kl = ", ".join(keys)
    dup = con.execute(f"SELECT {kl} FROM _lalp_frame GROUP BY ALL HAVING count(*) > 1 LIMIT 1").fetchone()
    if dup is None:
        dup = con.execute(f"SELECT {', '.join('f.' + k for k in keys)} FROM _lalp_frame f JOIN {table} "
                          f"ON {_key_match(table, keys)} LIMIT 1").fetchone()
    if dup is not None:
        shown = ", ".join(f"{k}: {v}" for k, v in zip(keys, dup))
        raise duckdb.ConstraintException(f'Constraint Error: Duplicate key "{shown}" violates primary key constraint.')


def replace_teachers(con, table: str, teachers: Sequence[str], df: pl.DataFrame) -> int:
    """Replace the rows of some teacher partitions with `df`, in one transaction."""

    def body() -> int:
        _fence(con, table)
        con.execute(f"DELETE FROM {table} WHERE teacher IN (SELECT unnest(?))", [list(teachers)])
        return insert(con, table, df)

    return run_transaction(con, body)


def replace_all(con, table: str, df: pl.DataFrame) -> int:
    def body() -> int:
        _fence(con, table)
        con.execute(f"DELETE FROM {table}")
        return insert(con, table, df)

    return run_transaction(con, body)


def cached_scores(warehouse: "Warehouse", keys: list[str]) -> dict[str, tuple]:
    """The `score_cache` rows for these keys: key -> (sum_logprob, n_tokens, head1_logprob,
    head2_logprob), heads None for a row written before head sums existed. Read-only; an absent
    warehouse is an empty cache. The keys are joined as an Arrow table (a hash join: one scan of
    the cache, whatever its size, instead of a per-key list membership test)."""
    if not keys:
        return {}
    try:
        with warehouse.connect(read_only=True) as con:
            if not table_exists(con, "score_cache"):
                return {}
            return lookup_scores(con, keys)
    except WarehouseMissing:
        return {}


def lookup_scores(con, keys: Sequence[str]) -> dict[str, tuple]:
    import pyarrow as pa

    con.register("_lalp_keys", pa.table({"key": pa.array(list(dict.fromkeys(keys)), pa.string())}))
    try:
        rows = con.execute(
            "SELECT c.key, c.sum_logprob, c.n_tokens, c.head1_logprob, c.head2_logprob "
            "FROM score_cache c JOIN _lalp_keys k ON c.key = k.key"
        ).fetchall()
    finally:
        con.unregister("_lalp_keys")
    return {k: (s, n, h1, h2) for k, s, n, h1, h2 in rows}


# One query answers "where did this curated row come from?"
LINEAGE_VIEW = """
CREATE OR REPLACE VIEW curated_lineage AS
SELECT c.prompt_id, c.response_id, c.teacher, c.lalp, c.galp, c.reason AS selection_reason,
       r.source_uri, r.source_sha256, r.source_row, r.format, r.ingest_run_id,
       s.score_run_id, s.student, s.segmenter, s.segmenter_version, s.window_spec, s.template, s.dtype,
       s.n_steps, c.select_run_id
FROM curated_sft_dataset c
JOIN raw_teacher_traces r USING (response_id)
LEFT JOIN response_scores s USING (response_id)
"""


class WarehouseSession:
    """One warehouse connection for the scoring loop's many short uses (the engine's cache lookup
    and the commit of each chunk). Opening a DuckDB file, checking its schema and closing it
    (which checkpoints) cost more than a chunk's commit, and that cost grows with the file, so
    while chunks come quickly the connection is kept. It is handed back after a use that followed
    a long idle gap (a slow model: nothing to save) and at least every `hold_s` seconds, so other
    processes get the file (a DuckDB file has one writer). Also the engine's score cache: one
    process cannot hold a read-only and a writable connection to the same file."""

    def __init__(self, wh, hold_s: float = 5.0, idle_s: float = 1.0):
        self.wh, self.hold_s, self.idle_s = wh, hold_s, idle_s
        self.pending: dict[str, tuple] = {}  # scored, not yet committed: the cache sees them
        self._cm = self._con = None
        self._opened = 0.0
        self._last_end: float | None = None

    @contextlib.contextmanager
    def use(self):
        start = time.monotonic()
        idle = start - self._last_end if self._last_end is not None else float("inf")
        if self._con is None:
            self._cm = self.wh.connect()
            self._con = self._cm.__enter__()
            self._opened = start
        try:
            yield self._con
        except BaseException as e:
            cm, self._cm, self._con = self._cm, None, None
            if cm is not None:  # the warehouse sees the error: a full disk or a damaged file is explained
                cm.__exit__(type(e), e, e.__traceback__)
            raise
        self._last_end = end = time.monotonic()
        if idle > self.idle_s or end - self._opened > self.hold_s:
            self.close()

    def close(self) -> None:
        cm, self._cm, self._con = self._cm, None, None
        if cm is not None:
            cm.__exit__(None, None, None)

    def lookup(self, keys: list[str]) -> dict[str, tuple]:
        if not keys:
            return {}
        with self.use() as con:
            found = lookup_scores(con, keys)
        if self.pending:
            found.update((k, self.pending[k]) for k in keys if k in self.pending)
        return found
