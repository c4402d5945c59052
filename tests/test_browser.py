"""The UI in a real browser: headless Chromium (Debian's `chromium`, driven by Playwright) against a
real `dagster dev` on a loopback port, after `lalp run` has materialized the whole graph on a tiny
canonical JSONL (3 prompts x 2 teachers, the real SmolLM2 student).

What a new user would look at is asserted and saved as screenshots under `test-artifacts/` (repo
root, gitignored):

  asset_graph.png            Lineage -> the global asset graph: the six assets, each with its checks
  teacher_rankings.png       the ranking asset's page: the `ranking` table (teachers, LALP [95% CI])
  teacher_rankings_events.png  the same metadata on its Events tab (wider)
  teacher_rankings_checks.png  its Checks tab: `every_teacher_ranked`, passed
  curated_sft_dataset.png    the curated set's `teacher_mix` (Events tab)
  materialize_all.png        the "Materialize all" dialog with all teacher partitions picked
  lalp_run.log, dagster_dev.log, failed_<test>.png/.txt (what the browser saw when a test failed)

Every asset's Checks tab is opened and each check's name and result is asserted. The numbers the
UI shows are compared with the DuckDB warehouse the run wrote.

Slow (the student loads once, in `lalp run`). Skips with a message when Chromium or Playwright is
missing; `.ci/run` installs Debian's `chromium`. Playwright's own browser download is never used.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from dagster_dev import ASSETS, CHROMIUM_ARGS, DagsterDev, chromium_path, show_whole_graph
from helpers import temp_dagster_home

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "test-artifacts"
CHROMIUM = chromium_path("LALP_TEST_CHROMIUM")

CHECKS = {
    "raw_teacher_traces": ["traces_valid", "counts_reconcile"],
    "reasoning_steps": ["steps_tile_responses"],
    "step_scores": ["step_scores_valid"],
    "response_scores": ["every_response_scored"],
    "teacher_rankings": ["every_teacher_ranked"],
    "curated_sft_dataset": ["one_row_per_prompt_traceable"],
}
TEACHERS = ["alpha", "beta"]

# 3 prompts x 2 teachers. beta is wrong on p3, so p3 can only go to alpha and the curated set's
# teacher mix has both teachers in it, whatever the LALP scores are.
PROMPTS = [("p1", "What is 2 + 3?", "5"), ("p2", "What is 4 times 6?", "24"), ("p3", "What is 10 minus 7?", "3")]


def _rows() -> list[dict]:
    rows = []
    for pid, q, a in PROMPTS:
        rows.append({"prompt_id": pid, "prompt": q, "teacher": "alpha", "reference_answer": a,
                     "response": f"We need to compute the value.\n\nDoing the arithmetic gives {a}.\n\nSo the answer is \\boxed{{{a}}}."})
        b = str(int(a) + 1) if pid == "p3" else a
        rows.append({"prompt_id": pid, "prompt": q, "teacher": "beta", "reference_answer": a,
                     "response": f"Let us think step by step.\n\nThe result is {b}.\n\nTherefore the final answer is \\boxed{{{b}}}."})
    return rows


# --- the server --------------------------------------------------------------------------------


# --- fixtures ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sync_api():
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no Chromium at {CHROMIUM}: install Debian's package (apt-get install chromium; .ci/run does)")
    try:
        from playwright import sync_api
    except ImportError:
        pytest.skip("playwright is not installed (pip install -e '.[test]')")
    return sync_api


@pytest.fixture(scope="module")
def server(sync_api, tmp_path_factory):
    """`lalp run` on the tiny JSONL, then `dagster dev` on the same instance. Yields
    (base URL, expected values read from the warehouse)."""
    import duckdb

    root = tmp_path_factory.mktemp("browser")
    home = temp_dagster_home(root)
    (root / "inbox").mkdir()
    source = root / "traces.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in _rows()), encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if not k.startswith("LALP_")}
    env.update(
        DAGSTER_HOME=str(home), LALP_SOURCES=str(source), LALP_MAX_PROMPTS="0",
        LALP_WAREHOUSE=str(root / "lalp.duckdb"), LALP_EXPORTS=str(root / "exports"),
        LALP_INBOX=str(root / "inbox"), LALP_BOOTSTRAP="200", TOKENIZERS_PARALLELISM="false",
    )
    proc = subprocess.run(
        [sys.executable, "-m", "lalp_assets.cli", "run"], env=env, cwd=home,
        capture_output=True, text=True, timeout=420,
    )
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "lalp_run.log").write_text(proc.stdout + "\n--- stderr ---\n" + proc.stderr)
    assert proc.returncode == 0, f"lalp run failed rc={proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"

    con = duckdb.connect(str(root / "lalp.duckdb"), read_only=True)
    try:
        ranking = [t for (t,) in con.execute("SELECT teacher FROM teacher_rankings ORDER BY lalp_rank").fetchall()]
        mix = dict(con.execute("SELECT teacher, count(*) FROM curated_sft_dataset GROUP BY teacher").fetchall())
    finally:
        con.close()
    assert sorted(ranking) == TEACHERS and mix.get("alpha", 0) >= 1, (ranking, mix)

    dev = DagsterDev(home, env, root / "dagster_dev.log")
    try:
        dev.wait_ready()
        yield dev.base, {"ranking": ranking, "mix": mix}
    finally:
        dev.stop()
        shutil.copy(root / "dagster_dev.log", ARTIFACTS / "dagster_dev.log")


@pytest.fixture(scope="module")
def browser(sync_api):
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def page(browser, server, request):
    # A 1556x1000 CSS viewport rendered at 0.9 gives 1400x900 screenshots with room for the graph
    # at the zoom where asset nodes show their details.
    ctx = browser.new_context(viewport={"width": 1556, "height": 1000}, device_scale_factor=0.9)
    # skip the first-visit "Join the Dagster community" dialog and keep the main navigation narrow
    ctx.add_init_script(
        "window.localStorage.setItem('communityNux', JSON.stringify('1'));"
        "window.localStorage.setItem('dagster-nav-collapsed', 'true');"
    )
    ctx.set_default_timeout(60_000)
    pg = ctx.new_page()
    failed_before = request.session.testsfailed
    yield pg
    if request.session.testsfailed > failed_before:  # this test failed: keep what the browser saw
        name = re.sub(r"[^\w.-]+", "_", request.node.name)
        try:
            pg.screenshot(path=str(ARTIFACTS / f"failed_{name}.png"))
            (ARTIFACTS / f"failed_{name}.txt").write_text(pg.url + "\n\n" + pg.inner_text("body"))
        except Exception:  # noqa: BLE001 - best effort; the assertion message is what matters
            pass
    ctx.close()


# --- helpers -----------------------------------------------------------------------------------


def _wait_for(pg, ok, what: str, timeout: float = 60.0) -> str:
    """Poll the page's visible text until `ok(text)` holds (the UI renders in several passes)."""
    deadline = time.monotonic() + timeout
    while True:
        body = pg.inner_text("body")
        if ok(body):
            return body
        assert time.monotonic() < deadline, f"{what} not shown on {pg.url} within {timeout}s; page text:\n{body[:3000]}"
        pg.wait_for_timeout(500)


