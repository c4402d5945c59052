"""Stage 3: steps -> `step_scores` (the student's mean log-prob per step, in its window) and
`response_scores` (LALP beside GALP per response).

`step_scores` commits each engine chunk (cache rows first) in one transaction, so a killed run
resumes from the cache. With `LALP_SHARDS` > 1 it is partitioned by teacher × shard; on a
cluster the warehouse is DuckLake and any number of scoring runs commit concurrently.
"""


import time

import dagster as dg
import duckdb
import polars as pl

from lalp_assets import unchanged
from lalp_assets.metadata import check_result, table_metadata
from lalp_assets.partitions import Scope, by_teacher, scope_of, settled_partitions
from lalp_assets.versions import RESPONSES, ensure_version, score_version
from lalp_resources import diagnostics
from lalp_resources import expectations as gx_suites
from lalp_resources.markdown import markdown_table
from lalp_resources.pipeline import aggregate_responses, prompt_batches, score_chunks, score_items, with_shard
from lalp_resources.resources import PipelineSettingsResource, StudentModelResource, WarehouseResource
from lalp_resources.warehouse import WarehouseSession, insert, query, run_transaction

def k8s_gpu_tags(gpus: int = 1) -> dict:
    """A scoring pod's GPU request: one for the engine, TP x PP for the vLLM backend."""
    return {"dagster-k8s/config": {"container_config": {"resources": {"limits": {"nvidia.com/gpu": str(gpus)}}}}}


K8S_GPU_TAGS = k8s_gpu_tags(1)


class ScoringProgress:
    """The stage's progress across its batches: responses done of the total, responses/s and time
    left, with the windows so far (from the cache, tokens forwarded), at most every `every_s`
    seconds and at the end. `within(before, n)` is the engine's callback for one batch of `n`
    responses after `before` done; inside a batch, responses advance with the batch's windows."""

    def __init__(self, log, every_s: float, total: int):
        self.log, self.every_s, self.total = log, every_s, total
        self.t0, self.last = time.monotonic(), 0.0

    def within(self, before: int, n: int):
        def report(done: int, total: int, stats) -> None:
            now = time.monotonic()
            end = done >= total and before + n >= self.total
            if not end and now - self.last < self.every_s:
                return
            self.last = now
            responses = before + (n * done / total if total else n)
            rate = responses / (now - self.t0) if now > self.t0 else 0.0
            eta = (self.total - responses) / rate if rate else float("nan")
            self.log.info(
                f"scored {responses:.0f}/{self.total} responses ({100 * responses / max(self.total, 1):.0f}%), "
                f"{rate:.1f} responses/s, ~{eta:.0f}s left; {stats.windows_total} windows, {stats.windows_cached} "
                f"from the cache, {stats.tokens_forwarded} tokens forwarded")

        return report


# spans and provenance; not the step texts (the engine cuts them from the response)
STEP_COLUMNS = ("response_id, step_index, char_start, char_end, prompt_id, teacher, segmenter, segmenter_version, "
                "source_uri, source_sha256, ingest_run_id")

# Responses whose every step has a score for this student, window, template and dtype, from the
# segmenter version their steps have now (and a GALP): nothing about them changed since.
DONE_SQL = """
SELECT r.response_id, r.prompt_id, r.teacher, r.n AS n_steps
FROM (SELECT response_id, any_value(prompt_id) AS prompt_id, any_value(teacher) AS teacher,
             any_value(segmenter_version) AS v, count(*) AS n
      FROM reasoning_steps WHERE teacher IN (SELECT unnest(?)) GROUP BY response_id) r
JOIN (SELECT response_id, any_value(segmenter_version) AS v, count(DISTINCT segmenter_version) AS nv, count(*) AS n
      FROM step_scores WHERE teacher IN (SELECT unnest(?)) AND student = ? AND window_spec = ? AND template = ? AND dtype = ?
      GROUP BY response_id) s USING (response_id)
WHERE r.v = s.v AND s.nv = 1 AND r.n = s.n AND r.response_id IN (SELECT response_id FROM galp_scores)
"""


