"""Warehouses from earlier releases and damaged files: a warehouse at an earlier schema is migrated
in place, in one transaction, with its schema version recorded; one this release cannot migrate
(newer, or lacking a column) is refused before anything is written; a truncated or corrupted DuckDB
file is refused with a clear message and its bytes are kept. Real DuckDB files and a local DuckLake
catalog; the earlier schemas are built by the test from the current code."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import duckdb
import polars as pl
import pytest

from lalp_resources import warehouse as W
from lalp_resources.warehouse import (
    Migration, Warehouse, WarehouseDamaged, WarehouseSchemaError, insert, query,
)


def backends(tmp_path: Path) -> list[Warehouse]:
    return [Warehouse(tmp_path / "old.duckdb"), Warehouse(f"ducklake:{tmp_path}/old.ducklake")]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def history(wh: Warehouse) -> list[tuple[int, str]]:
    return [tuple(r) for r in wh.read(f"SELECT version, note FROM {W.VERSION_TABLE} ORDER BY applied_at, version").rows()]


def write_rows(wh: Warehouse) -> None:
    with wh.connect() as con:
        insert(con, "teacher_rankings", pl.DataFrame({"teacher": ["a", "b"], "lalp_rank": [1, 2], "lalp_mean": [-1.5, -2.5]}))
        insert(con, "quarantine", pl.DataFrame({"reason": ["bad_json"], "source_row": [3], "stage": ["read"]}))


def downgrade(wh: Warehouse, version: int) -> None:
    """What a release at `version` left: the columns later migrations add are absent, and a
    version-1 warehouse (written before versions were recorded) has no version table."""
    with wh.connect() as con:
        for m in W.MIGRATIONS:
            if m.version > version:
                for table, column, _ in m.add_columns:
                    con.execute(f"ALTER TABLE {table} DROP COLUMN {column}")
        if version == 1:
            con.execute(f"DROP TABLE {W.VERSION_TABLE}")
        else:
            con.execute(f"DELETE FROM {W.VERSION_TABLE}")
            con.execute(f"INSERT INTO {W.VERSION_TABLE} VALUES ({version}, 'written by an earlier release', now()::TIMESTAMP)")


def test_a_new_warehouse_records_the_current_schema_version(tmp_path):
    for wh in backends(tmp_path):
        with wh.connect():
            pass
        assert history(wh) == [(W.SCHEMA_VERSION, "created")]
        with wh.connect():  # an up-to-date warehouse is left alone
            pass
        assert history(wh) == [(W.SCHEMA_VERSION, "created")]


@pytest.mark.parametrize("version", range(1, W.SCHEMA_VERSION))
def test_a_warehouse_at_an_earlier_schema_is_migrated_in_place(tmp_path, version):
    for wh in backends(tmp_path):
        write_rows(wh)
        downgrade(wh, version)
        with wh.connect(read_only=True) as con:
            later = [(t, c) for m in W.MIGRATIONS if m.version > version for t, c, _ in m.add_columns]
            assert later and all(c not in W.columns(con, t) for t, c in later)
        with wh.connect() as con:
            for table, cols in W.COLUMNS.items():
                assert list(cols) == [c for c in W.columns(con, table) if c in cols], table
            # the rows written before are kept; the added columns are empty
            assert query(con, "SELECT teacher, lalp_rank, lalp_mean, n_conflicting_prompts FROM teacher_rankings "
                              "ORDER BY teacher").rows() == [("a", 1, -1.5, None), ("b", 2, -2.5, None)]
            assert con.execute("SELECT reason, source_row FROM quarantine").fetchall() == [("bad_json", 3)]
        versions = [v for v, _ in history(wh)]
        assert versions == list(range(version, W.SCHEMA_VERSION + 1)), (wh, history(wh))
        assert all(note.startswith("migrated: ") for v, note in history(wh) if v > version)


def test_a_failing_migration_leaves_the_warehouse_as_it_was(tmp_path, monkeypatch):
    """Every migration step runs in one transaction: one that fails half-way writes nothing."""
    for wh in backends(tmp_path):
        write_rows(wh)
        downgrade(wh, 1)
        monkeypatch.setattr(W, "MIGRATIONS", W.MIGRATIONS + (
            Migration(W.SCHEMA_VERSION + 1, "broken", (("teacher_rankings", "later", "NO_SUCH_TYPE"),)),))
        monkeypatch.setattr(W, "SCHEMA_VERSION", W.SCHEMA_VERSION + 1)
        with pytest.raises(duckdb.Error, match="NO_SUCH_TYPE"):
            with wh.connect():
                pass
        monkeypatch.undo()
        with wh.connect(read_only=True) as con:
            assert not W.table_exists(con, W.VERSION_TABLE)
            # the real migrations ran before the failure, and were rolled back with it
            assert all(c not in W.columns(con, t) for m in W.MIGRATIONS for t, c, _ in m.add_columns)
        with wh.connect():  # the real migrations still apply afterwards
            pass
        assert history(wh)[-1][0] == W.SCHEMA_VERSION


def test_a_warehouse_from_a_newer_release_is_refused_unchanged(tmp_path):
    wh = Warehouse(tmp_path / "new.duckdb")
    write_rows(wh)
    with wh.connect() as con:
        con.execute(f"INSERT INTO {W.VERSION_TABLE} VALUES ({W.SCHEMA_VERSION + 1}, 'from the future', now()::TIMESTAMP)")
    before = sha256(wh.target.path)
    with pytest.raises(WarehouseSchemaError, match=rf"schema version {W.SCHEMA_VERSION + 1}, written by a newer .*Upgrade lalp-pipeline"):
        with wh.connect():
            pass
    assert sha256(wh.target.path) == before


def test_a_table_lacking_a_column_is_refused_with_its_name_and_left_unchanged(tmp_path):
    for wh in backends(tmp_path):
        write_rows(wh)
        with wh.connect() as con:
            con.execute("ALTER TABLE teacher_rankings DROP COLUMN accuracy")
        before = history(wh)
        digest = sha256(wh.target.path)
        with pytest.raises(WarehouseSchemaError, match=r"lacks column\(s\) teacher_rankings\.accuracy that no migration adds"):
            with wh.connect():
                pass
        assert history(wh) == before
        if not wh.is_lake:
            assert sha256(wh.target.path) == digest
        with wh.connect(read_only=True) as con:  # reading still works: lineage and forensics need it
            assert "accuracy" not in W.columns(con, "teacher_rankings")


READ_ALL = "SELECT count(*), sum(length(key)), sum(sum_logprob), sum(n_tokens), count(created_at) FROM score_cache"


def damaged_copies(tmp_path: Path) -> dict[str, Path]:
    good = tmp_path / "good.duckdb"
    wh = Warehouse(good)
    with wh.connect() as con:
        con.execute("INSERT INTO score_cache SELECT md5(range::VARCHAR), -1.0, 3, 'ns', 'run', now()::TIMESTAMP, -0.5, -1.0 "
                    "FROM range(100000)")
    size = good.stat().st_size
    out = {}
    # where the table's blocks are (the file's tail holds free blocks, whose loss DuckDB never sees)
    for name, cut in (("quarter", size // 4), ("header", 100)):
        p = out[f"truncated_{name}"] = tmp_path / f"truncated_{name}.duckdb"
        shutil.copy(good, p)
        os.truncate(p, cut)
    for name, at in (("header", 5000), ("data", size // 4)):
        p = out[f"corrupted_{name}"] = tmp_path / f"corrupted_{name}.duckdb"
        shutil.copy(good, p)
        with open(p, "r+b") as f:
            f.seek(at)
            f.write(bytes(range(256)) * 16)
    out["empty"] = tmp_path / "empty.duckdb"
    out["empty"].touch()
    out["not_duckdb"] = tmp_path / "notes.duckdb"
    out["not_duckdb"].write_text("these are my notes, not a database\n" * 50)
    for name, p in out.items():  # each is damage DuckDB itself cannot read past
        with pytest.raises(duckdb.Error):
            with duckdb.connect(str(p), read_only=True) as con:
                con.execute(READ_ALL).fetchone()
    return out


def test_a_damaged_duckdb_file_is_refused_with_a_clear_message_and_its_bytes_kept(tmp_path):
    for name, path in damaged_copies(tmp_path).items():
        before = sha256(path)
        for read_only in (False, True):
            with pytest.raises(WarehouseDamaged, match=r"truncated or corrupted .*has not been changed.*mv ") as e:
                with Warehouse(path).connect(read_only=read_only) as con:
                    con.execute(READ_ALL).fetchone()  # every block is read
            assert str(path) in str(e.value), name
        assert sha256(path) == before, name


def test_cache_rows_from_before_head_sums_keep_their_scores_with_null_heads(tmp_path):
    """Migration 5 adds the head sums: a cache row and a step score written at version 4 keep
    their sum and count, their heads read as NULL (None), and a new row carries its heads."""
    from lalp_resources.warehouse import cached_scores

    for wh in backends(tmp_path):
        with wh.connect():
            pass
        downgrade(wh, 4)
        with wh.connect(read_only=True) as con:
            assert "head1_logprob" not in W.columns(con, "score_cache")
        # what a version-4 release wrote: no head columns to fill (DuckDB lets the file be written as it is)
        con = duckdb.connect(str(wh.target.path)) if not wh.is_lake else None
        if con is None:
            with wh.connect(read_only=False) as c2:  # DuckLake: the migration runs on open; write after it
                insert(c2, "score_cache", pl.DataFrame({"key": ["old"], "sum_logprob": [-6.0], "n_tokens": [4]}))
        else:
            con.execute("INSERT INTO score_cache (key, sum_logprob, n_tokens) VALUES ('old', -6.0, 4)")
            con.execute("INSERT INTO step_scores (response_id, step_index, n_tokens, sum_logprob, mean_logprob) "
                        "VALUES ('r', 0, 4, -6.0, -1.5)")
            con.close()
        with wh.connect() as c2:
            insert(c2, "score_cache", pl.DataFrame({"key": ["new"], "sum_logprob": [-3.0], "n_tokens": [2],
                                                   "head1_logprob": [-2.0], "head2_logprob": [-3.0]}))
        assert history(wh)[-1][0] == W.SCHEMA_VERSION
        got = cached_scores(wh, ["old", "new"])
        assert got == {"old": (-6.0, 4, None, None), "new": (-3.0, 2, -2.0, -3.0)}
        if not wh.is_lake:
            assert wh.read("SELECT sum_logprob, mean_logprob, head1_logprob FROM step_scores").rows() == [(-6.0, -1.5, None)]