def _wait_text(pg, text: str, timeout: float = 60.0) -> str:
    return _wait_for(pg, lambda body: text in body, repr(text), timeout)


def _metadata_row(pg, key: str):
    """The metadata table row whose key cell is exactly `key`."""
    row = pg.locator("tr").filter(has=pg.locator("td", has_text=re.compile(rf"^\s*{re.escape(key)}\s*$"))).first
    row.wait_for(state="visible")
    return row


def _graph_scale(pg) -> float:
    z = pg.evaluate("window.localStorage.getItem('defaultZoom')")
    return float(z) if z else 0.0


# --- the tests ---------------------------------------------------------------------------------


def test_asset_graph_shows_six_assets_and_their_checks(page, server, sync_api):
    base, _ = server
    expect = sync_api.expect
    page.goto(f"{base}/asset-groups")  # Lineage: "Global asset lineage"
    _wait_text(page, "Global asset lineage")
    _wait_text(page, "selection")  # the group boxes have rendered

    show_whole_graph(page, len(ASSETS))

    for name in ASSETS:  # on screen, not just in the DOM
        expect(page.get_by_text(name, exact=True).first).to_be_in_viewport(ratio=1)
    # every node shows its checks row, all passed
    body = page.inner_text("body")
    n_checks = len(re.findall(r"Asset checks", body))
    assert n_checks == len(ASSETS), f"{n_checks} 'Asset checks' rows in the graph (scale {_graph_scale(page)})\n{body[:3000]}"
    passed = re.findall(r"(\d+)\s*/\s*(\d+)\s*Passed", body)
    assert sorted(int(t) for _, t in passed) == sorted(len(c) for c in CHECKS.values()), passed
    assert all(a == t for a, t in passed), passed
    page.screenshot(path=str(ARTIFACTS / "asset_graph.png"))