def _settled_only(done: pl.DataFrame, settled: set[str], shards: int) -> pl.DataFrame:
    """The rows of `done` in partitions last materialized under the current code version."""
    if shards <= 1 or done.height == 0:
        return done.filter(pl.col("teacher").is_in(sorted(settled)))
    done = with_shard(done, shards)
    ok = [(t, x) for t, x in done.select("teacher", "shard").unique().iter_rows()
          if str(dg.MultiPartitionKey({"teacher": t, "shard": str(x)})) in settled]
    keep = pl.lit(False)
    for t, x in ok:
        keep = keep | ((pl.col("teacher") == t) & (pl.col("shard") == x))
    return done.filter(keep).drop("shard")


def _in_scope(df: pl.DataFrame, scope: Scope, shards: int) -> pl.DataFrame:
    if scope.shards is None or df.height == 0:
        return df
    df = with_shard(df, shards)
    keep = pl.lit(False)
    for t, ss in scope.shards.items():
        keep = keep | ((pl.col("teacher") == t) & pl.col("shard").is_in(sorted(ss)))
    return df.filter(keep).drop("shard")


class RowsByResponse:
    """A frame's rows by `response_id`, fetched for one chunk's responses in time proportional to
    the chunk: joining each chunk against the whole scope's frame made scoring quadratic in rows."""

    def __init__(self, df: pl.DataFrame):
        self.df = df.sort("response_id", maintain_order=True)
        firsts = self.df.with_row_index("_i").group_by("response_id", maintain_order=True).agg(
            pl.col("_i").first(), pl.len())
        self.at = {r: (i, n) for r, i, n in firsts.iter_rows()}

    def rows(self, ids) -> pl.DataFrame:
        at = self.at
        return self.df[[k for r in ids if r in at for k in range(at[r][0], at[r][0] + at[r][1])]]


def _score_and_commit(context, engine, items, session: WarehouseSession, meta, teacher_of, cfg: dict, run_id: str,
                      commit_every_s: float, progress) -> None:
    """Score, committing engine chunks (cache rows first) in one transaction at most every
    `commit_every_s` (LALP_COMMIT_EVERY_S). A commit's cost grows with the tables (key checks
    against them), so on the fast path (cache hits, a GPU) one per chunk would make the total grow
    faster than the rows. A slow chunk still commits on its own; a killed run loses at most
    `commit_every_s` of work besides the chunk in flight."""
    pending: dict[str, list[pl.DataFrame]] = {"score_cache": [], "step_scores": [], "galp_scores": []}

    def flush() -> None:
        frames = {t: pl.concat(fs) for t, fs in pending.items() if fs}
        if not frames:
            return

        def commit(con):
            # one transaction, cache first: scores never land without the cache rows that produced them
            if "score_cache" in frames:
                insert(con, "score_cache", frames["score_cache"], mode="ignore")
            if "step_scores" in frames:
                insert(con, "step_scores", frames["step_scores"], mode="replace")
            if "galp_scores" in frames:
                insert(con, "galp_scores", frames["galp_scores"], mode="replace")

        with session.use() as con:
            run_transaction(con, lambda: commit(con))
        for fs in pending.values():
            fs.clear()
        session.pending.clear()

    meta, teacher_of = RowsByResponse(meta), RowsByResponse(teacher_of)
    try:
        _score_chunks_into(context, engine, items, session, meta, teacher_of, cfg, run_id, commit_every_s,
                           progress, pending, flush)
    except BaseException as e:
        # SIGTERM (Dagster's terminate, Kubernetes' pod stop) or SIGINT: commit what is scored,
        # then let the run fail; a rerun takes these windows from the cache
        if not _interrupted(e):
            raise
        context.log.warning("interrupted: committing the chunks scored so far before the run stops")
        flush()
        raise
    flush()


