"""The warehouse's two backends run the same operations with the same results: one DuckDB file, and
DuckLake with its catalog in a real (throwaway, loopback) PostgreSQL and Parquet data in a temp folder.
Concurrent writer processes on DuckLake-on-PostgreSQL leave every row exactly once. A read-only open
of a missing warehouse fails and creates nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import duckdb
import polars as pl
import pytest

from helpers import REPO
from pg import postgres_or_skip, throwaway_postgres

from lalp_resources import warehouse as W
from lalp_resources.warehouse import (
    KEYS, SCHEMA, Warehouse, WarehouseConflict, WarehouseMissing, cached_scores, insert, query, replace_all,
    replace_teachers, run_transaction, transaction,
)


@pytest.fixture(scope="module")
def pg():
    postgres_or_skip()
    with throwaway_postgres() as server:
        yield server


_DB_COUNTER = iter(range(10**6))


def lake_on_pg(pg, root: Path) -> Warehouse:
    dsn = pg.create_database(f"lake{next(_DB_COUNTER)}")
    return Warehouse(f"ducklake:postgres:{dsn}", lock_timeout_s=30, data_path=str(root / "lake-data") + "/")


# --------------------------------------------------------------------------- parsing


def test_backend_selection_from_the_warehouse_string(tmp_path):
    f = Warehouse(tmp_path / "w.duckdb")
    assert not f.is_lake and f.path == tmp_path / "w.duckdb"
    lk = Warehouse("ducklake:postgres:dbname=lake host=pg port=5433 user=lalp password=s3cret data_path=/data/lake/")
    assert lk.is_lake and lk.target.postgres
    assert lk.target.catalog == "postgres:dbname=lake host=pg port=5433 user=lalp password=s3cret"
    assert lk.target.data_path == "/data/lake/"
    assert "s3cret" not in str(lk.path) and "s3cret" not in lk.describe() and "s3cret" not in repr(lk)
    # the constructor's data_path wins over one in the string
    assert Warehouse("ducklake:postgres:dbname=lake data_path=/a/", data_path="/b/").target.data_path == "/b/"
    uri = Warehouse("ducklake:postgres:postgresql://lalp:pw@pg:5432/lake?sslmode=require&data_path=/data/x/")
    assert uri.target.catalog == "postgres:postgresql://lalp:pw@pg:5432/lake?sslmode=require"
    assert uri.target.data_path == "/data/x/" and "pw@" not in uri.describe()
    local = Warehouse(f"ducklake:{tmp_path}/meta.ducklake")
    assert local.is_lake and not local.target.postgres and local.target.path == tmp_path / "meta.ducklake"
    with pytest.raises(ValueError):
        Warehouse("ducklake:postgres:")


def test_keys_are_the_declared_primary_keys():
    assert KEYS["score_cache"] == ("key",)
    assert KEYS["reasoning_steps"] == ("response_id", "step_index")
    assert KEYS["selection_decisions"] == ("prompt_id", "response_id")
    assert KEYS["quarantine"] == ()
    assert set(KEYS) == set(SCHEMA)
    assert all("PRIMARY KEY" not in cols.upper() for cols in W.LAKE_SCHEMA.values())


# --------------------------------------------------------------------------- same results on both backends


def _traces(teacher: str, n: int, tag: str = "") -> pl.DataFrame:
    return pl.DataFrame({
        "response_id": [f"{teacher}-r{i}" for i in range(n)], "prompt_id": [f"q{i}" for i in range(n)],
        "teacher": [teacher] * n, "prompt": [f"prompt {i}" for i in range(n)],
        "response": [f"{tag}response {i}" for i in range(n)], "is_correct": [i % 2 == 0 for i in range(n)],
        "source_row": list(range(n)),
    })


def _steps(teacher: str, n_resp: int, n_steps: int, tag: str) -> pl.DataFrame:
    rows = [(f"{teacher}-r{r}", f"q{r}", teacher, s, f"{tag}{r}.{s}") for r in range(n_resp) for s in range(n_steps)]
    return pl.DataFrame(rows, schema=["response_id", "prompt_id", "teacher", "step_index", "text"], orient="row")


def _cache(keys, value: float, run: str) -> pl.DataFrame:
    return pl.DataFrame({"key": list(keys), "sum_logprob": [value] * len(keys), "n_tokens": [3] * len(keys),
                         "namespace": ["ns"] * len(keys), "created_run_id": [run] * len(keys)})


class Boom(Exception):
    pass


def exercise(wh: Warehouse) -> dict:
    """The operations the assets use, on one backend; returns every table's content (sorted)."""
    out: dict = {}
    with wh.connect() as con:
        out["tables"] = sorted(r[0] for r in con.execute(
            "SELECT table_name FROM duckdb_tables() WHERE database_name = current_database() AND schema_name = 'main'"
        ).fetchall())
        # plain insert, then a duplicate key: rejected on both backends, nothing written
        insert(con, "raw_teacher_traces", pl.concat([_traces("a", 3), _traces("b", 2)]))
        with pytest.raises(duckdb.ConstraintException):
            insert(con, "raw_teacher_traces", _traces("b", 3, tag="again "))
        with pytest.raises(duckdb.ConstraintException):  # a key twice in one frame
            insert(con, "ingest_runs", pl.DataFrame({"ingest_run_id": ["x", "x"], "n_read": [1, 2]}))
        # partition replacement: a's rows replaced twice, b's untouched
        replace_teachers(con, "reasoning_steps", ["a", "b"], pl.concat([_steps("a", 3, 2, "v1 "), _steps("b", 2, 2, "v1 ")]))
        replace_teachers(con, "reasoning_steps", ["a"], _steps("a", 2, 3, "v2 "))
        replace_teachers(con, "quarantine", ["a"], pl.DataFrame({"teacher": ["a"], "reason": ["bad"], "source_row": [1]}))
        replace_teachers(con, "quarantine", ["a"], pl.DataFrame({"teacher": ["a", "a"], "reason": ["bad", "worse"], "source_row": [1, 2]}))
        # upserts: existing keys updated, new ones added, a key twice in a frame keeps its last row
        insert(con, "response_scores", pl.DataFrame({"response_id": ["a-r0", "a-r1"], "teacher": ["a", "a"], "lalp": [-1.0, -2.0]}), mode="replace")
        insert(con, "response_scores", pl.DataFrame({"response_id": ["a-r1", "a-r2", "a-r2"], "teacher": ["a"] * 3, "lalp": [-3.0, -4.0, -5.0]}), mode="replace")
        insert(con, "selection_decisions", pl.DataFrame({"prompt_id": ["q0", "q0"], "response_id": ["a-r0", "b-r0"], "chosen": [True, False]}), mode="replace")
        insert(con, "selection_decisions", pl.DataFrame({"prompt_id": ["q0"], "response_id": ["b-r0"], "chosen": [True]}), mode="replace")
        insert(con, "galp_scores", pl.DataFrame({"response_id": ["a-r0"], "galp": [1.0]}), mode="ignore")
        insert(con, "galp_scores", pl.DataFrame({"response_id": ["a-r0", "a-r1"], "galp": [9.0, 2.0]}), mode="ignore")
        # the score cache: rows are immutable, an upsert skips keys already present
        insert(con, "score_cache", _cache(["k1", "k2"], -1.0, "run1"), mode="replace")
        insert(con, "score_cache", _cache(["k2", "k3"], -9.0, "run2"), mode="replace")
        # rollback: an error inside the block leaves nothing behind, on both helpers
        with pytest.raises(Boom):
            with transaction(con):
                insert(con, "teacher_rankings", pl.DataFrame({"teacher": ["zz"], "lalp_rank": [1]}))
                insert(con, "response_scores", pl.DataFrame({"response_id": ["a-r0"], "lalp": [99.0]}), mode="replace")
                raise Boom()

        def failing():
            replace_all(con, "teacher_rankings", pl.DataFrame({"teacher": ["yy"], "lalp_rank": [1]}))
            raise Boom()

        with pytest.raises(Boom):
            run_transaction(con, failing)
        replace_all(con, "teacher_rankings", pl.DataFrame({"teacher": ["a", "b"], "lalp_rank": [2, 1]}))
        replace_all(con, "teacher_rankings", pl.DataFrame({"teacher": ["a", "b"], "lalp_rank": [1, 2]}))
        insert(con, "curated_sft_dataset", pl.DataFrame({"prompt_id": ["q0"], "response_id": ["a-r0"], "teacher": ["a"], "lalp": [-1.0]}), mode="replace")
        out["lineage"] = query(con, "SELECT prompt_id, response_id, source_row, lalp FROM curated_lineage").rows()
        for table in SCHEMA:
            cols = [c for c in W.columns(con, table) if c not in ("ingested_at", "quarantined_at", "created_at", "loaded_at")]
            out[table] = sorted(query(con, f"SELECT {', '.join(cols)} FROM {table}").rows(), key=repr)
    out["cached"] = cached_scores(wh, ["k1", "k3", "k-absent", "k1"])
    out["read"] = wh.read("SELECT count(*) AS n FROM reasoning_steps WHERE teacher = ?", ["a"])["n"].to_list()
    return out


