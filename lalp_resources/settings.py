"""Pipeline settings, read from `LALP_*` environment variables when the code location loads.

Settings that change the data (student, dtype, segmenter, window, template) feed the assets'
code versions, so changing one and reloading the location marks the affected assets stale in
the UI; nothing re-scores until someone materializes (or the schedule runs).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def dagster_home() -> Path:
    return Path(os.environ.get("DAGSTER_HOME") or REPO_ROOT / "dagster_home")


def _env(name: str, default: str) -> str:
    v = os.environ.get(name)
    return v if v not in (None, "") else default


@dataclass(frozen=True)
class Settings:
    warehouse: str = field(default_factory=lambda: _env("LALP_WAREHOUSE", str(dagster_home() / "lalp.duckdb")))
    warehouse_lock_timeout_s: float = field(default_factory=lambda: float(_env("LALP_WAREHOUSE_LOCK_TIMEOUT", "120")))
    sources: tuple[str, ...] = field(default_factory=lambda: tuple(s.strip() for s in _env("LALP_SOURCES", "champ").split(",") if s.strip()))
    source_format: str = field(default_factory=lambda: _env("LALP_FORMAT", "auto"))
    teacher_mode: str = field(default_factory=lambda: _env("LALP_TEACHER_MODE", "model"))
    inbox: str = field(default_factory=lambda: _env("LALP_INBOX", str(dagster_home() / "inbox")))
    max_response_chars: int = field(default_factory=lambda: int(_env("LALP_MAX_RESPONSE_CHARS", "200000")))
    max_prompts: int = field(default_factory=lambda: int(_env("LALP_MAX_PROMPTS", "5")))
    model: str = field(default_factory=lambda: _env("LALP_MODEL", "smollm2"))
    device: str = field(default_factory=lambda: _env("LALP_DEVICE", "auto"))
    dtype: str = field(default_factory=lambda: _env("LALP_DTYPE", "auto"))
    group_tokens: int = field(default_factory=lambda: int(_env("LALP_GROUP_TOKENS", "0")))
    segmenter: str = field(default_factory=lambda: _env("LALP_SEGMENTER", "paragraph"))
    window: str = field(default_factory=lambda: _env("LALP_WINDOW", "fixed:4"))
    template: str = field(default_factory=lambda: _env("LALP_TEMPLATE", "chat"))
    llm_url: str = field(default_factory=lambda: _env("LALP_LLM_URL", ""))
    llm_model: str = field(default_factory=lambda: _env("LALP_LLM_MODEL", ""))
    require_correct: bool = field(default_factory=lambda: _env("LALP_REQUIRE_CORRECT", "1") not in ("0", "false", "no"))
    bootstrap: int = field(default_factory=lambda: int(_env("LALP_BOOTSTRAP", "1000")))
    exports: str = field(default_factory=lambda: _env("LALP_EXPORTS", str(dagster_home() / "exports")))
    staging_dir: str = field(default_factory=lambda: _env("LALP_STAGING_DIR", ""))
    rescore_cron: str = field(default_factory=lambda: _env("LALP_RESCORE_CRON", "0 3 * * *"))

    def as_dict(self) -> dict:
        return asdict(self)