def _interrupted(e: BaseException | None) -> bool:
    """The stop signal, or an error it caused: a signal that lands inside a DuckDB query (the
    score-cache lookup) surfaces as DuckDB's "Query interrupted" with the signal as its cause."""
    seen = 0
    while e is not None and seen < 10:
        if isinstance(e, (KeyboardInterrupt, dg.DagsterExecutionInterruptedError, duckdb.InterruptException)):
            return True
        e, seen = e.__cause__ or e.__context__, seen + 1
    return False


def _score_chunks_into(context, engine, items, session, meta, teacher_of, cfg, run_id, commit_every_s, progress, pending, flush):
    last = time.monotonic()
    for frames in score_chunks(engine, items, progress=progress):
        steps, galp = frames["step_scores"], frames["galp_scores"]
        pending["step_scores"].append(
            steps.join(meta.rows(steps["response_id"].unique(maintain_order=True)), on=["response_id", "step_index"])
            .with_columns(*[pl.lit(v).alias(k) for k, v in cfg.items()], pl.lit(run_id).alias("score_run_id")))
        pending["galp_scores"].append(
            galp.join(teacher_of.rows(galp["response_id"]), on="response_id").with_columns(pl.lit(run_id).alias("score_run_id")))
        cache_rows = frames["score_cache"].with_columns(pl.lit(run_id).alias("created_run_id"))
        pending["score_cache"].append(cache_rows)
        session.pending.update((k, tuple(v)) for k, *v in cache_rows.select(
            "key", "sum_logprob", "n_tokens", "head1_logprob", "head2_logprob").iter_rows())
        if time.monotonic() - last >= commit_every_s:
            flush()
            last = time.monotonic()


