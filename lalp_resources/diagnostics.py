"""What the scores say about themselves: length bias, length-corrected scores, the same-family
warning, the weakest step, and the metrics that check step scores against human labels.

Pure functions over Polars frames and lists (no Dagster import); docs/method.md defines every
quantity here. Step rows carry `n_tokens`, `sum_logprob`, `mean_logprob` and the head sums
`head1_logprob` / `head2_logprob` (the log-prob sum of the first 1 and 2 scored tokens of the
step window, see `engine.head.window_sums`). A step scored by a release before head sums existed
has them NULL: DROP and CASL use the steps that have them, and `n_responses_without_heads`
counts the responses left out.
"""

from __future__ import annotations

import math
import re
from typing import Sequence

import numpy as np
import polars as pl

# ------------------------------------------------------------------------------ length bias


def spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Spearman's rank correlation (average ranks for ties); None under 3 pairs or a constant side."""
    a = np.asarray(x, dtype=np.float64)
    b = np.asarray(y, dtype=np.float64)
    ok = np.isfinite(a) & np.isfinite(b)
    a, b = a[ok], b[ok]
    if len(a) < 3:
        return None
    ra = pl.Series(a).rank("average").to_numpy()
    rb = pl.Series(b).rank("average").to_numpy()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = math.sqrt(float((ra * ra).sum() * (rb * rb).sum()))
    return float((ra * rb).sum() / den) if den else None


def length_bias(steps: pl.DataFrame) -> pl.DataFrame:
    """Per teacher: Spearman rho between a step's score (mean log-prob) and its token count. A
    positive rho means longer steps score higher: a mean over tokens favours them."""
    rows = []
    for (teacher,), g in steps.filter(pl.col("n_tokens") > 0).group_by("teacher", maintain_order=True):
        rows.append({"teacher": teacher, "length_rho": spearman(g["mean_logprob"].to_list(), g["n_tokens"].to_list())})
    return pl.DataFrame(rows, schema={"teacher": pl.Utf8, "length_rho": pl.Float64})


# ------------------------------------------------------------------------------ DROP and CASL


def drop_step_mean(sum_lp: float, n: int, head: float | None, s: int) -> float | None:
    """A step's mean log-prob without its first `s` scored tokens (their sum is `head`); None
    when the step has no more than `s` tokens or its head sum is unknown."""
    if head is None or n <= s or (isinstance(head, float) and math.isnan(head)):
        return None
    return (sum_lp - head) / (n - s)


def _drop_expr(s: int) -> pl.Expr:
    head = pl.col(f"head{s}_logprob")
    return (pl.when((pl.col("n_tokens") > s) & head.is_not_null() & head.is_not_nan())
            .then((pl.col("sum_logprob") - head) / (pl.col("n_tokens") - s)).otherwise(None))


def response_diagnostics(steps: pl.DataFrame) -> pl.DataFrame:
    """Per response, from its step rows: DROP-1 and DROP-2 (the mean over steps of the step
    means without the first 1 / 2 tokens; steps too short are left out), the CASL inputs
    (M: mean over all scored tokens; M_first: over step-head tokens, the first of each step;
    M_non: over the rest; F: the share of head tokens) and `has_heads` (every scored step has its
    head sums). Responses lacking head sums get NULL DROP/CASL inputs."""
    st = steps.filter(pl.col("n_tokens") > 0).with_columns(
        _drop_expr(1).alias("_d1"), _drop_expr(2).alias("_d2"),
        (pl.col("head1_logprob").is_not_null() & pl.col("head1_logprob").is_not_nan()).alias("_h"),
    )
    agg = st.group_by("response_id").agg(
        pl.col("_h").all().alias("has_heads"),
        pl.col("_d1").mean().alias("drop1"),
        pl.col("_d2").mean().alias("drop2"),
        pl.col("sum_logprob").sum().alias("_sum"),
        pl.col("n_tokens").sum().alias("_n"),
        pl.col("head1_logprob").sum().alias("_head"),
        pl.len().alias("_nhead"),
    )
    has = pl.col("has_heads")
    non_n = pl.col("_n") - pl.col("_nhead")
    return agg.select(
        "response_id", "has_heads",
        pl.when(has).then(pl.col("drop1")).alias("drop1"),
        pl.when(has).then(pl.col("drop2")).alias("drop2"),
        pl.when(has).then(pl.col("_sum") / pl.col("_n")).alias("casl_m"),
        pl.when(has).then(pl.col("_head") / pl.col("_nhead")).alias("casl_m_first"),
        pl.when(has & (non_n > 0)).then((pl.col("_sum") - pl.col("_head")) / non_n).alias("casl_m_non"),
        pl.when(has).then(pl.col("_nhead") / pl.col("_n")).alias("casl_f"),
    )


