"""The `lalp` command.

    lalp run      [--all | --max-prompts N] [--source S ...]   run the whole Dagster graph
    lalp score    INPUT --out DIR [options]                     score traces to Parquet, no Dagster
    lalp ingest   SOURCE --out DIR [--format ...]               canonical traces + quarantine
    lalp lineage  RESPONSE_ID                                   where a curated row came from
    lalp forget   TEACHER [--yes]                               remove a teacher that left the sources

Every default comes from `lalp_resources.settings.Settings` (the `LALP_*` variables); a flag
overrides its setting for this command only.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from lalp_resources.settings import Settings


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("transformers", "great_expectations", "httpx", "math_verify"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    if not verbose:  # library progress bars (weights loading, dataset saving) are noise on a first run
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        import datasets

        datasets.disable_progress_bars()


# --- lalp ingest ------------------------------------------------------------------------------


def cmd_ingest(args) -> int:
    from lalp_resources import adapters

    settings = _settings(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    res = adapters.ingest(args.source, settings.source_format, teacher_mode=settings.teacher_mode, limits=_limits(settings))
    res.traces.write_parquet(out / "traces.parquet")
    res.quarantine.write_parquet(out / "quarantine.parquet")
    _print_ingest(res, args.show)
    print(f"wrote {out / 'traces.parquet'} and {out / 'quarantine.parquet'}")
    return 0


def _limits(settings: Settings):
    from lalp_resources import adapters

    return adapters.Limits(max_prompt_chars=settings.max_prompt_chars, max_response_chars=settings.max_response_chars,
                           max_teacher_chars=settings.max_teacher_chars, max_prompt_id_chars=settings.max_prompt_id_chars)


def _print_ingest(res, show: int, file=sys.stdout, prefix: str = "-") -> None:
    s = res.summary()
    print(f"read {s['read']} rows = {s['accepted']} accepted + {s['quarantined']} quarantined", file=file)
    for reason, n in s["by_reason"].items():
        print(f"  quarantined {reason}: {n}", file=file)
    for row in res.quarantine.head(show).iter_rows(named=True):
        print(f"  {prefix} {str(row['source_uri']).rsplit('/', 1)[-1]}: {row['detail']}", file=file)


# --- lalp score -------------------------------------------------------------------------------


def cmd_score(args) -> int:
    """The same stages as the asset graph (lalp_resources/pipeline.py), without Dagster."""
    import polars as pl

    from lalp_resources import adapters, pipeline
    from lalp_resources.method.aggregation import sample_prompts
    from lalp_resources.student import load_student

    settings = _settings(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    res = adapters.ingest(args.input, settings.source_format, teacher_mode=settings.teacher_mode, limits=_limits(settings))
    _print_ingest(res, show=res.quarantine.height, file=sys.stderr, prefix="skipped:")
    traces = res.traces
    if settings.max_prompts:
        keep = sample_prompts(traces["prompt_id"].to_list(), settings.max_prompts)
        traces = traces.filter(pl.col("prompt_id").is_in(list(keep)))
    # another backend than the engine holds the weights itself: the student's tokenizer and identity here
    student = load_student(settings.model, device=settings.device, dtype=settings.dtype, cache_dir=settings.cache_dir,
                           weights=settings.backend == "engine")
    if settings.segmenter == "llm":
        from lalp_resources.llm_segmenter import LLMSegmenter

        if not (settings.llm_url and settings.llm_model):
            print("error: --segmenter llm needs --llm-url and --llm-model (or LALP_LLM_URL / LALP_LLM_MODEL)", file=sys.stderr)
            return 2
        llm = LLMSegmenter(settings.llm_url, settings.llm_model, api_key=settings.llm_api_key or None, timeout=settings.llm_timeout_s)
        segment_fn = llm.segment
    else:
        from lalp_resources.method.segmentation import segment

        segment_fn = lambda text: (segment(text, settings.segmenter), None)  # noqa: E731
    steps, screened = pipeline.screen_and_segment(traces, student.tokenizer, settings.template, settings.control_tokens,
                                                  settings.max_prompt_tokens, settings.max_response_tokens, segment_fn,
                                                  batch_prompts=settings.batch_prompts)
    traces, too_long = screened.kept, screened.rejected
    if screened.control_token_rows and settings.control_tokens == "keep":
        print(f"note: {screened.control_token_rows} response(s) hold control-token strings; kept and scored as plain text "
              "(LALP_CONTROL_TOKENS=keep)", file=sys.stderr)
    quarantine = pl.concat([res.quarantine, too_long], how="diagonal_relaxed") if too_long.height else res.quarantine
    for row in too_long.iter_rows(named=True):
        print(f"  skipped: {row['detail']} (prompt_id={row['prompt_id']!r}, teacher={row['teacher']!r})", file=sys.stderr)
    if quarantine.height:
        quarantine.write_parquet(out / "quarantine.parquet")
    if traces.height == 0:
        print("error: no valid rows to score", file=sys.stderr)
        return 2
    items = pipeline.score_items(steps, traces)
    engine = _engine(args, settings, student)
    bar = _progress_bar(len(steps) + len(items))
    t0 = time.perf_counter()
    parts = list(pipeline.score_chunks(engine, items, progress=lambda done, total, st: bar(done, total, st)))
    secs = time.perf_counter() - t0
    step_scores = pl.concat([p["step_scores"] for p in parts]) if parts else pl.DataFrame(schema=pipeline.STEP_SCORE_SCHEMA)
    galp = pl.concat([p["galp_scores"] for p in parts]) if parts else pl.DataFrame(schema=pipeline.GALP_SCHEMA)
    steps_out = steps.join(step_scores, on=["response_id", "step_index"]).select(
        "response_id", "prompt_id", "teacher", "step_index", "char_start", "char_end", "text", "n_tokens", "mean_logprob"
    ).sort("response_id", "step_index")
    resp = pipeline.aggregate_responses(step_scores, galp).join(
        traces.select("response_id", "prompt_id", "teacher"), on="response_id"
    ).select("response_id", "prompt_id", "teacher", "n_steps", "lalp", "galp").sort("response_id")
    steps_out.write_parquet(out / "steps.parquet")
    resp.write_parquet(out / "responses.parquet")
    st = engine.stats
    print(
        f"\nscored {resp.height} responses, {steps_out.height} steps in {secs:.1f}s "
        f"({st.tokens_forwarded / max(secs, 1e-9):.0f} tokens/s) with {student.fingerprint} on {student.device}/{student.dtype}",
        file=sys.stderr,
    )
    if st.windows_over_context:
        print(f"warning: {st.windows_over_context} window(s) exceed the student's trained context; scored in full "
              "(no truncation) but less reliable", file=sys.stderr)
    print(resp.group_by("teacher").agg(pl.len().alias("responses"), pl.col("lalp").mean(), pl.col("galp").mean()).sort("lalp", descending=True))
    print(f"wrote {out / 'steps.parquet'} and {out / 'responses.parquet'}")
    return 0


def _engine(args, settings: Settings, student):
    from lalp_resources.engine import ScoringEngine

    if settings.backend != "engine":  # the same construction as the graph's (StudentModelResource.engine)
        from lalp_assets.definitions import build_resources

        if args.approx:
            raise SystemExit("error: --approx is the engine's mode; it has no LALP_BACKEND=vllm or openai: form")
        return build_resources(settings)["student"].engine(settings.template, settings.window)

    kw = dict(template=settings.template, window=settings.window,
              namespace=f"{student.fingerprint}|{settings.template}|{student.dtype}",
              row_tokens=settings.row_tokens or None, batch_tokens=settings.batch_tokens or None,
              group_tokens=settings.group_tokens or None, host_workers=settings.host_workers)
    if args.approx:
        print("note: --approx uses one step-sliding pass per response; step scores are NOT exact LALP", file=sys.stderr)
        return ScoringEngine(student.model, student.tokenizer, approx=True, **kw)
    return ScoringEngine(student.model, student.tokenizer, compile=settings.compile,
                         cpu_kernels=settings.cpu_kernels, **kw)


def _progress_bar(total: int):
    """A tqdm bar on a terminal; plain periodic lines otherwise."""
    from tqdm import tqdm

    bar = tqdm(total=total, unit="win", disable=not sys.stderr.isatty(), file=sys.stderr)
    last = {"t": 0.0}

    def update(done, total_, stats):
        bar.update(done - bar.n)
        bar.set_postfix(cached=stats.windows_cached, tok=stats.tokens_forwarded)
        if not sys.stderr.isatty() and time.monotonic() - last["t"] > 10:
            last["t"] = time.monotonic()
            rate = done / stats.seconds if stats.seconds else 0
            print(f"  {done}/{total_} windows, {rate:.1f}/s, ~{(total_ - done) / rate if rate else 0:.0f}s left", file=sys.stderr)
        if done >= total_:
            bar.close()

    return update


# --- lalp run ---------------------------------------------------------------------------------


def cmd_run(args) -> int:
    import dagster as dg

    from lalp_assets.definitions import build_defs
    from lalp_assets.instance import open_instance, owner_tags, reap_dead_runs, register_teachers
    from lalp_assets.partitions import teacher_partitions
    from lalp_assets.rankings import ranking_markdown
    from lalp_resources.method.aggregation import ranking_verdict
    from lalp_resources.warehouse import Warehouse

    settings = _settings(args)
    defs = build_defs(settings)
    instance = open_instance(settings)
    reap_dead_runs(instance)
    t0 = time.perf_counter()
    teachers = defs.resources["trace_sources"].discover_teachers()
    if not teachers:
        print("error: no teacher traces found in the configured sources", file=sys.stderr)
        return 2
    register_teachers(instance, teachers)
    keys = instance.get_dynamic_partitions(teacher_partitions.name)
    wanted = [k for k in keys if k in teachers]
    others = [k for k in keys if k not in teachers]
    print(f"teachers: {wanted}; prompts per teacher: {settings.max_prompts or 'all'}; DAGSTER_HOME={settings.dagster_home}")
    if others:
        print(f"note: teacher(s) {others} are registered but not in these sources: left untouched "
              "(`lalp forget TEACHER` removes one)", file=sys.stderr)
    # A run touches exactly the current sources' teachers: one run per contiguous block of
    # them in partition order. The runs share this process, so the student loads once.
    blocks = _contiguous_blocks(keys, set(wanted))
    log = _log_config(args.verbose)
    # score_teachers_job: the whole per-teacher chain, or with shards ingest + steps only
    for lo, hi in blocks:
        r = defs.resolve_job_def("score_teachers_job").execute_in_process(
            instance=instance, run_config=log, raise_on_error=False,
            tags={"dagster/asset_partition_range_start": lo, "dagster/asset_partition_range_end": hi, **owner_tags()},
        )
        if not _report(r, "score_teachers_job"):
            return 1
    if settings.shards > 1:
        for t in wanted:
            for shard in range(settings.shards):
                key = dg.MultiPartitionKey({"teacher": t, "shard": str(shard)})
                r = defs.resolve_job_def("score_shards_job").execute_in_process(
                    instance=instance, run_config=log, raise_on_error=False, partition_key=key, tags=owner_tags())
                if not _report(r, f"score_shards_job {t}/{shard}"):
                    return 1
        for lo, hi in blocks:
            r = defs.resolve_job_def("response_scores_job").execute_in_process(
                instance=instance, run_config=log, raise_on_error=False,
                tags={"dagster/asset_partition_range_start": lo, "dagster/asset_partition_range_end": hi, **owner_tags()})
            if not _report(r, "response_scores_job"):
                return 1
    r = defs.resolve_job_def("rank_and_curate_job").execute_in_process(
        instance=instance, tags=owner_tags(), run_config=log, raise_on_error=False)
    if not _report(r, "rank_and_curate_job"):
        return 1
    wh = Warehouse(settings.warehouse, data_path=settings.lake_data_path or None, memory_limit=settings.duckdb_memory)
    rk = wh.read("SELECT * FROM teacher_rankings ORDER BY lalp_rank")
    mix = wh.read("SELECT teacher, count(*) AS rows FROM curated_sft_dataset GROUP BY teacher ORDER BY rows DESC")
    print("\nTeacher ranking (LALP, paired bootstrap 95% CI; GALP beside it):")
    print(ranking_markdown(rk))
    print("\n" + ranking_verdict(rk))
    print("\nCurated set teacher mix: " + ", ".join(f"{t}: {n}" for t, n in mix.iter_rows()))
    from lalp_resources.objectstore import join

    print(f"Curated SFT data: {join(settings.exports, 'curated_sft.jsonl')} (and .parquet)")
    print(f"Warehouse: {settings.warehouse}; open the UI with: make ui   ({time.perf_counter() - t0:.0f}s)")
    return 0


def _contiguous_blocks(keys: list[str], wanted: set[str]) -> list[tuple[str, str]]:
    blocks, start, prev = [], None, None
    for k in keys + [None]:
        if k is not None and k in wanted:
            start = start or k
            prev = k
        elif start is not None:
            blocks.append((start, prev))
            start = None
    return blocks


def _report(result, name: str) -> bool:
    print(f"run {result.run_id}: {name} {'succeeded' if result.success else 'FAILED'}")
    if not result.success:
        _print_failures(result)
    return result.success


def _log_config(verbose: bool) -> dict:
    """Dagster's console logger: progress and results at INFO, its step-by-step DEBUG only with -v."""
    return {"loggers": {"console": {"config": {"log_level": "DEBUG" if verbose else "INFO"}}}}


