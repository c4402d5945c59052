"""A real `dagster dev` (webserver + daemon + code server) on a loopback port, for the UI tests
(tests/test_webserver_smoke.py, tests/test_browser.py): start it, wait until the `lalp` code
location has loaded, talk GraphQL to it, end the whole process tree."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

# The graph's assets in order (the browser test and docs/screenshots.py count and visit them).
ASSETS = ["raw_teacher_traces", "reasoning_steps", "step_scores", "response_scores", "teacher_rankings", "curated_sft_dataset"]
# Without the background-networking flags Chromium's own connections are refused on a closed
# network and it can stall; none of them change what the page renders.
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-dev-shm-usage",
]


def chromium_path(env_var: str) -> str:
    """The Chromium binary: `env_var` if set, else `chromium` on PATH, else Debian's path."""
    return os.environ.get(env_var) or shutil.which("chromium") or "/usr/bin/chromium"

WORKSPACE_QUERY = """
query {
  workspaceOrError {
    __typename
    ... on Workspace {
      locationEntries {
        name
        loadStatus
        locationOrLoadError {
          __typename
          ... on RepositoryLocation { repositories { name jobs { name } } }
          ... on PythonError { message }
        }
      }
    }
    ... on PythonError { message }
  }
}
"""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.status, r.read()


def graphql(base: str, query: str, variables: dict | None = None, timeout: float = 60.0) -> dict:
    req = urllib.request.Request(
        f"{base}/graphql",
        data=json.dumps({"query": query, "variables": variables or {}}).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(req, timeout=timeout) as r:
        body = json.loads(r.read())
    assert not body.get("errors"), body["errors"]
    return body["data"]


class DagsterDev:
    """`dagster dev` in its own session, so the whole tree (webserver, daemon, code server, run
    workers) can be ended at once."""

    def __init__(self, home: Path, env: dict, log: Path):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log_path = log
        self._log = open(log, "w")
        self.proc = subprocess.Popen(
            [str(BIN / "dagster"), "dev", "-w", str(REPO / "workspace.yaml"), "-h", "127.0.0.1", "-p", str(self.port)],
            cwd=home, env=env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True,
        )

    def log_tail(self, n: int = 6000) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")[-n:]

    def wait_ready(self, timeout: float = 180.0) -> dict:
        deadline = time.monotonic() + timeout
        info = None
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"dagster dev exited with {self.proc.returncode}:\n{self.log_tail()}"
            try:
                status, body = http_get(f"{self.base}/server_info")
                if status == 200:
                    info = json.loads(body)
                    break
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            time.sleep(1.0)
        assert info is not None, f"no /server_info within {timeout}s:\n{self.log_tail()}"
        # the webserver answers before the code location has loaded
        while time.monotonic() < deadline:
            ws = graphql(self.base, WORKSPACE_QUERY)["workspaceOrError"]
            assert ws["__typename"] == "Workspace", ws
            entry = next((e for e in ws["locationEntries"] if e["name"] == "lalp"), None)
            if entry and entry["loadStatus"] == "LOADED":
                loc = entry["locationOrLoadError"]
                assert loc["__typename"] == "RepositoryLocation", f"code location failed to load: {loc}"
                return {"server_info": info, "location": loc}
            time.sleep(1.0)
        raise AssertionError(f"code location 'lalp' did not load within {timeout}s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # whatever is left of the tree
        except ProcessLookupError:
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        self._log.close()


def show_whole_graph(page, n_assets: int) -> None:
    """Expand the groups, hide the asset tree, zoom in until the nodes show their details and
    centre the graph in the view, the way a person would with the mouse."""
    # groups start collapsed: background menu -> "Expand all groups" (what a user would click)
    svg = page.locator("[class*='svgContainer']").first
    svg.wait_for(state="visible")
    view = svg.locator("xpath=../..").bounding_box()  # the graph's viewport (toolbar on top)
    page.mouse.click(view["x"] + 40, view["y"] + view["height"] - 40, button="right")
    expand = page.get_by_role("menuitem", name="Expand all groups")
    if expand.count():
        expand.click()
    else:
        page.keyboard.press("Escape")
    # hide the asset tree beside the graph, then zoom in until nodes show their details
    page.locator("button:has([aria-label='panel_show_right'])").first.click()
    zoom_in = page.locator("button:has([aria-label='zoom_in'])").first
    for _ in range(12):
        if page.get_by_text("Asset checks").count() >= n_assets:
            break
        zoom_in.click()
        page.wait_for_timeout(300)
    # centre the graph: drag the background by the offset between the groups' box and the view
    page.wait_for_timeout(500)
    view = svg.locator("xpath=../..").bounding_box()  # wider now that the tree is hidden
    top = page.get_by_role("button", name="Materialize all").bounding_box()
    top = top["y"] + top["height"] + 8 if top else view["y"]
    groups = page.locator("foreignObject.group")
    rects = [groups.nth(i).bounding_box() for i in range(groups.count())]
    if rects and all(rects):
        x0, x1 = min(r["x"] for r in rects), max(r["x"] + r["width"] for r in rects)
        y0, y1 = min(r["y"] for r in rects), max(r["y"] + r["height"] for r in rects)
        dx = (view["x"] + view["width"] / 2) - (x0 + x1) / 2
        dy = (top + view["y"] + view["height"]) / 2 - (y0 + y1) / 2
        sx, sy = view["x"] + 40, view["y"] + view["height"] - 40
        page.mouse.move(sx, sy)
        page.mouse.down()
        page.mouse.move(sx + dx, sy + dy, steps=10)
        page.mouse.up()
        page.wait_for_timeout(500)
