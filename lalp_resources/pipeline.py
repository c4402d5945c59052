"""The pipeline's stages as plain functions, shared by the Dagster assets (`lalp_assets/`) and
the `lalp score` / `lalp ingest` commands, so that both front doors compute the same thing:

    ingest (adapters) -> token caps -> segment -> build items -> score (engine) -> aggregate
    -> rank -> select

LALP and GALP are aggregated in one place, `aggregate_responses`. No Dagster import.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterable, Sequence

import polars as pl

from lalp_resources import adapters, objectstore
from lalp_resources.method.aggregation import (  # noqa: F401
    lalp_from_steps,
    rank_teachers,
    select_responses,
    spans_by_response,
    steps_from_spans,
)
from lalp_resources.method.tokenization import control_strings, encode_arrays, merge_unscored_steps, text_ids, tokenize_many

Segmenter = Callable[[str], tuple[list[tuple[int, int]], "str | None"]]


def utcnow() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


# ---------------------------------------------------------------------------------- sharding


def shard_of(prompt_id: str, shards: int) -> int:
    """A prompt's scoring shard: a stable hash of `prompt_id` (the same on every machine and run)."""
    if shards <= 1:
        return 0
    return int.from_bytes(hashlib.sha256(prompt_id.encode("utf-8", "surrogatepass")).digest()[:8], "big") % shards


def with_shard(df: pl.DataFrame, shards: int) -> pl.DataFrame:
    ids = df["prompt_id"].unique().to_list()
    table = pl.DataFrame({"prompt_id": ids, "shard": [shard_of(p, shards) for p in ids]},
                         schema={"prompt_id": pl.Utf8, "shard": pl.Int32})
    return df.join(table, on="prompt_id", how="left")


# ---------------------------------------------------------------------------------- token caps


# texts per batched tokenizer call, bounded by characters so a batch of long rows stays small
TOKENIZE_BLOCK_CHARS = 1 << 21
TOKENIZE_BLOCK_ROWS = 2048


def text_blocks(texts: Sequence[str]) -> Iterable[tuple[int, int]]:
    """[lo, hi) ranges of `texts` for batched tokenization: at most TOKENIZE_BLOCK_ROWS texts and
    about TOKENIZE_BLOCK_CHARS characters each (one longer text is a block of its own)."""
    lo, chars = 0, 0
    for i, t in enumerate(texts):
        n = len(t) if t else 0
        if i > lo and (chars + n > TOKENIZE_BLOCK_CHARS or i - lo >= TOKENIZE_BLOCK_ROWS):
            yield lo, i
            lo, chars = i, 0
        chars += n
    if lo < len(texts):
        yield lo, len(texts)


def token_counts(tokenizer, texts: Sequence[str]) -> list[int]:
    """Student tokens per text (no special tokens), tokenized in bounded batches."""
    out: list[int] = []
    for lo, hi in text_blocks(texts):
        ids = text_ids(tokenizer, list(texts[lo:hi]))
        out.extend(len(x) for x in ids)
    return out


