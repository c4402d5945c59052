"""Markdown tables for metadata, logs and reports (pure; no Dagster import)."""

from __future__ import annotations

import polars as pl


def markdown_table(df: pl.DataFrame, float_fmt: str = "{:.4f}") -> str:
    if df.height == 0:
        return "_(no rows)_"
    head = "| " + " | ".join(df.columns) + " |\n| " + " | ".join("---" for _ in df.columns) + " |\n"
    lines = []
    for row in df.iter_rows():
        cells = []
        for v in row:
            if isinstance(v, float):
                cells.append(float_fmt.format(v).rstrip("0").rstrip(".") if "." in float_fmt.format(v) else float_fmt.format(v))
            else:
                cells.append("" if v is None else str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return head + "\n".join(lines)