def casl_fit(resp: pl.DataFrame) -> dict[str, float] | None:
    """One least-squares fit over all responses given (every teacher's):
    M ~ b1*M_non + b2*M_first + g*F + c. None with fewer responses than coefficients + 1."""
    df = resp.drop_nulls(["casl_m", "casl_m_non", "casl_m_first", "casl_f"]).filter(
        pl.all_horizontal(pl.col("casl_m", "casl_m_non", "casl_m_first", "casl_f").is_finite()))
    if df.height < 5:
        return None
    X = np.column_stack([df["casl_m_non"].to_numpy(), df["casl_m_first"].to_numpy(), df["casl_f"].to_numpy(),
                         np.ones(df.height)])
    coef, *_ = np.linalg.lstsq(X, df["casl_m"].to_numpy(), rcond=None)
    return {"b1": float(coef[0]), "b2": float(coef[1]), "g": float(coef[2]), "c": float(coef[3]), "n": df.height}


def casl_scores(resp: pl.DataFrame, fit: dict[str, float] | None) -> pl.DataFrame:
    """`resp` with `casl` = M - g*F (NULL without a fit or without the inputs)."""
    if fit is None:
        return resp.with_columns(pl.lit(None, pl.Float64).alias("casl"))
    return resp.with_columns((pl.col("casl_m") - fit["g"] * pl.col("casl_f")).alias("casl"))


# ------------------------------------------------------------------------------ the weakest step


WEAKEST_SCHEMA = {"response_id": pl.Utf8, "weakest_step": pl.Int32, "weakest_char_start": pl.Int32,
                  "weakest_char_end": pl.Int32, "weakest_score": pl.Float64, "weakest_gap": pl.Float64}


def weakest_steps(steps: pl.DataFrame) -> pl.DataFrame:
    """Per response: its lowest-scored step (index, character span, score; the lower index on a
    tie) and how far it sits below the response's mean step score (LALP), as a gap >= 0. Steps
    without tokens have no score and are never the weakest. `steps` needs response_id,
    step_index, mean_logprob, char_start, char_end."""
    st = steps.with_columns(pl.col("mean_logprob").fill_nan(None)).filter(pl.col("mean_logprob").is_not_null())
    if st.height == 0:
        return pl.DataFrame(schema=WEAKEST_SCHEMA)
    out = (st.sort("response_id", "mean_logprob", "step_index")
           .group_by("response_id", maintain_order=True)
           .agg(pl.col("step_index").first().alias("weakest_step"),
                pl.col("char_start").first().alias("weakest_char_start"),
                pl.col("char_end").first().alias("weakest_char_end"),
                pl.col("mean_logprob").first().alias("weakest_score"),
                pl.col("mean_logprob").mean().alias("_mean"))
           .with_columns((pl.col("_mean") - pl.col("weakest_score")).alias("weakest_gap"))
           .drop("_mean"))
    return out.cast(WEAKEST_SCHEMA)


def shorten(text: str | None, limit: int = 120) -> str:
    """One line of at most `limit` characters (whitespace runs collapsed, an ellipsis in the middle)."""
    s = " ".join((text or "").split())
    if len(s) <= limit:
        return s
    half = (limit - 3) // 2
    return s[:half] + " … " + s[len(s) - (limit - 3 - half):]


# ------------------------------------------------------------------------------ same family