def token_caps(traces: pl.DataFrame, tokenizer, max_prompt_tokens: int, max_response_tokens: int,
               response_counts: Sequence[int] | None = None) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Split traces into (kept, rejected): prompts or responses with more student tokens than the
    caps are not scored. The character caps at ingest bound memory first, and the texts are
    tokenized in bounded batches, so this stays bounded too. `rejected` carries the quarantine
    columns with the limit in the detail (a prompt over its cap is reported before a response).
    `response_counts`: the responses' token counts, where the caller tokenized them already."""
    if traces.height == 0:
        return traces, _token_rejects(traces.head(0), [])
    n = traces.height
    n_p = pl.Series(token_counts(tokenizer, traces["prompt"].to_list()) if max_prompt_tokens else [0] * n, dtype=pl.Int64)
    if response_counts is None and max_response_tokens:
        response_counts = token_counts(tokenizer, traces["response"].to_list())
    n_r = pl.Series(response_counts if max_response_tokens else [0] * n, dtype=pl.Int64)
    over_p = (n_p > max_prompt_tokens) if max_prompt_tokens else pl.Series([False] * n)
    over_r = ~over_p & ((n_r > max_response_tokens) if max_response_tokens else pl.Series([False] * n))
    bad = over_p | over_r
    reasons = [
        ("prompt_too_many_tokens", f"prompt is {p:,} student tokens; limit LALP_MAX_PROMPT_TOKENS={max_prompt_tokens}") if op
        else ("response_too_many_tokens", f"response is {r:,} student tokens; limit LALP_MAX_RESPONSE_TOKENS={max_response_tokens}")
        for p, r, op in zip(n_p.filter(bad).to_list(), n_r.filter(bad).to_list(), over_p.filter(bad).to_list())
    ]
    return traces.filter(~bad), _token_rejects(traces.filter(bad), reasons)


CONTROL_TOKEN_MODES = ("quarantine", "keep")


def control_token_split(traces: pl.DataFrame, tokenizer, template: str, mode: str) -> tuple[pl.DataFrame, pl.DataFrame, int]:
    """Find prompts and responses that hold one of the student's control-token strings
    (`control_strings`: its special tokens and the chat template's markup tokens). An SFT
    trainer's chat template would read such a string as a real turn boundary, and a default
    tokenizer call as a control token the student finds highly probable, so by default
    (`quarantine`) these rows are not scored; `keep` scores them as the literal characters they
    are. Returns (kept, rejected as quarantine rows, rows holding control-token strings)."""
    if mode not in CONTROL_TOKEN_MODES:
        raise ValueError(f"LALP_CONTROL_TOKENS={mode!r}: expected one of {CONTROL_TOKEN_MODES}")
    strings = list(control_strings(tokenizer, template))
    if traces.height == 0 or not strings:
        return traces, _token_rejects(traces.head(0), []), 0
    in_p = traces["prompt"].str.contains_any(strings)
    in_r = traces["response"].str.contains_any(strings)
    flagged = in_p | in_r
    n = int(flagged.sum())
    if mode == "keep" or n == 0:
        return traces, _token_rejects(traces.head(0), []), n
    rows = traces.filter(flagged)
    reasons = []
    for prompt, response in rows.select("prompt", "response").iter_rows():
        where, text = ("prompt", prompt) if any(c in prompt for c in strings) else ("response", response)
        found = [c for c in strings if c in text]
        reasons.append((f"control_token_in_{where}",
                        f"{where} holds the student's control-token string(s) {', '.join(found[:5])}"
                        f"{' ...' if len(found) > 5 else ''}; set LALP_CONTROL_TOKENS=keep to score it as plain text"))
    return traces.filter(~flagged), _token_rejects(rows, reasons), n


@dataclass(frozen=True)
class Screened:
    kept: pl.DataFrame          # the traces that go on to segmentation and scoring
    rejected: pl.DataFrame      # quarantine rows (stage `steps`), each with its reason
    control_token_rows: int     # rows holding control-token strings (quarantined, or kept as text)
    over_token_caps: int


def screen_traces(traces: pl.DataFrame, tokenizer, template: str, control_tokens: str,
                  max_prompt_tokens: int, max_response_tokens: int) -> Screened:
    """The steps stage's gate, the same for the assets and `lalp score`: control-token strings
    first (a cheap substring scan), then the token caps (a tokenization)."""
    kept, control, n_control = control_token_split(traces, tokenizer, template, control_tokens)
    kept, too_long = token_caps(kept, tokenizer, max_prompt_tokens, max_response_tokens)
    rejected = pl.concat([control, too_long]) if control.height else too_long
    return Screened(kept, rejected, n_control, too_long.height)


STEPS_BATCH_PROMPTS = 2048


