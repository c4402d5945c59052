"""Great Expectations (1.x) suites that guard each stage.

GX has no Polars or DuckDB backend, so each suite validates pandas frames (from Polars). Some
properties are not column-local (steps must tile their response; curated rows must join back to
a raw trace; ids must be unique): those are derived as boolean columns with Polars first, over
the whole frame, and GX checks the column. Every expectation is then row-local, so a large frame
is validated in fixed-size batches (`BATCH_ROWS`) against one suite and the outcomes merged:
every row is checked, and memory stays bounded whatever the table's size. Only the columns an
expectation reads are converted. GX is imported lazily (the import takes seconds) and one
ephemeral context serves the process.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import polars as pl

_ctx_lock = threading.Lock()
_ctx = None


@dataclass
class SuiteResult:
    suite: str
    success: bool
    n_rows: int
    failures: list[dict] = field(default_factory=list)
    evaluated: list[str] = field(default_factory=list)

    def metadata(self) -> dict:
        return {
            "suite": self.suite,
            "rows_validated": self.n_rows,
            "expectations": self.evaluated,
            "failed_expectations": self.failures,
        }

    def describe(self) -> str:
        if self.success:
            return f"{self.suite}: all {len(self.evaluated)} expectations passed on {self.n_rows} rows"
        return f"{self.suite}: " + "; ".join(f["expectation"] + " " + f["kwargs"] for f in self.failures)


def _context():
    global _ctx
    with _ctx_lock:
        if _ctx is None:
            import logging

            import great_expectations as gx
            from great_expectations.data_context.types.base import ProgressBarsConfig

            # "Created temporary directory ... for ephemeral docs site" is noise in a run's log
            logging.getLogger("great_expectations.data_context.types.base").setLevel(logging.WARNING)
            _ctx = gx.get_context(mode="ephemeral")
            _ctx.variables.progress_bars = ProgressBarsConfig(globally=False)
        return _ctx


# rows per GX batch: a pandas frame of this many rows (of the few columns a suite reads) at a time
BATCH_ROWS = 100_000
# expectations that compare rows with each other cannot be split into batches
NOT_ROW_LOCAL = frozenset({"ExpectColumnValuesToBeUnique", "ExpectCompoundColumnsToBeUnique",
                           "ExpectSelectColumnValuesToBeUniqueWithinRecord", "ExpectColumnUniqueValueCountToBeBetween",
                           "ExpectColumnProportionOfUniqueValuesToBeBetween"})
MAX_EXAMPLES = 5


def validate(suite_name: str, df: pl.DataFrame, expectations: list[tuple[str, dict]],
             batch_rows: int = BATCH_ROWS) -> SuiteResult:
    """Run expectations (GX class name, kwargs) against a frame, in batches of `batch_rows`
    rows; never raises on bad data. Failures are merged over the batches: unexpected counts
    summed, the first examples kept."""
    import great_expectations as gx

    if df.height > batch_rows and any(cls in NOT_ROW_LOCAL for cls, _ in expectations):
        raise ValueError(f"{suite_name}: expectations that compare rows cannot run in batches; derive a per-row "
                         "column first (see `duplicated`) and check that")
    ctx = _context()
    merged: list[dict] = []
    success = True
    with _ctx_lock:
        name = f"{suite_name}-{id(df)}-{threading.get_ident()}"
        ds = ctx.data_sources.add_pandas(name)
        try:
            batch_def = ds.add_dataframe_asset("frame").add_batch_definition_whole_dataframe("all")
            suite = gx.ExpectationSuite(name=name)
            for cls_name, kwargs in expectations:
                suite.add_expectation(getattr(gx.expectations, cls_name)(**kwargs))
            for lo in range(0, max(df.height, 1), batch_rows):
                part = df.slice(lo, batch_rows).to_pandas()
                res = batch_def.get_batch(batch_parameters={"dataframe": part}).validate(suite, result_format="SUMMARY")
                del part
                success = success and bool(res.success)
                for k, r in enumerate(res.results):
                    if k == len(merged):
                        kw = {key: v for key, v in r.expectation_config.kwargs.items() if key != "batch_id"}
                        merged.append({"type": r.expectation_config.type, "kwargs": kw, "success": True,
                                       "unexpected_count": None, "examples": [], "exception": None})
                    m = merged[k]
                    if r.success:
                        continue
                    detail = r.result or {}
                    m["success"] = False
                    if detail.get("unexpected_count") is not None:
                        m["unexpected_count"] = (m["unexpected_count"] or 0) + detail["unexpected_count"]
                    room = MAX_EXAMPLES - len(m["examples"])
                    m["examples"] += [str(x)[:200] for x in (detail.get("partial_unexpected_list") or [])[:room]]
                    info = r.exception_info
                    if m["exception"] is None and isinstance(info, dict):
                        m["exception"] = info.get("exception_message")
        finally:
            ctx.data_sources.delete(name)
    failures, evaluated = [], []
    for m in merged:
        kw = m["kwargs"]
        evaluated.append(f"{m['type']}({', '.join(f'{k}={v!r}' for k, v in kw.items())})")
        if not m["success"]:
            failures.append({"expectation": m["type"], "kwargs": str(kw), "unexpected_count": m["unexpected_count"],
                             "examples": m["examples"], "exception": m["exception"]})
    return SuiteResult(suite_name, success, df.height, failures, evaluated)


def merge(results: list[SuiteResult]) -> SuiteResult:
    """One suite's outcomes over disjoint parts of a table (a stage that streams its scope in
    batches validates each batch as it goes): rows summed, failures of the same expectation merged
    (unexpected counts summed, the first examples kept)."""
    if not results:
        raise ValueError("merge: no results")
    failures: dict[tuple[str, str], dict] = {}
    for r in results:
        for f in r.failures:
            m = failures.setdefault((f["expectation"], f["kwargs"]), {**f, "unexpected_count": None, "examples": []})
            if f.get("unexpected_count") is not None:
                m["unexpected_count"] = (m["unexpected_count"] or 0) + f["unexpected_count"]
            m["examples"] = (m["examples"] + list(f.get("examples") or []))[:MAX_EXAMPLES]
            m["exception"] = m.get("exception") or f.get("exception")
    evaluated = list(dict.fromkeys(e for r in results for e in r.evaluated))
    return SuiteResult(results[0].suite, all(r.success for r in results), sum(r.n_rows for r in results),
                       list(failures.values()), evaluated)


def duplicated(column: str) -> pl.Expr:
    """`duplicate_<column>`: the row's value where it occurs more than once in the whole frame,
    else null. Uniqueness as a row-local column (expect it to be null), so it can be validated in
    batches, and a failure's examples are the repeated values themselves."""
    col = pl.col(column)
    return pl.when(col.is_duplicated() & col.is_not_null()).then(col).otherwise(None).alias(f"duplicate_{column}")