# family -> regular expression matched (case-insensitive) against a teacher name and against the
# student's model name / tokenizer class. Extend it with LALP_FAMILIES="name=regex,...".
FAMILIES: dict[str, str] = {
    "qwen": r"qwen|qwq",
    "llama": r"llama",
    "smollm": r"smollm",
    "mistral": r"mistral|mixtral|ministral|magistral",
    "gemma": r"gemma",
    "phi": r"\bphi[-_ ]?\d|\bphi\b",
    "deepseek": r"deepseek",
    "gpt": r"\bgpt[-_ ]?\d|\bgpt\b|openai",
    "claude": r"claude",
    "gemini": r"gemini",
    "palm": r"\bpalm\b",
    "olmo": r"olmo",
    "granite": r"granite",
    "falcon": r"falcon",
    "yi": r"\byi[-_ ]",
}


def parse_families(spec: str | None) -> dict[str, str]:
    """The table above, extended or overridden by "name=regex,name2=regex2" (a setting)."""
    table = dict(FAMILIES)
    for part in (spec or "").split(","):
        if not part.strip():
            continue
        if "=" not in part:
            raise ValueError(f"LALP_FAMILIES entry {part!r}: expected name=regex")
        name, pattern = (x.strip() for x in part.split("=", 1))
        if not name or not pattern:
            raise ValueError(f"LALP_FAMILIES entry {part!r}: expected name=regex")
        try:
            re.compile(pattern)
        except re.error as e:
            raise ValueError(f"LALP_FAMILIES entry {part!r}: bad regex ({e})") from e
        table[name.lower()] = pattern
    return table


def family_of(name: str | None, families: dict[str, str] | None = None) -> str | None:
    """The first family whose pattern matches `name` (table order), or None."""
    if not name:
        return None
    for fam, pattern in (families or FAMILIES).items():
        if re.search(pattern, name, flags=re.I):
            return fam
    return None


def student_families(names: Sequence[str | None], families: dict[str, str] | None = None) -> set[str]:
    """The families of the student: its model name, its tokenizer's class and name (any match)."""
    return {f for n in names if (f := family_of(n, families))}


def same_family(teachers: Sequence[str], student_names: Sequence[str | None],
                families: dict[str, str] | None = None) -> dict[str, str]:
    """teacher -> the reason its rank is suspect, for every teacher of the student's family."""
    fams = student_families(student_names, families)
    out = {}
    for t in teachers:
        f = family_of(t, families)
        if f and f in fams:
            out[t] = (f"{t} is of the student's family ({f}): a student scores text like its own training data "
                      f"higher, so this teacher's rank is suspect")
    return out


# ------------------------------------------------------------------------------ human labels


def step_at(spans: Sequence[tuple[int, int]], char: int) -> int | None:
    """The index of the step whose span holds character `char` (the last step for char at the end)."""
    for i, (lo, hi) in enumerate(spans):
        if lo <= char < hi:
            return i
    if spans and char == spans[-1][1]:
        return len(spans) - 1
    return None


def first_wrong_metrics(scores: Sequence[float], wrong: int) -> dict:
    """For one response: step scores (higher = more likely under the student) and the index of
    the first wrong step. top1: the lowest score is the wrong step's (the lower index on a tie);
    percentile: the share of the other steps that score below it (ties count half), 0 = the
    weakest step, 0.5 = chance (None with one step); pairs / pairs_won: the steps before the wrong
    one, and how many of them score above it (ties half): their ratio is this response's AUROC."""
    s = [float(x) for x in scores]
    w = s[wrong]
    top1 = int(np.argmin(np.asarray(s))) == wrong
    others = [x for i, x in enumerate(s) if i != wrong]
    pct = (sum(x < w for x in others) + 0.5 * sum(x == w for x in others)) / len(others) if others else None
    before = s[:wrong]
    won = sum(x > w for x in before) + 0.5 * sum(x == w for x in before)
    return {"top1": top1, "percentile": pct, "pairs": len(before), "pairs_won": won}


