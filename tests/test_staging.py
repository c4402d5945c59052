"""Cluster-mode staging: workers' per-partition Parquet, and the one serialized load into DuckDB."""

import json
import shutil
import time

import polars as pl
import pytest

from lalp_resources.staging import COMPLETE, DuckDBSink, ParquetSink, StagedCache, load_staged, staged_runs
from lalp_resources.warehouse import Warehouse, query


def frames(teacher: str, run: str, n: int, score: float, keys: tuple[str, ...] = ()) -> dict:
    steps = pl.DataFrame({
        "response_id": [f"{teacher}-r{i // 2}" for i in range(n)], "step_index": [i % 2 for i in range(n)],
        "prompt_id": [f"p{i // 2}" for i in range(n)], "teacher": [teacher] * n, "n_tokens": [3] * n,
        "sum_logprob": [3 * score] * n, "mean_logprob": [score] * n, "cache_hit": [False] * n, "score_run_id": [run] * n,
    }, schema_overrides={"step_index": pl.Int32, "n_tokens": pl.Int32})
    galp = pl.DataFrame({"response_id": sorted(set(steps["response_id"])), "galp": score, "galp_tokens": 6,
                         "teacher": teacher, "score_run_id": run}, schema_overrides={"galp_tokens": pl.Int32})
    cache = pl.DataFrame({"key": list(keys), "sum_logprob": [1.0] * len(keys), "n_tokens": [2] * len(keys),
                          "namespace": "ns", "created_run_id": run}, schema_overrides={"n_tokens": pl.Int32})
    return {"score_cache": cache, "step_scores": steps, "galp_scores": galp}


def stage(root, run, teachers, data: dict, complete=True) -> ParquetSink:
    sink = ParquetSink(root, run, teachers)
    sink.begin()
    for t in teachers:
        sink.write(data[t])
    if complete:
        sink.finish()
    return sink


@pytest.fixture
def wh(tmp_path):
    w = Warehouse(tmp_path / "w.duckdb", lock_timeout_s=5)
    with w.connect():
        pass
    return w


def table(wh, name):
    with wh.connect(read_only=True) as con:
        return query(con, f"SELECT * FROM {name} ORDER BY 1")


def test_complete_run_loads_per_partition_files_then_is_removed(tmp_path, wh):
    root = tmp_path / "staging"
    sink = stage(root, "run1", ["a/b", "c"], {"a/b": frames("a/b", "run1", 4, -1.0, ("k1",)),
                                              "c": frames("c", "run1", 2, -2.0, ("k2",))})
    # one folder per teacher partition, names kept to one path segment
    assert sorted(p.name for p in (sink.dir / "step_scores").iterdir()) == ["teacher=a%2Fb", "teacher=c"]
    assert json.loads((sink.dir / COMPLETE).read_text())["rows"] == {"step_scores": 6, "galp_scores": 3, "score_cache": 2}
    rep = load_staged(wh, root, ["a/b", "c"])
    assert rep.loaded == {"a/b": "run1", "c": "run1"}
    assert rep.rows == {"step_scores": 6, "galp_scores": 3, "score_cache": 2}
    steps = table(wh, "step_scores")
    assert steps.height == 6 and set(steps["score_run_id"]) == {"run1"}
    assert table(wh, "galp_scores").height == 3 and table(wh, "score_cache").height == 2
    assert rep.removed == ["run1"] and not sink.dir.exists()
    # a second load has nothing to do and changes nothing
    assert load_staged(wh, root, ["a/b", "c"]).loaded == {}
    assert table(wh, "step_scores").height == 6


