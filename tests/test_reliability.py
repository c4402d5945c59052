"""Nothing lost: one test per defect of the adversarial pass, each run through the real `lalp`
command (in-process, so the tiny student loads once), a real Dagster instance in a temp
DAGSTER_HOME and a real DuckDB file.

1. a run with fewer sources keeps the other teachers      -> test_fewer_sources_keep_other_teachers
2. crafted fields cannot collide on response_id            -> test_crafted_ids_do_not_collide_in_lalp_score
3. prompt size is bounded                                  -> tests/test_adapters.py (50 MB prompt), test_token_caps_quarantine
4. one unreadable file blocks nothing                      -> test_unreadable_files_are_quarantined_and_the_rest_ingested
5. the inbox sensor waits for stable files; old quarantine rows are superseded
                                                           -> test_sensor_waits_for_a_stable_file, test_changed_file_supersedes_its_quarantine
6. long teacher names                                      -> test_long_and_hostile_teacher_names
7. a TeX-looking teacher name                              -> test_long_and_hostile_teacher_names
+  read-only commands open read-only                       -> test_lineage_on_a_missing_warehouse_creates_nothing
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import duckdb
import pytest

from helpers import save_tiny_student, temp_dagster_home, write_traces
from lalp_assets import cli

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory, smol_tokenizer):
    return save_tiny_student(tmp_path_factory.mktemp("student"), smol_tokenizer, seed=11)


@pytest.fixture
def lalp(tmp_path, monkeypatch, student_dir):
    """`lalp ARGS...` in this process with a temp home; returns (rc, stdout+stderr)."""
    home = temp_dagster_home(tmp_path)
    for k in list(os.environ):
        if k.startswith("LALP_"):
            monkeypatch.delenv(k)
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    monkeypatch.setenv("LALP_MODEL", str(student_dir))
    monkeypatch.setenv("LALP_DEVICE", "cpu")
    monkeypatch.setenv("LALP_DTYPE", "float32")
    monkeypatch.setenv("LALP_MAX_PROMPTS", "0")
    monkeypatch.setenv("LALP_BOOTSTRAP", "50")

    def run(*args: str, capsys=None) -> int:
        return cli.main(list(args))

    run.home = home
    run.warehouse = home / "lalp.duckdb"
    return run


def rows(db: Path, sql: str, params=None) -> list[tuple]:
    con = duckdb.connect(str(db), read_only=True)
    try:
        return con.execute(sql, params or []).fetchall()
    finally:
        con.close()


TABLES = ["raw_teacher_traces", "reasoning_steps", "step_scores", "galp_scores", "response_scores",
          "teacher_rankings", "selection_decisions"]


def per_teacher(db: Path) -> dict[str, dict[str, int]]:
    return {t: dict(rows(db, f"SELECT teacher, count(*) FROM {t} GROUP BY 1")) for t in TABLES}


def test_fewer_sources_keep_other_teachers(lalp, tmp_path, capsys):
    full = write_traces(tmp_path / "abc.jsonl", 3, teachers=("A", "B", "C"), paragraphs=3)
    assert lalp("run", "--source", str(full)) == 0
    before = per_teacher(lalp.warehouse)
    assert all(set(v) == {"A", "B", "C"} for v in before.values()), before
    ac = tmp_path / "ac.jsonl"
    ac.write_text("".join(line + "\n" for line in full.read_text().splitlines() if json.loads(line)["teacher"] != "B"))
    capsys.readouterr()
    assert lalp("run", "--source", str(ac)) == 0
    out = capsys.readouterr()
    assert "['B'] are registered but not in these sources: left untouched" in out.err
    assert per_teacher(lalp.warehouse) == before  # nothing of B lost; A and C unchanged too

    # removing a teacher is explicit, reported, and a dry run without --yes
    assert lalp("forget", "B") == 0
    assert "dry run" in capsys.readouterr().out
    assert per_teacher(lalp.warehouse) == before
    assert lalp("forget", "B", "--yes") == 0
    report = capsys.readouterr().out
    assert "raw_teacher_traces: 3" in report and "deleted" in report
    after = per_teacher(lalp.warehouse)
    assert all("B" not in v for v in after.values()) and all(after[t]["A"] == before[t]["A"] for t in TABLES)


def test_crafted_ids_do_not_collide_in_lalp_score(lalp, tmp_path):
    """prompt_id 'p0\\x1fevil' + teacher 'x' and prompt_id 'p0' + teacher 'evil\\x1fx' hashed the
    same under a separator join; now `lalp score` writes exactly one row per accepted response."""
    import polars as pl

    base = {"prompt": "What is 1+1?", "response": "One plus one.\n\nSo \\boxed{2}.", "reference_answer": "2"}
    src = tmp_path / "crafted.jsonl"
    src.write_text("\n".join(json.dumps({**base, **f}) for f in (
        {"prompt_id": "p0\u001fevil", "teacher": "x"},
        {"prompt_id": "p0", "teacher": "evil\u001fx"},
        {"prompt_id": "p0", "teacher": "legit"},
    )) + "\n")
    assert lalp("score", str(src), "--out", str(tmp_path / "out")) == 0
    resp = pl.read_parquet(tmp_path / "out" / "responses.parquet")
    steps = pl.read_parquet(tmp_path / "out" / "steps.parquet")
    assert resp.height == 3 and resp["response_id"].n_unique() == 3
    assert steps.group_by("response_id").len()["len"].to_list() == [2, 2, 2]


def test_unreadable_files_are_quarantined_and_the_rest_ingested(lalp, tmp_path, capsys):
    folder = tmp_path / "sources"
    folder.mkdir()
    write_traces(folder / "good.jsonl", 2, teachers=("A", "B"), paragraphs=2)
    (folder / "notes.json").write_text("these are my notes, not JSON {")
    good_parquet = tmp_path / "t.parquet"
    import polars as pl

    pl.read_ndjson(folder / "good.jsonl").with_columns(pl.lit("P").alias("teacher")).write_parquet(good_parquet)
    (folder / "half.parquet").write_bytes(good_parquet.read_bytes()[: good_parquet.stat().st_size // 2])
    assert lalp("run", "--source", str(folder)) == 0
    assert sorted(t for (t,) in rows(lalp.warehouse, "SELECT DISTINCT teacher FROM raw_teacher_traces")) == ["A", "B"]
    q = rows(lalp.warehouse, "SELECT source_uri, reason FROM quarantine")
    names = {uri.rsplit("/", 1)[-1]: reason for uri, reason in q}
    assert set(names) == {"notes.json", "half.parquet"}, q
    files = rows(lalp.warehouse, "SELECT item, n_read, n_accepted, n_quarantined FROM source_files ORDER BY item")
    assert all(n == a + qn for _, n, a, qn in files), files


def test_changed_file_supersedes_its_quarantine(lalp, tmp_path):
    src = write_traces(tmp_path / "t.jsonl", 2, teachers=("A",), paragraphs=2)
    good = src.read_text()
    src.write_text(good + '{"prompt_id": "q9", "prompt": "cut', encoding="utf-8")  # a copy cut mid-line
    assert lalp("run", "--source", str(src)) == 0
    assert [r for (r,) in rows(lalp.warehouse, "SELECT reason FROM quarantine")] == ["invalid_json"]
    src.write_text(good)  # the complete file arrives
    assert lalp("run", "--source", str(src)) == 0
    assert rows(lalp.warehouse, "SELECT count(*) FROM quarantine") == [(0,)]
    assert rows(lalp.warehouse, "SELECT count(*) FROM raw_teacher_traces") == [(2,)]
    # and an unchanged file is not read again
    assert lalp("run", "--source", str(src)) == 0
    assert rows(lalp.warehouse, "SELECT count(DISTINCT source_sha256) FROM source_files") == [(2,)]


def test_sensor_waits_for_a_stable_file(tmp_path):
    """A file still being written is not taken; once size and mtime hold for a tick, it is."""
    import dagster as dg

    from lalp_assets.definitions import build_defs
    from lalp_resources.settings import Settings

    home = temp_dagster_home(tmp_path)
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    defs = build_defs(Settings(dagster_home=str(home), inbox=str(inbox), sources=()))
    sensor = defs.resolve_sensor_def("inbox_sensor")
    src = write_traces(tmp_path / "full.jsonl", 2, teachers=("A",), paragraphs=2).read_bytes()
    part = inbox / "a.jsonl"
    with dg.instance_for_test() as instance:
        def tick(cursor):
            ctx = dg.build_sensor_context(instance=instance, cursor=cursor, resources={"trace_sources": defs.resources["trace_sources"]})
            return sensor(ctx)

        part.write_bytes(src[: len(src) // 2])
        r1 = tick(None)
        assert not r1.run_requests  # first sight: not yet known to be stable
        time.sleep(0.01)
        part.write_bytes(src)  # the writer goes on
        r2 = tick(r1.cursor)
        assert not r2.run_requests  # it changed since the last tick
        r3 = tick(r2.cursor)
        assert [rr.partition_key for rr in r3.run_requests] == ["A"]
        r4 = tick(r3.cursor)
        assert not r4.run_requests  # nothing new


def test_long_and_hostile_teacher_names(lalp, tmp_path):
    """A 200-character name and a TeX-looking one run through ranking, plots and curation; a name
    over the limit is quarantined with the limit in its reason."""
    long_name = "t" * 200
    tex = "price$\\frac{$x"
    too_long = "z" * 300
    src = write_traces(tmp_path / "n.jsonl", 2, teachers=(long_name, tex, too_long), paragraphs=2)
    assert lalp("run", "--source", str(src)) == 0
    teachers = {t for (t,) in rows(lalp.warehouse, "SELECT teacher FROM teacher_rankings")}
    assert teachers == {long_name, tex}
    assert {t for (t,) in rows(lalp.warehouse, "SELECT DISTINCT teacher FROM curated_sft_dataset")} <= {long_name, tex}
    reasons = rows(lalp.warehouse, "SELECT reason, detail FROM quarantine")
    assert len(reasons) == 2 and all(r == "teacher_too_long" and "256" in d for r, d in reasons), reasons


def test_lineage_on_a_missing_warehouse_creates_nothing(lalp, tmp_path, capsys):
    missing = tmp_path / "typo" / "lalp.duckdb"
    assert lalp("lineage", "abc", "--warehouse", str(missing)) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "typo").exists()
