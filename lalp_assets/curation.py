"""Stage 5: scores -> `curated_sft_dataset`: per prompt the highest-LALP eligible response,
every decision recorded with its reason, exported for SFT."""


import json
import re
from pathlib import Path

import dagster as dg
import polars as pl

from lalp_assets import unchanged
from lalp_assets.metadata import check_result, table_metadata
from lalp_assets.versions import curated_version, ensure_version
from lalp_resources import expectations as gx_suites
from lalp_resources import objectstore
from lalp_resources.markdown import markdown_table
from lalp_resources.method.aggregation import select_responses, sft_messages
from lalp_resources.report import md_image, mix_plot, write_report
from lalp_resources.method.tokenization import control_strings
from lalp_resources.resources import PipelineSettingsResource, StudentModelResource, WarehouseResource
from lalp_assets.rankings import CONFLICTING_PROMPTS, PLOT_SAMPLE
from lalp_resources.diagnostics import shorten
from lalp_resources.warehouse import insert, query, run_transaction

EXPORT_FIELDS = ["prompt_id", "teacher", "response_id", "lalp", "galp", "source_uri", "source_sha256"]


CURATED_INPUTS = (*unchanged.SCORED, unchanged.Stamp("teacher_rankings"), unchanged.Stamp("quarantine"))
CURATED_OUTPUTS = (unchanged.Stamp("curated_sft_dataset"), unchanged.Stamp("selection_decisions"))
EXPORTS = ("jsonl", "parquet", "hf_dataset", "report")


def _exports_in_place(metadata: dict, exports: str) -> bool:
    """The exports an earlier materialization recorded are under today's LALP_EXPORTS and still there."""
    for key in EXPORTS:
        path = unchanged._text(metadata, key)
        if not path or not path.startswith(str(exports).rstrip("/")):
            return False
        if objectstore.is_remote(path) and objectstore.stat(path) is None and not objectstore.list_folder(path):
            return False
        if not objectstore.is_remote(path) and not Path(path).exists():
            return False
    return True


