"""The one configuration: parsing, clear errors, overrides, and the README table kept in step
with the settings object."""

from __future__ import annotations

import re

import pytest

from helpers import REPO
from lalp_resources.settings import Settings


def test_defaults_and_derived_paths():
    s = Settings(dagster_home="/h")
    assert s.warehouse == "/h/lalp.duckdb" and s.exports == "/h/exports" and s.inbox == "/h/inbox"
    assert s.max_prompts == 5 and s.window == "fixed:4" and s.shards == 1


def test_from_env_parses_types_and_ignores_empty_values():
    env = {"LALP_MAX_PROMPTS": "0", "LALP_REQUIRE_CORRECT": "no", "LALP_SOURCES": "a.jsonl, b/ ,",
           "LALP_BOOTSTRAP": "", "LALP_LLM_TIMEOUT": "2.5", "DAGSTER_HOME": "/x", "LALP_SHARDS": "8"}
    s = Settings.from_env(env)
    assert s.max_prompts == 0 and s.require_correct is False and s.sources == ("a.jsonl", "b/")
    assert s.bootstrap == 1000 and s.llm_timeout_s == 2.5 and s.warehouse == "/x/lalp.duckdb" and s.shards == 8


def test_flags_override_the_environment():
    s = Settings.from_env({"LALP_MAX_PROMPTS": "9"}, max_prompts=0, window=None)
    assert s.max_prompts == 0 and s.window == "fixed:4"


@pytest.mark.parametrize("env, needle", [
    ({"LALP_MAX_PROMPTS": "many"}, "LALP_MAX_PROMPTS='many'"),
    ({"LALP_REQUIRE_CORRECT": "maybe"}, "LALP_REQUIRE_CORRECT='maybe'"),
    ({"LALP_BACKFILL": "sometimes"}, "LALP_BACKFILL"),
    ({"LALP_SHARDS": "0"}, "LALP_SHARDS"),
])
def test_bad_values_name_the_variable(env, needle):
    with pytest.raises(ValueError, match=re.escape(needle)):
        Settings.from_env(env)


def test_readme_configuration_table_matches_the_settings():
    """Every setting is in the README's table with its default, and the table documents nothing
    that does not exist."""
    text = (REPO / "README.md").read_text()
    section = text.split("## Configuration", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        m = re.match(r"\|\s*`([A-Z0-9_]+)`\s*\|\s*(.*?)\s*\|", line)
        if m:
            rows[m.group(1)] = m.group(2).strip("` ")
    documented = {env: default for env, default, _ in Settings.documented()}
    assert set(rows) == set(documented), f"missing: {set(documented) - set(rows)}; unknown: {set(rows) - set(documented)}"
    for env, default in documented.items():
        if env in ("DAGSTER_HOME", "LALP_CACHE_DIR"):
            continue  # machine-specific absolute paths; the README names them in words
        shown = "(empty)" if default in ("", ()) else ",".join(default) if isinstance(default, tuple) else str(default)
        if isinstance(default, bool):
            shown = "1" if default else "0"
        assert rows[env] in (shown, f"{shown}"), f"{env}: README says {rows[env]!r}, Settings says {shown!r}"