def test_newer_run_replaces_a_teachers_rows_and_leaves_other_teachers_alone(tmp_path, wh):
    root = tmp_path / "staging"
    stage(root, "run1", ["a", "b"], {"a": frames("a", "run1", 4, -1.0), "b": frames("b", "run1", 4, -1.0)})
    load_staged(wh, root, ["a", "b"])
    stage(root, "run2", ["a"], {"a": frames("a", "run2", 2, -3.0)})
    rep = load_staged(wh, root, ["a"])
    steps = table(wh, "step_scores")
    a, b = steps.filter(pl.col("teacher") == "a"), steps.filter(pl.col("teacher") == "b")
    assert a.height == 2 and set(a["mean_logprob"]) == {-3.0} and set(a["score_run_id"]) == {"run2"}
    assert b.height == 4 and set(b["score_run_id"]) == {"run1"}
    assert rep.removed == ["run2"]


def test_incomplete_run_is_not_loaded_but_its_cache_serves_the_next_worker(tmp_path, wh):
    root = tmp_path / "staging"
    dead = stage(root, "dead", ["a"], {"a": frames("a", "dead", 4, -1.0, ("k-dead",))}, complete=False)
    rep = load_staged(wh, root, ["a"])
    assert rep.loaded == {} and rep.waiting == ["dead"] and dead.dir.exists()
    assert table(wh, "step_scores").height == 0
    # the resumed worker finds the killed run's windows in the staged cache
    assert StagedCache(wh, root).lookup(["k-dead", "missing"]) == {"k-dead": (1.0, 2)}
    # once a newer complete run for the same teacher loads and the dead run is known to be over,
    # the dead folder's cache rows are loaded and it goes
    stage(root, "resumed", ["a"], {"a": frames("a", "resumed", 4, -1.0, ("k-new",))})
    rep = load_staged(wh, root, ["a"], run_finished=lambda run_id: run_id == "dead")
    assert rep.loaded == {"a": "resumed"} and sorted(rep.removed) == ["dead", "resumed"]
    assert sorted(table(wh, "score_cache")["key"]) == ["k-dead", "k-new"]
    assert staged_runs(root) == []
    assert StagedCache(wh, root).lookup(["k-dead"]) == {"k-dead": (1.0, 2)}  # now from DuckDB


def test_folder_covering_an_unloaded_teacher_stays(tmp_path, wh):
    root = tmp_path / "staging"
    sink = stage(root, "run1", ["a", "b"], {"a": frames("a", "run1", 2, -1.0), "b": frames("b", "run1", 2, -1.0)})
    rep = load_staged(wh, root, ["a"])
    assert rep.loaded == {"a": "run1"} and rep.removed == [] and sink.dir.exists()
    assert set(table(wh, "step_scores")["teacher"]) == {"a"}
    assert load_staged(wh, root, ["b"]).removed == ["run1"]
    assert set(table(wh, "step_scores")["teacher"]) == {"a", "b"}


def test_a_failed_load_rolls_back_and_keeps_the_staging(tmp_path, wh):
    root = tmp_path / "staging"
    bad = frames("a", "run1", 2, -1.0)
    bad["step_scores"] = bad["step_scores"].with_columns(pl.lit(None, pl.Utf8).alias("response_id"))  # violates NOT NULL key
    sink = stage(root, "run1", ["a"], {"a": bad})
    with pytest.raises(Exception):
        load_staged(wh, root, ["a"])
    assert sink.dir.exists() and table(wh, "step_scores").height == 0 and table(wh, "galp_scores").height == 0


def test_duckdb_sink_commits_each_chunk(tmp_path, wh):
    sink = DuckDBSink(wh, ["a"])
    sink.begin()
    sink.write(frames("a", "r", 2, -1.0, ("k",)))
    assert sink.written("step_scores").height == 2 and table(wh, "score_cache").height == 1
    sink.begin()  # a re-run starts from a clean slate for its teachers
    assert sink.written("step_scores").height == 0


