"""The scale benchmark: the whole Dagster graph (ingest to curated export) on N rows.

    make bench-scale ROWS=100000      # = .venv/bin/python -m benchmarks.bench_scale --rows 100000

1. Inputs. N canonical traces (Parquet by default, one file per 100,000 rows) made from the real ZeroEval MATH level-5
   text: new prompt id `s0000000`, `s0000001`, ... takes real problem `i mod P` (the P problems
   that all eight teachers answered parseably) and each teacher's real response to it, cycling,
   until there are N rows. Each cycle's prompts end in a different run of invisible characters
   (U+2060..U+2064) that the student's tokenizer normalizes away: every prompt text is distinct,
   as in real data (the engine groups and commits per prompt text), yet reads as the same tokens. One row in `--bad-every` has its response blanked, so the
   quarantine is never empty and "rows in = accepted + quarantined" is exercised.
2. The student. A tiny random Llama (1 layer, hidden 32) with a real byte-level BPE tokenizer
   (about 1k tokens) trained on the real texts with `tokenizers`, and a small chat template,
   saved as a local model directory (built once, kept under `~/.cache/lalp/bench_scale/`).
3. The score cache, pre-filled. Before the timed run the student scores each distinct
   (prompt, response) of the inputs once (P x teachers responses; kept between runs under
   `~/.cache/lalp/bench_scale/` with the student, keyed by its fingerprint), and those rows go into the
   fresh warehouse's `score_cache`. Every window of the timed run is then a cache hit: no
   forward pass, so the pipeline's own costs show, and every row still goes through ingest,
   token caps, segmentation, window planning and tokenization, the cache lookup, the commits,
   the aggregation, ranking, selection, exports and every check. (`--cold` skips the pre-fill:
   the model then forwards every window, which only small N can afford on a CPU.)
4. The run. The embedded default: a local DuckDB file and a temporary DAGSTER_HOME,
   `build_defs(Settings(...))` with `max_prompts=0`, the jobs executed in-process as `lalp run`
   does (`score_teachers_job` over every teacher, then `rank_and_curate_job`).
5. The table. Seconds and peak RSS per stage from the Dagster event log: an asset's body
   (STEP_START to its ASSET_MATERIALIZATION), then each asset check (to its
   ASSET_CHECK_EVALUATION); RSS and CPU time are sampled by a background thread every 20 ms, over
   the process and its live children (the planner processes of `LALP_HOST_WORKERS`). Inputs are
   generated in a child process that ends before the run, so the peak RSS is the pipeline's.

6. The rerun. The same graph again on the same inputs, warehouse and instance, with nothing new:
   its table follows, and its tables must come out unchanged.

The last line is `rows=N seconds=S peak_rss_mb=M per_row_ms=P rerun_seconds=R`: S is the wall time
of the graph (teacher discovery included; generation, student building and the cache pre-fill
excluded), M the peak RSS of the process with its planner processes (both runs), R the rerun's wall time.
"""

from __future__ import annotations

import argparse
import bisect
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ZEROEVAL_DIR = REPO.parent / "shared" / "data" / "zeroeval-math-l5"
DEFAULT_TEACHERS = 8
DEFAULT_BAD_EVERY = 1000
# distinct real problems cycled: 128 x 8 teachers = 1,024 distinct responses, scored once
DEFAULT_PROBLEMS = 128
CHUNK_ROWS = 100_000  # rows per input file (and per generation step)
VOCAB = 1024
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
SPECIAL = ["<|end|>", "<|user|>", "<|assistant|>", "<|system|>"]


# --------------------------------------------------------------------------------- inputs


