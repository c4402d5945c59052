"""Pure stage logic shared by the assets and the CLI: prompt sampling, steps frames, score
aggregation, teacher ranking with bootstrap intervals, and response selection with reasons.

No Dagster import.
"""

from __future__ import annotations

import hashlib
import json
from typing import Collection

import numpy as np
import polars as pl

from lalp_resources import diagnostics

def sample_prompts(prompt_ids: list[str], max_prompts: int | None) -> set[str]:
    """A deterministic subset of prompts, stable as teachers and prompts are added: the
    `max_prompts` prompt ids with the smallest hash. 0 or None means all."""
    ids = sorted(set(prompt_ids))
    if not max_prompts or max_prompts >= len(ids):
        return set(ids)
    return set(sorted(ids, key=lambda p: hashlib.sha256(p.encode()).hexdigest())[:max_prompts])


STEPS_SCHEMA = {
    "response_id": pl.Utf8, "prompt_id": pl.Utf8, "teacher": pl.Utf8, "step_index": pl.Int32,
    "char_start": pl.Int32, "char_end": pl.Int32, "text": pl.Utf8, "segment_note": pl.Utf8,
}


def steps_from_spans(traces: pl.DataFrame, spans: list[list[tuple[int, int]]], notes: list[str | None]) -> pl.DataFrame:
    """One row per step from each response's character spans (in `traces` order): the step
    texts are sliced in Polars, not built row by row in Python."""
    lo = [[a for a, _ in sp] for sp in spans]
    hi = [[b for _, b in sp] for sp in spans]
    df = traces.select("response_id", "prompt_id", "teacher", "response").with_row_index("_row").with_columns(
        pl.Series("char_start", lo, dtype=pl.List(pl.Int32)),
        pl.Series("char_end", hi, dtype=pl.List(pl.Int32)),
        pl.Series("segment_note", notes, dtype=pl.Utf8),
    )
    return (
        df.filter(pl.col("char_start").list.len() > 0)
        .explode("char_start", "char_end")
        .with_columns(
            pl.int_range(pl.len(), dtype=pl.Int32).over("_row").alias("step_index"),
            pl.col("response").str.slice(pl.col("char_start"), pl.col("char_end") - pl.col("char_start")).alias("text"),
        )
        .select(list(STEPS_SCHEMA))
        .cast(STEPS_SCHEMA)
    )


def spans_by_response(steps: pl.DataFrame) -> dict[str, list[tuple[int, int]]]:
    out: dict[str, list[tuple[int, int]]] = {}
    for rid, lo, hi in steps.sort("response_id", "step_index").select("response_id", "char_start", "char_end").iter_rows():
        out.setdefault(rid, []).append((lo, hi))
    return out


def lalp_from_steps(step_scores: pl.DataFrame) -> pl.DataFrame:
    """LALP = mean of step scores, every step weighted equally (steps without tokens excluded)."""
    return step_scores.group_by("response_id").agg(
        pl.len().alias("n_steps"),
        pl.col("mean_logprob").fill_nan(None).mean().alias("lalp"),
    )


# index draws per bootstrap block: memory stays bounded (a few MB) whatever the number of prompts
BOOTSTRAP_BLOCK = 1 << 18


