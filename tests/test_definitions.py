"""The `Definitions` object: it loads through the Dagster CLI, and the asset graph has the shape
the design promises (six assets, groups, descriptions, checks between stages, the `teacher`
dynamic partitions, the gpu pool), plus the jobs, sensors and schedule around it.

Fast: nothing here loads the student or runs a job.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest

REPO = Path(__file__).resolve().parents[1]
DAGSTER_BIN = Path(sys.executable).parent / "dagster"

ASSETS = [
    "raw_teacher_traces",
    "reasoning_steps",
    "step_scores",
    "response_scores",
    "teacher_rankings",
    "curated_sft_dataset",
]
PER_TEACHER = ASSETS[:4]


from helpers import temp_dagster_home  # noqa: E402


@pytest.fixture(scope="module")
def settings():
    from lalp_resources.settings import Settings

    return Settings(dagster_home="/nonexistent/home")


@pytest.fixture(scope="module")
def defs(settings):
    from lalp_assets.definitions import build_defs

    return build_defs(settings)


@pytest.fixture(scope="module")
def asset_graph(defs):
    return defs.resolve_asset_graph()


def test_dagster_definitions_validate(tmp_path):
    """`dagster definitions validate -w workspace.yaml` loads the code location without errors."""
    home = temp_dagster_home(tmp_path)
    env = {
        **os.environ,
        "DAGSTER_HOME": str(home),
        "LALP_WAREHOUSE": str(tmp_path / "lalp.duckdb"),
        "LALP_EXPORTS": str(tmp_path / "exports"),
        "LALP_INBOX": str(tmp_path / "inbox"),
    }
    # cwd inside the temp home: nothing the CLI writes can land in the repository
    proc = subprocess.run(
        [str(DAGSTER_BIN), "definitions", "validate", "-w", str(REPO / "workspace.yaml")],
        cwd=home, env=env, capture_output=True, text=True, timeout=300,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "Validation successful for code location lalp" in out, out
    assert "All code locations passed validation" in out, out
    assert not (tmp_path / "lalp.duckdb").exists(), "loading the definitions must not open the warehouse"


def test_exactly_the_six_assets(asset_graph):
    keys = {k.to_user_string() for k in asset_graph.get_all_asset_keys()}
    assert keys == set(ASSETS)


def test_lineage_is_the_documented_chain(asset_graph):
    parents = {
        k.to_user_string(): {p.to_user_string() for p in asset_graph.get(k).parent_keys}
        for k in asset_graph.get_all_asset_keys()
    }
    assert parents == {
        "raw_teacher_traces": set(),
        "reasoning_steps": {"raw_teacher_traces"},
        "step_scores": {"reasoning_steps"},
        "response_scores": {"step_scores"},
        "teacher_rankings": {"response_scores"},
        "curated_sft_dataset": {"response_scores", "teacher_rankings"},
    }


@pytest.mark.parametrize("name", ASSETS)
def test_every_asset_is_documented_grouped_and_checked(defs, asset_graph, name):
    key = dg.AssetKey(name)
    node = asset_graph.get(key)
    assets_def = defs.resolve_assets_def(name)
    description = assets_def.descriptions_by_key.get(key)
    assert description and len(description.strip()) > 20, f"{name} has no real description"
    assert node.group_name and node.group_name != "default", f"{name} is in no group"
    checks = [s for s in assets_def.check_specs if s.asset_key == key]
    assert checks, f"{name} has no asset check"
    for spec in checks:
        assert spec.description, f"check {spec.name} on {name} has no description"
    assert node.code_version, f"{name} has no code version (settings would not mark it stale)"


def test_per_teacher_assets_share_the_teacher_dynamic_partitions(asset_graph):
    from lalp_assets.partitions import teacher_partitions

    for name in PER_TEACHER:
        pd = asset_graph.get(dg.AssetKey(name)).partitions_def
        assert isinstance(pd, dg.DynamicPartitionsDefinition), name
        assert pd.name == "teacher", name
        assert pd == teacher_partitions
    for name in ("teacher_rankings", "curated_sft_dataset"):
        assert asset_graph.get(dg.AssetKey(name)).partitions_def is None, name


def test_step_scores_runs_in_the_gpu_pool(defs, asset_graph):
    assert asset_graph.get(dg.AssetKey("step_scores")).pools == {"gpu"}
    assert defs.resolve_assets_def("step_scores").op.pool == "gpu"


def test_checks_that_guard_a_downstream_stage_are_blocking(defs, asset_graph):
    """Every check on an asset that feeds another stage is blocking, so bad data stops there."""
    guarded = 0
    for key in asset_graph.get_all_asset_keys():
        if not asset_graph.get(key).child_keys:
            continue
        for spec in defs.resolve_assets_def(key).check_specs:
            if spec.asset_key == key:
                assert spec.blocking, f"check {spec.name} on {key.to_user_string()} guards a downstream stage but is not blocking"
                guarded += 1
    assert guarded >= 5


def test_check_names(defs):
    names = {
        (spec.asset_key.to_user_string(), spec.name)
        for name in ASSETS
        for spec in defs.resolve_assets_def(name).check_specs
    }
    assert names >= {
        ("raw_teacher_traces", "traces_valid"),
        ("raw_teacher_traces", "counts_reconcile"),
        ("reasoning_steps", "steps_tile_responses"),
        ("step_scores", "step_scores_valid"),
        ("response_scores", "every_response_scored"),
        ("teacher_rankings", "every_teacher_ranked"),
        ("curated_sft_dataset", "one_row_per_prompt_traceable"),
    }


def test_jobs_sensors_schedules(defs):
    score = defs.resolve_job_def("score_teachers_job")
    assert score.partitions_def is not None and score.partitions_def.name == "teacher"
    assert {k.to_user_string() for k in score.asset_layer.executable_asset_keys} == set(PER_TEACHER)
    rank = defs.resolve_job_def("rank_and_curate_job")
    assert {k.to_user_string() for k in rank.asset_layer.executable_asset_keys} == {"teacher_rankings", "curated_sft_dataset"}
    assert defs.resolve_sensor_def("inbox_sensor").job_name == "score_teachers_job"
    defs.resolve_sensor_def("lalp_automation")
    defs.resolve_schedule_def("rescore_schedule")
    for name in ("teacher_rankings", "curated_sft_dataset"):
        assert defs.resolve_assets_def(name).automation_conditions_by_key[dg.AssetKey(name)] is not None


def test_resources_are_configured_from_settings(defs, settings):
    res = defs.resources
    assert set(res) >= {"warehouse", "trace_sources", "student", "segmentation", "settings"}
    assert res["warehouse"].path == settings.warehouse == "/nonexistent/home/lalp.duckdb"
    assert list(res["trace_sources"].sources) == list(settings.sources)
    assert res["segmentation"].method == settings.segmenter
    assert res["settings"].window == settings.window


def test_code_versions_follow_the_settings():
    """A setting that changes the data changes the code version of exactly the assets it feeds."""
    from lalp_assets.definitions import build_defs
    from lalp_resources.settings import Settings

    def versions(s):
        g = build_defs(s).resolve_asset_graph()
        return {k.to_user_string(): g.get(k).code_version for k in g.get_all_asset_keys()}

    base = versions(Settings())
    changed = versions(Settings(window="fraction:0.25"))
    assert {k for k in base if base[k] != changed[k]} == {"step_scores"}
    assert "fraction:0.25" in changed["step_scores"]
    seg = versions(Settings(segmenter="sentence"))
    assert {k for k in base if base[k] != seg[k]} == {"reasoning_steps"}


def test_definitions_snapshot(defs):
    """The shape of the graph in one place: asset keys, checks, partitions, pools, code versions.
    A change here is a change users see in the UI; update the snapshot on purpose."""
    g = defs.resolve_asset_graph()
    snap = {}
    for key in sorted(g.get_all_asset_keys(), key=lambda k: k.to_user_string()):
        node = g.get(key)
        pd = node.partitions_def
        snap[key.to_user_string()] = {
            "partitions": None if pd is None else getattr(pd, "name", type(pd).__name__),
            "pools": sorted(node.pools or []),
            "checks": sorted(c.name for c in defs.resolve_assets_def(key).check_specs if c.asset_key == key),
            "code_version": node.code_version,
        }
    assert snap == {
        "curated_sft_dataset": {"partitions": None, "pools": [], "checks": ["one_row_per_prompt_traceable"],
                                "code_version": "curated@2|require_correct=True|control_tokens=quarantine"},
        "raw_teacher_traces": {"partitions": "teacher", "pools": [], "checks": ["counts_reconcile", "traces_valid"],
                               "code_version": "ingest@2|model|auto|chars=100000,200000,256,256"},
        "reasoning_steps": {"partitions": "teacher", "pools": [], "checks": ["steps_tile_responses"],
                            "code_version": "steps@3|paragraph||smollm2|max_prompts=5|tokens=8192,65536|control_tokens=quarantine|chat"},
        "response_scores": {"partitions": "teacher", "pools": [], "checks": ["every_response_scored"],
                            "code_version": "response_scores@3"},
        "step_scores": {"partitions": "teacher", "pools": ["gpu"], "checks": ["step_scores_valid"],
                        "code_version": "score@2|smollm2|auto|fixed:4|chat"},
        "teacher_rankings": {"partitions": None, "pools": [], "checks": ["every_teacher_ranked"],
                             "code_version": "rankings@3|bootstrap=1000|families="},
    }


def test_sharded_scoring_fans_out_over_teacher_and_shard():
    from lalp_assets.definitions import build_defs
    from lalp_resources.settings import Settings

    d = build_defs(Settings(shards=4))
    g = d.resolve_asset_graph()
    pd = g.get(dg.AssetKey("step_scores")).partitions_def
    assert isinstance(pd, dg.MultiPartitionsDefinition)
    assert {dim.name for dim in pd.partitions_defs} == {"teacher", "shard"}
    assert g.get(dg.AssetKey("response_scores")).partitions_def.name == "teacher"
    assert d.resolve_job_def("score_shards_job").partitions_def == pd


def test_a_run_with_other_resource_config_is_refused(tmp_path):
    """The Launchpad can change a resource's config; the asset's code version would then describe
    something else, so the run fails with a message naming both versions."""
    from lalp_assets.definitions import build_defs
    from lalp_resources.settings import Settings

    s = Settings(dagster_home=str(tmp_path), bootstrap=50)
    d = build_defs(s)
    job = d.resolve_job_def("rank_and_curate_job")
    with dg.instance_for_test() as instance:
        result = job.execute_in_process(
            instance=instance, raise_on_error=False,
            run_config={"resources": {"settings": {"config": {**d.resources["settings"].model_dump(), "bootstrap": 7}}}},
        )
    assert not result.success
    failures = [e for e in result.all_events if e.is_step_failure]
    msg = failures[0].step_failure_data.error.message
    assert "rankings@3|bootstrap=7|" in msg and "rankings@3|bootstrap=50|" in msg and "LALP_" in msg


def test_rescore_schedule_requests_teacher_partitions(defs, tmp_path, monkeypatch):
    """Every job the schedule targets is partitioned by teacher, so each run it requests must
    name teacher partitions (a partition key or a partition range); a run without one fails at
    its first asset ("Cannot access partition_key for a non-partitioned run")."""
    home = temp_dagster_home(tmp_path)
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    monkeypatch.chdir(home)
    sched = defs.resolve_schedule_def("rescore_schedule")
    with dg.DagsterInstance.get() as instance:
        instance.add_dynamic_partitions("teacher", ["alpha", "beta"])
        with dg.build_schedule_context(instance=instance) as ctx:
            result = sched.evaluate_tick(ctx)
    requests = result.run_requests or []
    assert requests, f"the schedule requested no run: {result.skip_message}"
    for req in requests:
        has_range = "dagster/asset_partition_range_start" in req.tags
        assert req.partition_key is not None or has_range, (
            f"rescore_schedule requests a run with no teacher partition: {req}"
        )


def test_instance_storage_lives_under_dagster_home(tmp_path, monkeypatch):
    """dagster_home/dagster.yaml must put the run/event/schedule storage in $DAGSTER_HOME,
    whatever the working directory (README: results stay in dagster_home/)."""
    home = temp_dagster_home(tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    monkeypatch.chdir(elsewhere)
    with dg.DagsterInstance.get() as instance:
        instance.add_dynamic_partitions("teacher", ["alpha"])
    assert not any(elsewhere.iterdir()), f"instance storage written to the cwd: {sorted(p.name for p in elsewhere.iterdir())}"
    assert (home / "history").is_dir() or (home / "storage").is_dir()