def _print_failures(result) -> None:
    for ev in result.all_events:
        if ev.is_step_failure and ev.step_failure_data and ev.step_failure_data.error:
            print(f"  step {ev.step_key} failed: {ev.step_failure_data.error.message.strip()}", file=sys.stderr)
        elif ev.event_type_value == "ASSET_CHECK_EVALUATION":
            data = ev.asset_check_evaluation_data
            if not data.passed:
                print(f"  check {data.check_name} on {data.asset_key.to_user_string()} FAILED", file=sys.stderr)


# --- lalp lineage -----------------------------------------------------------------------------


def cmd_lineage(args) -> int:
    from lalp_resources.lineage import format_report, lineage_report

    settings = _settings(args)
    settings.export_dagster_home()  # the run details come from this Dagster instance
    report = lineage_report(args.response_id, settings.warehouse)
    if report is None:
        print(f"error: response_id {args.response_id!r} is not in the warehouse {settings.warehouse}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=2, default=str) if args.json else format_report(report))
    return 0


# --- lalp forget ------------------------------------------------------------------------------

FORGET_TABLES = ["raw_teacher_traces", "reasoning_steps", "step_scores", "galp_scores", "response_scores",
                 "teacher_rankings", "selection_decisions", "curated_sft_dataset", "quarantine"]


def cmd_forget(args) -> int:
    """Remove a teacher's rows from every table and its partition. Ranking and curated set are
    not recomputed here: the automation sensor (or `lalp run`) refreshes them."""
    from lalp_resources.warehouse import Warehouse, transaction

    settings = _settings(args)
    wh = Warehouse(settings.warehouse, data_path=settings.lake_data_path or None, memory_limit=settings.duckdb_memory)
    with wh.connect(read_only=True) as con:
        counts = {t: con.execute(f"SELECT count(*) FROM {t} WHERE teacher = ?", [args.teacher]).fetchone()[0] for t in FORGET_TABLES}
    print(f"teacher {args.teacher!r} has: " + ", ".join(f"{t}: {n}" for t, n in counts.items()))
    if not any(counts.values()):
        print(f"nothing to forget: no rows for teacher {args.teacher!r} in {settings.warehouse}")
    if not args.yes:
        print("dry run: pass --yes to delete these rows (the score cache is kept: it is keyed by content, not teacher)")
        return 0
    with wh.connect() as con, transaction(con):
        for t in FORGET_TABLES:
            con.execute(f"DELETE FROM {t} WHERE teacher = ?", [args.teacher])
    from lalp_assets.instance import open_instance
    from lalp_assets.partitions import teacher_partitions

    instance = open_instance(settings)
    if instance.has_dynamic_partition(teacher_partitions.name, args.teacher):
        instance.delete_dynamic_partition(teacher_partitions.name, args.teacher)
        print(f"removed partition {args.teacher!r}")
    print(f"deleted {sum(counts.values())} rows of teacher {args.teacher!r}; "
          "re-run rank_and_curate_job (or `lalp run`) to refresh the ranking and the curated set")
    return 0


def _settings(args) -> Settings:
    """The settings for this command: `LALP_*` variables, then this command's flags."""
    over = {}
    for flag, field in (("model", "model"), ("segmenter", "segmenter"), ("window", "window"), ("template", "template"),
                        ("device", "device"), ("dtype", "dtype"), ("format", "source_format"),
                        ("teacher_mode", "teacher_mode"), ("max_response_chars", "max_response_chars"),
                        ("max_prompt_chars", "max_prompt_chars"), ("llm_url", "llm_url"), ("llm_model", "llm_model"),
                        ("warehouse", "warehouse"), ("max_prompts", "max_prompts"), ("control_tokens", "control_tokens"),
                        ("backend", "backend")):
        v = getattr(args, flag, None)
        if v is not None:
            over[field] = v
    if getattr(args, "all", False):
        over["max_prompts"] = 0
    if getattr(args, "source", None):
        over["sources"] = tuple(args.source)
    return Settings.from_env(**over)


# --- parser -----------------------------------------------------------------------------------


# lalp_resources.adapters.FORMATS, spelled out so that `lalp --help` does not import the adapters
FORMATS = ["auto", "canonical", "messages", "sharegpt", "alpaca", "zeroeval", "champ"]
CONTROL_HELP = ("rows holding the student's control-token strings (<|im_end|>, ...): quarantine (default) or keep "
                "them as plain text (LALP_CONTROL_TOKENS)")


BACKEND_HELP = "engine (default), vllm, or openai:<base url> of a vLLM server (LALP_BACKEND)"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lalp", description="Local Average Log Probability for reasoning data selection")
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="cmd", required=True)

    r = sub.add_parser("run", help="run the whole Dagster graph (default: embedded CHAMP traces, SmolLM2 student)")
    g = r.add_mutually_exclusive_group()
    g.add_argument("--all", action="store_true", help="score every prompt (default: LALP_MAX_PROMPTS, 5)")
    g.add_argument("--max-prompts", type=int, help="score this many prompts (0 = all)")
    r.add_argument("--source", action="append", help="trace source (file, folder, s3:// prefix, or 'champ'); repeatable")
    r.add_argument("--control-tokens", choices=["quarantine", "keep"], help=CONTROL_HELP)
    r.add_argument("--backend", help=BACKEND_HELP)
    r.set_defaults(fn=cmd_run)

    s = sub.add_parser("score", help="score canonical JSONL/Parquet traces to steps.parquet and responses.parquet")
    s.add_argument("input", nargs="+")
    s.add_argument("--out", required=True)
    s.add_argument("--model", help="smollm2 (embedded), a local HF dir, a .gguf, or a hub id (LALP_MODEL)")
    s.add_argument("--segmenter", choices=["paragraph", "line", "sentence", "llm"], help="(LALP_SEGMENTER)")
    s.add_argument("--window", help="fixed:K or fraction:R (LALP_WINDOW)")
    s.add_argument("--template", choices=["chat", "plain"], help="(LALP_TEMPLATE)")
    s.add_argument("--device", help="(LALP_DEVICE)")
    s.add_argument("--dtype", choices=["float32", "bfloat16", "float16", "auto"], help="(LALP_DTYPE)")
    s.add_argument("--format", choices=FORMATS, help="(LALP_FORMAT)")
    # this command scores the whole input it is given, unless told to sample
    s.add_argument("--max-prompts", type=int, default=0, help="score a deterministic sample of this many prompts (0 = all)")
    s.add_argument("--approx", action="store_true",
                   help="opt-in approximate single pass (step-sliding mask); faster, not exact (see README)")
    s.add_argument("--max-response-chars", type=int, help="(LALP_MAX_RESPONSE_CHARS)")
    s.add_argument("--max-prompt-chars", type=int, help="(LALP_MAX_PROMPT_CHARS)")
    s.add_argument("--llm-url", help="(LALP_LLM_URL)")
    s.add_argument("--llm-model", help="(LALP_LLM_MODEL)")
    s.add_argument("--control-tokens", choices=["quarantine", "keep"], help=CONTROL_HELP)
    s.add_argument("--backend", help=BACKEND_HELP)
    s.set_defaults(fn=cmd_score)

    i = sub.add_parser("ingest", help="read traces (any adapter) into canonical Parquet plus a quarantine")
    i.add_argument("source", nargs="+")
    i.add_argument("--out", required=True)
    i.add_argument("--format", choices=FORMATS, help="(LALP_FORMAT)")
    i.add_argument("--teacher-mode", choices=["model", "model+setting"], help="(LALP_TEACHER_MODE)")
    i.add_argument("--max-response-chars", type=int, help="(LALP_MAX_RESPONSE_CHARS)")
    i.add_argument("--max-prompt-chars", type=int, help="(LALP_MAX_PROMPT_CHARS)")
    i.add_argument("--show", type=int, default=20, help="print this many quarantine details")
    i.set_defaults(fn=cmd_ingest)

    ln = sub.add_parser("lineage", help="the chain from a curated row back to its teacher, file and runs")
    ln.add_argument("response_id")
    ln.add_argument("--json", action="store_true")
    ln.add_argument("--warehouse", help="the warehouse to read (LALP_WAREHOUSE); opened read-only")
    ln.set_defaults(fn=cmd_lineage)

    f = sub.add_parser("forget", help="remove a teacher that left the sources from every table (dry run without --yes)")
    f.add_argument("teacher")
    f.add_argument("--yes", action="store_true", help="delete (without it, only report what would be deleted)")
    f.add_argument("--warehouse", help="(LALP_WAREHOUSE)")
    f.set_defaults(fn=cmd_forget)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    try:
        return args.fn(args)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
