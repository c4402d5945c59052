"""Stage 4: response scores -> `teacher_rankings` (mean LALP over shared prompts, bootstrap 95%
interval, GALP beside it)."""


import dagster as dg
import polars as pl

from lalp_assets.metadata import check_result, table_metadata
from lalp_assets.versions import ensure_version, rankings_version
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


def ranking_markdown(rk: pl.DataFrame) -> str:
    view = rk.select(
        "lalp_rank", "teacher",
        pl.format("{} [{}, {}]", pl.col("lalp_mean").round(4), pl.col("lalp_ci_low").round(4), pl.col("lalp_ci_high").round(4)).alias("LALP [95% CI]"),
        "galp_rank",
        pl.format("{} [{}, {}]", pl.col("galp_mean").round(4), pl.col("galp_ci_low").round(4), pl.col("galp_ci_high").round(4)).alias("GALP [95% CI]"),
        pl.col("accuracy").round(3), "n_shared_prompts", "n_responses",
    )
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
        "bootstrap 95% interval; GALP (the global baseline) and answer accuracy beside it.",
    )
    def teacher_rankings(context: dg.AssetExecutionContext, warehouse: WarehouseResource, settings: PipelineSettingsResource):
        ensure_version(context, rankings_version(settings))
        wh = warehouse.get()
        with wh.connect(read_only=True) as con:
            resp = query(con, "SELECT teacher, prompt_id, lalp, galp, is_correct FROM response_scores")
            steps = query(con, f"SELECT teacher, mean_logprob FROM step_scores {PLOT_SAMPLE}")
            conflicts = query(con, CONFLICTING_PROMPTS)
        rk = rank_teachers(resp, n_boot=settings.bootstrap, conflicting=conflicts["prompt_id"].to_list()).with_columns(
            pl.lit(context.run.run_id).alias("rank_run_id"))
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
        yield dg.MaterializeResult(
            metadata=table_metadata(rk, "teacher_rankings", preview_rows=50, ranking=dg.MetadataValue.md(md),
                                    verdict=dg.MetadataValue.text(verdict), **pictures,
                                    n_conflicting_prompts=conflicts.height,
                                    conflicting_prompts=dg.MetadataValue.md(markdown_table(conflicts.head(100))))
        )
        yield check_result("every_teacher_ranked", gx_suites.rankings_suite(sorted(resp["teacher"].unique().to_list()), rk))

    return teacher_rankings
