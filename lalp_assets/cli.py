"""The `lalp` command.

    lalp run      [--all | --max-prompts N] [--source S ...]   run the whole Dagster graph
    lalp score    INPUT --out DIR [options]                     score traces to Parquet, no Dagster
    lalp ingest   SOURCE --out DIR [--format ...]               canonical traces + quarantine
    lalp lineage  RESPONSE_ID                                   where a curated row came from
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

from lalp_resources.settings import REPO_ROOT, dagster_home


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("transformers", "great_expectations", "httpx", "math_verify"):
        logging.getLogger(noisy).setLevel(logging.ERROR)


# --- lalp ingest ------------------------------------------------------------------------------


def cmd_ingest(args) -> int:
    from lalp_resources import adapters

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    res = adapters.ingest(args.source, args.format, teacher_mode=args.teacher_mode, max_response_chars=args.max_response_chars)
    res.traces.write_parquet(out / "traces.parquet")
    res.quarantine.write_parquet(out / "quarantine.parquet")
    s = res.summary()
    print(f"read {s['read']} rows = {s['accepted']} accepted + {s['quarantined']} quarantined")
    for reason, n in s["by_reason"].items():
        print(f"  quarantined {reason}: {n}")
    for row in res.quarantine.head(args.show).iter_rows(named=True):
        print(f"  - {row['source_uri'].rsplit('/', 1)[-1]}: {row['detail']}")
    print(f"wrote {out / 'traces.parquet'} and {out / 'quarantine.parquet'}")
    return 0


# --- lalp score -------------------------------------------------------------------------------


def cmd_score(args) -> int:
    import polars as pl

    from lalp_resources.method.aggregation import steps_frame
    from lalp_resources.method.segmentation import segment
    from lalp_resources import adapters
    from lalp_resources.engine import ScoreItem, ScoringEngine
    from lalp_resources.student import load_student
    from lalp_resources.method.tokenization import merge_unscored_steps

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    res = adapters.ingest(args.input, args.format, max_response_chars=args.max_response_chars)
    s = res.summary()
    print(f"read {s['read']} rows = {s['accepted']} accepted + {s['quarantined']} quarantined", file=sys.stderr)
    for row in res.quarantine.iter_rows(named=True):
        print(f"  skipped: {row['source_uri'].rsplit('/', 1)[-1]}: {row['detail']}", file=sys.stderr)
    if res.quarantine.height:
        res.quarantine.write_parquet(out / "quarantine.parquet")
    traces = res.traces
    if args.max_prompts:
        from lalp_resources.method.aggregation import sample_prompts

        keep = sample_prompts(traces["prompt_id"].to_list(), args.max_prompts)
        traces = traces.filter(pl.col("prompt_id").is_in(list(keep)))
    if traces.height == 0:
        print("error: no valid rows to score", file=sys.stderr)
        return 2
    student = load_student(args.model, device=args.device, dtype=args.dtype)
    llm = None
    if args.segmenter == "llm":
        from lalp_resources.llm_segmenter import LLMSegmenter

        if not (args.llm_url and args.llm_model):
            print("error: --segmenter llm needs --llm-url and --llm-model", file=sys.stderr)
            return 2
        llm = LLMSegmenter(args.llm_url, args.llm_model)

    def seg(text):
        spans = llm.segment(text) if llm else (segment(text, args.segmenter), None)
        return merge_unscored_steps(student.tokenizer, text, spans[0]), spans[1]

    steps = steps_frame(traces, seg)
    spans = {}
    for rid, lo, hi in steps.select("response_id", "char_start", "char_end").iter_rows():
        spans.setdefault(rid, []).append((lo, hi))
    items = [ScoreItem(rid, p, t, spans[rid]) for rid, p, t in traces.select("response_id", "prompt", "response").iter_rows()]
    engine = ScoringEngine(
        student.model, student.tokenizer, template=args.template, window=args.window,
        namespace=f"{student.fingerprint}|{args.template}|{student.dtype}", approx=args.approx,
    )
    if args.approx:
        print("note: --approx uses one step-sliding pass per response; step scores are NOT exact LALP", file=sys.stderr)
    bar = _progress_bar(len(steps) + len(items))
    t0 = time.perf_counter()
    result = engine.score_all(items, progress=lambda done, total, st: bar(done, total, st))
    secs = time.perf_counter() - t0
    sc = pl.DataFrame(
        [(x.response_id, x.step_index, x.n_tokens, x.mean_logprob) for x in result.steps],
        schema={"response_id": pl.Utf8, "step_index": pl.Int32, "n_tokens": pl.Int32, "mean_logprob": pl.Float64},
        orient="row",
    )
    steps_out = steps.join(sc, on=["response_id", "step_index"]).select(
        "response_id", "prompt_id", "teacher", "step_index", "char_start", "char_end", "text", "n_tokens", "mean_logprob"
    )
    resp = pl.DataFrame(
        [(r.response_id, r.n_steps, r.lalp, r.galp) for r in result.responses],
        schema={"response_id": pl.Utf8, "n_steps": pl.Int32, "lalp": pl.Float64, "galp": pl.Float64},
        orient="row",
    ).join(traces.select("response_id", "prompt_id", "teacher"), on="response_id").select(
        "response_id", "prompt_id", "teacher", "n_steps", "lalp", "galp"
    )
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
    os.environ.setdefault("DAGSTER_HOME", str(REPO_ROOT / "dagster_home"))
    if args.all:
        os.environ["LALP_MAX_PROMPTS"] = "0"
    elif args.max_prompts is not None:
        os.environ["LALP_MAX_PROMPTS"] = str(args.max_prompts)
    if args.source:
        os.environ["LALP_SOURCES"] = ",".join(args.source)
    import dagster as dg

    from lalp_assets.definitions import defs
    from lalp_assets.common import SETTINGS, teacher_partitions

    instance = open_instance()
    reap_dead_runs(instance)
    t0 = time.perf_counter()
    sources = defs.resources["trace_sources"]
    teachers = sources.discover_teachers()
    if not teachers:
        print("error: no teacher traces found in the configured sources", file=sys.stderr)
        return 2
    register_teachers(instance, teachers)
    keys = instance.get_dynamic_partitions(teacher_partitions.name)
    wanted = [k for k in keys if k in teachers]
    print(f"teachers: {wanted}; prompts per teacher: {SETTINGS.max_prompts or 'all'}; DAGSTER_HOME={os.environ['DAGSTER_HOME']}")
    # One run over the contiguous range of teacher partitions (the student loads once), then
    # the ranking and curation run.
    lo, hi = keys.index(wanted[0]), keys.index(wanted[-1])
    if keys[lo : hi + 1] != wanted:
        print("note: the partition range also covers teachers not in the current sources", file=sys.stderr)
    r1 = defs.resolve_job_def("score_teachers_job").execute_in_process(
        instance=instance,
        tags={"dagster/asset_partition_range_start": keys[lo], "dagster/asset_partition_range_end": keys[hi], **_owner_tags()},
        run_config=_log_config(args.verbose),
        raise_on_error=False,
    )
    print(f"run {r1.run_id}: score_teachers_job {'succeeded' if r1.success else 'FAILED'}")
    if not r1.success:
        _print_failures(r1)
        return 1
    r2 = defs.resolve_job_def("rank_and_curate_job").execute_in_process(
        instance=instance, tags=_owner_tags(), run_config=_log_config(args.verbose), raise_on_error=False
    )
    print(f"run {r2.run_id}: rank_and_curate_job {'succeeded' if r2.success else 'FAILED'}")
    if not r2.success:
        _print_failures(r2)
        return 1
    from lalp_assets.rankings import ranking_markdown
    from lalp_resources.warehouse import Warehouse

    wh = Warehouse(SETTINGS.warehouse)
    rk = wh.read("SELECT * FROM teacher_rankings ORDER BY lalp_rank")
    mix = wh.read("SELECT teacher, count(*) AS rows FROM curated_sft_dataset GROUP BY teacher ORDER BY rows DESC")
    print("\nTeacher ranking (LALP, paired bootstrap 95% CI; GALP beside it):")
    print(ranking_markdown(rk))
    print("\nCurated set teacher mix: " + ", ".join(f"{t}: {n}" for t, n in mix.iter_rows()))
    print(f"Curated SFT data: {Path(SETTINGS.exports) / 'curated_sft.jsonl'} (and .parquet)")
    print(f"Warehouse: {SETTINGS.warehouse}; open the UI with: make ui   ({time.perf_counter() - t0:.0f}s)")
    return 0


def open_instance():
    """The Dagster instance in $DAGSTER_HOME. Its SQLite storages create their tables on first use,
    and two processes doing that at once on a fresh home collide ("table ... already exists"), so
    that first use is serialized with a file lock beside them."""
    import fcntl

    import dagster as dg

    home = Path(os.environ["DAGSTER_HOME"])
    home.mkdir(parents=True, exist_ok=True)
    with open(home / ".lalp-instance.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        instance = dg.DagsterInstance.get()
        # one read from each storage (runs, events, schedules) creates its tables
        instance.get_runs(limit=1)
        instance.get_dynamic_partitions("teacher")
        instance.all_instigator_state()
    return instance


def register_teachers(instance, teachers: list[str]) -> list[str]:
    """Add teacher partitions that do not exist yet. Safe when another process registers the
    same teachers at the same moment (the loser of the race sees them and moves on)."""
    from lalp_assets.common import teacher_partitions

    added = []
    for t in teachers:
        if instance.has_dynamic_partition(teacher_partitions.name, t):
            continue
        try:
            instance.add_dynamic_partitions(teacher_partitions.name, [t])
            added.append(t)
        except Exception:
            if not instance.has_dynamic_partition(teacher_partitions.name, t):
                raise
    return added


def _log_config(verbose: bool) -> dict:
    """Dagster's console logger: progress and results at INFO, its step-by-step DEBUG only with -v."""
    return {"loggers": {"console": {"config": {"log_level": "DEBUG" if verbose else "INFO"}}}}