def test_ranking_page_shows_the_ranking(page, server):
    base, expected = server
    page.goto(f"{base}/assets/teacher_rankings")
    _wait_text(page, "LALP [95% CI]")
    row = _metadata_row(page, "ranking")
    text = row.inner_text()
    for col in ("lalp_rank", "teacher", "LALP [95% CI]", "GALP [95% CI]", "accuracy"):
        assert col in text, f"column {col!r} missing from the ranking metadata:\n{text}"
    # the UI's order is the warehouse's order, rank 1 first
    shown = [t for t in re.findall(r"\b(alpha|beta)\b", text)]
    assert shown == expected["ranking"], (shown, expected["ranking"], text)
    assert re.search(r"^\s*1\s+" + expected["ranking"][0] + r"\s+-\d+\.\d+ \[-\d+\.\d+, -\d+\.\d+\]", text, re.M), text
    # the check is on the overview too
    _wait_text(page, "Latest check results")
    # the plot behind ranking_plot opens from its row
    assert "[Show Markdown]" in _metadata_row(page, "ranking_plot").inner_text()
    # scroll the page's "Metadata" section to the top of the view
    page.get_by_text("Metadata", exact=True).first.evaluate("e => e.scrollIntoView({block: 'start'})")
    page.wait_for_timeout(300)
    page.screenshot(path=str(ARTIFACTS / "teacher_rankings.png"))

    page.goto(f"{base}/assets/teacher_rankings?view=events")  # the latest materialization, wider
    _wait_text(page, "Materialized in run")
    _wait_text(page, "LALP [95% CI]")
    page.screenshot(path=str(ARTIFACTS / "teacher_rankings_events.png"))


def test_curated_page_shows_the_teacher_mix(page, server):
    base, expected = server
    page.goto(f"{base}/assets/curated_sft_dataset?view=events")
    _wait_text(page, "Materialized in run")
    text = _metadata_row(page, "teacher_mix").inner_text()
    assert all(c in text for c in ("teacher", "rows", "percent")), text
    shown = {t: int(n) for t, n in re.findall(r"\b(alpha|beta)\s+(\d+)\s+\d+(?:\.\d+)?", text)}
    assert shown == expected["mix"], (shown, expected["mix"], text)
    for key in ("prompts_considered", "jsonl", "parquet"):
        _metadata_row(page, key)
    assert "curated_sft.jsonl" in _metadata_row(page, "jsonl").inner_text()
    page.screenshot(path=str(ARTIFACTS / "curated_sft_dataset.png"))


@pytest.mark.parametrize("asset", ASSETS)
def test_checks_tab_lists_each_check_passed(page, server, asset):
    base, _ = server
    page.goto(f"{base}/assets/{asset}?view=checks")
    checks = CHECKS[asset]
    # the list on the left: "Checks (n)", then each check's name and its latest result
    pattern = re.compile("".join(rf"(?=.*^{re.escape(c)}\s*\n\s*Succeeded\s*$)" for c in checks), re.M | re.S)
    _wait_for(page, lambda body: f"Checks ({len(checks)})" in body and pattern.match(body),
              f"checks {checks} of {asset}, each 'Succeeded'")
    _wait_text(page, "Passed")  # the selected check's latest evaluation
    if asset == "teacher_rankings":
        page.screenshot(path=str(ARTIFACTS / "teacher_rankings_checks.png"))


def test_materialize_all_dialog_offers_every_partition(page, server, sync_api):
    """What a user clicks to materialize everything: Lineage -> "Materialize all…" -> All ->
    Launch backfill. Checked up to the launch button (the full backfill takes minutes)."""
    base, _ = server
    page.goto(f"{base}/asset-groups")
    button = page.get_by_role("button", name="Materialize all")
    button.wait_for(state="visible")
    sync_api.expect(button).to_be_enabled()
    _wait_text(page, "selection")
    button.click()
    dialog = page.get_by_role("dialog")
    sync_api.expect(dialog).to_contain_text(f"Launch runs to materialize {len(ASSETS)} assets")
    dialog.get_by_role("button", name="All", exact=True).click()
    sync_api.expect(dialog).to_contain_text(f"{len(TEACHERS)} partitions")
    launch = dialog.get_by_role("button", name="Launch backfill")
    sync_api.expect(launch).to_be_enabled()
    page.screenshot(path=str(ARTIFACTS / "materialize_all.png"))
    dialog.get_by_role("button", name="Cancel").click()
