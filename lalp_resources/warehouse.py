"""The DuckDB warehouse: one file, one table per asset, plus the score cache and the quarantine.

Tables are owned through SQL (not an IO manager): the score cache needs upserts, and per-teacher
partitions replace their own rows. Frames go in and out as Polars via Arrow. DuckDB allows one
writing process, so `connect` retries on a lock conflict for a while and then fails with a
message that says what to do.
"""

from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path
from typing import Iterator, Sequence

import duckdb
import polars as pl

log = logging.getLogger("lalp.warehouse")

PROVENANCE = "source_uri VARCHAR, source_sha256 VARCHAR, ingest_run_id VARCHAR"
SCORE_CONFIG = (
    "student VARCHAR, segmenter VARCHAR, segmenter_version VARCHAR, window_spec VARCHAR, "
    "template VARCHAR, dtype VARCHAR"
)

SCHEMA: dict[str, str] = {
    "raw_teacher_traces": f"""
        response_id VARCHAR PRIMARY KEY, prompt_id VARCHAR NOT NULL, teacher VARCHAR NOT NULL,
        prompt VARCHAR, response VARCHAR, reference_answer VARCHAR, final_answer VARCHAR,
        is_correct BOOLEAN, verify_reason VARCHAR, source_uri VARCHAR, source_sha256 VARCHAR,
        source_row BIGINT, format VARCHAR, ingest_run_id VARCHAR, ingested_at TIMESTAMP""",
    "quarantine": """
        source_uri VARCHAR, source_sha256 VARCHAR, source_row BIGINT, format VARCHAR,
        reason VARCHAR, detail VARCHAR, raw_excerpt VARCHAR, prompt_id VARCHAR, teacher VARCHAR,
        ingest_run_id VARCHAR, quarantined_at TIMESTAMP""",
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
        created_run_id VARCHAR, created_at TIMESTAMP""",
    "step_scores": f"""
        response_id VARCHAR, prompt_id VARCHAR, teacher VARCHAR, step_index INTEGER,
        n_tokens INTEGER, sum_logprob DOUBLE, mean_logprob DOUBLE, cache_hit BOOLEAN,
        {SCORE_CONFIG}, {PROVENANCE}, score_run_id VARCHAR,
        PRIMARY KEY (response_id, step_index)""",
    "galp_scores": """
        response_id VARCHAR PRIMARY KEY, teacher VARCHAR, galp DOUBLE, galp_tokens INTEGER,
        score_run_id VARCHAR""",
    "staged_loads": """
        teacher VARCHAR PRIMARY KEY, run_id VARCHAR, started_at VARCHAR, loaded_at TIMESTAMP""",
    "response_scores": f"""
        response_id VARCHAR PRIMARY KEY, prompt_id VARCHAR, teacher VARCHAR, n_steps INTEGER,
        lalp DOUBLE, galp DOUBLE, galp_tokens INTEGER, is_correct BOOLEAN,
        {SCORE_CONFIG}, {PROVENANCE}, score_run_id VARCHAR""",
    "teacher_rankings": """
        teacher VARCHAR PRIMARY KEY, lalp_rank INTEGER, galp_rank INTEGER, n_shared_prompts INTEGER,
        n_responses INTEGER, lalp_mean DOUBLE, lalp_ci_low DOUBLE, lalp_ci_high DOUBLE,
        galp_mean DOUBLE, galp_ci_low DOUBLE, galp_ci_high DOUBLE, accuracy DOUBLE,
        rank_run_id VARCHAR""",
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

LOCK_HINTS = ("could not set lock", "conflicting lock", "database is locked")


class WarehouseBusy(RuntimeError):
    pass


class Warehouse:
    def __init__(self, path: str | Path, lock_timeout_s: float = 120.0):
        self.path = Path(path)
        self.lock_timeout_s = lock_timeout_s

    @contextlib.contextmanager
    def connect(self, read_only: bool = False) -> Iterator[duckdb.DuckDBPyConnection]:
        """Open the file, waiting while another process holds the write lock."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + self.lock_timeout_s
        delay = 0.2
        while True:
            try:
                con = duckdb.connect(str(self.path), read_only=read_only and self.path.exists())
                break
            except duckdb.IOException as e:
                if not any(h in str(e).lower() for h in LOCK_HINTS):
                    raise
                if time.monotonic() > deadline:
                    raise WarehouseBusy(
                        f"the warehouse {self.path} is locked by another process for over "
                        f"{self.lock_timeout_s:.0f}s (DuckDB allows one writer). Wait for the other "
                        f"run to finish, or give this run its own warehouse path, then retry. ({e})"
                    ) from e
                log.info("warehouse locked by another process; retrying in %.1fs", delay)
                time.sleep(delay)
                delay = min(delay * 1.5, 5.0)
        try:
            if not read_only:
                ensure_schema(con)
            yield con
        finally:
            con.close()

    def read(self, sql: str, params: Sequence | None = None) -> pl.DataFrame:
        with self.connect() as con:
            return query(con, sql, params)


def ensure_schema(con: duckdb.DuckDBPyConnection) -> None:
    for name, cols in SCHEMA.items():
        con.execute(f"CREATE TABLE IF NOT EXISTS {name} ({cols})")
    con.execute(LINEAGE_VIEW)


def table_exists(con, name: str) -> bool:
    return bool(con.execute("SELECT count(*) FROM information_schema.tables WHERE table_name = ?", [name]).fetchone()[0])


def query(con, sql: str, params: Sequence | None = None) -> pl.DataFrame:
    rel = con.sql(sql, params=list(params)) if params else con.sql(sql)
    return pl.from_arrow(rel.to_arrow_table())


def columns(con, table: str) -> list[str]:
    return [r[0] for r in con.execute(f"DESCRIBE {table}").fetchall()]


def insert(con, table: str, df: pl.DataFrame, mode: str = "insert") -> int:
    """Insert a Polars frame by column name; mode 'replace' upserts on the primary key."""
    if df.height == 0:
        return 0
    cols = [c for c in columns(con, table) if c in df.columns]
    con.register("_lalp_frame", df.select(cols).to_arrow())
    try:
        verb = "INSERT OR REPLACE" if mode == "replace" else "INSERT"
        con.execute(f"{verb} INTO {table} ({', '.join(cols)}) SELECT {', '.join(cols)} FROM _lalp_frame")
    finally:
        con.unregister("_lalp_frame")
    return df.height


@contextlib.contextmanager
def transaction(con) -> Iterator[None]:
    """BEGIN ... COMMIT, or ROLLBACK on any error (the error is re-raised)."""
    con.execute("BEGIN TRANSACTION")
    try:
        yield
        con.execute("COMMIT")
    except BaseException:
        con.execute("ROLLBACK")
        raise


def replace_teachers(con, table: str, teachers: Sequence[str], df: pl.DataFrame) -> int:
    """Replace the rows of some teacher partitions with `df`, in one transaction."""
    with transaction(con):
        con.execute(f"DELETE FROM {table} WHERE teacher IN (SELECT unnest(?))", [list(teachers)])
        return insert(con, table, df)


def replace_all(con, table: str, df: pl.DataFrame) -> int:
    with transaction(con):
        con.execute(f"DELETE FROM {table}")
        return insert(con, table, df)


def cached_scores(warehouse: "Warehouse", keys: list[str]) -> dict[str, tuple[float, int]]:
    """The `score_cache` rows for these keys: key -> (sum_logprob, n_tokens). Read-only."""
    if not keys or not warehouse.path.exists():
        return {}
    with warehouse.connect(read_only=True) as con:
        rows = con.execute(
            "SELECT key, sum_logprob, n_tokens FROM score_cache WHERE key IN (SELECT unnest(?))", [keys]
        ).fetchall()
    return {k: (s, n) for k, s, n in rows}


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
