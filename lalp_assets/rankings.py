"""Stage 4: response scores -> `teacher_rankings` (mean LALP over shared prompts, bootstrap 95%
interval, GALP beside it)."""


import dagster as dg
import polars as pl

from lalp_resources.method.aggregation import rank_teachers
from lalp_resources.report import md_image, ranking_plot, step_distribution_plot
from lalp_assets.common import SETTINGS, check_result, markdown_table, table_metadata
from lalp_resources import expectations as gx_suites
from lalp_resources.resources import PipelineSettingsResource, WarehouseResource
from lalp_resources.warehouse import query, replace_all


def ranking_markdown(rk: pl.DataFrame) -> str:
    view = rk.select(
        "lalp_rank", "teacher",
        pl.format("{} [{}, {}]", pl.col("lalp_mean").round(4), pl.col("lalp_ci_low").round(4), pl.col("lalp_ci_high").round(4)).alias("LALP [95% CI]"),
        "galp_rank",
        pl.format("{} [{}, {}]", pl.col("galp_mean").round(4), pl.col("galp_ci_low").round(4), pl.col("galp_ci_high").round(4)).alias("GALP [95% CI]"),
        pl.col("accuracy").round(3), "n_shared_prompts", "n_responses",
    )
    return markdown_table(view)


@dg.asset(
    group_name="selection",
    kinds={"duckdb", "polars"},
    deps=["response_scores"],
    code_version=f"rankings@1|bootstrap={SETTINGS.bootstrap}",
    automation_condition=dg.AutomationCondition.eager(),
    check_specs=[
        dg.AssetCheckSpec("every_teacher_ranked", asset="teacher_rankings", blocking=True,
                          description="GX: every teacher with scored responses appears in the ranking"),
    ],
    description="Teachers ranked by mean LALP over the prompts every teacher answered, with a paired "
    "bootstrap 95% interval; GALP (the global baseline) and answer accuracy beside it.",
)
def teacher_rankings(context: dg.AssetExecutionContext, warehouse: WarehouseResource, settings: PipelineSettingsResource):
    wh = warehouse.get()
    with wh.connect() as con:
        resp = query(con, "SELECT * FROM response_scores")
        steps = query(con, "SELECT teacher, mean_logprob FROM step_scores")
    rk = rank_teachers(resp, n_boot=settings.bootstrap).with_columns(pl.lit(context.run.run_id).alias("rank_run_id"))
    with wh.connect() as con:
        replace_all(con, "teacher_rankings", rk)
    md = ranking_markdown(rk)
    context.log.info("teacher ranking:\n" + md)
    pictures = {}
    if rk.height:
        pictures = {
            "ranking_plot": dg.MetadataValue.md(md_image(ranking_plot(rk), "LALP vs GALP ranking")),
            "step_score_distributions": dg.MetadataValue.md(md_image(step_distribution_plot(steps), "step scores")),
        }
    yield dg.MaterializeResult(
        metadata=table_metadata(rk, "teacher_rankings", preview_rows=50, ranking=dg.MetadataValue.md(md), **pictures)
    )
    yield check_result("every_teacher_ranked", gx_suites.rankings_suite(sorted(resp["teacher"].unique().to_list()), rk))