def export_curated(curated: pl.DataFrame, out_dir: Path) -> dict[str, str]:
    """Chat JSONL (TRL / LLaMA-Factory `messages` style, one object per line), Parquet, and a
    Hugging Face `datasets` directory (`datasets.load_from_disk`)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    jsonl = out_dir / "curated_sft.jsonl"
    tmp = jsonl.with_suffix(".jsonl.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for row in curated.sort("prompt_id").iter_rows(named=True):
            rec = {"messages": json.loads(row["messages"]), **{k: row[k] for k in EXPORT_FIELDS}}
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    tmp.replace(jsonl)
    parquet = out_dir / "curated_sft.parquet"
    curated.sort("prompt_id").write_parquet(parquet)
    hf_dir = out_dir / "curated_sft_hf"
    _save_hf_dataset(curated.sort("prompt_id"), hf_dir)
    return {"jsonl": str(jsonl), "parquet": str(parquet), "hf_dataset": str(hf_dir)}


def _save_hf_dataset(curated: pl.DataFrame, target: Path) -> None:
    import shutil

    import datasets

    rows = curated.select(EXPORT_FIELDS + ["messages"]).with_columns(
        pl.col("messages").str.json_decode(pl.List(pl.Struct({"role": pl.Utf8, "content": pl.Utf8})))
    )
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    datasets.Dataset.from_polars(rows).save_to_disk(str(tmp))
    shutil.rmtree(target, ignore_errors=True)
    tmp.replace(target)


def control_token_counts(curated: pl.DataFrame, cand: pl.DataFrame, quarantined: int, mode: str,
                         strings: list[str]) -> dict:
    """What the report says about control-token strings: rows quarantined at the steps stage,
    candidates blocked here, and curated rows that carry them as text (only under `keep`)."""
    blocked = int(cand["blocked"].str.starts_with("holds a control-token").sum()) if cand.height else 0
    carried = 0
    if mode == "keep" and curated.height and strings:
        carried = int((curated["prompt"].str.contains_any(strings) | curated["response"].str.contains_any(strings)).sum())
    return {"mode": mode, "quarantined": int(quarantined), "blocked_at_curation": blocked, "curated_rows_with_them": carried}


def build(settings: PipelineSettingsResource) -> dg.AssetsDefinition:
    @dg.asset(
        name="curated_sft_dataset",
        group_name="selection",
        kinds={"duckdb", "polars"},
        deps=["response_scores", "teacher_rankings"],
        code_version=curated_version(settings),
        automation_condition=dg.AutomationCondition.eager(),
        check_specs=[
            dg.AssetCheckSpec("one_row_per_prompt_traceable", asset="curated_sft_dataset", blocking=True,
                              description="GX: at most one row per prompt; every row joins back to a raw trace"),
        ],
        description="The fine-tuning set: for each prompt, the response with the highest LALP among eligible "
        "ones (verified correct where a reference answer exists). Every candidate's decision and reason is "
        "in `selection_decisions`. Exported as chat JSONL and Parquet.",
    )
    def curated_sft_dataset(context: dg.AssetExecutionContext, warehouse: WarehouseResource, settings: PipelineSettingsResource,
                            student: StudentModelResource):
        version = curated_version(settings)
        ensure_version(context, version)
        wh = warehouse.get()
        with wh.connect(read_only=True) as con:
            inputs = unchanged.fingerprint(con, CURATED_INPUTS)
            before = unchanged.fingerprint(con, CURATED_OUTPUTS)
            previous = unchanged.unchanged_since(context, version, inputs, before)
            if previous is not None and _exports_in_place(previous, settings.exports):
                # the check runs again on the stored set
                stored = query(con, "SELECT prompt_id, response_id FROM curated_sft_dataset")
                raw_ids = query(con, "SELECT response_id FROM raw_teacher_traces")["response_id"]
            else:
                previous = None
        if previous is not None:
            context.log.info("passed over: no score, ranking, trace or quarantine row changed since this set was "
                             "curated, and its exports are in place")
            yield dg.MaterializeResult(metadata=unchanged.stamped(previous, inputs, before, passed_over=True))
            yield check_result("one_row_per_prompt_traceable", gx_suites.curated_suite(stored, raw_ids))
            return
        # A response whose text holds a control-token string never enters the SFT set unless the
        # user chose LALP_CONTROL_TOKENS=keep: the steps stage quarantines them, and a score left by
        # an earlier release (or an edited table) is blocked here, with its reason recorded.
        strings = [] if settings.control_tokens == "keep" else list(control_strings(student.tokenizer(), settings.template))
        pattern = "|".join(re.escape(c) for c in strings) or "a^"
        with wh.connect(read_only=True) as con:
            # every candidate's scores and verdict, but the texts of the chosen ones only (below)
            cand = query(
                con,
                "SELECT s.response_id, s.prompt_id, s.teacher, s.lalp, s.galp, s.score_run_id, r.is_correct, "
                "r.reference_answer, r.verify_reason, r.source_uri, r.source_sha256, r.ingest_run_id, "
                "CASE WHEN regexp_matches(r.prompt, ?) OR regexp_matches(r.response, ?) THEN "
                "'holds a control-token string (LALP_CONTROL_TOKENS=quarantine)' "
                "WHEN c.prompt_id IS NOT NULL THEN 'prompt_id holds ' || c.n_texts || ' different prompt texts (teachers: ' "
                "|| c.teachers || '): answers to different questions are not compared; give each question its own prompt_id' "
                "END AS blocked "
                f"FROM response_scores s JOIN raw_teacher_traces r USING (response_id) "
                f"LEFT JOIN ({CONFLICTING_PROMPTS}) c ON c.prompt_id = s.prompt_id", [pattern, pattern],
            )
            control_quarantined = con.execute(
                "SELECT count(*) FROM quarantine WHERE stage = 'steps' AND reason LIKE 'control_token_in_%'").fetchone()[0]
            raw_ids = query(con, "SELECT response_id FROM raw_teacher_traces")["response_id"]
            decisions, chosen = select_responses(cand, require_correct=settings.require_correct)
            texts = query(con, "SELECT response_id, prompt, response FROM raw_teacher_traces "
                               "WHERE response_id IN (SELECT unnest(?))", [chosen["response_id"].to_list()])
        run_id = context.run.run_id
        columns = chosen.columns
        at = columns.index("verify_reason") + 1
        chosen = chosen.join(texts, on="response_id", how="left").select(columns[:at] + ["prompt", "response"] + columns[at:])
        curated = chosen.with_columns(
            pl.Series("messages", [sft_messages(p, r) for p, r in chosen.select("prompt", "response").iter_rows()], dtype=pl.Utf8),
            pl.lit(run_id).alias("select_run_id"),
        )
        mix = curated.group_by("teacher").agg(pl.len().alias("rows")).with_columns(
            (pl.col("rows") / max(curated.height, 1) * 100).round(1).alias("percent")
        ).sort("rows", descending=True)
        n_prompts = decisions["prompt_id"].n_unique()
        with wh.connect(read_only=True) as con:
            rk = query(con, "SELECT * FROM teacher_rankings")
            steps = query(con, f"SELECT teacher, mean_logprob FROM step_scores {PLOT_SAMPLE}")
            cfg = query(con, "SELECT DISTINCT student, segmenter_version, window_spec, template, dtype FROM response_scores")
            weakest = query(con, "SELECT s.teacher, s.response_id, s.weakest_step AS step, s.weakest_score AS score, "
                                 "s.weakest_gap AS below_mean, r.text FROM response_scores s JOIN reasoning_steps r "
                                 "ON r.response_id = s.response_id AND r.step_index = s.weakest_step "
                                 "WHERE s.response_id IN (SELECT unnest(?)) ORDER BY s.weakest_gap DESC LIMIT 20",
                            [curated["response_id"].to_list()])
        # pictures, report and exports first: a failure there leaves the tables as they were
        mix_picture = md_image(mix_plot(mix), "teacher mix")
        control = control_token_counts(curated, cand, control_quarantined, settings.control_tokens,
                                       strings or list(control_strings(student.tokenizer(), settings.template)))
        # an `s3://` LALP_EXPORTS: written to a local folder, then uploaded under the prefix
        with objectstore.output_folder(settings.exports) as out:
            report = write_report(
                out / "report", rk, steps, mix, decisions,
                cfg.row(0, named=True) if cfg.height == 1 else {"configs": cfg.height}, control=control,
            )
            paths = export_curated(curated, out)
        paths = {k: objectstore.join(settings.exports, Path(v).relative_to(out).as_posix()) for k, v in paths.items()}
        report = objectstore.join(settings.exports, report.relative_to(out).as_posix())
        def replace(con):
            for table, frame in (("curated_sft_dataset", curated),
                                 ("selection_decisions", decisions.with_columns(pl.lit(run_id).alias("select_run_id")))):
                con.execute(f"DELETE FROM {table}")
                insert(con, table, frame)

        with wh.connect() as con:
            run_transaction(con, lambda: replace(con))
            after = unchanged.fingerprint(con, CURATED_OUTPUTS)
        context.log.info(f"curated {curated.height} of {n_prompts} prompts; teacher mix:\n{markdown_table(mix)}\nwrote {paths}")
        yield dg.MaterializeResult(
            metadata=unchanged.stamped(table_metadata(
                curated.drop("prompt", "response", "messages"), "curated_sft_dataset",
                teacher_mix=dg.MetadataValue.md(markdown_table(mix)),
                prompts_considered=n_prompts, prompts_without_eligible=n_prompts - curated.height,
                candidates_under_conflicting_prompt_ids=int(cand["blocked"].str.starts_with("prompt_id holds").sum()),
                **{f"control_tokens_{k}": v for k, v in control.items()},
                teacher_mix_plot=dg.MetadataValue.md(mix_picture),
                weakest_steps_of_curated=dg.MetadataValue.md(markdown_table(weakest.with_columns(
                    pl.col("text").map_elements(shorten, return_dtype=pl.Utf8))) if weakest.height else "_(none)_"),
                jsonl=dg.MetadataValue.path(paths["jsonl"]), parquet=dg.MetadataValue.path(paths["parquet"]),
                hf_dataset=dg.MetadataValue.path(paths["hf_dataset"]), report=dg.MetadataValue.path(report),
            ), inputs, after)
        )
        yield check_result("one_row_per_prompt_traceable", gx_suites.curated_suite(curated, raw_ids))

    return curated_sft_dataset
