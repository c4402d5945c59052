"""The streaming stages (LALP_BATCH_PROMPTS): `reasoning_steps` and `step_scores` read, process and
commit their scope a batch of prompts at a time, and give exactly what one batch over everything
gives: the same steps, step scores, LALP, rankings and curated rows, bit for bit.

The whole graph (a real Dagster instance, a real DuckDB file, the GX checks) on real ZeroEval
traces (skipped with a message where they are missing) with a tiny random student saved as a
local model dir, for `paragraph`, `sentence` and `fraction:0.25`; one run with every prompt in one
batch, one with two prompts a batch (so the scope has several batches, one of them short)."""

from __future__ import annotations

import json
from pathlib import Path

import dagster as dg
import polars as pl
import pytest
from polars.testing import assert_frame_equal

from helpers import limits, save_tiny_student, temp_dagster_home, zeroeval_traces
from lalp_assets.definitions import build_defs
from lalp_resources.settings import Settings
from lalp_resources.warehouse import Warehouse

PROMPTS, TEACHERS = 5, 3
CANONICAL = ["prompt_id", "prompt", "teacher", "response", "reference_answer"]
# what the runs write that is not a result: run ids, timestamps
VOLATILE = {"steps_run_id", "score_run_id", "ingest_run_id", "created_run_id", "rank_run_id", "select_run_id",
            "ingested_at", "quarantined_at", "created_at"}


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    t = zeroeval_traces()
    teachers = sorted(t["teacher"].unique().to_list())[:TEACHERS]
    t = t.filter(pl.col("teacher").is_in(teachers))
    pids = sorted(t["prompt_id"].unique().to_list())[:PROMPTS]
    rows = t.filter(pl.col("prompt_id").is_in(pids)).select(CANONICAL).sort("prompt_id", "teacher")
    folder = tmp_path_factory.mktemp("zeroeval_subset")
    with open(folder / "traces.jsonl", "w") as f:
        for r in rows.iter_rows(named=True):
            f.write(json.dumps(r) + "\n")
    return folder


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory, smol_tokenizer):
    return save_tiny_student(tmp_path_factory.mktemp("stream_student"), smol_tokenizer, seed=3)


def run_graph(root: Path, source: Path, student_dir: Path, monkeypatch, **settings) -> tuple[Warehouse, dict]:
    home = temp_dagster_home(root)
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    s = Settings(dagster_home=str(home), warehouse=str(root / "lalp.duckdb"), sources=(str(source),),
                 inbox=str(root / "inbox"), model=str(student_dir), device="cpu", dtype="float32", max_prompts=0,
                 exports=str(root / "exports"), bootstrap=50, **settings)
    defs = build_defs(s)
    teachers = defs.resources["trace_sources"].discover_teachers()
    with dg.DagsterInstance.get() as instance:
        instance.add_dynamic_partitions("teacher", teachers)
        tags = {"dagster/asset_partition_range_start": teachers[0], "dagster/asset_partition_range_end": teachers[-1]}
        assert defs.resolve_job_def("score_teachers_job").execute_in_process(instance=instance, tags=tags).success
        assert defs.resolve_job_def("rank_and_curate_job").execute_in_process(instance=instance).success
        md = {k: instance.get_latest_materialization_event(dg.AssetKey(k)).asset_materialization.metadata
              for k in ("reasoning_steps", "step_scores")}
    return Warehouse(s.warehouse), md


def table(wh: Warehouse, name: str, order: str) -> pl.DataFrame:
    df = wh.read(f"SELECT * FROM {name} ORDER BY {order}")
    return df.drop([c for c in df.columns if c in VOLATILE])