def _check(r: dict) -> None:
    assert r["tables"] == sorted([*SCHEMA, W.VERSION_TABLE])
    assert len(r["raw_teacher_traces"]) == 5
    assert r["ingest_runs"] == []
    steps = r["reasoning_steps"]
    assert len([s for s in steps if s[2] == "a"]) == 6 and all("v2 " in s[6] for s in steps if s[2] == "a")
    assert len([s for s in steps if s[2] == "b"]) == 4
    assert sorted((q[8], q[4]) for q in r["quarantine"]) == [("a", "bad"), ("a", "worse")]
    lalp = {row[0]: row[4] for row in r["response_scores"]}
    assert lalp == {"a-r0": -1.0, "a-r1": -3.0, "a-r2": -5.0}
    assert {(row[0], row[1]): row[6] for row in r["selection_decisions"]} == {("q0", "a-r0"): True, ("q0", "b-r0"): True}
    assert {row[0]: row[2] for row in r["galp_scores"]} == {"a-r0": 1.0, "a-r1": 2.0}
    assert {row[0]: (row[1], row[4]) for row in r["score_cache"]} == {"k1": (-1.0, "run1"), "k2": (-1.0, "run1"), "k3": (-9.0, "run2")}
    assert sorted((row[0], row[1]) for row in r["teacher_rankings"]) == [("a", 1), ("b", 2)]
    assert r["lineage"] == [("q0", "a-r0", 0, -1.0)]
    assert r["cached"] == {"k1": (-1.0, 3, None, None), "k3": (-9.0, 3, None, None)}  # rows written without head sums
    assert r["read"] == [6]