def summarize_first_wrong(per_response: Sequence[dict]) -> dict:
    """Over responses: top-1 hit rate, mean rank percentile, and the AUROC of the first wrong
    step against the steps before it (pairs within a response only, pooled over responses; a
    response whose first step is wrong has no pair)."""
    n = len(per_response)
    pcts = [r["percentile"] for r in per_response if r["percentile"] is not None]
    pairs = sum(r["pairs"] for r in per_response)
    won = sum(r["pairs_won"] for r in per_response)
    return {
        "n": n,
        "top1": sum(r["top1"] for r in per_response) / n if n else None,
        "mean_percentile": float(np.mean(pcts)) if pcts else None,
        "auroc": won / pairs if pairs else None,
        "pairs": pairs,
    }


# ------------------------------------------------------------------------------ per response / teacher


def per_response(steps: pl.DataFrame) -> pl.DataFrame:
    """The diagnostic columns of `response_scores`: the weakest step and the DROP/CASL inputs.
    `steps`: response_id, step_index, n_tokens, sum_logprob, mean_logprob, head1_logprob,
    head2_logprob, char_start, char_end."""
    rd = response_diagnostics(steps)
    return weakest_steps(steps).join(rd, on="response_id", how="full", coalesce=True)


# Spearman rho per teacher over all its scored steps in SQL (average ranks: the Pearson correlation
# of rank + (ties - 1) / 2), so it scales with the table instead of a sample; `?` = prompt ids left out.
# Twice the average rank is an integer, so the sums are exact (HUGEINT) and rho does not depend on
# the order the rows are stored or summed in (DuckDB's corr() does, in its last bits).
LENGTH_BIAS_SQL = """
SELECT teacher, (n * sxy - sx * sy)::DOUBLE / sqrt((n * sxx - sx * sx)::DOUBLE * (n * syy - sy * sy)::DOUBLE) AS length_rho
FROM (
  SELECT teacher, count(*)::HUGEINT AS n, sum(x) AS sx, sum(y) AS sy, sum(x * y) AS sxy, sum(x * x) AS sxx, sum(y * y) AS syy
  FROM (
    SELECT teacher,
           (2 * rank() OVER (PARTITION BY teacher ORDER BY mean_logprob)
             + count(*) OVER (PARTITION BY teacher, mean_logprob) - 1)::HUGEINT AS x,
           (2 * rank() OVER (PARTITION BY teacher ORDER BY n_tokens)
             + count(*) OVER (PARTITION BY teacher, n_tokens) - 1)::HUGEINT AS y
    FROM step_scores
    WHERE n_tokens > 0 AND isfinite(mean_logprob) AND prompt_id NOT IN (SELECT unnest(?::VARCHAR[]))
  ) GROUP BY teacher HAVING count(*) >= 3
)
"""

CORRECTED = ("drop1", "drop2", "casl")
LABELS = {"lalp": "LALP", "drop1": "DROP-1", "drop2": "DROP-2", "casl": "CASL"}


def teacher_corrected(responses: pl.DataFrame, teachers: Sequence[str], shared: Sequence[str]) -> pl.DataFrame:
    """Per teacher, over the shared prompts (the same ones LALP is compared on): the mean of each
    corrected score (per prompt the mean of the teacher's responses, then the mean over prompts
    that have a value), its rank (1 = best), and how many of the teacher's responses lack head
    sums (scored by an earlier release: left out of DROP/CASL)."""
    cols = [c for c in CORRECTED if c in responses.columns]
    schema = {"teacher": pl.Utf8, **{f"{c}_mean": pl.Float64 for c in CORRECTED},
              "n_responses_without_heads": pl.Int32}
    rows = {t: {"teacher": t} for t in teachers}
    if "has_heads" in responses.columns:
        lacking = responses.filter(pl.col("has_heads").not_()).group_by("teacher").len()
        for t, n in lacking.iter_rows():
            if t in rows:
                rows[t]["n_responses_without_heads"] = n
    if cols and shared:
        pp = (responses.filter(pl.col("prompt_id").is_in(list(shared)))
              .with_columns([pl.col(c).fill_nan(None) for c in cols])
              .group_by("teacher", "prompt_id").agg([pl.col(c).mean() for c in cols])
              .group_by("teacher").agg([pl.col(c).mean().alias(f"{c}_mean") for c in cols]))
        for r in pp.iter_rows(named=True):
            if r["teacher"] in rows:
                rows[r["teacher"]].update({k: v for k, v in r.items() if k != "teacher"})
    for t in teachers:
        rows[t].setdefault("n_responses_without_heads", 0)
    out = pl.DataFrame([rows[t] for t in teachers], schema=schema) if teachers else pl.DataFrame(schema=schema)
    return out.with_columns([pl.col(f"{c}_mean").rank("ordinal", descending=True).cast(pl.Int32).alias(f"{c}_rank")
                             for c in CORRECTED])