def real_rows(data_dir: Path, teachers: int, problems: int = 0):
    """The real rows: a frame (problem index `j`, teacher slot `k`, prompt, response, reference,
    final answer) over the problems every real teacher answered parseably. Teacher slot k uses
    real teacher k mod 8 (slots past the eighth are named `<teacher>#<k // 8>`)."""
    import polars as pl

    from lalp_resources import adapters

    limits = adapters.Limits(max_prompt_chars=100_000, max_response_chars=200_000, max_teacher_chars=256,
                             max_prompt_id_chars=256)
    files = sorted(p for p in data_dir.glob("*.json") if p.name != "summary.json")
    res = adapters.ingest([str(p) for p in files], "zeroeval", teacher_mode="model", limits=limits, verify=False)
    t = res.traces
    names = sorted(t["teacher"].unique().to_list())
    full = t.group_by("prompt_id").agg(pl.col("teacher").n_unique().alias("n")).filter(pl.col("n") == len(names))
    ids = sorted(full["prompt_id"].to_list(), key=lambda p: (len(p), p))
    problems = ids[:problems] if problems else ids
    index = pl.DataFrame({"prompt_id": problems, "j": list(range(len(problems)))}, schema={"prompt_id": pl.Utf8, "j": pl.Int64})
    slots = pl.DataFrame({
        "k": list(range(teachers)),
        "real": [names[k % len(names)] for k in range(teachers)],
        "teacher": [names[k % len(names)] + (f"#{k // len(names)}" if k >= len(names) else "") for k in range(teachers)],
    }, schema={"k": pl.Int64, "real": pl.Utf8, "teacher": pl.Utf8})
    rows = (
        t.join(index, on="prompt_id")
        .join(slots, left_on="teacher", right_on="real", suffix="_slot")
        .select("j", "k", pl.col("teacher_slot").alias("teacher"), "prompt", "response",
                "reference_answer", "final_answer")
        .sort("j", "k")
    )
    return rows, len(problems), names


