"""Pictures and the teacher-selection report: people pick a teacher from a plot, not a table.

Pure (matplotlib, Polars); no Dagster import. The assets put the PNGs in materialization
metadata and write the report next to the curated exports.
"""

from __future__ import annotations

import base64
import io
from datetime import datetime, timezone
from pathlib import Path

import polars as pl

from lalp_resources.markdown import escape_cell, markdown_table
from lalp_resources import diagnostics
from lalp_resources.method.aggregation import ranking_verdict


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    # Labels are data (teacher names): `$...$` in a name must not be parsed as TeX.
    matplotlib.rcParams["text.parse_math"] = False
    matplotlib.rcParams["text.usetex"] = False
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    _plt().close(fig)
    return buf.getvalue()


LABEL_CHARS = 40


def label(name: object) -> str:
    """A teacher name as a plot label: control characters dropped, long names shortened."""
    text = "".join(ch if ch.isprintable() else " " for ch in str(name))
    return text if len(text) <= LABEL_CHARS else text[: LABEL_CHARS - 1] + "…"


def md_image(png: bytes, alt: str) -> str:
    """Markdown that embeds a PNG (the Dagster UI renders data-URI images in markdown metadata)."""
    return f"![{alt}](data:image/png;base64,{base64.b64encode(png).decode()})"


def ranking_plot(rk: pl.DataFrame) -> bytes:
    """Teacher LALP with 95% intervals beside GALP, and how the two rankings differ."""
    plt = _plt()
    df = rk.filter(pl.col("lalp_mean").is_not_null()).sort("lalp_rank")
    teachers = [label(t) for t in df["teacher"].to_list()]
    y = list(range(len(teachers)))[::-1]
    fig, axes = plt.subplots(1, 3, figsize=(10.5, 0.6 * max(len(teachers), 3) + 1.6), gridspec_kw={"width_ratios": [3, 3, 2]})
    for ax, metric, colour, title in ((axes[0], "lalp", "tab:blue", "LALP (local, the selection signal)"),
                                      (axes[1], "galp", "tab:gray", "GALP (global baseline)")):
        m = df[f"{metric}_mean"].to_numpy()
        lo = m - df[f"{metric}_ci_low"].to_numpy()
        hi = df[f"{metric}_ci_high"].to_numpy() - m
        ax.errorbar(m, y, xerr=[lo, hi], fmt="o", color=colour, capsize=4)
        ax.set_yticks(y, teachers if ax is axes[0] else [""] * len(y))
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("mean log-prob per token (95% bootstrap CI)")
        ax.grid(axis="x", alpha=0.3)
    ax = axes[2]
    for t, lr, gr in df.select("teacher", "lalp_rank", "galp_rank").iter_rows():
        ax.plot([0, 1], [lr, gr], marker="o", color="tab:red" if lr != gr else "tab:green")
        ax.annotate(label(t), (1.04, gr), va="center", fontsize=8)
    ax.set_xticks([0, 1], ["LALP rank", "GALP rank"])
    ax.set_yticks(range(1, len(teachers) + 1))
    ax.invert_yaxis()
    ax.set_xlim(-0.2, 1.9)
    ax.set_title("rank agreement (red: differs)", fontsize=10)
    n = int(df["n_shared_prompts"][0]) if df.height else 0
    fig.suptitle(f"Teacher ranking over {n} shared prompts", fontsize=12)
    return _png(fig)


def step_distribution_plot(steps: pl.DataFrame) -> bytes:
    """Per-teacher distribution of step scores (mean log-prob per step)."""
    plt = _plt()
    s = steps.filter(pl.col("mean_logprob").is_not_null() & pl.col("mean_logprob").is_not_nan())
    order = s.group_by("teacher").agg(pl.col("mean_logprob").median().alias("m")).sort("m", descending=True)["teacher"].to_list()
    data = [s.filter(pl.col("teacher") == t)["mean_logprob"].to_numpy() for t in order]
    fig, ax = plt.subplots(figsize=(9, 0.55 * max(len(order), 3) + 1.2))
    if data:
        ax.boxplot(data, orientation="horizontal", tick_labels=[label(t) for t in order], showfliers=False)
    ax.invert_yaxis()
    ax.set_xlabel("step score (mean token log-prob in its window)")
    ax.set_title("Step-score distributions per teacher", fontsize=11)
    ax.grid(axis="x", alpha=0.3)
    return _png(fig)