@pytest.mark.parametrize("segmenter,window", [("paragraph", "fixed:4"), ("sentence", "fixed:4"), ("paragraph", "fraction:0.25")])
def test_batches_of_prompts_give_the_same_tables(tmp_path, monkeypatch, source, student_dir, segmenter, window):
    one, md_one = run_graph(tmp_path / "one", source, student_dir, monkeypatch, segmenter=segmenter, window=window,
                            batch_prompts=0)
    many, md_many = run_graph(tmp_path / "many", source, student_dir, monkeypatch, segmenter=segmenter, window=window,
                              batch_prompts=2)
    # the scope really went through in several batches (3 of 2, 2 and 1 prompts), and in one
    assert md_many["reasoning_steps"]["batches"].value == 3 and md_one["reasoning_steps"]["batches"].value == 1
    assert md_many["step_scores"]["batches"].value == 3 and md_one["step_scores"]["batches"].value == 1
    n_steps = one.read("SELECT count(*) AS n FROM reasoning_steps")["n"][0]
    assert n_steps > PROMPTS * TEACHERS  # several steps a response: the windows matter
    for name, order in [("reasoning_steps", "response_id, step_index"), ("step_scores", "response_id, step_index"),
                        ("galp_scores", "response_id"), ("response_scores", "response_id"),
                        ("teacher_rankings", "teacher"), ("selection_decisions", "response_id"),
                        ("curated_sft_dataset", "prompt_id"), ("quarantine", "source_row, reason")]:
        a, b = table(one, name, order), table(many, name, order)
        assert a.height == b.height, name
        assert_frame_equal(a, b, check_exact=True)  # `name` says which table
    assert md_many["step_scores"]["dagster/row_count"].value == n_steps


def test_duplicates_across_files_are_found_in_the_warehouse(tmp_path, monkeypatch, student_dir):
    """`raw_teacher_traces` deduplicates across files by digest inside the warehouse (the texts do
    not pass through the process): the same kept rows and the same quarantine rows (reason, detail
    naming the kept row, excerpt) as the in-memory rule that `lalp ingest` applies."""
    from lalp_resources import adapters

    src = tmp_path / "src"
    src.mkdir()
    long = "x" * 400 + " so \\boxed{4}"  # longer than the excerpt: only its first characters leave the warehouse
    a = [{"prompt_id": f"p{i}", "prompt": f"Q{i}?", "teacher": "t1", "response": f"Step {i}.\n\nSo \\boxed{{{i}}}",
          "reference_answer": str(i)} for i in range(4)] + [
        {"prompt_id": "p9", "prompt": "Q9?", "teacher": "t1", "response": long, "reference_answer": "4"}]
    b = [dict(a[1]), {**a[2], "response": "Another answer.\n\nSo \\boxed{2}"}, dict(a[4]),
         {"prompt_id": "p5", "prompt": "Q5?", "teacher": "t1", "response": "New.\n\nSo \\boxed{5}", "reference_answer": "5"}]
    for name, rows in (("a.jsonl", a), ("b.jsonl", b)):
        (src / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    home = temp_dagster_home(tmp_path)
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    s = Settings(dagster_home=str(home), warehouse=str(tmp_path / "lalp.duckdb"), sources=(str(src),),
                 inbox=str(tmp_path / "inbox"), model=str(student_dir), device="cpu", dtype="float32", max_prompts=0)
    defs = build_defs(s)
    with dg.DagsterInstance.get() as instance:
        instance.add_dynamic_partitions("teacher", ["t1"])
        res = defs.resolve_job_def("score_teachers_job").execute_in_process(
            instance=instance, partition_key="t1", asset_selection=[dg.AssetKey("raw_teacher_traces")])
        assert res.success
        checks = [e.asset_check_evaluation_data for e in res.all_events if e.event_type_value == "ASSET_CHECK_EVALUATION"]
        assert {c.check_name: c.passed for c in checks} == {"traces_valid": True, "counts_reconcile": True}
    wh = Warehouse(s.warehouse)
    expected = adapters.ingest([str(src / "a.jsonl"), str(src / "b.jsonl")], "auto", teacher_mode=s.teacher_mode,
                               limits=limits(), verify=False)
    got = wh.read("SELECT prompt_id, response, source_row FROM raw_teacher_traces ORDER BY prompt_id")
    assert_frame_equal(got, expected.traces.select("prompt_id", "response", "source_row").sort("prompt_id"))
    assert got.height == 6 and got.filter(pl.col("prompt_id") == "p9")["response"][0] == long
    cols = ["source_uri", "source_row", "reason", "detail", "raw_excerpt", "prompt_id", "teacher"]
    q = wh.read(f"SELECT {', '.join(cols)} FROM quarantine WHERE stage = 'assemble' ORDER BY source_row")
    want = expected.quarantine.filter(pl.col("reason").is_in(["duplicate", "conflicting_duplicate"])).select(cols)
    assert sorted(q["reason"].to_list()) == ["conflicting_duplicate", "duplicate", "duplicate"]
    assert_frame_equal(q, want.sort("source_row"))
