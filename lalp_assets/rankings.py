"""Stage 4: response scores -> `teacher_rankings` (mean LALP over shared prompts, bootstrap 95%
interval, GALP beside it)."""


import dagster as dg
import polars as pl

from lalp_assets import unchanged
from lalp_assets.metadata import check_result, table_metadata
from lalp_assets.versions import ensure_version, rankings_version
from lalp_resources import diagnostics
from lalp_resources import expectations as gx_suites
from lalp_resources.markdown import markdown_table
from lalp_resources.method.aggregation import rank_teachers, ranking_verdict
from lalp_resources.report import md_image, ranking_plot, step_distribution_plot
from lalp_resources.resources import PipelineSettingsResource, WarehouseResource
from lalp_resources.warehouse import query, replace_all

# the step-score distribution plot reads a fixed-size sample, whatever the table's size
PLOT_SAMPLE = "USING SAMPLE reservoir(200000 ROWS) REPEATABLE (7)"

# Prompt ids under which the scored responses answer different prompt texts (ignoring surrounding
# whitespace): comparing teachers, or choosing a response, there would compare different questions.
CONFLICTING_PROMPTS = """
SELECT s.prompt_id, count(DISTINCT md5(trim(r.prompt, ' ' || chr(9) || chr(10) || chr(13)))) AS n_texts,
       string_agg(DISTINCT s.teacher, ', ' ORDER BY s.teacher) AS teachers
FROM response_scores s JOIN raw_teacher_traces r USING (response_id)
GROUP BY s.prompt_id HAVING n_texts > 1
ORDER BY s.prompt_id
"""


# The weakest steps of each teacher's responses (largest gap below their response's mean), for the UI
WEAKEST_PER_TEACHER = 3
# (the window runs over the scores alone and only the chosen rows fetch their step's text, so the
# texts of every response's weakest step are never held at once: it stays within LALP_DUCKDB_MEMORY)
WEAKEST_SQL = """
WITH top AS (
  SELECT s.teacher, s.response_id, s.weakest_step, s.weakest_score, s.weakest_gap
  FROM response_scores s SEMI JOIN reasoning_steps r ON r.response_id = s.response_id AND r.step_index = s.weakest_step
  WHERE s.prompt_id NOT IN (SELECT unnest(?::VARCHAR[])) AND s.weakest_gap IS NOT NULL
  QUALIFY row_number() OVER (PARTITION BY s.teacher ORDER BY s.weakest_gap DESC, s.response_id) <= ?
)
SELECT t.teacher, t.response_id, t.weakest_step, t.weakest_score, t.weakest_gap, r.text
FROM top t JOIN reasoning_steps r ON r.response_id = t.response_id AND r.step_index = t.weakest_step
ORDER BY t.teacher, t.weakest_gap DESC, t.response_id
"""


def ranking_markdown(rk: pl.DataFrame) -> str:
    view = rk.select(
        "lalp_rank", "teacher",
        pl.format("{} [{}, {}]", pl.col("lalp_mean").round(4), pl.col("lalp_ci_low").round(4), pl.col("lalp_ci_high").round(4)).alias("LALP [95% CI]"),
        "galp_rank",
        pl.format("{} [{}, {}]", pl.col("galp_mean").round(4), pl.col("galp_ci_low").round(4), pl.col("galp_ci_high").round(4)).alias("GALP [95% CI]"),
        pl.col("accuracy").round(3), "n_shared_prompts", "n_responses",
    )
    extra = diagnostics.table_view(rk)
    return markdown_table(view.hstack(extra) if extra.width else view)


def with_diagnostics(resp: pl.DataFrame, conflicting: list[str]) -> tuple[pl.DataFrame, dict | None]:
    """Responses with `casl` (one least-squares fit over every teacher's responses, the conflicting
    prompt ids left out as in the comparison) and `has_heads`; returns the fit too."""
    resp = resp.with_columns(pl.col("casl_m").is_not_null().alias("has_heads"))
    fit = diagnostics.casl_fit(resp.filter(~pl.col("prompt_id").is_in(conflicting)))
    return diagnostics.casl_scores(resp, fit), fit


def same_family_column(rk: pl.DataFrame, student_names: list[str], families: dict[str, str]) -> tuple[pl.DataFrame, dict]:
    flagged = diagnostics.same_family(rk["teacher"].to_list(), student_names, families)
    fam = {t: diagnostics.family_of(t, families) for t in flagged}
    return rk.with_columns(pl.col("teacher").replace_strict(fam, default=None, return_dtype=pl.Utf8).alias("same_family")), flagged


def weakest_preview(weak: pl.DataFrame) -> str:
    """Per teacher, its weakest steps: shortened text, score and gap below the response's mean."""
    if weak.height == 0:
        return "_(no scored steps)_"
    view = weak.select("teacher", "response_id", pl.col("weakest_step").alias("step"),
                       pl.col("weakest_score").round(3).alias("score"), pl.col("weakest_gap").round(3).alias("below mean"),
                       pl.col("text").map_elements(diagnostics.shorten, return_dtype=pl.Utf8).alias("text (shortened)"))
    return markdown_table(view)