def _owner_tags() -> dict:
    import socket

    return {"lalp/pid": str(os.getpid()), "lalp/host": socket.gethostname()}


def reap_dead_runs(instance) -> list[str]:
    """Runs this command executes in-process have no run monitor: if such a process was killed
    (SIGKILL, OOM), its run stays STARTED and keeps its `gpu` pool slot, blocking every later
    scoring run. Mark runs whose owning process is gone as failed and free their slots."""
    import socket

    import dagster as dg

    reaped = []
    host = socket.gethostname()
    for run in instance.get_runs(filters=dg.RunsFilter(statuses=[dg.DagsterRunStatus.STARTED, dg.DagsterRunStatus.STARTING])):
        pid, run_host = run.tags.get("lalp/pid"), run.tags.get("lalp/host")
        if not pid or run_host != host:
            continue
        try:
            os.kill(int(pid), 0)
            continue  # still alive
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        instance.report_run_failed(run, f"the process that ran it (pid {pid}) is gone; marked failed by lalp run")
        instance.event_log_storage.free_concurrency_slots_for_run(run.run_id)
        reaped.append(run.run_id)
        print(f"note: run {run.run_id} was left STARTED by a dead process; marked failed and freed its pool slot", file=sys.stderr)
    return reaped


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
    from lalp_resources.lineage import lineage_report
    from lalp_resources.settings import Settings

    os.environ.setdefault("DAGSTER_HOME", str(dagster_home()))
    report = lineage_report(args.response_id, Settings().warehouse)
    if report is None:
        print(f"error: response_id {args.response_id!r} is not in the warehouse", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=2, default=str) if args.json else report_text(report))
    return 0