def test_same_results_on_duckdb_file_and_ducklake(pg, tmp_path):
    backends = {
        "duckdb": Warehouse(tmp_path / "file" / "lalp.duckdb"),
        "ducklake-file": Warehouse(f"ducklake:{tmp_path}/local/meta.ducklake"),
        "ducklake-postgres": lake_on_pg(pg, tmp_path),
    }
    results = {name: exercise(wh) for name, wh in backends.items()}
    for name, r in results.items():
        _check(r)
        assert r == results["duckdb"], name
    # DuckLake keeps commits of up to 10 rows inside the catalog ("inlining"); larger ones become
    # Parquet under the data path. Its catalog really is in PostgreSQL.
    with backends["ducklake-postgres"].connect() as con:
        insert(con, "score_cache", _cache([f"bulk{i}" for i in range(100)], -2.0, "run3"), mode="replace")
    assert list((tmp_path / "lake-data").rglob("*.parquet"))
    lake_db = backends["ducklake-postgres"].target.catalog.split("dbname=")[1].split()[0]
    assert int(pg.psql("SELECT count(*) FROM ducklake_table", lake_db).strip()) >= len(SCHEMA)


def test_a_transaction_conflict_is_retried_then_reported(pg, tmp_path):
    """Two connections upsert the same new key at once: DuckLake alone would commit both (no key
    constraint); the fence makes the second a conflict, which run_transaction retries."""
    wh = lake_on_pg(pg, tmp_path)
    with wh.connect() as a, wh.connect() as b:
        a.execute("BEGIN")
        insert(a, "galp_scores", pl.DataFrame({"response_id": ["r"], "galp": [1.0]}), mode="replace")
        calls = []

        def b_body():
            calls.append(1)
            insert(b, "galp_scores", pl.DataFrame({"response_id": ["r"], "galp": [2.0]}), mode="replace")
            if len(calls) == 1:
                a.execute("COMMIT")  # a commits while b's first attempt is open: b's commit conflicts

        run_transaction(b, b_body)
        assert len(calls) == 2
        assert query(a, "SELECT response_id, galp FROM galp_scores").rows() == [("r", 2.0)]
        # a `with transaction()` block cannot be re-run: the conflict is reported clearly
        a.execute("BEGIN")
        insert(a, "galp_scores", pl.DataFrame({"response_id": ["s"], "galp": [1.0]}), mode="replace")
        with pytest.raises(WarehouseConflict, match="run_transaction"):
            with transaction(b):
                insert(b, "galp_scores", pl.DataFrame({"response_id": ["s"], "galp": [2.0]}), mode="replace")
                a.execute("COMMIT")
        assert query(b, "SELECT galp FROM galp_scores WHERE response_id = 's'").rows() == [(1.0,)]
        # bounded: a body that always collides gives up with WarehouseConflict
        n = []

        def always_conflicts():
            n.append(1)
            insert(b, "galp_scores", pl.DataFrame({"response_id": ["t"], "galp": [float(len(n))]}), mode="replace")
            insert(a, "galp_scores", pl.DataFrame({"response_id": ["t"], "galp": [0.0]}), mode="replace")  # a commits each time

        with pytest.raises(WarehouseConflict, match="3 times"):
            run_transaction(b, always_conflicts, attempts=3)
        assert len(n) == 3


