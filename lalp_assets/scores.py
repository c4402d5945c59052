"""Stage 3: steps -> `step_scores` (the student's mean log-prob per step, in its window) and
`response_scores` (LALP beside GALP per response)."""


import os
import time

import dagster as dg
import polars as pl

from lalp_resources.method.aggregation import lalp_from_steps, spans_by_response
from lalp_assets.common import BACKFILL, SETTINGS, check_result, score_config, table_metadata, teacher_partitions
from lalp_resources import expectations as gx_suites
from lalp_resources.engine import ScoreItem
from lalp_resources.resources import PipelineSettingsResource, StudentModelResource, WarehouseCache, WarehouseResource
from lalp_resources.staging import DuckDBSink, ParquetSink, StagedCache, load_staged
from lalp_resources.warehouse import query, replace_teachers

# On Kubernetes (dagster_home/deploy/), each scoring step's pod requests one GPU.
GPU_OP_TAGS = (
    {"dagster-k8s/config": {"container_config": {"resources": {"limits": {"nvidia.com/gpu": "1"}}}}}
    if os.environ.get("LALP_K8S_GPU") == "1" else {}
)

SCORE_CODE_VERSION = f"score@1|{SETTINGS.model}|{SETTINGS.dtype}|{SETTINGS.window}|{SETTINGS.template}"


def progress_logger(log, every_s: float = 10.0):
    """Windows done, windows/s and time left, at most every `every_s` seconds."""
    state = {"last": 0.0}

    def report(done: int, total: int, stats) -> None:
        now = time.monotonic()
        if done < total and now - state["last"] < every_s:
            return
        state["last"] = now
        rate = done / stats.seconds if stats.seconds else 0.0
        eta = (total - done) / rate if rate else float("nan")
        log.info(
            f"scored {done}/{total} windows ({100 * done / max(total, 1):.0f}%), {rate:.1f} windows/s, "
            f"~{eta:.0f}s left; {stats.windows_cached} from cache, {stats.tokens_forwarded} tokens forwarded"
        )

    return report


def chunk_frames(chunk, meta_cols: pl.DataFrame, traces: pl.DataFrame, cfg: dict, run_id: str, namespace: str) -> dict:
    """One committed engine chunk as the rows of `score_cache`, `step_scores` and `galp_scores`."""
    step_df = pl.DataFrame(
        [{"response_id": s.response_id, "step_index": s.step_index, "n_tokens": s.n_tokens,
          "sum_logprob": s.sum_logprob, "mean_logprob": s.mean_logprob, "cache_hit": s.cached} for s in chunk.steps],
        schema={"response_id": pl.Utf8, "step_index": pl.Int32, "n_tokens": pl.Int32, "sum_logprob": pl.Float64,
                "mean_logprob": pl.Float64, "cache_hit": pl.Boolean},
    ).join(meta_cols, on=["response_id", "step_index"]).with_columns(
        *[pl.lit(v).alias(k) for k, v in cfg.items() if k not in ("segmenter", "segmenter_version")],
        pl.lit(run_id).alias("score_run_id"),
    )
    galp_df = pl.DataFrame(
        [{"response_id": r.response_id, "galp": r.galp, "galp_tokens": r.galp_tokens} for r in chunk.responses],
        schema={"response_id": pl.Utf8, "galp": pl.Float64, "galp_tokens": pl.Int32},
    ).join(traces.select("response_id", "teacher"), on="response_id").with_columns(pl.lit(run_id).alias("score_run_id"))
    cache_df = pl.DataFrame(
        chunk.new_cache_rows, schema={"key": pl.Utf8, "sum_logprob": pl.Float64, "n_tokens": pl.Int32}, orient="row"
    ).with_columns(pl.lit(namespace).alias("namespace"), pl.lit(run_id).alias("created_run_id"))
    # cache first: a chunk's scores never land without the cache rows that produced them
    return {"score_cache": cache_df, "step_scores": step_df, "galp_scores": galp_df}


def items_for(steps: pl.DataFrame, traces: pl.DataFrame) -> list[ScoreItem]:
    spans = spans_by_response(steps)
    return [
        ScoreItem(rid, prompt, text, spans[rid])
        for rid, prompt, text in traces.select("response_id", "prompt", "response").iter_rows()
        if rid in spans
    ]


