"""The one configuration of the pipeline.

`Settings` is the only place that reads the environment and the only place that declares a
default. It is built once at the edge (the code location's entry point,
`lalp_assets/definitions.py`, and the `lalp` command) and passed in:
`build_defs(settings)` makes the resources and the assets' code versions from the same values.
Nothing else reads `LALP_*` variables (tests/test_architecture.py checks it).

Settings that change the data (student, dtype, segmenter, window, template, limits, ...) feed
the assets' code versions, so changing one and reloading the location marks the affected assets
stale in the UI; nothing re-scores until someone materializes (or the schedule runs).
"""

from __future__ import annotations

import re

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

REPO_ROOT = Path(__file__).resolve().parents[1]

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off", "")


def _meta(env: str, doc: str) -> dict:
    return {"env": env, "doc": doc}


@dataclass(frozen=True)
class Settings:
    """Every knob, its `LALP_*` variable and its default (README "Configuration" is checked
    against this class by tests/test_settings.py)."""

    dagster_home: str = field(default=str(REPO_ROOT / "dagster_home"), metadata=_meta(
        "DAGSTER_HOME", "the Dagster instance folder (run history, schedules, sensors)"))
    # -- storage
    warehouse: str = field(default="", metadata=_meta(
        "LALP_WAREHOUSE", "the warehouse: a DuckDB file (default `<DAGSTER_HOME>/lalp.duckdb`), or a DuckLake "
        "catalog `ducklake:postgres:<dsn>` in cluster mode"))
    lake_data_path: str = field(default="", metadata=_meta(
        "LALP_LAKE_DATA_PATH", "cluster mode: the shared folder or object-store prefix for DuckLake's Parquet files"))
    warehouse_lock_timeout_s: float = field(default=120.0, metadata=_meta(
        "LALP_WAREHOUSE_LOCK_TIMEOUT", "seconds to wait for another process's DuckDB write lock"))
    duckdb_memory: str = field(default="1GB", metadata=_meta(
        "LALP_DUCKDB_MEMORY", "DuckDB's memory limit per warehouse connection (its buffer pool; bigger joins and "
        "inserts spill to disk past it); `''` leaves DuckDB's default of 80% of the machine"))
    exports: str = field(default="", metadata=_meta(
        "LALP_EXPORTS", "curated JSONL / Parquet / HF dataset output folder, or an object-store prefix `s3://bucket/prefix` "
        "(default `<DAGSTER_HOME>/exports`)"))
    cache_dir: str = field(default=str(Path.home() / ".cache" / "lalp"), metadata=_meta(
        "LALP_CACHE_DIR", "where a GGUF student, de-quantised once, is kept"))
    # -- sources
    sources: tuple[str, ...] = field(default=("champ",), metadata=_meta(
        "LALP_SOURCES", "comma-separated trace sources (files, folders, Hugging Face dataset folders, object-store "
        "URLs `s3://bucket/prefix`, `champ`)"))
    inbox: str = field(default="", metadata=_meta(
        "LALP_INBOX", "folder or object-store prefix watched by `inbox_sensor` (default `<DAGSTER_HOME>/inbox`)"))
    source_format: str = field(default="auto", metadata=_meta(
        "LALP_FORMAT", "`auto`, `canonical`, `messages`, `sharegpt`, `alpaca`, `zeroeval`, `champ`"))
    teacher_mode: str = field(default="model", metadata=_meta(
        "LALP_TEACHER_MODE", "`model+setting` makes each CHAMP model+prompt setting a teacher"))
    max_prompt_chars: int = field(default=100_000, metadata=_meta(
        "LALP_MAX_PROMPT_CHARS", "longer prompts are quarantined (`prompt_too_long`)"))
    max_response_chars: int = field(default=200_000, metadata=_meta(
        "LALP_MAX_RESPONSE_CHARS", "longer responses are quarantined (`response_too_long`)"))
    max_teacher_chars: int = field(default=256, metadata=_meta(
        "LALP_MAX_TEACHER_CHARS", "longer teacher names are quarantined"))
    max_prompt_id_chars: int = field(default=256, metadata=_meta(
        "LALP_MAX_PROMPT_ID_CHARS", "longer prompt ids are quarantined"))
    max_prompt_tokens: int = field(default=8_192, metadata=_meta(
        "LALP_MAX_PROMPT_TOKENS", "prompts with more student tokens are not scored (recorded in `quarantine`)"))
    max_response_tokens: int = field(default=65_536, metadata=_meta(
        "LALP_MAX_RESPONSE_TOKENS", "responses with more student tokens are not scored (recorded in `quarantine`)"))
    control_tokens: str = field(default="quarantine", metadata=_meta(
        "LALP_CONTROL_TOKENS", "prompts or responses holding the student's control-token strings (`<|im_end|>`, ...): "
        "`quarantine` (not scored, a quarantine row names the token) or `keep` (scored, and exported, as plain text)"))
    inbox_settle_s: float = field(default=0.0, metadata=_meta(
        "LALP_INBOX_SETTLE_S", "a file (object) must also be this many seconds old (beyond two equal sensor ticks) to be read"))
    # -- scoring
    max_prompts: int = field(default=5, metadata=_meta(
        "LALP_MAX_PROMPTS", "prompts sampled for scoring (deterministic by hash); `0` = all"))
    model: str = field(default="smollm2", metadata=_meta(
        "LALP_MODEL", "the student: embedded SmolLM2, a local HF dir, a .gguf, or a hub id"))
    device: str = field(default="auto", metadata=_meta(
        "LALP_DEVICE", "`auto` (CUDA when present), `cpu`, `cuda`, `cuda:N`"))
    dtype: str = field(default="auto", metadata=_meta(
        "LALP_DTYPE", "`auto` (bf16 on CUDA, fp32 on CPU), `float32`, `bfloat16`, `float16`"))
    row_tokens: int = field(default=0, metadata=_meta(
        "LALP_ROW_TOKENS", "engine: tokens per packed row (0: the engine's default for the device)"))
    batch_tokens: int = field(default=0, metadata=_meta(
        "LALP_BATCH_TOKENS", "engine: tokens per forward batch (0: the engine's default for the device)"))
    group_tokens: int = field(default=0, metadata=_meta(
        "LALP_GROUP_TOKENS", "engine: estimated tokens per committed chunk (0: the engine's default)"))
    compile: bool = field(default=False, metadata=_meta(
        "LALP_COMPILE", "engine: `1` compiles the student's decoder layers with `torch.compile` (about 1.2x on "
        "this CPU after a one-off compile per process; worth it for long runs)"))
    cpu_kernels: bool = field(default=True, metadata=_meta(
        "LALP_CPU_KERNELS", "engine on CPU in float32: packed oneDNN GEMMs with the MLP's SiLU and product and the "
        "RMSNorm fused, as vLLM's CPU backend runs them (1.1-1.45x on this CPU; one more copy of the linear weights in "
        "memory); `0` runs the student's modules as transformers does"))
    backend: str = field(default="engine", metadata=_meta(
        "LALP_BACKEND", "who computes the scores, all to the same definition: `engine` (this package's exact engine), "
        "`vllm` (vLLM in-process, its own venv: `make setup-vllm`), or `openai:<base url>` (an OpenAI-compatible "
        "server returning prompt log-probs, such as `vllm serve`); the cache is shared, its keys describe the numbers"))
    vllm_tp: int = field(default=1, metadata=_meta(
        "LALP_VLLM_TP", "backend `vllm`: tensor-parallel GPUs (a scoring pod then asks for this many)"))
    vllm_pp: int = field(default=1, metadata=_meta(
        "LALP_VLLM_PP", "backend `vllm`: pipeline-parallel stages"))
    vllm_gpu_memory: float = field(default=0.9, metadata=_meta(
        "LALP_VLLM_GPU_MEMORY", "backend `vllm`: the share of each GPU's memory vLLM may take"))
    vllm_max_model_len: int = field(default=0, metadata=_meta(
        "LALP_VLLM_MAX_MODEL_LEN", "backend `vllm`: the longest prefix + window in tokens (0: the model's own)"))
    vllm_batch_tokens: int = field(default=2048, metadata=_meta(
        "LALP_VLLM_BATCH_TOKENS", "backend `vllm`: tokens per vLLM step (`max_num_batched_tokens`; bounds the memory "
        "that prompt log-probs take)"))
    vllm_kv_cache_gb: int = field(default=2, metadata=_meta(
        "LALP_VLLM_KV_CACHE_GB", "backend `vllm` on a CPU: GB of KV cache (`VLLM_CPU_KVCACHE_SPACE`)"))
    server_model: str = field(default="", metadata=_meta(
        "LALP_SERVER_MODEL", "backend `openai:`: the model name sent to the server (empty: the one it serves)"))
    server_concurrency: int = field(default=4, metadata=_meta(
        "LALP_SERVER_CONCURRENCY", "backend `openai:`: requests in flight at once"))
    server_timeout_s: float = field(default=300.0, metadata=_meta(
        "LALP_SERVER_TIMEOUT", "backend `openai:`: seconds per request"))
    server_retries: int = field(default=4, metadata=_meta(
        "LALP_SERVER_RETRIES", "backend `openai:`: retries of a failed request (backoff 1, 2, 4, ... s), then the run fails"))
    segmenter: str = field(default="paragraph", metadata=_meta(
        "LALP_SEGMENTER", "`paragraph`, `line`, `sentence`, or `llm`"))
    window: str = field(default="fixed:4", metadata=_meta(
        "LALP_WINDOW", "`fixed:K` or `fraction:R`"))
    template: str = field(default="chat", metadata=_meta(
        "LALP_TEMPLATE", "`chat` (the student's chat template) or `plain` (`prompt + \"\\n\\n\"`)"))
    llm_url: str = field(default="", metadata=_meta(
        "LALP_LLM_URL", "segmenter `llm`: the OpenAI-compatible endpoint"))
    llm_model: str = field(default="", metadata=_meta(
        "LALP_LLM_MODEL", "segmenter `llm`: the model name sent to the endpoint"))
    llm_api_key: str = field(default="", repr=False, metadata=_meta(
        "LALP_LLM_API_KEY", "segmenter `llm`: bearer token (read at run time through `dg.EnvVar`; never shown in the UI)"))
    llm_timeout_s: float = field(default=60.0, metadata=_meta(
        "LALP_LLM_TIMEOUT", "segmenter `llm`: seconds per request"))
    # -- selection
    require_correct: bool = field(default=True, metadata=_meta(
        "LALP_REQUIRE_CORRECT", "only verified-correct answers are eligible where a reference exists"))
    bootstrap: int = field(default=1000, metadata=_meta(
        "LALP_BOOTSTRAP", "bootstrap resamples for the ranking's 95% intervals"))
    families: str = field(default="", metadata=_meta(
        "LALP_FAMILIES", "model families for the same-family warning, `name=regex,...` (case-insensitive), added to "
        "or replacing entries of the built-in table (qwen, llama, smollm, mistral, gemma, phi, deepseek, ...)"))
    # -- scale and automation
    commit_every_s: float = field(default=2.0, metadata=_meta(
        "LALP_COMMIT_EVERY_S", "`step_scores` commits its scored chunks at most this often (seconds): a kill "
        "loses at most this much work besides the chunk in flight, and a DuckDB file is handed to other processes "
        "at least every 2.5 intervals; `0` commits every chunk and hands the file back after each"))
    batch_prompts: int = field(default=2048, metadata=_meta(
        "LALP_BATCH_PROMPTS", "`reasoning_steps` and `step_scores` read, process and commit their scope this many "
        "prompts at a time, so their memory depends on the batch and not on the rows (`0`: all at once); the steps "
        "and scores are the same whatever the batch"))
    host_workers: int = field(default=1, metadata=_meta(
        "LALP_HOST_WORKERS", "planner processes that tokenize `step_scores`' next windows while the scoring process "
        "scores, looks up and commits the ones before (`0`: plan in the scoring process); the scores are the same"))
    progress_every_s: float = field(default=10.0, metadata=_meta(
        "LALP_PROGRESS_EVERY_S", "long stages log their progress (done of total, rate, time left) at most this often (seconds)"))
    shards: int = field(default=1, metadata=_meta(
        "LALP_SHARDS", "scoring partitions per teacher (a stable hash of `prompt_id`); one run per GPU"))
    backfill: str = field(default="single", metadata=_meta(
        "LALP_BACKFILL", "`single`: a backfill is one run (the student loads once); `multi`: one run per partition"))
    k8s_gpu: bool = field(default=False, metadata=_meta(
        "LALP_K8S_GPU", "`1`: each `step_scores` pod requests one GPU (`dagster-k8s/config` tag)"))
    rescore_cron: str = field(default="0 3 * * *", metadata=_meta(
        "LALP_RESCORE_CRON", "when `rescore_schedule` re-scores every teacher"))

    def __post_init__(self) -> None:
        # defaults that depend on another setting: resolved once, here
        home = Path(self.dagster_home)
        for name, default in (("warehouse", home / "lalp.duckdb"), ("exports", home / "exports"), ("inbox", home / "inbox")):
            if not getattr(self, name):
                object.__setattr__(self, name, str(default))
        if self.backfill not in ("single", "multi"):
            raise ValueError(f"LALP_BACKFILL={self.backfill!r}: expected 'single' or 'multi'")
        if self.control_tokens not in ("quarantine", "keep"):
            raise ValueError(f"LALP_CONTROL_TOKENS={self.control_tokens!r}: expected 'quarantine' or 'keep'")
        if not (self.backend in ("engine", "vllm") or self.backend.startswith(("openai:http://", "openai:https://"))):
            raise ValueError(f"LALP_BACKEND={self.backend!r}: expected 'engine', 'vllm' or 'openai:<http(s) base url>'")
        if self.vllm_tp < 1 or self.vllm_pp < 1 or self.server_concurrency < 1:
            raise ValueError("LALP_VLLM_TP, LALP_VLLM_PP and LALP_SERVER_CONCURRENCY: expected 1 or more")
        if self.shards < 1:
            raise ValueError(f"LALP_SHARDS={self.shards}: expected 1 or more")
        if not self.commit_every_s >= 0:
            raise ValueError(f"LALP_COMMIT_EVERY_S={self.commit_every_s}: expected 0 or more seconds")
        if self.duckdb_memory and not re.fullmatch(r"\s*\d+(\.\d+)?\s*(B|[KMGT]i?B)\s*", self.duckdb_memory, re.I):
            raise ValueError(f"LALP_DUCKDB_MEMORY={self.duckdb_memory!r}: expected a size such as 1GB or 512MiB, or '' for DuckDB's default")
        if self.batch_prompts < 0:
            raise ValueError(f"LALP_BATCH_PROMPTS={self.batch_prompts}: expected 0 (all at once) or more prompts")
        if self.host_workers < 0:
            raise ValueError(f"LALP_HOST_WORKERS={self.host_workers}: expected 0 (plan in-process) or more processes")
        if not self.progress_every_s >= 0:
            raise ValueError(f"LALP_PROGRESS_EVERY_S={self.progress_every_s}: expected 0 or more seconds")
        from lalp_resources.diagnostics import parse_families

        parse_families(self.families)  # a bad entry fails here, with the entry named

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides) -> "Settings":
        """Settings from `LALP_*` variables (unset or empty means the default), then `overrides`
        (for example the `lalp` command's flags)."""
        env = os.environ if environ is None else environ
        if env.get("LALP_STEPS_BATCH_PROMPTS"):  # one release's name: say so rather than ignore it
            raise ValueError("LALP_STEPS_BATCH_PROMPTS is now LALP_BATCH_PROMPTS (it bounds step_scores too)")
        values = {}
        for f in dataclasses.fields(cls):
            raw = env.get(f.metadata["env"])
            if raw is None or raw == "":
                continue
            values[f.name] = _parse(f, raw)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def replace(self, **changes) -> "Settings":
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})

    def export_dagster_home(self) -> None:
        """Dagster's own instance loader (and dagster.yaml's `env: DAGSTER_HOME`) reads this
        variable: set it from the settings, at the edge, before the instance opens."""
        os.environ["DAGSTER_HOME"] = self.dagster_home

    @staticmethod
    def export_vllm_env(kv_cache_gb: int, threads: int) -> None:
        """vLLM reads its CPU settings from the environment, once, at import: its engine core
        in-process (no spawned worker, which needs a `__main__` guard in the caller), a bounded KV
        cache, and the threads this process may use (or it takes every core)."""
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(int(kv_cache_gb)))
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
        os.environ.setdefault("OMP_NUM_THREADS", str(threads))

    @staticmethod
    def env_var_set(name: str) -> bool:
        """Whether a variable is set (the LLM API key goes to Dagster as `dg.EnvVar` when it is)."""
        return bool(os.environ.get(name))

    @classmethod
    def documented(cls) -> list[tuple[str, str, str]]:
        """(variable, default, description) for every setting, in declaration order."""
        out = []
        for f in dataclasses.fields(cls):
            out.append((f.metadata["env"], f.default, f.metadata["doc"]))
        return out


# The standard AWS variables an object store (`s3://...` sources, inbox, exports, DuckLake data) is
# reached with. They are read when an object is opened (lalp_resources/objectstore.py) and never
# become `Settings` fields: credentials must not travel in the resource config the UI shows.
OBJECT_STORE_VARIABLES = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                          "AWS_SESSION_TOKEN", "AWS_REGION", "AWS_DEFAULT_REGION")


def object_store_env(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The object-store variables that are set (empty ones left out)."""
    env = os.environ if environ is None else environ
    return {k: env[k] for k in OBJECT_STORE_VARIABLES if env.get(k)}


def _parse(f: dataclasses.Field, raw: str):
    kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    name = f.metadata["env"]
    try:
        if kind == "bool":
            low = raw.strip().lower()
            if low in _TRUE:
                return True
            if low in _FALSE:
                return False
            raise ValueError(f"expected one of {_TRUE + _FALSE[:-1]}")
        if kind == "int":
            return int(raw.replace("_", ""))
        if kind == "float":
            return float(raw)
        if kind.startswith("tuple"):
            return tuple(s.strip() for s in raw.split(",") if s.strip())
        return raw
    except ValueError as e:
        raise ValueError(f"{name}={raw!r}: {e}") from None