# --------------------------------------------------------------------------- concurrent writers

WORKER = textwrap.dedent("""
    import json, logging, pathlib, sys, time
    import polars as pl
    from lalp_resources.warehouse import Warehouse, insert, replace_teachers, run_transaction

    spec, data_path, me, n_procs, rounds, n_resp, barrier = sys.argv[1:8]
    me, n_procs, rounds, n_resp = int(me), int(n_procs), int(rounds), int(n_resp)
    conflicts = []

    class Count(logging.Handler):
        def emit(self, record):
            if "conflict" in record.getMessage():
                conflicts.append(1)

    logging.getLogger("lalp.warehouse").addHandler(Count())
    logging.getLogger("lalp.warehouse").setLevel(logging.INFO)
    wh = Warehouse(spec, lock_timeout_s=60, data_path=data_path)
    teacher = f"t{me}"
    # start together: each process announces itself, then waits for the others
    barrier = pathlib.Path(barrier)
    (barrier / f"ready-{me}").touch()
    while len(list(barrier.glob("ready-*"))) < n_procs:
        time.sleep(0.005)
    t0 = time.time()
    for rnd in range(rounds):
        steps = pl.DataFrame([(f"{teacher}-r{r}", teacher, s, f"round {rnd}") for r in range(n_resp) for s in range(3)],
                             schema=["response_id", "teacher", "step_index", "text"], orient="row")
        own = [f"{teacher}-k{rnd}-{i}" for i in range(20)]
        shared = [f"shared-k{rnd}-{i}" for i in range(5)]   # every process offers these keys too
        cache = pl.DataFrame({"key": own + shared, "sum_logprob": [float(me)] * 25, "n_tokens": [1] * 25,
                              "created_run_id": [teacher] * 25})
        scores = pl.DataFrame({"response_id": [f"{teacher}-r{r}" for r in range(n_resp)], "teacher": [teacher] * n_resp,
                               "lalp": [float(rnd)] * n_resp})
        with wh.connect() as con:
            def chunk():
                replace_teachers(con, "reasoning_steps", [teacher], steps)
                insert(con, "score_cache", cache, mode="replace")
                insert(con, "response_scores", scores, mode="replace")
            run_transaction(con, chunk)
    print(json.dumps({"teacher": teacher, "seconds": time.time() - t0, "conflicts": len(conflicts)}))
""")