def test_a_live_workers_folder_is_never_removed(tmp_path, wh):
    root = tmp_path / "staging"
    live = stage(root, "older-live", ["a"], {"a": frames("a", "older-live", 2, -1.0, ("k1",))}, complete=False)
    time.sleep(0.01)
    stage(root, "newer", ["a"], {"a": frames("a", "newer", 2, -2.0)})
    rep = load_staged(wh, root, ["a"])  # run_finished defaults to "still running"
    assert rep.loaded == {"a": "newer"} and rep.removed == ["newer"] and rep.waiting == ["older-live"]
    live.write(frames("a", "older-live", 2, -1.0, ("k2",)))  # the live worker keeps writing
    live.finish()
    # its scores are older than what was loaded: they never replace the newer ones
    rep = load_staged(wh, root, ["a"])
    assert rep.loaded == {} and rep.removed == ["older-live"]
    assert set(table(wh, "step_scores")["score_run_id"]) == {"newer"}
    assert {"k1", "k2"} <= set(table(wh, "score_cache")["key"])


def test_older_scores_never_replace_newer_ones(tmp_path, wh):
    root = tmp_path / "staging"
    stage(root, "B", ["a", "b"], {"a": frames("a", "B", 2, -1.0), "b": frames("b", "B", 2, -1.0)})
    time.sleep(0.01)
    stage(root, "C", ["a"], {"a": frames("a", "C", 2, -3.0)})
    assert load_staged(wh, root, ["a"]).loaded == {"a": "C"}
    assert load_staged(wh, root, ["b"]).loaded == {"b": "B"}
    assert load_staged(wh, root, ["a", "b"]).loaded == {}
    steps = table(wh, "step_scores")
    assert set(steps.filter(pl.col("teacher") == "a")["score_run_id"]) == {"C"}
    assert staged_runs(root) == []
    with wh.connect(read_only=True) as con:
        assert dict(con.execute("SELECT teacher, run_id FROM staged_loads").fetchall()) == {"a": "C", "b": "B"}


def test_a_retry_with_the_same_run_id_keeps_its_cache_and_redoes_its_scores(tmp_path, wh):
    root = tmp_path / "staging"
    first = stage(root, "r", ["a"], {"a": frames("a", "r", 4, -1.0, ("k1",))}, complete=False)
    retry = ParquetSink(root, "r", ["a"])
    retry.begin()
    assert StagedCache(wh, root).lookup(["k1"]) == {"k1": (1.0, 2)}
    assert retry.written("step_scores").width == 0  # the killed attempt's scores are gone
    retry.write(frames("a", "r", 2, -2.0, ("k2",)))
    retry.finish()
    assert sorted(f.name for f in (first.dir / "score_cache").iterdir()) == ["chunk-00001.parquet", "chunk-00002.parquet"]
    load_staged(wh, root, ["a"])
    assert set(table(wh, "step_scores")["mean_logprob"]) == {-2.0} and sorted(table(wh, "score_cache")["key"]) == ["k1", "k2"]


def test_writing_into_a_removed_folder_fails_clearly(tmp_path):
    sink = stage(tmp_path / "staging", "r", ["a"], {"a": frames("a", "r", 2, -1.0)}, complete=False)
    shutil.rmtree(sink.dir)
    with pytest.raises(RuntimeError, match="was removed while run r was writing"):
        sink.write(frames("a", "r", 2, -1.0))


def test_staged_cache_skips_a_file_the_loader_removed(tmp_path, wh, monkeypatch):
    root = tmp_path / "staging"
    stage(root, "r1", ["a"], {"a": frames("a", "r1", 2, -1.0, ("k1",))}, complete=False)
    cache = StagedCache(wh, root)
    assert cache.lookup(["k1"]) == {"k1": (1.0, 2)}
    stage(root, "r2", ["b"], {"b": frames("b", "r2", 2, -1.0, ("k2",))}, complete=False)
    real = pl.read_parquet

    def vanishing(path, *a, **kw):  # the loader removes r2 between the glob and the read
        if "r2" in str(path):
            raise FileNotFoundError(path)
        return real(path, *a, **kw)

    monkeypatch.setattr(pl, "read_parquet", vanishing)
    assert cache.lookup(["k1", "k2"]) == {"k1": (1.0, 2)}