def build_step_scores(student, settings, partitions_def, backfill, k8s_gpu: bool) -> dg.AssetsDefinition:
    @dg.asset(
        name="step_scores",
        partitions_def=partitions_def,
        backfill_policy=backfill,
        group_name="scoring",
        kinds={"torch", "duckdb"},
        deps=[dg.AssetDep("reasoning_steps", partition_mapping=by_teacher(settings.shards))],
        pool="gpu",
        op_tags=k8s_gpu_tags(student.vllm_tp * student.vllm_pp if student.backend == "vllm" else 1) if k8s_gpu else {},
        code_version=score_version(student, settings),
        check_specs=[
            dg.AssetCheckSpec("step_scores_valid", asset="step_scores", blocking=True,
                              description="GX: every step has a finite score <= 0 and at least one scored token"),
        ],
        description=(
            "Per step: the student's mean log-probability of the step's tokens given the prompt and the "
            "window's preceding steps (LALP_WINDOW, default fixed:4). Exact packed engine with a score "
            "cache: only windows never scored before reach the model. Results commit in chunks (at most "
            "every few seconds), so a killed run resumes from the cache. Partitioned by teacher (× shard with LALP_SHARDS > 1)."
        ),
    )
    def step_scores(context: dg.AssetExecutionContext, warehouse: WarehouseResource, student: StudentModelResource,
                    settings: PipelineSettingsResource):
        version = score_version(student, settings)
        ensure_version(context, version)
        scope = scope_of(context)
        wh = warehouse.get()
        st = student.load()
        cfg = {"student": st.fingerprint, "window_spec": settings.window, "template": settings.template, "dtype": st.dtype}
        with wh.connect(read_only=True) as con:
            # responses passed over: one join, before any window planning or tokenization
            done = _settled_only(query(con, DONE_SQL, [scope.teachers, scope.teachers, *cfg.values()]),
                                 settled_partitions(context, version), settings.shards)
            con.register("_lalp_done", done.select("response_id").to_arrow())
            # the work list holds ids only: steps and texts are read a batch of prompts at a time
            todo = query(
                con,
                "SELECT response_id, prompt_id, teacher FROM raw_teacher_traces "
                "WHERE response_id IN (SELECT DISTINCT response_id FROM reasoning_steps WHERE teacher IN (SELECT unnest(?))) "
                "AND response_id NOT IN (SELECT response_id FROM _lalp_done)",
                [scope.teachers],
            )
            previous = query(con, "SELECT response_id, prompt_id, teacher FROM galp_scores JOIN "
                                  "(SELECT DISTINCT response_id, prompt_id FROM step_scores) USING (response_id) "
                                  "WHERE teacher IN (SELECT unnest(?))", [scope.teachers])
        todo, done = _in_scope(todo, scope, settings.shards), _in_scope(done, scope, settings.shards)
        current = pl.concat([todo["response_id"], done["response_id"]])
        stale = _in_scope(previous, scope, settings.shards).filter(~pl.col("response_id").is_in(current.implode()))
        run_id = context.run.run_id
        batches = prompt_batches(todo, settings.batch_prompts)
        # the file is handed back at least every 2.5 commit intervals (5 s by default; 0: after every use)
        session = WarehouseSession(wh, hold_s=2.5 * settings.commit_every_s)
        engine = student.engine(settings.template, settings.window, cache=session)
        if done.height:
            context.log.info(f"passed over {done.height} response(s) already scored under these settings")
        context.log.info(f"scoring {todo.height} responses of {scope.describe()} in {len(batches)} batch(es) of "
                         f"{settings.batch_prompts or 'all'} prompts with {st.fingerprint} on {st.device}/{st.dtype}")
        t0 = time.perf_counter()
        ids = todo["response_id"].to_list() + stale["response_id"].to_list()

        def clear(con):  # this scope's old rows go; responses no longer in it too
            con.execute("DELETE FROM step_scores WHERE response_id IN (SELECT unnest(?))", [ids])
            con.execute("DELETE FROM galp_scores WHERE response_id IN (SELECT unnest(?))", [ids])

        checks, head, n_steps, n_done = [], None, 0, 0
        progress = ScoringProgress(context.log, settings.progress_every_s, todo.height)
        try:
            with session.use() as con:
                run_transaction(con, lambda: clear(con))
            held = None
            for k, batch_ids in enumerate(batches):
                with session.use() as con:
                    steps = query(con, f"SELECT {STEP_COLUMNS} FROM reasoning_steps WHERE response_id IN (SELECT unnest(?)) "
                                       "ORDER BY response_id, step_index", [batch_ids])
                    traces = query(con, "SELECT response_id, prompt_id, teacher, prompt, response FROM raw_teacher_traces "
                                        "WHERE response_id IN (SELECT unnest(?)) ORDER BY prompt_id, teacher", [batch_ids])
                if held is not None:
                    steps, traces = pl.concat([held[0], steps]), pl.concat([held[1], traces])
                items = score_items(steps, traces)
                held = None
                if k < len(batches) - 1:
                    # the batch's last engine group waits for the next batch's first prompts, so the
                    # engine groups (and forwards) exactly as in one call over the scope
                    later = set(engine.groups(items)[-1]) if items else set()
                    wait = [it.response_id for it in items if it.prompt in later]
                    items = [it for it in items if it.prompt not in later]
                    keep = pl.col("response_id").is_in(pl.Series(wait, dtype=pl.Utf8).implode())
                    held = (steps.filter(keep), traces.filter(keep))
                    steps, traces = steps.filter(~keep), traces.filter(~keep)
                meta = steps.select("response_id", "step_index", "prompt_id", "teacher", "segmenter", "segmenter_version",
                                    "source_uri", "source_sha256", "ingest_run_id")
                del steps
                _score_and_commit(context, engine, items, session, meta, traces.select("response_id", "teacher"), cfg,
                                  run_id, settings.commit_every_s, progress.within(n_done, traces.height))
                del items, meta
                # what the check reads, for every row scored now; every column for a few rows (schema and preview)
                now = traces["response_id"].to_list()
                with session.use() as con:
                    mine = query(con, "SELECT response_id, step_index, mean_logprob, n_tokens FROM step_scores "
                                      "WHERE response_id IN (SELECT unnest(?))", [now])
                    if head is None and mine.height:
                        head = query(con, "SELECT * FROM step_scores WHERE response_id IN (SELECT unnest(?)) "
                                          "ORDER BY response_id, step_index LIMIT 5", [now])
                checks.append(gx_suites.step_scores_suite(mine))
                n_steps += mine.height
                n_done += traces.height
            if head is None:
                with session.use() as con:
                    head = query(con, "SELECT * FROM step_scores LIMIT 0")
        finally:
            session.close()
        secs = time.perf_counter() - t0
        stats = engine.stats
        context.log.info(f"windows: {stats.windows_total} total, {stats.windows_scored} sent to the model, "
                         f"{stats.windows_cached} from the cache; {stats.tokens_forwarded} tokens in {secs:.1f}s")
        if stats.windows_over_context:
            context.log.warning(
                f"{stats.windows_over_context} window(s) are longer than the student's trained context "
                f"({getattr(getattr(st.model, 'config', None), 'max_position_embeddings', '?')} tokens): scored in full, not truncated, "
                "but such scores are less reliable; consider a smaller window (LALP_WINDOW) or a longer-context student"
            )
        yield dg.MaterializeResult(
            metadata=table_metadata(
                head.drop("source_uri", "source_sha256"), "step_scores", row_count=n_steps + int(done["n_steps"].sum() or 0),
                responses_scored=n_done, responses_passed_over=done.height, batches=len(batches),
                windows_total=stats.windows_total, windows_scored=stats.windows_scored, windows_cached=stats.windows_cached,
                windows_over_context=stats.windows_over_context,
                tokens_forwarded=stats.tokens_forwarded, seconds=round(secs, 2),
                tokens_per_s=round(stats.tokens_forwarded / secs, 1) if secs else 0.0,
                student=st.fingerprint, device=st.device, dtype=st.dtype, window=settings.window, template=settings.template,
            )
        )
        yield check_result("step_scores_valid", gx_suites.merge(checks))

    return step_scores


