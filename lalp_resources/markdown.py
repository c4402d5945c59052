"""Markdown tables for metadata, logs and reports (pure; no Dagster import).

Cell text is data: teacher names and prompt ids may hold `|`, newlines, HTML or markdown
syntax, so every cell is escaped and cannot change the table's shape or render as markup."""

from __future__ import annotations

import re

import polars as pl

# what can break a table or render as markup: a cell separator, code, emphasis, HTML, math, a
# link; kept small so that ordinary text (brackets, underscores in names) reads as written
_SPECIAL = re.compile(r"([\\`*|<>$~])")


def escape_cell(value: object) -> str:
    text = "" if value is None else str(value)
    text = "".join(" " if ch in "\r\n\t" else ch for ch in text if ch == "\n" or ch == "\r" or ch == "\t" or ch.isprintable())
    return _SPECIAL.sub(r"\\\1", text).replace("](", "]\\(")


def _fmt_float(v: float, float_fmt: str) -> str:
    s = float_fmt.format(v)
    return s.rstrip("0").rstrip(".") if "." in s else s


def markdown_table(df: pl.DataFrame, float_fmt: str = "{:.4f}") -> str:
    if df.height == 0:
        return "_(no rows)_"
    head = "| " + " | ".join(escape_cell(c) for c in df.columns) + " |\n| " + " | ".join("---" for _ in df.columns) + " |\n"
    lines = []
    for row in df.iter_rows():
        cells = [_fmt_float(v, float_fmt) if isinstance(v, float) else escape_cell(v) for v in row]
        lines.append("| " + " | ".join(cells) + " |")
    return head + "\n".join(lines)
