"""Object stores (issue 19) against a real S3-compatible server on loopback (moto's server mode,
tests/s3.py): sources read from a prefix, the ledger keyed by (size, ETag), a changed object
superseding its old rows, a multipart upload in progress never read, the inbox sensor on an S3
prefix, unreadable objects quarantined, exports written to S3, and DuckLake's data in S3 with
concurrent writers. The code under test reaches the server through the standard AWS variables
only (no mocked client); the tests' own setup uses boto3."""

from __future__ import annotations

import io
import itertools
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import dagster as dg
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import REPO, check_ingest_invariants, limits, temp_dagster_home, trace_row
from s3 import s3_or_skip, throwaway_s3

from lalp_resources import adapters, objectstore
from lalp_resources.adapters import expand_sources, ingest
from lalp_resources.pipeline import file_stat, sync_sources
from lalp_resources.resources import TraceSourcesResource
from lalp_resources.warehouse import Warehouse

_BUCKETS = itertools.count()


@pytest.fixture(scope="module")
def s3server():
    s3_or_skip()
    with throwaway_s3() as server:
        yield server


@pytest.fixture
def s3(s3server, monkeypatch):
    """The server, this process's AWS variables pointed at it, and a fresh bucket."""
    for k in ("AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE"):
        monkeypatch.delenv(k, raising=False)
    for k, v in s3server.variables().items():
        monkeypatch.setenv(k, v)
    s3server.bucket = f"lalp-test-{next(_BUCKETS)}"
    s3server.create_bucket(s3server.bucket)
    return s3server


def put(s3, key: str, body: bytes | str) -> str:
    s3.client().put_object(Bucket=s3.bucket, Key=key, Body=body.encode() if isinstance(body, str) else body)
    return f"s3://{s3.bucket}/{key}"


def jsonl(rows: list) -> str:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)


def parquet_bytes(rows: list[dict]) -> bytes:
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buf)
    return buf.getvalue()


def sources(**kw) -> TraceSourcesResource:
    base = dict(sources=[], inbox="", format="auto", teacher_mode="model", max_prompt_chars=100_000,
                max_response_chars=200_000, max_teacher_chars=256, max_prompt_id_chars=256, inbox_settle_s=0.0)
    base.update(kw)
    return TraceSourcesResource(**base)


def sync(wh, items, ts=None):
    ts = ts or sources()
    return sync_sources(wh, items, ts.read_one, adapters.file_sha256, "run-1", "auto")


# --------------------------------------------------------------------------- sources


def test_ingest_from_a_prefix(s3):
    base = f"s3://{s3.bucket}/traces"
    put(s3, "traces/a.jsonl", jsonl([trace_row("p1", "t1"), trace_row("p2", "t1"), "{broken"]))
    put(s3, "traces/b.parquet", parquet_bytes([trace_row("p1", "t2", response="1+1 is \\boxed{2}")]))
    put(s3, "traces/notes.txt", "not a trace file")               # not an input suffix: not listed
    put(s3, "traces/sub/deeper.jsonl", jsonl([trace_row("p9")]))  # a deeper "folder": not read, as locally
    # a hub dataset layout under a prefix: the teacher is its folder's name
    put(s3, "hub/deepseek-r1/README.md", "---\nconfigs: []\n---\n")
    put(s3, "hub/deepseek-r1/data/train-00000-of-00001.parquet", parquet_bytes([
        {"system": "think first", "conversations": [{"from": "user", "value": "What is 1+1?"},
                                                    {"from": "assistant", "value": "<think>1+1</think>\\boxed{2}"}]}]))
    items = expand_sources([base, f"s3://{s3.bucket}/hub/deepseek-r1/"])
    assert items == [f"{base}/a.jsonl", f"{base}/b.parquet",
                     f"s3://{s3.bucket}/hub/deepseek-r1/data/train-00000-of-00001.parquet"]
    res = ingest(items, teacher_mode="model", limits=limits())
    check_ingest_invariants(res)
    assert res.summary() == {"read": 5, "accepted": 4, "quarantined": 1, "by_reason": {"invalid_json": 1}}
    assert set(res.traces["source_uri"]) == set(items) and res.quarantine["source_uri"][0] == f"{base}/a.jsonl"
    assert sorted(res.traces["teacher"].unique()) == ["deepseek-r1", "t1", "t2"]
    r1 = res.traces.filter(pl.col("teacher") == "deepseek-r1").row(0, named=True)
    assert r1["format"] == "sharegpt" and r1["prompt"] == "What is 1+1?" and r1["response"].startswith("<think>")
    # the hash of what was read is the object's
    body = s3.client().get_object(Bucket=s3.bucket, Key="traces/a.jsonl")["Body"].read()
    import hashlib

    assert res.quarantine["source_sha256"][0] == hashlib.sha256(body).hexdigest() == adapters.file_sha256(items[0])
    with pytest.raises(FileNotFoundError, match="nothing-here"):
        expand_sources([f"s3://{s3.bucket}/nothing-here"])
    put(s3, "empty/readme.txt", "x")
    with pytest.raises(ValueError, match="holds no"):
        expand_sources([f"s3://{s3.bucket}/empty"])