def build(settings: PipelineSettingsResource) -> dg.AssetsDefinition:
    @dg.asset(
        name="teacher_rankings",
        group_name="selection",
        kinds={"duckdb", "polars"},
        deps=["response_scores"],
        code_version=rankings_version(settings),
        automation_condition=dg.AutomationCondition.eager(),
        check_specs=[
            dg.AssetCheckSpec("every_teacher_ranked", asset="teacher_rankings", blocking=True,
                              description="GX: every teacher with scored responses appears in the ranking"),
        ],
        description="Teachers ranked by mean LALP over the prompts every teacher answered, with a paired "
        "bootstrap 95% interval; GALP (the global baseline) and answer accuracy beside it; the length bias of "
        "step scores (Spearman rho), the length-corrected DROP-1/DROP-2/CASL with their ranks, a same-family "
        "warning, and (metadata) each teacher's weakest steps.",
    )
    def teacher_rankings(context: dg.AssetExecutionContext, warehouse: WarehouseResource, settings: PipelineSettingsResource):
        version = rankings_version(settings)
        ensure_version(context, version)
        wh = warehouse.get()
        with wh.connect(read_only=True) as con:
            inputs = unchanged.fingerprint(con, unchanged.SCORED)
            before = unchanged.fingerprint(con, [unchanged.Stamp("teacher_rankings")])
            previous = unchanged.unchanged_since(context, version, inputs, before)
            if previous is not None:  # the check runs again on the stored ranking
                teachers = query(con, "SELECT DISTINCT teacher FROM response_scores ORDER BY teacher")["teacher"].to_list()
                stored = query(con, "SELECT teacher FROM teacher_rankings")
        if previous is not None:
            context.log.info("passed over: no score, step or trace changed since this ranking was computed")
            yield dg.MaterializeResult(metadata=unchanged.stamped(previous, inputs, before, passed_over=True))
            yield check_result("every_teacher_ranked", gx_suites.rankings_suite(teachers, stored))
            return
        with wh.connect(read_only=True) as con:
            resp = query(con, "SELECT teacher, prompt_id, lalp, galp, is_correct, drop1, drop2, casl_m, casl_m_first, "
                              "casl_m_non, casl_f, student FROM response_scores")
            steps = query(con, f"SELECT teacher, mean_logprob FROM step_scores {PLOT_SAMPLE}")
            conflicts = query(con, CONFLICTING_PROMPTS)
            conflicting = conflicts["prompt_id"].to_list()
            rho = query(con, diagnostics.LENGTH_BIAS_SQL, [conflicting])
            weak = query(con, WEAKEST_SQL, [conflicting, WEAKEST_PER_TEACHER])
        resp, fit = with_diagnostics(resp, conflicting)
        rk = rank_teachers(resp, n_boot=settings.bootstrap, conflicting=conflicting).with_columns(
            pl.lit(context.run.run_id).alias("rank_run_id"))
        rk = rk.join(rho, on="teacher", how="left")
        students = sorted({s.split("@")[0] for s in resp["student"].drop_nulls().unique().to_list()} | {settings.student})
        rk, flagged = same_family_column(rk, students, diagnostics.parse_families(settings.families))
        for reason in flagged.values():
            context.log.warning(reason)
        if conflicts.height:
            context.log.warning(f"{conflicts.height} prompt id(s) hold different prompt texts across responses; left out "
                                f"of the comparison: {', '.join(conflicts['prompt_id'].head(20).to_list())}")
        md = ranking_markdown(rk)
        verdict = ranking_verdict(rk)
        context.log.info("teacher ranking:\n" + md + "\n" + verdict)
        pictures = {}
        if rk.height:  # drawn before the table is replaced: a failing plot leaves the old ranking in place
            pictures = {
                "ranking_plot": dg.MetadataValue.md(md_image(ranking_plot(rk), "LALP vs GALP ranking")),
                "step_score_distributions": dg.MetadataValue.md(md_image(step_distribution_plot(steps), "step scores")),
            }
        with wh.connect() as con:
            replace_all(con, "teacher_rankings", rk)
            after = unchanged.fingerprint(con, [unchanged.Stamp("teacher_rankings")])
        yield dg.MaterializeResult(
            metadata=unchanged.stamped(table_metadata(rk, "teacher_rankings", preview_rows=50, ranking=dg.MetadataValue.md(md),
                                    verdict=dg.MetadataValue.text(verdict), **pictures,
                                    n_conflicting_prompts=conflicts.height,
                                    conflicting_prompts=dg.MetadataValue.md(markdown_table(conflicts.head(100))),
                                    weakest_steps=dg.MetadataValue.md(weakest_preview(weak)),
                                    same_family=dg.MetadataValue.md(markdown_table(pl.DataFrame(
                                        {"teacher": list(flagged), "why": list(flagged.values())},
                                        schema={"teacher": pl.Utf8, "why": pl.Utf8}))),
                                    length_corrections_reorder=", ".join(
                                        diagnostics.LABELS[c] for c in diagnostics.order_changes(rk)) or "none",
                                    casl_fit=dg.MetadataValue.json(fit or {})), inputs, after)
        )
        yield check_result("every_teacher_ranked", gx_suites.rankings_suite(sorted(resp["teacher"].unique().to_list()), rk))

    return teacher_rankings