@dg.asset(
    partitions_def=teacher_partitions,
    backfill_policy=BACKFILL,
    group_name="scoring",
    kinds={"torch", "duckdb"},
    deps=["reasoning_steps"],
    pool="gpu",
    op_tags=GPU_OP_TAGS,
    code_version=SCORE_CODE_VERSION,
    check_specs=[
        dg.AssetCheckSpec("step_scores_valid", asset="step_scores", blocking=True,
                          description="GX: every step has a finite score <= 0 and at least one scored token"),
    ],
    description=(
        "Per step: the student's mean log-probability of the step's tokens given the prompt and the "
        "window's preceding steps (LALP_WINDOW, default fixed:4). Exact packed engine with a score "
        "cache: only windows never scored before reach the model. Results commit in chunks, so a "
        "killed run resumes from the cache. With LALP_STAGING_DIR set (cluster mode) the chunks go to "
        "per-partition Parquet there, and response_scores loads them into DuckDB."
    ),
)
def step_scores(
    context: dg.AssetExecutionContext,
    warehouse: WarehouseResource,
    student: StudentModelResource,
    settings: PipelineSettingsResource,
):
    teachers = list(context.partition_keys)
    wh = warehouse.get()
    with wh.connect(read_only=True) as con:
        steps = query(
            con, "SELECT * FROM reasoning_steps WHERE teacher IN (SELECT unnest(?)) ORDER BY response_id, step_index", [teachers]
        )
        traces = query(
            con,
            "SELECT response_id, prompt_id, teacher, prompt, response FROM raw_teacher_traces "
            "WHERE response_id IN (SELECT DISTINCT response_id FROM reasoning_steps WHERE teacher IN (SELECT unnest(?))) "
            "ORDER BY prompt_id, teacher",
            [teachers],
        )
    run_id = context.run.run_id
    if settings.staging_dir:  # cluster mode: Parquet for the serialized load in response_scores
        sink, cache = ParquetSink(settings.staging_dir, run_id, teachers), StagedCache(wh, settings.staging_dir)
    else:
        sink, cache = DuckDBSink(wh, teachers), WarehouseCache(wh)
    sink.begin()
    items = items_for(steps, traces)
    st = student.load()
    engine = student.engine(settings.template, settings.window, cache=cache)
    meta_cols = steps.select("response_id", "step_index", "prompt_id", "teacher", "segmenter", "segmenter_version",
                             "source_uri", "source_sha256", "ingest_run_id")
    cfg = score_config(
        st.fingerprint, steps["segmenter"][0] if steps.height else "", steps["segmenter_version"][0] if steps.height else "",
        st.dtype, settings.window, settings.template,
    )
    context.log.info(
        f"scoring {len(items)} responses ({steps.height} steps) of {teachers} with {st.fingerprint} on "
        f"{st.device}/{st.dtype}; writing to {sink.describe()}"
    )
    t0 = time.perf_counter()
    for chunk in engine.score(items, progress=progress_logger(context.log)):
        sink.write(chunk_frames(chunk, meta_cols, traces, cfg, run_id, engine.namespace))
    sink.finish()
    secs = time.perf_counter() - t0
    stats = engine.stats
    context.log.info(
        f"windows: {stats.windows_total} total, {stats.windows_scored} sent to the model, "
        f"{stats.windows_cached} from the cache; {stats.tokens_forwarded} tokens in {secs:.1f}s"
    )
    if stats.windows_over_context:
        context.log.warning(
            f"{stats.windows_over_context} window(s) are longer than the student's trained context "
            f"({getattr(st.model.config, 'max_position_embeddings', '?')} tokens): scored in full, not truncated, "
            "but such scores are less reliable; consider a smaller window (LALP_WINDOW) or a longer-context student"
        )
    written = sink.written("step_scores")
    if written.width == 0:  # nothing staged: an empty frame with the table's columns
        with wh.connect(read_only=True) as con:
            written = query(con, "SELECT * FROM step_scores LIMIT 0")
    yield dg.MaterializeResult(
        metadata=table_metadata(
            written.drop("source_uri", "source_sha256"), "step_scores",
            written_to=sink.describe(),
            windows_total=stats.windows_total, windows_scored=stats.windows_scored, windows_cached=stats.windows_cached,
            windows_over_context=stats.windows_over_context,
            tokens_forwarded=stats.tokens_forwarded, seconds=round(secs, 2),
            tokens_per_s=round(stats.tokens_forwarded / secs, 1) if secs else 0.0,
            student=st.fingerprint, device=st.device, dtype=st.dtype, window=settings.window, template=settings.template,
        )
    )
    yield check_result("step_scores_valid", gx_suites.step_scores_suite(written))