def generate(data_dir: Path, rows: int, teachers: int, out: Path, fmt: str, bad_every: int, problems: int = 0) -> dict:
    """Write `rows` canonical traces into the folder `out`, one file per CHUNK_ROWS rows (memory
    stays bounded by a chunk; ingest, too, holds one file at a time)."""
    import polars as pl
    import pyarrow.parquet as pq

    real, n_problems, names = real_rows(data_dir, teachers, problems)
    n_prompts = -(-rows // teachers)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    n_bad = 0
    for lo in range(0, rows, CHUNK_ROWS):
        hi = min(rows, lo + CHUNK_ROWS)
        g = pl.DataFrame({"g": list(range(lo, hi))}, schema={"g": pl.Int64}).with_columns(
            (pl.col("g") // teachers).alias("i"), (pl.col("g") % teachers).alias("k"))
        chunk = (
            g.with_columns((pl.col("i") % n_problems).alias("j"))
            .join(real, on=["j", "k"], how="left")
            .sort("g")
            .with_columns(
                pl.format("s{}", pl.col("i").cast(pl.Utf8).str.zfill(7)).alias("prompt_id"),
                (pl.col("prompt") + (pl.col("i") // n_problems).map_batches(_cycle_marks, return_dtype=pl.Utf8))
                .alias("prompt"),
                pl.when((pl.col("g") % bad_every) == bad_every - 1).then(pl.lit("")).otherwise(pl.col("response"))
                .alias("response") if bad_every > 0 else pl.col("response"),
            )
            .select("prompt_id", "prompt", "teacher", "response", "reference_answer", "final_answer")
        )
        n_bad += int((chunk["response"] == "").sum())
        # one file per chunk, as datasets of this size come (a hub dataset's train-*.parquet shards)
        part = out / f"part-{lo // CHUNK_ROWS:05d}.{fmt}"
        if fmt == "jsonl":
            chunk.write_ndjson(part)
        else:
            pq.write_table(chunk.to_arrow(), part, compression="zstd", row_group_size=10_000)
    return {"rows": rows, "prompts": n_prompts, "teachers": teachers, "real_problems": n_problems,
            "real_teachers": len(names), "blank_responses": n_bad,
            "files": len(list(out.iterdir())), "bytes": sum(f.stat().st_size for f in out.iterdir())}


# Invisible characters (word joiner, function application, invisible times/separator/plus) that the
# benchmark student's tokenizer normalizes away: each cycle through the real problems gets its own
# prompt text (as real prompts are distinct, so the engine groups and commits as it would on real
# data) that the student reads as the same tokens (so the pre-filled score cache answers).
MARKS = "\u2060\u2061\u2062\u2063\u2064"


def _cycle_marks(cycles):
    import polars as pl

    def mark(c: int) -> str:
        out = ""
        while c:
            c, r = divmod(c, len(MARKS))
            out += MARKS[r]
        return out

    return pl.Series([mark(c) for c in cycles.to_list()], dtype=pl.Utf8)


STUDENT_VERSION = "1"  # bump when the student's recipe below changes


def build_student(data_dir: Path, model_dir: Path) -> Path:
    """A byte-level BPE tokenizer (~1k tokens, chat template) trained on the real texts, and a
    tiny random Llama over it, saved as a local Hugging Face model directory (written to a
    temporary name, then renamed: concurrent builders are safe)."""
    import torch
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    if (model_dir / "config.json").exists():
        return model_dir
    real, _, _ = real_rows(data_dir, DEFAULT_TEACHERS)  # every real teacher's text, once
    texts = real["prompt"].unique(maintain_order=True).to_list() + real["response"].to_list()
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.Replace(Regex(f"[{MARKS}]"), "")
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|end|>", pad_token="<|end|>",
                                   chat_template=CHAT_TEMPLATE)
    tmp = model_dir.with_name(f"{model_dir.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    fast.save_pretrained(tmp)
    torch.manual_seed(5)
    cfg = LlamaConfig(vocab_size=len(fast), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16384,
                      eos_token_id=fast.eos_token_id, pad_token_id=fast.pad_token_id, bos_token_id=None)
    LlamaForCausalLM(cfg).eval().save_pretrained(tmp)
    try:
        tmp.rename(model_dir)
    except OSError:  # another builder got there first
        shutil.rmtree(tmp, ignore_errors=True)
    return model_dir


def student_dir(data_dir: Path, store: Path) -> Path:
    """Where the student lives between runs: its path is part of its fingerprint, so a fixed
    path keeps the pre-scored windows valid from one run to the next."""
    import hashlib

    files = sorted((p.name, p.stat().st_size) for p in data_dir.glob("*.json"))
    key = hashlib.sha256(json.dumps([STUDENT_VERSION, VOCAB, files]).encode()).hexdigest()[:12]
    return store / f"student-{key}"


def cache_store() -> Path:
    from lalp_resources.settings import Settings

    return Path(Settings.__dataclass_fields__["cache_dir"].default) / "bench_scale"


def prescore(data_dir: Path, work: Path, model_dir: Path, teachers: int, problems: int, store: Path) -> dict:
    """Score each distinct (prompt, response) of the inputs once with the pipeline's own stage
    functions and engine, reusing and extending the rows kept in `store` for this student, and
    write them to `work/inputs/score_cache.parquet` for the warehouse."""
    import hashlib

    import polars as pl

    from lalp_resources import pipeline
    from lalp_resources.engine import DictCache, ScoringEngine
    from lalp_resources.method.segmentation import segment
    from lalp_resources.student import load_student

    real, _, _ = real_rows(data_dir, teachers, problems)
    distinct = real.unique(["prompt", "response"], maintain_order=True).select(
        pl.format("d{}-{}", "j", "k").alias("response_id"), pl.format("d{}", "j").alias("prompt_id"),
        pl.col("teacher"), "prompt", "response")
    st = load_student(str(model_dir), device="cpu", dtype="float32", cache_dir=str(work / "cache"))
    namespace = f"{st.fingerprint}|chat|{st.dtype}"  # what the pipeline's engine uses (template chat)
    kept = store / f"{hashlib.sha256(namespace.encode()).hexdigest()[:16]}.parquet"
    cache = DictCache()
    if kept.exists():
        old = pl.read_parquet(kept)  # a store from before head sums has none: those rows keep None heads
        cache.store(old.select([c for c in pipeline.CACHE_SCHEMA if c in old.columns]).iter_rows())
    n_before = len(cache.data)
    steps = pipeline.segment_traces(distinct, lambda text: (segment(text, "paragraph"), None), st.tokenizer)
    items = pipeline.score_items(steps, distinct)
    engine = ScoringEngine(st.model, st.tokenizer, template="chat", window="fixed:4", namespace=namespace, cache=cache)
    t0 = time.perf_counter()
    for chunk in engine.score(items):
        cache.store(chunk.new_cache_rows)
    secs = time.perf_counter() - t0
    rows = pl.DataFrame([(k, *v) for k, v in cache.data.items()], schema=pipeline.CACHE_SCHEMA, orient="row")
    if len(cache.data) > n_before:
        store.mkdir(parents=True, exist_ok=True)
        tmp = kept.with_suffix(".tmp")
        rows.write_parquet(tmp)
        tmp.replace(kept)
    rows.with_columns(pl.lit(namespace).alias("namespace")).write_parquet(work / "inputs" / "score_cache.parquet")
    return {"distinct_responses": distinct.height, "cache_rows": rows.height, "windows_scored_now": engine.stats.windows_scored,
            "prescore_seconds": round(secs, 1)}


def prepare(data_dir: Path, work: Path, rows: int, teachers: int, fmt: str, bad_every: int, problems: int,
            cold: bool, store: Path) -> dict:
    info = generate(data_dir, rows, teachers, work / "inputs" / "traces", fmt, bad_every, problems)
    model_dir = build_student(data_dir, student_dir(data_dir, store))
    info["student"] = str(model_dir)
    if not cold:
        info.update(prescore(data_dir, work, model_dir, teachers, problems, store))
    return info


def prefill_cache(warehouse: str, rows_file: Path) -> int:
    """The pre-scored windows into a fresh warehouse's `score_cache` (creating the warehouse)."""
    import polars as pl

    from lalp_resources.warehouse import Warehouse, insert

    rows = pl.read_parquet(rows_file).with_columns(pl.lit("bench_scale prefill").alias("created_run_id"))
    with Warehouse(warehouse).connect() as con:
        return insert(con, "score_cache", rows, mode="ignore")


# --------------------------------------------------------------------------------- measuring


def _descendants() -> list[int]:
    """This process's live descendants (the planner processes, engine/prefetch.py, among them)."""
    out, todo = [], [os.getpid()]
    while todo:
        pid = todo.pop()
        try:
            for tid in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{tid}/children") as f:
                    kids = [int(x) for x in f.read().split()]
                out += kids
                todo += kids
        except OSError:  # gone meanwhile
            continue
    return out


def _statm_mb(pid) -> float:
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _cpu_s(pid) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def rss_mb(kids: list[int] | None = None) -> float:
    """Resident set size of this process and its live descendants (an upper bound: pages that
    they share, such as libraries, count once in each)."""
    total = _statm_mb("self")
    for pid in _descendants() if kids is None else kids:
        try:
            total += _statm_mb(pid)
        except OSError:
            pass
    return total


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


class RssSampler(threading.Thread):
    """Resident set size and CPU time (all threads) of this process and its children every `every_s` seconds. CPU
    seconds say what a stage costs when other processes share the machine; wall seconds do not."""

    def __init__(self, every_s: float = 0.02):
        super().__init__(daemon=True)
        self.every_s = every_s
        self.samples: list[tuple[float, float, float]] = []
        self._halt = threading.Event()
        self._kids: list[int] = []
        self._kids_at = 0.0

    def sample(self) -> None:
        # children that ended (the answer verifier's) and live ones (the planner processes; the
        # list is refreshed every half second, reading it costs more than the sample)
        now = time.time()
        if now - self._kids_at >= 0.5:
            self._kids, self._kids_at = _descendants(), now
        live = self._kids
        done = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = time.process_time() + done.ru_utime + done.ru_stime
        for pid in live:
            try:
                cpu += _cpu_s(pid)
            except OSError:
                pass
        self.samples.append((time.time(), rss_mb(live), cpu))

    def run(self) -> None:
        while not self._halt.is_set():
            self.sample()
            self._halt.wait(self.every_s)

    def stop(self) -> None:
        self._halt.set()
        self.join()
        self.sample()

    def peak(self, t0: float, t1: float) -> float:
        inside = [r for t, r, _ in self.samples if t0 <= t <= t1]
        before = [r for t, r, _ in self.samples if t < t0]
        return max(inside + before[-1:], default=float("nan"))

    def cpu(self, t0: float, t1: float) -> float:
        i0 = bisect.bisect_right(self.samples, (t0, float("inf"), 0.0)) - 1
        i1 = bisect.bisect_right(self.samples, (t1, float("inf"), 0.0)) - 1
        if i1 < 0:
            return 0.0
        return self.samples[i1][2] - self.samples[max(i0, 0)][2]


def stage_rows(instance, run_id: str, sampler: RssSampler) -> list[dict]:
    """Per step of a run: the asset body, then each check, from the run's event log."""
    import dagster as dg

    out = []
    step_start: dict[str, float] = {}
    last: dict[str, float] = {}
    body: dict[str, dict] = {}  # a partition range materializes once per partition: one row
    for e in instance.all_logs(run_id):
        ev = e.dagster_event
        if ev is None or ev.step_key is None:
            continue
        key, ts = ev.step_key, e.timestamp
        if ev.event_type == dg.DagsterEventType.STEP_START:
            step_start[key] = last[key] = ts
        elif ev.event_type == dg.DagsterEventType.ASSET_MATERIALIZATION:
            mat = ev.step_materialization_data.materialization
            n = mat.metadata.get("dagster/row_count")
            if key in body:
                body[key]["t1"] = ts
            else:
                body[key] = {"stage": mat.asset_key.to_user_string(), "t0": last[key], "t1": ts,
                             "rows": n.value if n is not None else None}
                out.append(body[key])
            last[key] = ts
        elif ev.event_type == dg.DagsterEventType.ASSET_CHECK_EVALUATION:
            data = ev.asset_check_evaluation_data
            out.append({"stage": f"  check {data.check_name}" + ("" if data.passed else " (FAILED)"),
                        "t0": last[key], "t1": ts, "rows": data.metadata.get("rows_validated").value
                        if data.metadata.get("rows_validated") is not None else None})
            last[key] = ts
        elif ev.event_type in (dg.DagsterEventType.STEP_SUCCESS, dg.DagsterEventType.STEP_FAILURE):
            rest = ts - last.get(key, ts)
            if rest > 0.05:
                out.append({"stage": f"  {key} (step end)", "t0": last[key], "t1": ts, "rows": None})
    for r in out:
        measure(r, sampler)
    return out


def measure(r: dict, sampler: RssSampler) -> dict:
    r["seconds"] = r["t1"] - r["t0"]
    r["cpu_s"] = sampler.cpu(r["t0"], r["t1"])
    r["peak_rss_mb"] = sampler.peak(r["t0"], r["t1"])
    return r


def print_table(rows: list[dict], file=sys.stdout) -> None:
    print(f"| {'stage':<40} | {'seconds':>8} | {'CPU s':>8} | {'peak RSS MB':>11} | {'rows':>10} |", file=file)
    print(f"| {'-' * 40} | {'-' * 7}:| {'-' * 7}:| {'-' * 10}:| {'-' * 9}:|", file=file)
    for r in rows:
        n = "" if r.get("rows") is None else f"{r['rows']:,}"
        print(f"| {r['stage']:<40} | {r['seconds']:8.2f} | {r['cpu_s']:8.2f} | {r['peak_rss_mb']:11.0f} | {n:>10} |",
              file=file)


# --------------------------------------------------------------------------------- the run


def run_graph(work: Path, trace_file: Path, model_dir: str, verbose: bool = False, cold: bool = False,
              rerun: bool = False, host_workers: int | None = None,
              duckdb_memory: str | None = None) -> dict:
    """The whole graph in this process, the way `lalp run` does it; returns the measurements."""
    import logging

    import dagster as dg

    for noisy in ("transformers", "great_expectations", "httpx", "math_verify"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    import datasets

    datasets.disable_progress_bars()

    from lalp_assets.definitions import build_defs
    from lalp_assets.instance import open_instance, owner_tags, register_teachers
    from lalp_assets.partitions import teacher_partitions
    from lalp_resources.settings import Settings
    from lalp_resources.warehouse import Warehouse

    home = work / "dagster_home"
    home.mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO / "dagster_home" / "dagster.yaml", home / "dagster.yaml")
    settings = Settings(
        dagster_home=str(home), sources=(str(trace_file),), source_format="canonical", max_prompts=0,
        model=model_dir, device="cpu", dtype="float32", template="chat",
        cache_dir=str(work / "cache"), **({} if host_workers is None else {"host_workers": host_workers}),
        **({} if duckdb_memory is None else {"duckdb_memory": duckdb_memory}),
    )
    # a rerun finds the warehouse and instance of the first run: nothing new to do
    prefilled = 0 if cold or rerun else prefill_cache(settings.warehouse, work / "inputs" / "score_cache.parquet")
    sampler = RssSampler()
    sampler.start()
    t_start = time.time()
    defs = build_defs(settings)
    instance = open_instance(settings)
    t_disc = time.time()
    teachers = defs.resources["trace_sources"].discover_teachers()
    register_teachers(instance, teachers)
    keys = instance.get_dynamic_partitions(teacher_partitions.name)
    table = [{"stage": "discover teachers (reads the sources)", "t0": t_disc, "t1": time.time(), "rows": None}]
    log = {"loggers": {"console": {"config": {"log_level": "INFO" if verbose else "WARNING"}}}}
    ok = True
    runs = []
    for job, tags in (("score_teachers_job", {"dagster/asset_partition_range_start": keys[0],
                                              "dagster/asset_partition_range_end": keys[-1]}),
                      ("rank_and_curate_job", {})):
        t0 = time.time()
        r = defs.resolve_job_def(job).execute_in_process(
            instance=instance, run_config=log, raise_on_error=False, tags={**tags, **owner_tags()})
        runs.append((job, r.run_id, t0, time.time(), r.success))
        if not r.success:
            ok = False
            for ev in r.all_events:
                if ev.is_step_failure and ev.step_failure_data and ev.step_failure_data.error:
                    print(f"step {ev.step_key} failed: {ev.step_failure_data.error.message.strip()}", file=sys.stderr)
            break
    t_end = time.time()
    sampler.stop()
    for r in table:
        measure(r, sampler)
    for job, run_id, t0, t1, success in runs:
        steps = stage_rows(instance, run_id, sampler)
        inside = sum(s["seconds"] for s in steps)
        table += steps
        table.append({"stage": f"  {job} (run overhead)", "seconds": (t1 - t0) - inside,
                      "cpu_s": sampler.cpu(t0, t1) - sum(s["cpu_s"] for s in steps),
                      "peak_rss_mb": sampler.peak(t0, t1), "rows": None})
    engine = {}
    ev = instance.get_latest_materialization_event(dg.AssetKey("step_scores"))
    if ev is not None:
        md = ev.asset_materialization.metadata
        engine = {k: md[k].value for k in ("windows_total", "windows_scored", "windows_cached", "tokens_forwarded",
                                            "seconds") if k in md}
    wh = Warehouse(settings.warehouse)
    with wh.connect(read_only=True) as con:
        counts = {t: con.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in (
            "raw_teacher_traces", "quarantine", "reasoning_steps", "step_scores", "score_cache",
            "response_scores", "selection_decisions", "curated_sft_dataset")}
    return {"ok": ok, "table": table, "seconds": t_end - t_start, "cpu_s": sampler.cpu(t_start, t_end),
            # its own high-water mark, or the sampled peak with its planner processes where higher
            "peak_rss_mb": max(peak_rss_mb(), sampler.peak(t_start, t_end)),
            "sampled_peak_mb": sampler.peak(t_start, t_end), "counts": counts, "warehouse": settings.warehouse,
            "exports": settings.exports, "teachers": teachers, "engine": engine, "prefilled": prefilled}


# --------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_scale", description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=10_000, help="trace rows to generate and run (default 10000)")
    p.add_argument("--teachers", type=int, default=DEFAULT_TEACHERS, help="teachers (default 8, the real ones)")
    p.add_argument("--format", default="parquet", choices=("parquet", "jsonl"), help="input file format")
    p.add_argument("--bad-every", type=int, default=DEFAULT_BAD_EVERY,
                   help="blank one response in this many rows (quarantined as empty_response); 0: none")
    p.add_argument("--problems", type=int, default=DEFAULT_PROBLEMS,
                   help=f"cycle the first K real problems (default {DEFAULT_PROBLEMS}; 0: all that every teacher answered)")
    p.add_argument("--cold", action="store_true",
                   help="no pre-filled score cache: the model forwards every window (small N only on a CPU)")
    p.add_argument("--cache-store", type=Path, default=None,
                   help="where pre-scored windows are kept between runs (default ~/.cache/lalp/bench_scale)")
    p.add_argument("--data", type=Path, default=ZEROEVAL_DIR, help="the ZeroEval MATH level-5 directory")
    p.add_argument("--work", type=Path, default=None, help="working folder (default: a temporary one, removed)")
    p.add_argument("--keep", action="store_true", help="keep the working folder")
    p.add_argument("--host-workers", type=int, default=None,
                   help="LALP_HOST_WORKERS for the run (default: the setting's default)")
    p.add_argument("--duckdb-memory", default=None,
                   help="LALP_DUCKDB_MEMORY for the run (default: the setting's default); a tenth of it at a tenth of "
                        "the rows shows where the default would not hold at ten times the rows")
    p.add_argument("--json", type=Path, default=None, help="also write the measurements here as JSON")
    p.add_argument("-v", "--verbose", action="store_true", help="Dagster's INFO log on the console")
    p.add_argument("--prepare-only", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.cache_store = args.cache_store or cache_store()
    if args.rows < 1 or args.teachers < 1:
        p.error("--rows and --teachers must be positive")
    if not args.data.is_dir():
        print(f"skipped: the ZeroEval MATH level-5 traces are absent ({args.data}); "
              "pass --data DIR to point at a copy")
        return 0
    work = args.work or Path(tempfile.mkdtemp(prefix="lalp-bench-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    trace_file = work / "inputs" / "traces"
    if args.prepare_only:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        info = prepare(args.data, work, args.rows, args.teachers, args.format, args.bad_every, args.problems,
                       args.cold, args.cache_store)
        (work / "inputs" / "info.json").write_text(json.dumps(info))
        return 0
    try:
        # inputs and student in a child process: this process's peak RSS is the pipeline's
        t0 = time.perf_counter()
        cmd = [sys.executable, "-m", "benchmarks.bench_scale", "--prepare-only", "--rows", str(args.rows),
               "--teachers", str(args.teachers), "--format", args.format, "--bad-every", str(args.bad_every), "--problems", str(args.problems), "--cache-store", str(args.cache_store),
               "--data", str(args.data), "--work", str(work)] + (["--cold"] if args.cold else [])
        subprocess.run(cmd, check=True, cwd=REPO)
        info = json.loads((work / "inputs" / "info.json").read_text())
        print(f"inputs: {info['rows']:,} rows = {info['prompts']:,} prompts x {info['teachers']} teachers, cycling "
              f"{info['real_problems']} real problems answered by all {info['real_teachers']} ZeroEval teachers; "
              f"{info['blank_responses']} blanked responses; {info.get('files', 1)} {args.format} file(s), {info['bytes'] / 2**20:.1f} MiB "
              f"(prepared with the student in {time.perf_counter() - t0:.1f}s)")
        load = os.getloadavg()
        if not args.cold:
            print(f"score cache: {info['distinct_responses']:,} distinct responses, {info['cache_rows']:,} windows pre-scored "
                  f"({info['windows_scored_now']:,} scored now in {info['prescore_seconds']}s, the rest kept from earlier runs "
                  f"in {args.cache_store})")
        res = run_graph(work, trace_file, info["student"], verbose=args.verbose, cold=args.cold,
                        host_workers=args.host_workers, duckdb_memory=args.duckdb_memory)
        # the same graph again on the same inputs, warehouse and instance: what the nightly schedule
        # or a `lalp run` after a small change pays when nothing (or little) is new
        again = run_graph(work, trace_file, info["student"], verbose=args.verbose, cold=args.cold, rerun=True,
                          host_workers=args.host_workers, duckdb_memory=args.duckdb_memory) if res["ok"] else None
        load_after = os.getloadavg()
        print()
        print_table(res["table"])
        c = res["counts"]
        print("\ntables: " + ", ".join(f"{k}={v:,}" for k, v in c.items()))
        e = res["engine"]
        if e:
            print(f"student: {e.get('windows_scored', 0):,} windows sent to the model, {e.get('windows_cached', 0):,} from the "
                  f"score cache, {e.get('tokens_forwarded', 0):,} tokens forwarded; engine {e.get('seconds', 0):.1f}s "
                  "(inside step_scores)")
        print(f"rows in {args.rows:,} = raw {c['raw_teacher_traces']:,} + quarantined {c['quarantine']:,}"
              f" ({'reconciles' if c['raw_teacher_traces'] + c['quarantine'] == args.rows else 'DOES NOT reconcile'})")
        print(f"machine: {os.cpu_count()} CPUs, load average {load[0]:.1f} before, {load_after[0]:.1f} after "
              f"(other processes share this machine)")
        if args.json:
            args.json.write_text(json.dumps({**res, "rows": args.rows, "info": info, "load": [load, load_after]},
                                            default=str, indent=1))
        if not res["ok"]:
            print("error: the graph failed (see above)", file=sys.stderr)
            return 1
        if again is not None:
            print("\nthe rerun, nothing new:")
            print_table(again["table"])
            if not again["ok"]:
                print("error: the rerun failed (see above)", file=sys.stderr)
                return 1
            if again["counts"] != c:
                print(f"error: the rerun changed the tables: {again['counts']} != {c}", file=sys.stderr)
                return 1
        secs, peak = res["seconds"], res["peak_rss_mb"]
        print(f"CPU: {res['cpu_s']:.1f}s in all, {res['cpu_s'] * 1000 / args.rows:.3f} ms per row")
        if args.keep or args.work:
            print(f"kept {work}")
        print(f"rows={args.rows} seconds={secs:.1f} peak_rss_mb={peak:.0f} per_row_ms={secs * 1000 / args.rows:.3f} "
              f"rerun_seconds={again['seconds']:.1f}")
        return 0
    finally:
        if args.work is None and not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
