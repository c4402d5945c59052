"""The README's UI screenshots, taken from the instance `make demo` left in dagster_home/ (the demo's
real teachers), not from a test fixture:

  docs/ui_asset_graph.png        Lineage -> "Expand all groups": the six assets with their checks
  docs/ui_teacher_rankings.png   teacher_rankings -> Events: the `ranking` table (LALP/GALP, 95% CI)
  docs/ui_teacher_mix.png        curated_sft_dataset -> Events: the curated set's `teacher_mix`

Run after `make demo`:  make docs-screenshots  (= .venv/bin/python docs/screenshots.py)

It starts a real `dagster dev` on a free loopback port against DAGSTER_HOME (default: the repo's
dagster_home/; LALP_* settings are dropped so the code location uses the demo's defaults), drives
Debian's headless Chromium with Playwright the way tests/test_browser.py does (1556x1000 CSS
viewport at scale 0.9 -> 1400x900 PNGs), and ends the whole `dagster dev` process tree. The server's
log goes to a temporary folder. Playwright's own browser download is never used: install Debian's
`chromium` (or point LALP_SCREENSHOT_CHROMIUM at a Chromium binary).
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
# tests/dagster_dev.py: start `dagster dev`, wait for the code location, end the process tree
sys.path.insert(0, str(REPO / "tests"))
from dagster_dev import ASSETS, CHROMIUM_ARGS, DagsterDev, chromium_path, show_whole_graph

CHROMIUM = chromium_path("LALP_SCREENSHOT_CHROMIUM")


# Scroll a metadata row to the top of its scrolling pane (as far as the pane scrolls), then scroll
# back by whatever part of the row above it is hidden, so the view starts at a whole row.
SCROLL_TO_ROW = """row => {
  row.scrollIntoView({block: 'start'});
  let pane = row.parentElement;
  while (pane && !(pane.scrollHeight > pane.clientHeight && getComputedStyle(pane).overflowY !== 'visible')) {
    pane = pane.parentElement;
  }
  if (!pane) return;
  const top = pane.getBoundingClientRect().top;
  for (const tr of row.closest('table').querySelectorAll('tr')) {
    const r = tr.getBoundingClientRect();
    if (r.top < top && r.bottom > top) { pane.scrollTop -= top - r.top; break; }
  }
}"""


def _wait_text(pg, text: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while text not in pg.inner_text("body"):
        if time.monotonic() > deadline:
            raise SystemExit(f"{text!r} not shown on {pg.url} within {timeout}s")
        pg.wait_for_timeout(500)


def _metadata_row(pg, key: str):
    row = pg.locator("tr").filter(has=pg.locator("td", has_text=re.compile(rf"^\s*{re.escape(key)}\s*$"))).first
    row.wait_for(state="visible")
    return row


def take(base: str, out: Path) -> list[Path]:
    from playwright.sync_api import sync_playwright

    written = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            ctx = browser.new_context(viewport={"width": 1556, "height": 1000}, device_scale_factor=0.9)
            ctx.add_init_script(  # no first-visit community dialog, narrow main navigation
                "window.localStorage.setItem('communityNux', JSON.stringify('1'));"
                "window.localStorage.setItem('dagster-nav-collapsed', 'true');"
            )
            ctx.set_default_timeout(60_000)
            page = ctx.new_page()

            page.goto(f"{base}/asset-groups")
            _wait_text(page, "Global asset lineage")
            _wait_text(page, "selection")
            show_whole_graph(page, len(ASSETS))
            n = page.get_by_text("Asset checks").count()
            if n < len(ASSETS):
                raise SystemExit(f"the graph shows {n} 'Asset checks' rows, expected {len(ASSETS)}")
            written.append(out / "ui_asset_graph.png")
            page.screenshot(path=str(written[-1]))

            page.goto(f"{base}/assets/teacher_rankings?view=events")
            _wait_text(page, "Materialized in run")
            _wait_text(page, "LALP [95% CI]")
            # scroll the pane so the `ranking` table, the verdict and the plot links under the tall
            # `preview` rows are in view, then back a little so no metadata row is cut at the top
            _metadata_row(page, "ranking").evaluate(SCROLL_TO_ROW)
            page.wait_for_timeout(500)
            written.append(out / "ui_teacher_rankings.png")
            page.screenshot(path=str(written[-1]))

            page.goto(f"{base}/assets/curated_sft_dataset?view=events")
            _wait_text(page, "Materialized in run")
            _metadata_row(page, "teacher_mix")
            page.wait_for_timeout(500)
            written.append(out / "ui_teacher_mix.png")
            page.screenshot(path=str(written[-1]))
            ctx.close()
        finally:
            browser.close()
    return written


def main() -> int:
    if not Path(CHROMIUM).exists():
        print(f"no Chromium at {CHROMIUM}: apt-get install chromium (Debian's package)", file=sys.stderr)
        return 1
    home = Path(os.environ.get("DAGSTER_HOME") or REPO / "dagster_home").resolve()
    if not (home / "lalp.duckdb").exists():
        print(f"no warehouse at {home / 'lalp.duckdb'}: run `make demo` first", file=sys.stderr)
        return 1
    env = {k: v for k, v in os.environ.items() if not k.startswith("LALP_")}
    env.update(DAGSTER_HOME=str(home), TOKENIZERS_PARALLELISM="false")
    with tempfile.TemporaryDirectory(prefix="lalp-screenshots-") as tmp:
        dev = DagsterDev(home, env, Path(tmp) / "dagster_dev.log")
        try:
            dev.wait_ready()
            written = take(dev.base, DOCS)
        except BaseException:
            print(dev.log_tail(3000), file=sys.stderr)
            raise
        finally:
            dev.stop()
    for path in written:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