def order_changes(rk: pl.DataFrame) -> dict[str, tuple[list[str], list[str]]]:
    """score -> (the LALP order, its order) for each corrected score that orders the teachers
    differently from LALP (teachers without a value on either left out)."""
    out = {}
    for c in CORRECTED:
        col = f"{c}_mean"
        if col not in rk.columns:
            continue
        df = rk.filter(pl.col("lalp_mean").is_not_null() & pl.col(col).is_not_null())
        if df.height < 2:
            continue
        base = df.sort(["lalp_mean", "teacher"], descending=[True, False])["teacher"].to_list()
        other = df.sort([col, "teacher"], descending=[True, False])["teacher"].to_list()
        if base != other:
            out[c] = (base, other)
    return out


def diagnostics_verdict(rk: pl.DataFrame) -> str:
    """Sentences for the ranking verdict: where a length correction reorders the teachers, the
    length bias it answers, and which teachers share the student's family."""
    parts = []
    changes = order_changes(rk)
    present = [c for c in CORRECTED if f"{c}_mean" in rk.columns and rk[f"{c}_mean"].drop_nulls().len() > 0]
    for c, (base, other) in changes.items():
        parts.append(f"The length correction {LABELS[c]} changes the teacher order: LALP gives {' > '.join(base)}, "
                     f"{LABELS[c]} gives {' > '.join(other)}.")
    kept = [LABELS[c] for c in present if c not in changes]
    if kept and not changes:
        parts.append(f"The length corrections ({', '.join(kept)}) keep the LALP order of teachers.")
    elif kept:
        parts.append(f"{', '.join(kept)} keep{'s' if len(kept) == 1 else ''} the LALP order.")
    if "length_rho" in rk.columns:
        rho = [(r["teacher"], r["length_rho"]) for r in rk.iter_rows(named=True) if r["length_rho"] is not None]
        strong = [f"{t} (rho {v:+.2f})" for t, v in rho if abs(v) >= 0.3]
        if strong:
            parts.append("Step score depends on step length for " + ", ".join(strong)
                         + ": a mean over tokens favours " + ("long" if sum(v for _, v in rho) > 0 else "short")
                         + " steps there; compare the DROP/CASL columns.")
    if "n_responses_without_heads" in rk.columns:
        lack = int(rk["n_responses_without_heads"].fill_null(0).sum())
        if lack:
            parts.append(f"{lack} response(s) were scored by an earlier release without head sums and are left out of "
                         "DROP/CASL (their LALP/GALP stand; re-scoring them fills the heads).")
    if "same_family" in rk.columns:
        for r in rk.filter(pl.col("same_family").is_not_null()).iter_rows(named=True):
            parts.append(f"{r['teacher']}'s rank is suspect: it is of the student's family ({r['same_family']}), and a "
                         "student scores text like its own training data higher.")
    return " ".join(parts)


def table_view(rk: pl.DataFrame) -> pl.DataFrame:
    """The length-bias, length-corrected and same-family columns of a ranking, labelled for a
    table (an empty frame without them)."""
    cols = []
    if "length_rho" in rk.columns:
        cols.append(pl.col("length_rho").round(3).alias("length rho"))
    for c in CORRECTED:
        if f"{c}_mean" in rk.columns:
            cols.append(pl.format("{} (#{})", pl.col(f"{c}_mean").round(4), pl.col(f"{c}_rank")).alias(LABELS[c]))
    if "same_family" in rk.columns:
        cols.append(pl.col("same_family").fill_null("").alias("same family as student"))
    return rk.select(cols) if cols else pl.DataFrame()