def response_inputs(teachers) -> list:
    """What response_scores reads for these teachers, as fingerprint stamps (unchanged.py)."""
    return [unchanged.by_teacher("step_scores", "response_id, step_index, score_run_id", teachers),
            unchanged.by_teacher("galp_scores", "response_id, score_run_id", teachers),
            unchanged.by_teacher("reasoning_steps", "response_id, step_index, steps_run_id", teachers),
            unchanged.by_teacher("raw_teacher_traces", "response_id, ingest_run_id, is_correct", teachers)]


def build_response_scores(shards: int, partitions_def, backfill) -> dg.AssetsDefinition:
    @dg.asset(
        name="response_scores",
        partitions_def=partitions_def,
        backfill_policy=backfill,
        group_name="scoring",
        kinds={"duckdb", "polars"},
        deps=[dg.AssetDep("step_scores", partition_mapping=by_teacher(shards))],
        code_version=RESPONSES,
        automation_condition=dg.AutomationCondition.eager() if shards > 1 else None,
        check_specs=[
            dg.AssetCheckSpec("every_response_scored", asset="response_scores", blocking=True,
                              description="GX: every response with steps has LALP and GALP"),
        ],
        description="Per response: LALP (mean of its step scores, steps weighted equally) beside GALP "
        "(mean token log-prob of the whole response given the prompt), with the answer's correctness; its "
        "weakest step (index, span, score, gap below the mean) and the DROP/CASL inputs. "
        "Per teacher: with shards, it waits for every shard of its teacher.",
    )
    def response_scores(context: dg.AssetExecutionContext, warehouse: WarehouseResource):
        teachers = scope_of(context).teachers
        wh = warehouse.get()
        cfg_cols = ["student", "segmenter", "segmenter_version", "window_spec", "template", "dtype", "score_run_id"]
        with wh.connect(read_only=True) as con:
            inputs = unchanged.fingerprint(con, response_inputs(teachers))
            before = unchanged.fingerprint(con, [unchanged.by_teacher("response_scores", "t", teachers)])
            previous = unchanged.unchanged_since(context, RESPONSES, inputs, before)
            if previous is not None:
                # nothing it reads changed: the table stays, its check runs again on it
                with_steps = query(con, "SELECT DISTINCT response_id FROM reasoning_steps WHERE teacher IN (SELECT unnest(?))", [teachers])
                stored = query(con, "SELECT response_id, lalp, galp FROM response_scores WHERE teacher IN (SELECT unnest(?))", [teachers])
        if previous is not None:
            context.log.info(f"passed over: no step score, GALP, step or trace of {teachers} changed since this table was written")
            yield dg.MaterializeResult(metadata=unchanged.stamped(previous, inputs, before, passed_over=True))
            yield check_result("every_response_scored", gx_suites.response_scores_suite(with_steps, stored))
            return
        with wh.connect(read_only=True) as con:
            # only the columns LALP needs, and the per-response config aggregated in SQL: not every
            # step row's provenance in memory
            # and what the diagnostics need: head sums, and each step's span for the weakest step
            steps = query(con, "SELECT s.response_id, s.step_index, s.n_tokens, s.sum_logprob, s.mean_logprob, "
                               "s.head1_logprob, s.head2_logprob, r.char_start, r.char_end FROM step_scores s "
                               "LEFT JOIN reasoning_steps r USING (response_id, step_index) "
                               "WHERE s.teacher IN (SELECT unnest(?))", [teachers])
            cfg = query(con, "SELECT response_id, " + ", ".join(f"first({c} ORDER BY step_index) AS {c}" for c in cfg_cols)
                        + " FROM step_scores WHERE teacher IN (SELECT unnest(?)) GROUP BY response_id", [teachers])
            galp = query(con, "SELECT response_id, galp, galp_tokens FROM galp_scores WHERE teacher IN (SELECT unnest(?))", [teachers])
            with_steps = query(con, "SELECT DISTINCT response_id FROM reasoning_steps WHERE teacher IN (SELECT unnest(?))", [teachers])
            raw = query(
                con, "SELECT response_id, prompt_id, teacher, is_correct, source_uri, source_sha256, ingest_run_id "
                "FROM raw_teacher_traces WHERE teacher IN (SELECT unnest(?))", [teachers],
            )
        present = sorted(set(raw["teacher"].unique().to_list()))
        df = (aggregate_responses(steps, galp).join(raw, on="response_id", how="inner").join(cfg, on="response_id", how="left")
              .join(diagnostics.per_response(steps).drop("has_heads"), on="response_id", how="left"))
        def replace(con):
            con.execute("DELETE FROM response_scores WHERE teacher IN (SELECT unnest(?))", [present])
            insert(con, "response_scores", df)

        with wh.connect() as con:
            run_transaction(con, lambda: replace(con))
        with wh.connect(read_only=True) as con:
            after = unchanged.fingerprint(con, [unchanged.by_teacher("response_scores", "t", teachers)])
        summary = df.group_by("teacher").agg(
            pl.len().alias("responses"), pl.col("lalp").mean().alias("mean_lalp"), pl.col("galp").mean().alias("mean_galp")
        ).sort("teacher")
        yield dg.MaterializeResult(
            metadata=unchanged.stamped(table_metadata(df.drop("source_uri", "source_sha256"), "response_scores",
                                                      per_teacher=dg.MetadataValue.md(markdown_table(summary))), inputs, after)
        )
        yield check_result("every_response_scored", gx_suites.response_scores_suite(with_steps, df))

    return response_scores