def unique(column: str) -> tuple[str, dict]:
    """The expectation that goes with `duplicated(column)`."""
    return ("ExpectColumnValuesToBeNull", {"column": f"duplicate_{column}"})


# --- the suites -------------------------------------------------------------------------------


def raw_traces_suite(traces: pl.DataFrame) -> SuiteResult:
    """`traces`: the keys, and the response or (where the texts stay in the warehouse) its
    length without surrounding whitespace, `response_chars`."""
    keys = ["response_id", "prompt_id", "teacher", "source_uri", "source_sha256"]
    chars = (pl.col("response_chars") if "response_chars" in traces.columns
             else pl.col("response").fill_null("").str.strip_chars().str.len_chars().alias("response_chars"))
    df = traces.select(*keys, duplicated("response_id"), chars)
    return validate(
        "raw_teacher_traces",
        df,
        [("ExpectColumnValuesToNotBeNull", {"column": c}) for c in keys]
        + [
            unique("response_id"),
            ("ExpectColumnValuesToBeBetween", {"column": "response_chars", "min_value": 1}),
        ],
    )


def reconciliation_suite(files: pl.DataFrame) -> SuiteResult:
    df = files.with_columns((pl.col("n_read") == pl.col("n_accepted") + pl.col("n_quarantined")).alias("reconciles"))
    return validate(
        "ingest_reconciliation",
        df.select("source_uri", "reconciles"),
        [("ExpectColumnValuesToBeInSet", {"column": "reconciles", "value_set": [True]})],
    )