def test_an_unreadable_object_is_a_quarantine_row(s3, tmp_path):
    gone = put(s3, "src/gone.jsonl", jsonl([trace_row()]))
    cut = parquet_bytes([trace_row(f"p{i}") for i in range(50)])
    half = put(s3, "src/half.parquet", cut[: len(cut) // 2])
    ok = put(s3, "src/ok.jsonl", jsonl([trace_row("p1", "u")]))
    items = expand_sources([f"s3://{s3.bucket}/src"])
    s3.client().delete_object(Bucket=s3.bucket, Key="src/gone.jsonl")  # removed between listing and reading
    wh = Warehouse(tmp_path / "lalp.duckdb")
    files = sync(wh, items)
    assert [f.n_read for f in files] == [1, 1, 1] and [f.n_accepted for f in files] == [0, 0, 1]
    q = wh.read("SELECT source_uri, reason, detail FROM quarantine ORDER BY source_uri")
    assert q.rows() == [(gone, "unreadable_file", q["detail"][0]), (half, "invalid_parquet", q["detail"][1])]
    assert gone in q["detail"][0] and "/tmp/" not in q["detail"][0]  # the object is named, not its local copy
    assert ok in wh.read("SELECT source_uri FROM source_traces")["source_uri"].to_list()


def test_a_changed_object_supersedes_its_old_rows_and_the_ledger_keys_it_by_etag(s3, tmp_path):
    url = put(s3, "src/t.jsonl", jsonl([trace_row("p1"), trace_row("p2"), "{cut"]))
    wh = Warehouse(tmp_path / "lalp.duckdb")
    (f1,) = sync(wh, [url])
    assert f1.new and (f1.n_read, f1.n_accepted, f1.n_quarantined) == (3, 2, 1)
    etag = s3.client().head_object(Bucket=s3.bucket, Key="src/t.jsonl")["ETag"].strip('"')
    info = objectstore.info(url)
    assert info.etag == etag and file_stat(url) == (info.size, None, etag)
    ledger = wh.read("SELECT item, source_uri, size, mtime_ns, etag FROM source_files")
    assert ledger.rows() == [(url, url, info.size, None, etag)]  # (size, ETag) where a file has (size, mtime)
    # unchanged: not read again
    (again,) = sync(wh, [url])
    assert not again.new and wh.read("SELECT count(*) AS n FROM source_files")["n"][0] == 1
    # the same bytes uploaded again: a new LastModified, the same ETag: still not read
    put(s3, "src/t.jsonl", jsonl([trace_row("p1"), trace_row("p2"), "{cut"]))
    (same,) = sync(wh, [url])
    assert not same.new and wh.read("SELECT count(*) AS n FROM source_files")["n"][0] == 1
    # changed: read, and its old rows and quarantine rows superseded
    put(s3, "src/t.jsonl", jsonl([trace_row("p1"), trace_row("p2", response="2 = \\boxed{2}"), trace_row("p3")]))
    (f2,) = sync(wh, [url])
    assert f2.new and (f2.n_read, f2.n_accepted, f2.n_quarantined) == (3, 3, 0) and f2.source_sha256 != f1.source_sha256
    traces = wh.read("SELECT prompt_id, response, source_sha256 FROM source_traces ORDER BY prompt_id")
    assert traces["prompt_id"].to_list() == ["p1", "p2", "p3"] and set(traces["source_sha256"]) == {f2.source_sha256}
    assert traces["response"][1] == "2 = \\boxed{2}"
    assert wh.read("SELECT count(*) AS n FROM quarantine WHERE source_uri = ?", [url])["n"][0] == 0


def _multipart_open(s3, key: str, data: bytes, part: int = 5 << 20) -> tuple[str, list[dict]]:
    """Start a multipart upload and send every part but leave it uncompleted."""
    c = s3.client()
    upload = c.create_multipart_upload(Bucket=s3.bucket, Key=key)["UploadId"]
    parts = []
    for n, lo in enumerate(range(0, len(data), part), start=1):
        r = c.upload_part(Bucket=s3.bucket, Key=key, PartNumber=n, UploadId=upload, Body=data[lo:lo + part])
        parts.append({"PartNumber": n, "ETag": r["ETag"]})
    return upload, parts


def _big_traces(teacher: str, n: int = 60, chars: int = 100_000) -> bytes:
    return jsonl([trace_row(f"q{i}", teacher, response=("x" * chars) + f" \\boxed{{{i}}}") for i in range(n)]).encode()


def test_a_multipart_upload_in_progress_is_not_read_half_written(s3, tmp_path):
    put(s3, "inbox/small.jsonl", jsonl([trace_row("p1", "small")]))
    data = _big_traces("big")
    assert len(data) > 5 << 20  # two parts
    upload, parts = _multipart_open(s3, "inbox/big.jsonl", data)
    prefix = f"s3://{s3.bucket}/inbox"
    wh = Warehouse(tmp_path / "lalp.duckdb")
    # in progress: not listed, so neither read by a run nor seen by the sensor
    assert expand_sources([prefix]) == [f"{prefix}/small.jsonl"]
    assert list(sources(inbox=prefix).inbox_stats()) == [f"{prefix}/small.jsonl"]
    sync(wh, expand_sources([prefix]))
    assert wh.read("SELECT count(*) AS n FROM source_traces WHERE teacher = 'big'")["n"][0] == 0
    s3.client().complete_multipart_upload(Bucket=s3.bucket, Key="inbox/big.jsonl", UploadId=upload,
                                          MultipartUpload={"Parts": parts})
    files = sync(wh, expand_sources([prefix]))
    big = [f for f in files if f.item.endswith("big.jsonl")][0]
    assert big.new and (big.n_read, big.n_accepted) == (60, 60)  # whole, every row
    assert objectstore.info(big.item).etag.endswith("-2")  # a multipart ETag keys the ledger as well
    assert wh.read("SELECT count(*) AS n FROM source_traces WHERE teacher = 'big'")["n"][0] == 60


def test_the_sensor_on_an_s3_inbox(s3, tmp_path):
    from lalp_assets.definitions import build_defs
    from lalp_resources.settings import Settings

    home = temp_dagster_home(tmp_path)
    prefix = f"s3://{s3.bucket}/inbox/"
    defs = build_defs(Settings(dagster_home=str(home), inbox=prefix, sources=()))
    sensor = defs.resolve_sensor_def("inbox_sensor")
    with dg.instance_for_test() as instance:
        def tick(cursor):
            ctx = dg.build_sensor_context(instance=instance, cursor=cursor, resources={"trace_sources": defs.resources["trace_sources"]})
            return sensor(ctx)

        r0 = tick(None)
        assert not r0.run_requests and "no new or changed" in r0.skip_reason.skip_message
        put(s3, "inbox/a.jsonl", jsonl([trace_row("p1", "A")]))
        upload, parts = _multipart_open(s3, "inbox/b.jsonl", _big_traces("B"))
        r1 = tick(r0.cursor)
        assert not r1.run_requests  # first sight of a.jsonl; b.jsonl not visible at all
        r2 = tick(r1.cursor)
        assert [rr.partition_key for rr in r2.run_requests] == ["A"]
        assert r2.dynamic_partitions_requests[0].partition_keys == ["A"]
        assert not tick(r2.cursor).run_requests  # nothing new
        s3.client().complete_multipart_upload(Bucket=s3.bucket, Key="inbox/b.jsonl", UploadId=upload,
                                              MultipartUpload={"Parts": parts})
        put(s3, "inbox/a.jsonl", jsonl([trace_row("p1", "A"), trace_row("p1", "C")]))  # a changed object
        r3 = tick(r2.cursor)
        assert not r3.run_requests  # both changed since the last tick: wait for them to settle
        r4 = tick(r3.cursor)
        assert sorted(rr.partition_key for rr in r4.run_requests) == ["A", "B", "C"]
        assert not tick(r4.cursor).run_requests
        # the same bytes again: a new upload time, the same ETag and content: nothing to do
        put(s3, "inbox/a.jsonl", jsonl([trace_row("p1", "A"), trace_row("p1", "C")]))
        assert not tick(tick(r4.cursor).cursor).run_requests


# --------------------------------------------------------------------------- the whole graph, exports in S3


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory, smol_tokenizer):
    from helpers import save_tiny_student

    return save_tiny_student(tmp_path_factory.mktemp("tiny_student"), smol_tokenizer, seed=3)


@pytest.mark.slow  # the whole graph with a tiny student: ~45 s on a shared 2-core machine
def test_sources_and_exports_in_s3_through_the_graph(s3, tmp_path, monkeypatch, tiny_model_dir):
    """Traces read from an S3 prefix, the graph run, and the curated set written under an S3
    prefix: JSONL, Parquet, the HF dataset folder and the report."""
    from helpers import write_traces

    from lalp_assets.definitions import build_defs
    from lalp_resources.settings import Settings

    home = temp_dagster_home(tmp_path)
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    local = write_traces(tmp_path / "t.jsonl", 3, teachers=("t1", "t2"), paragraphs=3)
    src = put(s3, "traces/t.jsonl", local.read_bytes())
    exports = f"s3://{s3.bucket}/exports/run1"
    settings = Settings(dagster_home=str(home), warehouse=str(tmp_path / "lalp.duckdb"), sources=(src,), inbox="",
                        model=str(tiny_model_dir), device="cpu", dtype="float32", max_prompts=0, exports=exports,
                        bootstrap=100)
    defs = build_defs(settings)
    instance = dg.DagsterInstance.get()
    try:
        instance.add_dynamic_partitions("teacher", ["t1", "t2"])
        job = defs.resolve_job_def("score_teachers_job")
        for t in ("t1", "t2"):
            assert job.execute_in_process(instance=instance, partition_key=t).success
        assert defs.resolve_job_def("rank_and_curate_job").execute_in_process(instance=instance).success
        ev = instance.get_latest_materialization_event(dg.AssetKey("curated_sft_dataset")).asset_materialization
    finally:
        instance.dispose()
    assert ev.metadata["jsonl"].value == f"{exports}/curated_sft.jsonl"
    assert ev.metadata["report"].value == f"{exports}/report/teacher_selection_report.md"
    keys = {o["Key"] for o in s3.client().list_objects_v2(Bucket=s3.bucket, Prefix="exports/run1/")["Contents"]}
    for name in ("curated_sft.jsonl", "curated_sft.parquet", "report/teacher_selection_report.md", "report/ranking.png",
                 "curated_sft_hf/dataset_info.json", "curated_sft_hf/state.json"):
        assert f"exports/run1/{name}" in keys, sorted(keys)
    wh = Warehouse(tmp_path / "lalp.duckdb")
    curated = wh.read("SELECT prompt_id, response_id FROM curated_sft_dataset ORDER BY prompt_id")
    body = s3.client().get_object(Bucket=s3.bucket, Key="exports/run1/curated_sft.jsonl")["Body"].read().decode()
    lines = [json.loads(x) for x in body.splitlines()]
    assert [(r["prompt_id"], r["response_id"]) for r in lines] == curated.rows() and len(lines) == 3
    assert {r["source_uri"] for r in lines} == {src}  # provenance names the object
    # the HF dataset folder loads with `datasets` from S3 as from disk
    import datasets

    hf = tmp_path / "hf"
    s3fs_fs, _ = objectstore.filesystem(exports)
    s3fs_fs.get(f"{s3.bucket}/exports/run1/curated_sft_hf", str(hf), recursive=True)
    assert datasets.load_from_disk(str(hf)).num_rows == 3
    # a lineage record checks the object's current hash
    from lalp_resources.lineage import lineage_report

    rec = lineage_report(lines[0]["response_id"], str(tmp_path / "lalp.duckdb"))
    assert rec["input"]["source_uri"] == src and rec["input"]["file_unchanged"] is True


# --------------------------------------------------------------------------- DuckLake data in S3

WORKER = textwrap.dedent("""
    import json, pathlib, sys, time
    import polars as pl
    from lalp_resources.warehouse import Warehouse, insert, replace_teachers, run_transaction

    spec, data_path, me, n_procs, rounds, barrier = sys.argv[1:7]
    me, n_procs, rounds = int(me), int(n_procs), int(rounds)
    wh = Warehouse(spec, lock_timeout_s=60, data_path=data_path)
    teacher = f"t{me}"
    barrier = pathlib.Path(barrier)
    (barrier / f"ready-{me}").touch()
    while len(list(barrier.glob("ready-*"))) < n_procs:
        time.sleep(0.005)
    for rnd in range(rounds):
        steps = pl.DataFrame([(f"{teacher}-r{r}", teacher, s, f"round {rnd}") for r in range(4) for s in range(3)],
                             schema=["response_id", "teacher", "step_index", "text"], orient="row")
        cache = pl.DataFrame({"key": [f"{teacher}-k{rnd}-{i}" for i in range(10)] + [f"shared-k{rnd}-{i}" for i in range(3)],
                              "sum_logprob": [float(me)] * 13, "n_tokens": [1] * 13, "created_run_id": [teacher] * 13})
        with wh.connect() as con:
            def chunk():
                replace_teachers(con, "reasoning_steps", [teacher], steps)
                insert(con, "score_cache", cache, mode="replace")
            run_transaction(con, chunk)
    print(json.dumps({"teacher": teacher}))
""")


@pytest.mark.slow  # two Python writer processes against PostgreSQL and the S3 server: ~10-30 s on 2 cores
def test_ducklake_data_in_s3_two_concurrent_writers_keep_every_row(s3, tmp_path):
    from pg import postgres_or_skip, throwaway_postgres

    postgres_or_skip()
    data_path = f"s3://{s3.bucket}/lake/"
    n_procs, rounds = 2, 4
    with throwaway_postgres() as pg:
        spec = f"ducklake:postgres:{pg.create_database('lake_s3')}"
        barrier = tmp_path / "barrier"
        barrier.mkdir()
        env = {**os.environ, "PYTHONPATH": str(REPO)}  # the AWS variables of the `s3` fixture ride along
        procs = [subprocess.Popen([sys.executable, "-c", WORKER, spec, data_path, str(i), str(n_procs), str(rounds),
                                   str(barrier)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                                  cwd=REPO) for i in range(n_procs)]
        for p in procs:
            out, err = p.communicate(timeout=300)
            assert p.returncode == 0, err[-3000:]
        # a reader that names no data path finds it in the catalog
        with Warehouse(spec, lock_timeout_s=30).connect(read_only=True) as con:
            steps = pl.from_arrow(con.sql("SELECT teacher, response_id, step_index, text FROM reasoning_steps").to_arrow_table())
            cache = pl.from_arrow(con.sql("SELECT key FROM score_cache").to_arrow_table())
    assert steps.height == n_procs * 4 * 3 and steps.select("response_id", "step_index").is_duplicated().sum() == 0
    assert set(steps["text"]) == {f"round {rounds - 1}"}
    assert cache.height == n_procs * rounds * 10 + rounds * 3 and cache["key"].is_duplicated().sum() == 0
    # the Parquet files are in the bucket, and nowhere on the local disk
    objects = s3.client().list_objects_v2(Bucket=s3.bucket, Prefix="lake/").get("Contents", [])
    assert any(o["Key"].endswith(".parquet") for o in objects), [o["Key"] for o in objects]
    assert not list(tmp_path.glob("**/*.parquet"))