@dg.asset(
    partitions_def=teacher_partitions,
    backfill_policy=BACKFILL,
    group_name="scoring",
    kinds={"duckdb", "polars"},
    deps=["step_scores"],
    pool="warehouse",
    code_version="response_scores@1",
    check_specs=[
        dg.AssetCheckSpec("every_response_scored", asset="response_scores", blocking=True,
                          description="GX: every response with steps has LALP and GALP"),
    ],
    description="Per response: LALP (mean of its step scores, steps weighted equally) beside GALP "
    "(mean token log-prob of the whole response given the prompt), with the answer's correctness. "
    "With LALP_STAGING_DIR set, first loads the scoring workers' staged Parquet into DuckDB; the "
    "`warehouse` pool (limit 1) makes that the one serialized writer.",
)
def response_scores(context: dg.AssetExecutionContext, warehouse: WarehouseResource, settings: PipelineSettingsResource):
    teachers = list(context.partition_keys)
    wh = warehouse.get()
    load = {}
    if settings.staging_dir:
        def run_over(run_id: str) -> bool:  # a staged folder's worker is done (or unknown here)
            run = context.instance.get_run_by_id(run_id)
            return run is None or run.is_finished

        rep = load_staged(wh, settings.staging_dir, teachers, run_finished=run_over)
        context.log.info(f"staging {settings.staging_dir}: {rep.describe()}")
        if rep.waiting:
            context.log.warning(f"incomplete staged runs left in place (running, or died; their cache is reused): {rep.waiting}")
        load = {"staged_runs_loaded": dg.MetadataValue.json(rep.loaded), "staged_rows_loaded": dg.MetadataValue.json(rep.rows)}
    with wh.connect() as con:
        steps = query(con, "SELECT * FROM step_scores WHERE teacher IN (SELECT unnest(?))", [teachers])
        galp = query(con, "SELECT response_id, galp, galp_tokens FROM galp_scores WHERE teacher IN (SELECT unnest(?))", [teachers])
        with_steps = query(
            con, "SELECT DISTINCT response_id FROM reasoning_steps WHERE teacher IN (SELECT unnest(?))", [teachers]
        )
        raw = query(
            con, "SELECT response_id, prompt_id, teacher, is_correct, source_uri, source_sha256, ingest_run_id "
            "FROM raw_teacher_traces WHERE teacher IN (SELECT unnest(?))", [teachers],
        )
    cfg_cols = ["student", "segmenter", "segmenter_version", "window_spec", "template", "dtype", "score_run_id"]
    cfg = steps.group_by("response_id").agg([pl.col(c).first() for c in cfg_cols])
    df = (
        lalp_from_steps(steps)
        .join(galp, on="response_id", how="left")
        .join(raw, on="response_id", how="inner")
        .join(cfg, on="response_id", how="left")
    )
    with wh.connect() as con:
        replace_teachers(con, "response_scores", teachers, df)
    summary = df.group_by("teacher").agg(
        pl.len().alias("responses"), pl.col("lalp").mean().alias("mean_lalp"), pl.col("galp").mean().alias("mean_galp")
    ).sort("teacher")
    from lalp_assets.common import markdown_table

    yield dg.MaterializeResult(
        metadata=table_metadata(
            df.drop("source_uri", "source_sha256"), "response_scores",
            per_teacher=dg.MetadataValue.md(markdown_table(summary)),
            **load,
        )
    )
    yield check_result("every_response_scored", gx_suites.response_scores_suite(with_steps, df))