def mix_plot(mix: pl.DataFrame) -> bytes:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 0.5 * max(mix.height, 3) + 1))
    ax.barh([label(t) for t in mix["teacher"].to_list()[::-1]], mix["rows"].to_list()[::-1], color="tab:blue")
    ax.set_xlabel("curated rows")
    ax.set_title("Curated SFT set: teacher mix", fontsize=11)
    return _png(fig)


def write_report(out_dir: Path, rk: pl.DataFrame, steps: pl.DataFrame, mix: pl.DataFrame, decisions: pl.DataFrame,
                 settings: dict, control: dict | None = None) -> Path:
    """A Markdown report with PNGs beside it, readable without Dagster."""
    out_dir.mkdir(parents=True, exist_ok=True)
    pics = {"ranking.png": ranking_plot(rk), "step_scores.png": step_distribution_plot(steps), "teacher_mix.png": mix_plot(mix)}
    for name, png in pics.items():
        (out_dir / name).write_bytes(png)
    best = rk.filter(pl.col("lalp_rank") == 1)["teacher"].to_list()
    n_prompts = decisions["prompt_id"].n_unique() if decisions.height else 0
    n_chosen = int(decisions["chosen"].sum()) if decisions.height else 0
    view = rk.select(
        "lalp_rank", "teacher", pl.col("lalp_mean").round(4), pl.col("lalp_ci_low").round(4), pl.col("lalp_ci_high").round(4),
        "galp_rank", pl.col("galp_mean").round(4), pl.col("accuracy").round(3), "n_shared_prompts",
    )
    diag = diagnostics.table_view(rk)
    reasons = (
        decisions.with_columns(pl.col("reason").str.replace(r" \(.*", "").str.replace(r" than .*", ""))
        .group_by("reason").len().sort("len", descending=True).rename({"len": "candidates"})
        if decisions.height else pl.DataFrame({"reason": [], "candidates": []})
    )
    lines = [
        "# Teacher selection report (LALP)",
        "",
        f"Generated {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC. Settings: "
        + ", ".join(f"{k}={escape_cell(v)}" for k, v in settings.items()),
        "",
        f"**Highest mean LALP: {', '.join(escape_cell(b) for b in best) if best else 'n/a'}.** {ranking_verdict(rk)} "
        f"The curated set mixes teachers per prompt: {n_chosen} of {n_prompts} prompts got a response.",
        "",
        "## Ranking",
        "",
        "LALP scores each reasoning step with only the prompt and a few preceding steps as context; "
        "GALP (global average log-prob) is the baseline the paper shows fails for long, diverse traces.",
        "",
        "![ranking](ranking.png)",
        "",
        markdown_table(view),
        "",
        "## Length bias, length-corrected scores, same family",
        "",
        "A mean token log-prob favours long steps (the first tokens of a step, its branching point, score low and "
        "a long step dilutes them). `length rho`: Spearman correlation of step score with step token count. "
        "DROP-1/DROP-2: LALP without the first 1/2 tokens of each step; CASL: the response's mean token log-prob "
        "minus its fitted step-head-share term (docs/method.md). A teacher of the student's own family is "
        "flagged: its rank is suspect.",
        "",
        markdown_table(rk.select("teacher").hstack(diag)) if diag.width else "_(no diagnostics in this ranking)_",
        "",
        "## Step-score distributions",
        "",
        "![step scores](step_scores.png)",
        "",
        "## Curated set",
        "",
        "![teacher mix](teacher_mix.png)",
        "",
        markdown_table(mix),
        "",
        "Selection decisions by reason (every candidate response is recorded in `selection_decisions`):",
        "",
        markdown_table(reasons),
        "",
    ]
    if control is not None:
        lines += [
            "## Control-token strings in the traces",
            "",
            f"Mode `LALP_CONTROL_TOKENS={control['mode']}`. Rows whose prompt or response holds one of the student's "
            "control-token strings (such as `<|im_end|>`), which an SFT trainer's chat template would read as real "
            "turn boundaries:",
            "",
            f"- quarantined at the steps stage (not scored): {control['quarantined']}",
            f"- scored earlier but blocked from selection here: {control['blocked_at_curation']}",
            f"- curated rows that carry them as plain text (only with `keep`): {control['curated_rows_with_them']}",
            "",
        ]
    path = out_dir / "teacher_selection_report.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path