def prompt_batches(rows: pl.DataFrame, batch_prompts: int) -> list[list[str]]:
    """The response ids of `rows` (response_id, prompt_id) in batches of `batch_prompts` whole
    prompts (sorted by prompt id; 0 = one batch): the unit the streaming stages read, process and
    commit, so their memory depends on the batch and not on the rows. Always at least one batch."""
    if rows.height == 0:
        return [[]]
    ordered = rows.select("prompt_id", "response_id").sort("prompt_id", "response_id")
    rank = ordered["prompt_id"].rank("dense") - 1
    size = batch_prompts if batch_prompts > 0 else ordered.height
    return [part["response_id"].to_list()
            for part in ordered.with_columns((rank // size).alias("_b")).partition_by("_b", maintain_order=True)]


def screen_and_segment(traces: pl.DataFrame, tokenizer, template: str, control_tokens: str, max_prompt_tokens: int,
                       max_response_tokens: int, segment_fn: Segmenter, batch_prompts: int = STEPS_BATCH_PROMPTS,
                       progress: Callable[[int, int], None] | None = None) -> tuple[pl.DataFrame, Screened]:
    """The steps stage, the same for the assets and `lalp score`: `screen_traces`, then
    `segment_traces`, over `batch_prompts` prompts at a time. Each response is tokenized once,
    and that one tokenization serves both the token cap and the merge of steps that own no token;
    the token starts in memory are those of one batch, whatever the rows. Steps and kept rows come
    out in the input's order (response ids are unique after ingest), as from one call over everything. `progress(done, total)`: as in
    `segment_traces`, over all the batches."""
    pids = traces["prompt_id"].unique().sort().to_list() if traces.height else []
    step = batch_prompts if batch_prompts > 0 else max(1, len(pids))
    n = traces.height
    steps, kept_parts, rejected, n_control, n_caps, done = [], [], [], 0, 0, 0
    for lo in range(0, len(pids), step):
        batch = traces.filter(pl.col("prompt_id").is_in(pids[lo:lo + step])) if step < len(pids) else traces
        kept, control, c = control_token_split(batch, tokenizer, template, control_tokens)
        n_control += c
        starts = None
        if max_response_tokens and kept.height:
            texts = kept["response"].to_list()
            starts = [st for a, b in text_blocks(texts) for _, st, _ in encode_arrays(tokenizer, texts[a:b])]
            kept, too_long = token_caps(kept.with_row_index("_lalp_row"), tokenizer, max_prompt_tokens,
                                        max_response_tokens, response_counts=[len(st) for st in starts])
            starts = [starts[i] for i in kept["_lalp_row"].to_list()]
            kept = kept.drop("_lalp_row")
        else:
            kept, too_long = token_caps(kept, tokenizer, max_prompt_tokens, max_response_tokens)
        n_caps += too_long.height
        rejected += [r for r in (control, too_long) if r.height]
        base = done + (batch.height - kept.height)   # screened-out rows count as done in both passes
        steps.append(segment_traces(kept, segment_fn, tokenizer, starts=starts, progress=None if not progress else (
            lambda d, t, base=base: progress(2 * base + d, 2 * n))))
        kept_parts.append(kept)
        done += batch.height
    if progress and n:
        progress(2 * n, 2 * n)
    if not steps:
        return segment_traces(traces, segment_fn, tokenizer), Screened(traces, _token_rejects(traces.head(0), []), 0, 0)
    out, kept_all = pl.concat(steps), pl.concat(kept_parts)
    if len(steps) > 1:   # back to the input's order, as one call over everything gives
        order = traces.select("response_id").with_row_index("_lalp_order")
        kept_all = kept_all.join(order, on="response_id", how="left").sort("_lalp_order").drop("_lalp_order")
        out = out.join(order, on="response_id", how="left").sort("_lalp_order", "step_index").drop("_lalp_order")
    rej = pl.concat(rejected) if rejected else _token_rejects(traces.head(0), [])
    return out, Screened(kept_all, rej, n_control, n_caps)


def _token_rejects(rows: pl.DataFrame, reasons: list[tuple[str, str]]) -> pl.DataFrame:
    return pl.DataFrame(
        {
            "source_uri": rows["source_uri"] if rows.height else [], "source_sha256": rows["source_sha256"] if rows.height else [],
            "source_row": rows["source_row"] if rows.height else [], "format": rows["format"] if rows.height else [],
            "reason": [r for r, _ in reasons], "detail": [d for _, d in reasons],
            "raw_excerpt": [f"prompt_id={p} teacher={t}"[:200] for p, t in rows.select("prompt_id", "teacher").iter_rows()] if rows.height else [],
            "prompt_id": rows["prompt_id"] if rows.height else [], "teacher": rows["teacher"] if rows.height else [],
        },
        schema={"source_uri": pl.Utf8, "source_sha256": pl.Utf8, "source_row": pl.Int64, "format": pl.Utf8, "reason": pl.Utf8,
                "detail": pl.Utf8, "raw_excerpt": pl.Utf8, "prompt_id": pl.Utf8, "teacher": pl.Utf8},
    )


# ---------------------------------------------------------------------------------- segment


def segment_traces(traces: pl.DataFrame, segment_fn: Segmenter, tokenizer,
                   progress: Callable[[int, int], None] | None = None,
                   starts: Sequence | None = None) -> pl.DataFrame:
    """One row per step. Segment, then merge steps that own no student token into a neighbour
    (the responses are tokenized in bounded batches, not one call per response; `starts`: each
    response's token starts as numpy arrays (`encode_arrays`), where the caller tokenized them already). `progress(done, total)`
    counts responses through both passes (total = twice the responses)."""
    texts = traces["response"].to_list()
    n = len(texts)
    cut = []
    for k, text in enumerate(texts, 1):
        cut.append(segment_fn(text))
        if progress and (k % 1000 == 0 or k == n):
            progress(k, 2 * n)
    spans: list[list[tuple[int, int]]] = [list(c[0]) for c in cut]
    many = [i for i, sp in enumerate(spans) if len(sp) > 1]  # one step needs no merging
    if starts is not None:
        for k, i in enumerate(many, 1):
            spans[i] = merge_unscored_steps(tokenizer, texts[i], spans[i], starts=starts[i].tolist())
            if progress and k % 1000 == 0:
                progress(n + (n - len(many)) + k, 2 * n)
        many = []
    for lo, hi in text_blocks([texts[i] for i in many]):
        block = many[lo:hi]
        for i, (_, starts) in zip(block, tokenize_many(tokenizer, [texts[i] for i in block])):
            spans[i] = merge_unscored_steps(tokenizer, texts[i], spans[i], starts=starts)
        if progress:
            progress(n + (n - len(many)) + hi, 2 * n)
    if progress and n:
        progress(2 * n, 2 * n)
    return steps_from_spans(traces, spans, [c[1] for c in cut])


# ---------------------------------------------------------------------------------- score


def score_items(steps: pl.DataFrame, traces: pl.DataFrame) -> list:
    """The engine's input: one item per response that has steps, in one canonical order (prompt,
    teacher, response id), so both front doors batch, and so score, identically."""
    from lalp_resources.engine import ScoreItem

    spans = spans_by_response(steps)
    ordered = traces.sort("prompt_id", "teacher", "response_id")
    return [
        ScoreItem(rid, prompt, text, spans[rid])
        for rid, prompt, text in ordered.select("response_id", "prompt", "response").iter_rows()
        if rid in spans
    ]


STEP_SCORE_SCHEMA = {"response_id": pl.Utf8, "step_index": pl.Int32, "n_tokens": pl.Int32, "sum_logprob": pl.Float64,
                     "mean_logprob": pl.Float64, "cache_hit": pl.Boolean, "head1_logprob": pl.Float64,
                     "head2_logprob": pl.Float64}
CACHE_SCHEMA = {"key": pl.Utf8, "sum_logprob": pl.Float64, "n_tokens": pl.Int32, "head1_logprob": pl.Float64,
                "head2_logprob": pl.Float64}
GALP_SCHEMA = {"response_id": pl.Utf8, "galp": pl.Float64, "galp_tokens": pl.Int32}


def chunk_frames(chunk, namespace: str) -> dict[str, pl.DataFrame]:
    """One engine chunk as frames: `step_scores` (bare), `galp_scores` (bare), `score_cache`."""
    steps = pl.DataFrame(
        [(s.response_id, s.step_index, s.n_tokens, s.sum_logprob, s.mean_logprob, s.cached, s.head1_logprob,
          s.head2_logprob) for s in chunk.steps],
        schema=STEP_SCORE_SCHEMA, orient="row",
    )
    galp = pl.DataFrame([(r.response_id, r.galp, r.galp_tokens) for r in chunk.responses], schema=GALP_SCHEMA, orient="row")
    cache = pl.DataFrame(
        chunk.new_cache_rows, schema=CACHE_SCHEMA, orient="row"
    ).with_columns(pl.lit(namespace).alias("namespace"))
    return {"score_cache": cache, "step_scores": steps, "galp_scores": galp}


def score_chunks(engine, items: Sequence, progress=None) -> Iterable[dict[str, pl.DataFrame]]:
    """Score items with the engine, yielding committed chunks as frames (see `chunk_frames`)."""
    for chunk in engine.score(items, progress=progress):
        yield chunk_frames(chunk, engine.namespace)


# ---------------------------------------------------------------------------------- aggregate


def aggregate_responses(step_scores: pl.DataFrame, galp: pl.DataFrame) -> pl.DataFrame:
    """Per response: LALP (mean of its step scores, steps weighted equally) beside GALP. The one
    place LALP is computed from step scores, for the assets and for `lalp score`."""
    return lalp_from_steps(step_scores).join(galp.select("response_id", "galp", "galp_tokens"), on="response_id", how="left")


# ---------------------------------------------------------------------------------- ingest ledger


@dataclass(frozen=True)
class FileVersion:
    item: str           # the source spec as configured (a path, or `champ`)
    source_uri: str
    source_sha256: str
    new: bool           # parsed in this run (False: this content was read before and is reused)
    n_read: int
    n_accepted: int
    n_quarantined: int
    teachers: tuple[str, ...]


def file_stat(item: str) -> tuple[int, int | None, str | None] | None:
    """What says a source changed without reading it: (size, mtime_ns, None) of a file; (size,
    None, ETag) of an object (an object's mtime is when it was uploaded, not what it holds). None
    when it cannot be seen."""
    if objectstore.is_remote(item):
        return objectstore.stat(item)
    p = Path(item)
    try:
        st = p.stat()
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns, None


def ledger_frame(fv: FileVersion, stat: tuple[int, int | None, str | None] | None, run_id: str, fmt: str) -> pl.DataFrame:
    return pl.DataFrame([{
        "item": fv.item, "source_uri": fv.source_uri, "source_sha256": fv.source_sha256,
        "size": stat[0] if stat else None, "mtime_ns": stat[1] if stat else None,
        "etag": stat[2] if stat else None, "format": fmt,
        "n_read": fv.n_read, "n_accepted": fv.n_accepted, "n_quarantined": fv.n_quarantined,
        "teachers": json.dumps(list(fv.teachers), ensure_ascii=False), "read_run_id": run_id, "read_at": utcnow(),
    }])


def _file_uri(item: str, result: adapters.IngestResult) -> str:
    for frame in (result.traces, result.quarantine):
        if frame.height and frame["source_uri"][0]:
            return frame["source_uri"][0]
    if objectstore.is_remote(item):
        return item
    p = Path(item)
    return p.resolve().as_uri() if p.exists() else item


def sync_sources(wh, items: Sequence[str], read: Callable[..., adapters.IngestResult], sha_of: Callable[[str], str],
                 run_id: str, fmt: str, log=None) -> list[FileVersion]:
    """Bring the warehouse's parsed copy of each source file up to date, reading each file at
    most once per content hash: a file whose size and mtime are unchanged is not even hashed, and
    content parsed before (by any run, for any teacher) is reused from `source_traces`. A changed
    file's quarantine rows supersede those of its older content.

    An object (`s3://...`) is keyed by (size, ETag) instead of (size, mtime); when that is new it
    is downloaded once, hashed and, if its content is new, read from that copy (`read(item,
    local=copy)`), so the hash, the rows and the recorded version all belong to the same bytes."""
    from lalp_resources.warehouse import query

    with wh.connect() as con:  # the first write of a fresh warehouse creates it
        known = query(con, "SELECT item, source_uri, source_sha256, size, mtime_ns, etag, n_read, n_accepted, n_quarantined, teachers "
                           "FROM source_files ORDER BY read_at")
    by_stat = {(r["item"], r["size"], r["mtime_ns"], r["etag"]): r for r in known.iter_rows(named=True) if r["size"] is not None}
    by_sha = {r["source_sha256"]: r for r in known.iter_rows(named=True)}
    out: list[FileVersion] = []
    for item in items:
        with contextlib.ExitStack() as held:
            out.append(_sync_one(wh, item, read, sha_of, run_id, fmt, log, held, by_stat, by_sha))
    return out


def _sync_one(wh, item, read, sha_of, run_id, fmt, log, held, by_stat, by_sha) -> FileVersion:
    """One source of `sync_sources`; `held` keeps an object's local copy until the item is done."""
    from lalp_resources.warehouse import insert, run_transaction

    stat = file_stat(item)
    memo = by_stat.get((item, *stat)) if stat else None
    local = None
    try:
        if memo:
            sha = memo["source_sha256"]
        elif objectstore.is_remote(item):
            local, obj = held.enter_context(objectstore.local_copy(item))
            stat = (obj.size, None, obj.etag)  # the version of the bytes downloaded
            sha = adapters.common.sha256_file(local)
        else:
            sha = sha_of(item)
    except (OSError, RuntimeError) as e:  # vanished or unreadable: read_one turns it into a quarantine row
        sha = hashlib.sha256(f"unreadable:{item}:{type(e).__name__}".encode()).hexdigest()
        local = None
    if sha in by_sha:
        r = by_sha[sha]
        fv = FileVersion(item, r["source_uri"], sha, False, r["n_read"], r["n_accepted"], r["n_quarantined"],
                         tuple(json.loads(r["teachers"])))
        if not memo and stat:  # same content, new mtime (touched or copied): remember the stat
            with wh.connect() as con:
                insert(con, "source_files", ledger_frame(fv, stat, run_id, fmt))
        return fv
    res = read(item, local=local) if local is not None else read(item)
    uri = _file_uri(item, res)
    s = res.summary()
    fv = FileVersion(item, uri, sha, True, s["read"], s["accepted"], s["quarantined"],
                     tuple(sorted(res.traces["teacher"].unique().to_list())))
    now = utcnow()

    def write(con):
        # the file's older content and its quarantine rows are superseded; a concurrent run
        # that parsed the same content first is replaced by the same rows (idempotent)
        con.execute("DELETE FROM source_traces WHERE source_uri = ? AND source_sha256 <> ?", [uri, sha])
        con.execute("DELETE FROM quarantine WHERE source_uri = ? AND coalesce(stage, 'read') = 'read'", [uri])
        con.execute("DELETE FROM source_files WHERE source_sha256 = ?", [sha])
        con.execute("DELETE FROM source_traces WHERE source_sha256 = ?", [sha])
        insert(con, "source_traces", res.traces.with_columns(pl.lit(run_id).alias("read_run_id")))
        insert(con, "quarantine", res.quarantine.with_columns(
            pl.lit("read").alias("stage"), pl.lit(run_id).alias("ingest_run_id"), pl.lit(now).alias("quarantined_at")))
        insert(con, "source_files", ledger_frame(fv, stat, run_id, fmt))

    with wh.connect() as con:
        run_transaction(con, lambda: write(con))
    if log:
        log(f"read {item}: {s['read']} rows = {s['accepted']} accepted + {s['quarantined']} quarantined")
    by_sha[sha] = {"source_uri": uri, "n_read": fv.n_read, "n_accepted": fv.n_accepted,
                   "n_quarantined": fv.n_quarantined, "teachers": json.dumps(list(fv.teachers))}
    return fv


# Unicode White_Space, what Polars' `strip_chars` (Rust's `char::is_whitespace`) strips: the
# blank-response check computed in SQL, so the texts need not leave the warehouse
WHITESPACE = "".join(map(chr, [*range(0x09, 0x0E), 0x20, 0x85, 0xA0, 0x1680, *range(0x2000, 0x200B), 0x2028, 0x2029,
                               0x202F, 0x205F, 0x3000]))


def assemble_traces(wh, files: Sequence[FileVersion], teachers: Sequence[str]) -> tuple[pl.DataFrame, pl.DataFrame]:
    """The selected teachers' traces from the current file versions, deduplicated across files
    (first file in source order wins). Returns (the kept rows' keys, duplicates as quarantine rows).

    The keys, not the texts: (source_sha256, source_row, read_run_id) name the `source_traces`
    row to copy, with what the checks and metadata need (response_id, prompt_id, teacher,
    is_correct, the response's length without surrounding whitespace). Responses are compared by
    digest, and only the first characters of the duplicates leave the warehouse (the quarantine excerpt), so memory
    does not grow with the texts (`adapters.dedupe`, the rule `lalp ingest` applies too)."""
    from lalp_resources.adapters.common import EXCERPT_CHARS
    from lalp_resources.adapters.dedupe import excerpt
    from lalp_resources.warehouse import query

    order = {f.source_sha256: i for i, f in enumerate(files)}
    with wh.connect(read_only=True) as con:
        rows = query(
            con,
            "SELECT source_sha256, source_row, read_run_id, response_id, prompt_id, teacher, is_correct, source_uri, format, "
            "md5(response) AS response_key, '' AS response, length(trim(coalesce(response, ''), ?)) AS response_chars "
            "FROM source_traces WHERE source_sha256 IN (SELECT unnest(?)) AND teacher IN (SELECT unnest(?)) "
            # one read of each file version (a read commits all its rows at once): the first. A
            # grouped semi-join, not a window over the rows, so it spills within LALP_DUCKDB_MEMORY
            "AND (source_sha256, read_run_id) IN (SELECT source_sha256, min(read_run_id) FROM source_traces "
            "GROUP BY source_sha256)",
            [WHITESPACE, list(order), list(teachers)],
        )
        if rows.height:
            rows = rows.with_columns(pl.col("source_sha256").replace_strict(order, return_dtype=pl.Int64).alias("_order")).sort(
                "_order", "source_row").drop("_order")
        kept, dups = adapters.dedupe(rows, response_key="response_key")
        if dups.height:  # the excerpts of the duplicates only: the other texts never leave the warehouse
            con.register("_lalp_dups", dups.select("source_sha256", "source_row").to_arrow())
            try:
                texts = query(con, "SELECT DISTINCT s.source_sha256, s.source_row, s.prompt_id, s.teacher, left(s.response, ?) AS response "
                                   "FROM source_traces s JOIN _lalp_dups d USING (source_sha256, source_row)", [EXCERPT_CHARS])
            finally:
                con.unregister("_lalp_dups")
            dups = dups.drop("raw_excerpt").join(
                texts.select("source_sha256", "source_row", excerpt(pl.col("response"))),
                on=["source_sha256", "source_row"], how="left").select(dups.columns)
    return kept.drop("response", "response_key"), dups
