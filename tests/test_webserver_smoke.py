"""The UI path without a browser: a real `dagster dev` (webserver + daemon) on a loopback port,
a run launched through GraphQL `launchRun` the way the UI's "Materialize" button does (job
`__ASSET_JOB`, an asset selection and a `dagster/partition` tag), polled until it succeeds.

Slow: the run loads the real SmolLM2 student. The input is 2 prompts x 2 teachers of short
answers, and only the `alpha` partition is materialized.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from dagster_dev import DagsterDev, graphql
from helpers import temp_dagster_home

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
PER_TEACHER = ["raw_teacher_traces", "reasoning_steps", "step_scores", "response_scores"]

ROWS = [
    {"prompt_id": "p1", "prompt": "What is 2 + 3?", "teacher": "alpha", "reference_answer": "5",
     "response": "We add the two numbers.\n\nThat gives 5.\n\nSo the answer is \\boxed{5}."},
    {"prompt_id": "p1", "prompt": "What is 2 + 3?", "teacher": "beta", "reference_answer": "5",
     "response": "Two plus three is five.\n\nThe answer is \\boxed{5}."},
    {"prompt_id": "p2", "prompt": "What is 4 times 6?", "teacher": "alpha", "reference_answer": "24",
     "response": "We multiply the numbers.\n\nThat gives 24.\n\nSo the answer is \\boxed{24}."},
    {"prompt_id": "p2", "prompt": "What is 4 times 6?", "teacher": "beta", "reference_answer": "24",
     "response": "Four sixes make twenty-four.\n\nThe answer is \\boxed{24}."},
]

LAUNCH_RUN = """
mutation LaunchRun($executionParams: ExecutionParams!) {
  launchRun(executionParams: $executionParams) {
    __typename
    ... on LaunchRunSuccess { run { runId status jobName tags { key value } } }
    ... on RunConfigValidationInvalid { errors { message } }
    ... on PythonError { message stack }
    ... on Error { message }
  }
}
"""

RUN_STATUS = """
query RunStatus($runId: ID!) {
  runOrError(runId: $runId) {
    __typename
    ... on Run { status }
    ... on PythonError { message }
    ... on RunNotFoundError { message }
  }
}
"""

TERMINAL = {"SUCCESS", "FAILURE", "CANCELED"}


def test_launch_run_through_graphql(tmp_path):
    import dagster as dg

    home = temp_dagster_home(tmp_path)
    source = tmp_path / "traces.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in ROWS), encoding="utf-8")
    (tmp_path / "inbox").mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("LALP_")}
    env.update(
        DAGSTER_HOME=str(home),
        LALP_SOURCES=str(source),
        LALP_MAX_PROMPTS="0",
        LALP_WAREHOUSE=str(tmp_path / "lalp.duckdb"),
        LALP_EXPORTS=str(tmp_path / "exports"),
        LALP_INBOX=str(tmp_path / "inbox"),
        TOKENIZERS_PARALLELISM="false",
    )

    # register the teacher partitions on the same instance, before anything is launched
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DAGSTER_HOME", str(home))
        mp.chdir(home)  # the instance's storage path is resolved as `dagster dev` (cwd=home) will
        with dg.DagsterInstance.get() as inst:
            inst.add_dynamic_partitions("teacher", ["alpha", "beta"])

    dev = DagsterDev(home, env, tmp_path / "dagster_dev.log")
    try:
        ready = dev.wait_ready()
        assert "dagster_webserver_version" in ready["server_info"], ready["server_info"]
        repos = ready["location"]["repositories"]
        repo = next(r for r in repos if any(j["name"] == "score_teachers_job" for j in r["jobs"]))
        jobs = {j["name"] for j in repo["jobs"]}
        assert {"__ASSET_JOB", "score_teachers_job", "rank_and_curate_job"} <= jobs, jobs

        params = {
            "selector": {
                "repositoryLocationName": "lalp",
                "repositoryName": repo["name"],
                "jobName": "__ASSET_JOB",
                "assetSelection": [{"path": [name]} for name in PER_TEACHER],
            },
            "executionMetadata": {"tags": [{"key": "dagster/partition", "value": "alpha"}]},
        }
        launched = graphql(dev.base, LAUNCH_RUN, {"executionParams": params})["launchRun"]
        assert launched["__typename"] == "LaunchRunSuccess", launched
        run_id = launched["run"]["runId"]
        assert {t["key"]: t["value"] for t in launched["run"]["tags"]}.get("dagster/partition") == "alpha"

        status, deadline = None, time.monotonic() + 300
        while time.monotonic() < deadline:
            res = graphql(dev.base, RUN_STATUS, {"runId": run_id})["runOrError"]
            assert res["__typename"] == "Run", res
            status = res["status"]
            if status in TERMINAL:
                break
            assert dev.proc.poll() is None, f"dagster dev died:\n{dev.log_tail()}"
            time.sleep(2.0)
        assert status == "SUCCESS", f"run {run_id} ended {status}:\n{dev.log_tail()}"

        # what the run did, from the instance the webserver wrote
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("DAGSTER_HOME", str(home))
            mp.chdir(home)
            with dg.DagsterInstance.get() as inst:
                run = inst.get_run_by_id(run_id)
                assert run.status == dg.DagsterRunStatus.SUCCESS
                assert run.tags.get("dagster/partition") == "alpha"
                for name in PER_TEACHER:
                    assert inst.get_materialized_partitions(dg.AssetKey(name)) == {"alpha"}, name
                evals = [
                    ev.dagster_event.event_specific_data
                    for ev in inst.all_logs(run_id, of_type=dg.DagsterEventType.ASSET_CHECK_EVALUATION)
                ]
                assert {e.asset_key.to_user_string() for e in evals} == set(PER_TEACHER)
                assert all(e.passed for e in evals), [(e.check_name, e.passed) for e in evals]
    finally:
        dev.stop()
