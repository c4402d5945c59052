"""Transform: duplicate traces -> quarantine rows that name the row they repeat."""

from __future__ import annotations

import polars as pl

from lalp_resources.adapters.common import EXCERPT_CHARS, QUARANTINE_COLUMNS, QUARANTINE_SCHEMA, frame


def excerpt(response: pl.Expr) -> pl.Expr:
    """A duplicate's quarantine excerpt: its keys and the start of its response."""
    return pl.concat_str([pl.lit("prompt_id="), pl.col("prompt_id"), pl.lit(" teacher="), pl.col("teacher"),
                          pl.lit(" response="), response]).str.slice(0, EXCERPT_CHARS).alias("raw_excerpt")


def dedupe(traces: pl.DataFrame, response_key: str = "response") -> tuple[pl.DataFrame, pl.DataFrame]:
    """Split ``traces`` into (kept, quarantined) by row order (the first occurrence wins).

    * ``duplicate``: the same (prompt_id, teacher, response) appeared earlier.
    * ``conflicting_duplicate``: the same (prompt_id, teacher) appeared earlier with a
      different response; the detail names the kept row's source and row.

    ``response_key``: the column that stands for the response when comparing rows (the warehouse
    path passes a digest of each response, and only its first ``EXCERPT_CHARS`` characters as
    ``response``, which is all the excerpt shows: the texts stay in the warehouse).
    """
    if traces.height == 0:
        return traces, frame([], QUARANTINE_SCHEMA)
    pair, triple = ["prompt_id", "teacher"], ["prompt_id", "teacher", response_key]
    df = traces.with_row_index("_i").with_columns(
        pl.col("_i").min().over(triple).alias("_first_triple"),
        pl.col("_i").min().over(pair).alias("_first_pair"),
        pl.col("source_uri").first().over(triple).alias("_t_uri"),
        pl.col("source_row").first().over(triple).alias("_t_row"),
        pl.col("source_uri").first().over(pair).alias("_p_uri"),
        pl.col("source_row").first().over(pair).alias("_p_row"),
    )
    is_dup = pl.col("_i") != pl.col("_first_triple")
    is_conflict = ~is_dup & (pl.col("_i") != pl.col("_first_pair"))
    kept = df.filter(~is_dup & ~is_conflict).select(traces.columns)
    def where(uri: pl.Expr, row: pl.Expr) -> pl.Expr:
        return pl.concat_str([uri, pl.lit(" row "), row.cast(pl.Utf8).fill_null("?")])

    bad = df.filter(is_dup | is_conflict).with_columns(
        pl.when(is_dup).then(pl.lit("duplicate")).otherwise(pl.lit("conflicting_duplicate")).alias("reason"),
        pl.when(is_dup)
        .then(pl.concat_str([pl.lit("identical (prompt_id, teacher, response) already read at "),
                             where(pl.col("_t_uri"), pl.col("_t_row")), pl.lit("; keeping the first")]))
        .otherwise(pl.concat_str([pl.lit("prompt_id '"), pl.col("prompt_id"), pl.lit("' / teacher '"),
                                  pl.col("teacher"), pl.lit("' already has a different response at "),
                                  where(pl.col("_p_uri"), pl.col("_p_row")), pl.lit("; keeping the first")]))
        .alias("detail"),
        excerpt(pl.col("response")),
    )
    # Location prefix in the detail, worded like the adapters' details ("line 7: ...").
    unit = (
        pl.when(pl.col("format") == "zeroeval").then(pl.lit("record "))
        .when(pl.col("format") == "champ").then(pl.lit("conversation "))
        .when(pl.col("source_uri").str.to_lowercase().str.contains(r"\.(parquet|arrow)$")).then(pl.lit("row "))
        .when(pl.col("format").is_in(["sharegpt", "alpaca"]) & pl.col("source_uri").str.to_lowercase().str.ends_with(".json"))
        .then(pl.lit("record "))
        .otherwise(pl.lit("line "))
    )
    bad = bad.with_columns(
        pl.concat_str([unit, pl.col("source_row").cast(pl.Utf8).fill_null("?"), pl.lit(": "),
                       pl.col("detail")]).alias("detail")
    )
    return kept, bad.select(QUARANTINE_COLUMNS).cast(QUARANTINE_SCHEMA)