def steps_suite(steps: pl.DataFrame, traces: pl.DataFrame) -> SuiteResult:
    """Steps tile their response exactly (concatenation equals the response, spans contiguous)
    and no step is whitespace-only."""
    per_resp = (
        steps.sort("response_id", "step_index")
        .group_by("response_id", maintain_order=True)
        .agg(
            pl.col("text").str.join("").alias("joined"),
            pl.col("char_start").first().alias("first_start"),
            (pl.col("char_start").shift(-1) == pl.col("char_end")).drop_nulls().all().alias("contiguous"),
        )
        .join(traces.select("response_id", "response"), on="response_id", how="left")
        .with_columns(
            ((pl.col("joined") == pl.col("response")) & (pl.col("first_start") == 0) & pl.col("contiguous"))
            .fill_null(False)
            .alias("tiles_response")
        )
    )
    blank = steps.select("response_id", "step_index", (pl.col("text").str.strip_chars() == "").alias("whitespace_only"))
    tiles = validate(
        "reasoning_steps_tiling",
        per_resp.select("response_id", "tiles_response"),
        [("ExpectColumnValuesToBeInSet", {"column": "tiles_response", "value_set": [True]})],
    )
    nonblank = validate(
        "reasoning_steps_nonblank",
        blank,
        [
            ("ExpectColumnValuesToBeInSet", {"column": "whitespace_only", "value_set": [False]}),
            ("ExpectColumnValuesToNotBeNull", {"column": "response_id"}),
        ],
    )
    return SuiteResult(
        "reasoning_steps",
        tiles.success and nonblank.success,
        steps.height,
        tiles.failures + nonblank.failures,
        tiles.evaluated + nonblank.evaluated,
    )


def step_scores_suite(scores: pl.DataFrame) -> SuiteResult:
    df = scores.select("response_id", "step_index", pl.col("mean_logprob").fill_nan(None), "n_tokens")
    return validate(
        "step_scores",
        df,
        [
            ("ExpectColumnValuesToNotBeNull", {"column": "mean_logprob"}),
            ("ExpectColumnValuesToBeBetween", {"column": "mean_logprob", "max_value": 0.0}),
            ("ExpectColumnValuesToBeBetween", {"column": "n_tokens", "min_value": 1}),
        ],
    )


def response_scores_suite(responses_with_steps: pl.DataFrame, scores: pl.DataFrame) -> SuiteResult:
    df = responses_with_steps.join(scores.select("response_id", "lalp", "galp"), on="response_id", how="left").with_columns(
        pl.col("lalp").fill_nan(None), pl.col("galp").fill_nan(None)
    )
    return validate(
        "response_scores",
        df.select("response_id", "lalp", "galp"),
        [("ExpectColumnValuesToNotBeNull", {"column": "lalp"}), ("ExpectColumnValuesToNotBeNull", {"column": "galp"})],
    )


def rankings_suite(teachers: list[str], rankings: pl.DataFrame) -> SuiteResult:
    df = pl.DataFrame({"teacher": teachers}, schema={"teacher": pl.Utf8}).with_columns(
        pl.col("teacher").is_in(rankings["teacher"].implode()).alias("ranked")
    )
    return validate(
        "teacher_rankings",
        df,
        [("ExpectColumnValuesToBeInSet", {"column": "ranked", "value_set": [True]})],
    )


def curated_suite(curated: pl.DataFrame, raw_ids: pl.Series) -> SuiteResult:
    df = curated.select(
        "prompt_id", "response_id", duplicated("prompt_id"),
        pl.col("response_id").is_in(raw_ids.implode()).alias("joins_raw_trace"),
    )
    return validate(
        "curated_sft_dataset",
        df,
        [
            unique("prompt_id"),
            ("ExpectColumnValuesToNotBeNull", {"column": "response_id"}),
            ("ExpectColumnValuesToBeInSet", {"column": "joins_raw_trace", "value_set": [True]}),
        ],
    )