def report_text(r: dict) -> str:
    from lalp_resources.lineage import format_report

    return format_report(r)


# --- parser -----------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lalp", description="Local Average Log Probability for reasoning data selection")
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="cmd", required=True)

    r = sub.add_parser("run", help="run the whole Dagster graph (default: embedded CHAMP traces, SmolLM2 student)")
    g = r.add_mutually_exclusive_group()
    g.add_argument("--all", action="store_true", help="score every prompt (default: LALP_MAX_PROMPTS, 5)")
    g.add_argument("--max-prompts", type=int, help="score this many prompts (0 = all)")
    r.add_argument("--source", action="append", help="trace source (file, folder, or 'champ'); repeatable")
    r.set_defaults(fn=cmd_run)

    s = sub.add_parser("score", help="score canonical JSONL/Parquet traces to steps.parquet and responses.parquet")
    s.add_argument("input", nargs="+")
    s.add_argument("--out", required=True)
    s.add_argument("--model", default="smollm2", help="smollm2 (embedded), a local HF dir, a .gguf, or a hub id")
    s.add_argument("--segmenter", default="paragraph", choices=["paragraph", "line", "sentence", "llm"])
    s.add_argument("--window", default="fixed:4", help="fixed:K or fraction:R")
    s.add_argument("--template", default="chat", choices=["chat", "plain"])
    s.add_argument("--device", default="auto")
    s.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "auto"])
    s.add_argument("--format", default="auto", choices=["auto", "canonical", "messages", "zeroeval", "champ"])
    s.add_argument("--max-prompts", type=int, default=0)
    s.add_argument("--approx", action="store_true",
                   help="opt-in approximate single pass (step-sliding mask); faster, not exact (see README)")
    s.add_argument("--max-response-chars", type=int, default=200_000)
    s.add_argument("--llm-url", default=os.environ.get("LALP_LLM_URL", ""))
    s.add_argument("--llm-model", default=os.environ.get("LALP_LLM_MODEL", ""))
    s.set_defaults(fn=cmd_score)

    i = sub.add_parser("ingest", help="read traces (any adapter) into canonical Parquet plus a quarantine")
    i.add_argument("source", nargs="+")
    i.add_argument("--out", required=True)
    i.add_argument("--format", default="auto", choices=["auto", "canonical", "messages", "zeroeval", "champ"])
    i.add_argument("--teacher-mode", default="model", choices=["model", "model+setting"])
    i.add_argument("--max-response-chars", type=int, default=200_000)
    i.add_argument("--show", type=int, default=20, help="print this many quarantine details")
    i.set_defaults(fn=cmd_ingest)

    ln = sub.add_parser("lineage", help="the chain from a curated row back to its teacher, file and runs")
    ln.add_argument("response_id")
    ln.add_argument("--json", action="store_true")
    ln.set_defaults(fn=cmd_lineage)
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