def _paired_bootstrap(matrix: np.ndarray, n_boot: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """matrix: prompts x teachers. Resample prompts (the same draw for every teacher). The draws
    are made in blocks of resamples from one generator: the same numbers as one big draw, without
    an n_boot x prompts (x teachers) array in memory."""
    rng = np.random.default_rng(seed)
    n = matrix.shape[0]
    means = np.empty((n_boot, matrix.shape[1]), dtype=np.float64)
    step = max(1, BOOTSTRAP_BLOCK // max(n, 1))
    for lo in range(0, n_boot, step):
        hi = min(n_boot, lo + step)
        idx = rng.integers(0, n, size=(hi - lo, n))
        means[lo:hi] = matrix[idx].mean(axis=1)  # resamples x teachers
    return np.percentile(means, 2.5, axis=0), np.percentile(means, 97.5, axis=0)


def rank_teachers(responses: pl.DataFrame, n_boot: int = 1000, seed: int = 0,
                  conflicting: Collection[str] = ()) -> pl.DataFrame:
    """Per teacher: mean LALP over the prompts every compared teacher answered, with a paired
    bootstrap 95% interval; GALP the same way beside it. Teachers that share no prompt with the
    others still get a row (null means, n_shared_prompts = 0). Prompt ids in `conflicting` (the
    teachers were given different prompt texts under them) are left out of the comparison, and
    their number is in `n_conflicting_prompts`."""
    scored = responses.filter(pl.col("lalp").is_not_null() & pl.col("lalp").is_not_nan())
    teachers = sorted(responses["teacher"].unique().to_list())
    per_prompt = scored.group_by("teacher", "prompt_id").agg(pl.col("lalp").mean(), pl.col("galp").mean())
    counts = per_prompt.group_by("prompt_id").agg(pl.col("teacher").n_unique().alias("n"))
    conflicting = set(conflicting)
    shared = sorted(p for p in counts.filter(pl.col("n") == len(teachers))["prompt_id"].to_list() if p not in conflicting)
    acc = responses.group_by("teacher").agg(
        pl.len().alias("n_responses"), pl.col("is_correct").cast(pl.Float64).mean().alias("accuracy")
    )
    stats = {t: {} for t in teachers}
    if shared and teachers:
        pp = per_prompt.filter(pl.col("prompt_id").is_in(shared))
        for metric in ("lalp", "galp"):
            wide = pp.pivot(on="teacher", index="prompt_id", values=metric).sort("prompt_id")
            mat = wide.select(teachers).to_numpy().astype(np.float64)
            mat = np.nan_to_num(mat, nan=np.nanmean(mat))  # galp can be nan only for empty texts
            lo, hi = _paired_bootstrap(mat, n_boot, seed)
            for k, t in enumerate(teachers):
                stats[t][f"{metric}_mean"] = float(mat[:, k].mean())
                stats[t][f"{metric}_ci_low"] = float(lo[k])
                stats[t][f"{metric}_ci_high"] = float(hi[k])
    rows = []
    for t in teachers:
        s = stats[t]
        rows.append(
            {
                "teacher": t,
                "n_shared_prompts": len(shared),
                "n_conflicting_prompts": len(conflicting),
                **{k: s.get(k) for k in ("lalp_mean", "lalp_ci_low", "lalp_ci_high", "galp_mean", "galp_ci_low", "galp_ci_high")},
            }
        )
    out = pl.DataFrame(
        rows,
        schema={
            "teacher": pl.Utf8, "n_shared_prompts": pl.Int32, "lalp_mean": pl.Float64, "lalp_ci_low": pl.Float64,
            "lalp_ci_high": pl.Float64, "galp_mean": pl.Float64, "galp_ci_low": pl.Float64, "galp_ci_high": pl.Float64,
            "n_conflicting_prompts": pl.Int32,
        },
    ).join(acc, on="teacher", how="left")
    out = out.with_columns(
        pl.col("lalp_mean").rank("ordinal", descending=True).cast(pl.Int32).alias("lalp_rank"),
        pl.col("galp_mean").rank("ordinal", descending=True).cast(pl.Int32).alias("galp_rank"),
    )
    if any(c in responses.columns for c in diagnostics.CORRECTED):  # length-corrected scores beside LALP
        out = out.join(diagnostics.teacher_corrected(scored, teachers, shared), on="teacher", how="left")
    return out.sort("lalp_rank", "teacher", nulls_last=True)


def select_responses(candidates: pl.DataFrame, require_correct: bool = True) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Per prompt, the argmax of LALP among eligible responses.

    Eligible: scored (LALP not null), not blocked (an optional `blocked` column: a non-null reason,
    such as a control-token string in the text, makes a candidate ineligible) and, when
    `require_correct` and the prompt has a reference answer, verified correct. Ties on LALP go to the higher GALP, then teacher name, then
    response_id, so the choice is deterministic. Returns (decisions, chosen): one decision row
    per candidate with its reason, and one chosen row per prompt that has an eligible response.
    Vectorised in Polars (window expressions per prompt): cost linear in the candidates.
    """
    need = ["prompt_id", "response_id", "teacher", "lalp", "galp", "is_correct", "reference_answer", "verify_reason"]
    blocked = candidates["blocked"] if "blocked" in candidates.columns else pl.Series("blocked", [None] * candidates.height, pl.Utf8)
    df = candidates.select(need).with_columns(pl.col("lalp").fill_nan(None), blocked.cast(pl.Utf8).alias("_blocked")).sort(
        "prompt_id", maintain_order=True)
    has_ref = pl.col("reference_answer").is_not_null().any().over("prompt_id")
    strict = pl.lit(bool(require_correct)) & pl.col("_has_ref")
    df = df.with_columns(has_ref.alias("_has_ref")).with_columns(
        pl.col("lalp").is_not_null().alias("_scored"),
        (strict & pl.col("is_correct").ne(True).fill_null(True)).alias("_wrong"),
    ).with_columns((pl.col("_scored") & ~pl.col("_wrong") & pl.col("_blocked").is_null()).alias("eligible"))
    # rank the eligible: LALP desc, then GALP desc (missing last), teacher, response_id
    ranked = (
        df.filter("eligible")
        .with_columns(pl.col("galp").fill_nan(None).alias("_galp"))
        .sort(["prompt_id", "lalp", "_galp", "teacher", "response_id"], descending=[False, True, True, False, False],
              nulls_last=True, maintain_order=True)
        .with_columns(
            pl.int_range(pl.len()).over("prompt_id").alias("_rank"),
            pl.col("lalp").first().over("prompt_id").alias("_best_lalp"),
            pl.col("teacher").first().over("prompt_id").alias("_best_teacher"),
        )
        .with_columns((pl.col("lalp") == pl.col("_best_lalp")).sum().over("prompt_id").alias("_n_tie"))
    )
    fmt4 = lambda s: pl.Series([None if x is None else f"{x:.4f}" for x in s.to_list()], dtype=pl.Utf8)  # noqa: E731
    best_why = pl.concat_str(
        pl.lit("highest LALP among eligible"),
        pl.when(pl.col("_strict")).then(pl.lit(""))
        .when(~pl.col("_has_ref")).then(pl.lit(" (no reference answer: all scored responses eligible)"))
        .otherwise(pl.lit(" (correctness not required)")),
        pl.when(pl.col("_n_tie") > 1)
        .then(pl.format("; tie with {} other(s) broken by GALP, then teacher name", pl.col("_n_tie") - 1))
        .otherwise(pl.lit("")),
    )
    ranked = ranked.with_columns(strict.alias("_strict")).with_columns(
        pl.when(pl.col("_rank") == 0).then(best_why)
        .when(pl.col("lalp") != pl.col("_best_lalp"))
        .then(pl.format("lower LALP than {} ({} < {})", pl.col("_best_teacher"),
                        pl.col("lalp").map_batches(fmt4, return_dtype=pl.Utf8),
                        pl.col("_best_lalp").map_batches(fmt4, return_dtype=pl.Utf8)))
        .otherwise(pl.lit("tie lost on GALP/teacher name"))
        .alias("_why"),
        (pl.col("_rank") == 0).alias("chosen"),
    ).select("prompt_id", "response_id", "_why", "chosen")
    n_eligible = pl.col("eligible").sum().over("prompt_id")
    dec = (
        df.join(ranked, on=["prompt_id", "response_id"], how="left", maintain_order="left")
        .with_columns(
            pl.when(~pl.col("_scored")).then(pl.lit("not scored (no steps or no LALP)"))
            .when(pl.col("_blocked").is_not_null()).then(pl.col("_blocked"))
            .when(pl.col("_wrong"))
            .then(pl.format("not verified correct ({})",
                            pl.when(pl.col("verify_reason").fill_null("") == "").then(pl.lit("unknown"))
                            .otherwise(pl.col("verify_reason"))))
            .otherwise(pl.col("_why"))
            .alias("reason"),
            pl.col("chosen").fill_null(False),
        )
        .with_columns(
            pl.when(n_eligible == 0).then(pl.col("reason") + "; prompt has no eligible response, nothing selected")
            .otherwise(pl.col("reason")).alias("reason")
        )
        .select("prompt_id", "response_id", "teacher", "lalp", "is_correct", "eligible", "chosen", "reason")
    )
    schema = {
        "prompt_id": pl.Utf8, "response_id": pl.Utf8, "teacher": pl.Utf8, "lalp": pl.Float64, "is_correct": pl.Boolean,
        "eligible": pl.Boolean, "chosen": pl.Boolean, "reason": pl.Utf8,
    }
    dec = dec.cast(schema)
    stats = dec.group_by("prompt_id").agg(pl.len().alias("n_candidates"), pl.col("eligible").sum().alias("n_eligible"))
    chosen_ids = dec.filter("chosen")["response_id"]
    chosen = (
        candidates.filter(pl.col("response_id").is_in(chosen_ids.implode()))
        .join(stats, on="prompt_id")
        .join(dec.filter("chosen").select("response_id", "reason"), on="response_id")
    )
    return dec, chosen


def sft_messages(prompt: str, response: str) -> str:
    return json.dumps([{"role": "user", "content": prompt}, {"role": "assistant", "content": response}], ensure_ascii=False)


SMALL_SAMPLE = 30


def ranking_verdict(rk: pl.DataFrame) -> str:
    """An honest sentence about a ranking: which teachers the 95% intervals cannot separate from
    the top one, and whether the sample is too small to choose from."""
    df = rk.filter(pl.col("lalp_mean").is_not_null()).sort("lalp_rank")
    if df.height == 0:
        return "No teacher could be ranked: no prompt was answered by every teacher."
    top = df.row(0, named=True)
    n = int(top["n_shared_prompts"] or 0)
    tied = [r["teacher"] for r in df.iter_rows(named=True)
            if r["teacher"] != top["teacher"] and r["lalp_ci_high"] is not None and r["lalp_ci_high"] >= top["lalp_ci_low"]]
    acc = f" (answer accuracy {top['accuracy']:.0%})" if top.get("accuracy") is not None else ""
    if df.height == 1:
        text = f"Only one teacher ({top['teacher']}) was scored."
    elif tied:
        text = (f"{top['teacher']}{acc} has the highest mean LALP, but its 95% interval overlaps "
                f"{', '.join(tied)}: over {n} shared prompts these cannot be told apart.")
    else:
        text = f"{top['teacher']}{acc} ranks first and its 95% interval separates it from every other teacher ({n} shared prompts)."
    conflicts = int(top.get("n_conflicting_prompts") or 0)
    if conflicts:
        text += (f" {conflicts} prompt id(s) were given to the teachers with different prompt texts and were left out of "
                 f"the comparison (the ranking's `conflicting_prompts` metadata names them; give each question its own prompt_id).")
    if n < SMALL_SAMPLE:
        text += f" {n} shared prompts is a small sample: treat this as a smoke test, not a verdict (score more prompts, e.g. `lalp run --all`)."
    extra = diagnostics.diagnostics_verdict(df)
    return f"{text} {extra}" if extra else text
