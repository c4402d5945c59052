"""Great Expectations (1.x) suites that guard each stage.

GX has no Polars or DuckDB backend, so each suite validates a pandas frame (from Polars). Some
properties are not column-local (steps must tile their response; curated rows must join back to
a raw trace): those are derived as boolean columns with Polars first, and GX checks the column.
GX is imported lazily (the import takes seconds) and one ephemeral context serves the process.
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


def validate(suite_name: str, df: pl.DataFrame, expectations: list[tuple[str, dict]]) -> SuiteResult:
    """Run expectations (GX class name, kwargs) against a frame; never raises on bad data."""
    import great_expectations as gx

    ctx = _context()
    with _ctx_lock:
        name = f"{suite_name}-{id(df)}-{threading.get_ident()}"
        ds = ctx.data_sources.add_pandas(name)
        batch_def = ds.add_dataframe_asset("frame").add_batch_definition_whole_dataframe("all")
        suite = gx.ExpectationSuite(name=name)
        for cls_name, kwargs in expectations:
            suite.add_expectation(getattr(gx.expectations, cls_name)(**kwargs))
        batch = batch_def.get_batch(batch_parameters={"dataframe": df.to_pandas()})
        res = batch.validate(suite, result_format="SUMMARY")
        ctx.data_sources.delete(name)
    failures, evaluated = [], []
    for r in res.results:
        kw = {k: v for k, v in r.expectation_config.kwargs.items() if k != "batch_id"}
        label = f"{r.expectation_config.type}({', '.join(f'{k}={v!r}' for k, v in kw.items())})"
        evaluated.append(label)
        if not r.success:
            detail = r.result or {}
            failures.append(
                {
                    "expectation": r.expectation_config.type,
                    "kwargs": str(kw),
                    "unexpected_count": detail.get("unexpected_count"),
                    "examples": [str(x)[:200] for x in (detail.get("partial_unexpected_list") or [])[:5]],
                    "exception": (r.exception_info or {}).get("exception_message") if isinstance(r.exception_info, dict) else None,
                }
            )
    return SuiteResult(suite_name, bool(res.success), df.height, failures, evaluated)


# --- the suites -------------------------------------------------------------------------------


def raw_traces_suite(traces: pl.DataFrame) -> SuiteResult:
    df = traces.with_columns(pl.col("response").fill_null("").str.strip_chars().str.len_chars().alias("response_chars"))
    keys = ["response_id", "prompt_id", "teacher", "source_uri", "source_sha256"]
    return validate(
        "raw_teacher_traces",
        df.select(keys + ["response_chars"]),
        [("ExpectColumnValuesToNotBeNull", {"column": c}) for c in keys]
        + [
            ("ExpectColumnValuesToBeUnique", {"column": "response_id"}),
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
    blank = steps.with_columns((pl.col("text").str.strip_chars() == "").alias("whitespace_only"))
    tiles = validate(
        "reasoning_steps_tiling",
        per_resp.select("response_id", "tiles_response"),
        [("ExpectColumnValuesToBeInSet", {"column": "tiles_response", "value_set": [True]})],
    )
    nonblank = validate(
        "reasoning_steps_nonblank",
        blank.select("response_id", "step_index", "whitespace_only"),
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
    df = scores.with_columns(pl.col("mean_logprob").fill_nan(None))
    return validate(
        "step_scores",
        df.select("response_id", "step_index", "mean_logprob", "n_tokens"),
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
    df = curated.with_columns(pl.col("response_id").is_in(raw_ids.implode()).alias("joins_raw_trace"))
    return validate(
        "curated_sft_dataset",
        df.select("prompt_id", "response_id", "joins_raw_trace"),
        [
            ("ExpectColumnValuesToBeUnique", {"column": "prompt_id"}),
            ("ExpectColumnValuesToNotBeNull", {"column": "response_id"}),
            ("ExpectColumnValuesToBeInSet", {"column": "joins_raw_trace", "value_set": [True]}),
        ],
    )