@pytest.mark.slow  # 12-30 s on a shared 2-core machine (four Python processes start and contend)
def test_concurrent_writers_on_ducklake_postgres_leave_every_row_once(pg, tmp_path):
    n_procs, rounds, n_resp = 4, 6, 8
    wh = lake_on_pg(pg, tmp_path)
    # no catalog yet: the processes race to create it and the tables, too
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, wh.spec, wh.target.data_path, str(i), str(n_procs),
                               str(rounds), str(n_resp), str(barrier)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
             for i in range(n_procs)]
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
        outs.append(json.loads(out.strip().splitlines()[-1]))
    stats = {o["teacher"]: (round(o["seconds"], 1), o["conflicts"]) for o in outs}
    print(f"\n{n_procs} writers x {rounds} transactions: (seconds, conflicts retried) per writer: {stats}")

    with wh.connect(read_only=True) as con:
        steps = query(con, "SELECT teacher, response_id, step_index, text FROM reasoning_steps")
        cache = query(con, "SELECT key, created_run_id FROM score_cache")
        scores = query(con, "SELECT response_id, teacher, lalp FROM response_scores")
    # every writer's last round, exactly once
    assert steps.height == n_procs * n_resp * 3
    assert steps.select(["response_id", "step_index"]).is_duplicated().sum() == 0
    assert set(steps["text"]) == {f"round {rounds - 1}"}
    assert sorted(steps["teacher"].unique()) == [f"t{i}" for i in range(n_procs)]
    # every cache key once: own keys of every round, and the keys all writers offered
    assert cache.height == n_procs * rounds * 20 + rounds * 5
    assert cache["key"].is_duplicated().sum() == 0
    assert scores.height == n_procs * n_resp and scores["response_id"].is_duplicated().sum() == 0
    assert set(scores["lalp"]) == {float(rounds - 1)}


# --------------------------------------------------------------------------- a missing warehouse


def test_read_only_on_a_missing_warehouse_raises_and_creates_nothing(pg, tmp_path):
    missing = tmp_path / "typo" / "nested" / "lalp.duckdb"
    wh = Warehouse(missing)
    with pytest.raises(FileNotFoundError, match="does not exist; check LALP_WAREHOUSE"):
        with wh.connect(read_only=True):
            pass
    with pytest.raises(WarehouseMissing):
        wh.read("SELECT 1")
    assert cached_scores(wh, ["k"]) == {}
    assert not wh.exists()
    assert not (tmp_path / "typo").exists()
    # a local DuckLake catalog file, likewise
    lake = Warehouse(f"ducklake:{tmp_path}/typo2/meta.ducklake")
    with pytest.raises(FileNotFoundError):
        with lake.connect(read_only=True):
            pass
    assert not (tmp_path / "typo2").exists()
    # a PostgreSQL database without a DuckLake catalog: read-only does not create one
    pg_wh = lake_on_pg(pg, tmp_path)
    with pytest.raises(WarehouseMissing, match="does not exist"):
        with pg_wh.connect(read_only=True):
            pass
    assert cached_scores(pg_wh, ["k"]) == {}
    db = pg_wh.target.catalog.split("dbname=")[1].split()[0]
    assert pg.psql("SELECT count(*) FROM information_schema.tables WHERE table_schema = 'public'", db).strip() == "0"
    # a writable open creates it
    with Warehouse(missing).connect():
        pass
    assert missing.is_file()
    assert Warehouse(missing).read("SELECT count(*) AS n FROM score_cache")["n"].to_list() == [0]
