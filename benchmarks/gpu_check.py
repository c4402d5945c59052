"""The GPU checks for the scoring engine, as one command for a GPU lease (15 minutes of device time):

    python3 -m benchmarks.gpu_check        # writes its logs under $OUT (default /tmp/gpu_check)

Before the lease, on the CPU machine (needs the shared ZeroEval data and the embedded student), write the
inputs a lease can carry: `make gpu-bundle` (= `python -m benchmarks.benchmark --prompts 24
--write-bundle .devbundle`, ~4 MiB: ZeroEval rows plus the student's config and tokenizer), and
name `.devbundle` in the device run's `carry` (it is git-ignored). The
lease's image has torch and transformers; nothing else of ours is imported. The student's weights
(98 MB) cannot travel, so the GPU runs use its architecture with seeded random weights: speed,
MFU and engine == reference do not depend on the weight values.

Steps, each with its own time limit, each log in $OUT:
1. `tests/test_gpu.py`: engine == reference on CUDA in float32 for both attention paths (sparse
   tiles on fused SDPA kernels, dense-mask fallback), chunked long rows, fixed and fraction
   windows, both templates; one device-to-host copy per batch.
2. The benchmark in float32 on CUDA: the GPU's `max_abs_diff`.
3. The benchmark in bf16 (the CUDA default) with `--memory`: speedup, MFU, peak memory at 1k, 8k
   and 32k tokens. Its last line is `speedup=... max_abs_diff=... peak_fraction=... floor_ratio=...`
   (peak_fraction against the GPU's own matmul rate on the student's shapes, measured in the run).
4. The same comparison with vLLM as the peer, in bf16 (`--vs-vllm`: the reference, the engine,
   vLLM per window and merged, interleaved in rounds; the last line gains `vs_vllm=...`). It runs
   in `.venv-vllm/bin/python` where that exists (carry a CUDA build of it, `make setup-vllm` on
   a GPU host installs `vllm`), else in the image's python, which then needs vLLM. Not run in
   this release: no GPU lease was drawn for it, so there is no GPU figure yet.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / ".devbundle"
VLLM_PY = REPO / ".venv-vllm" / "bin" / "python" if (REPO / ".venv-vllm" / "bin" / "python").exists() else Path(sys.executable)

STEPS = [
    ("test_gpu", [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_gpu.py"], 240),
    ("bench_fp32", [sys.executable, "-m", "benchmarks.benchmark", "--bundle", str(BUNDLE), "--random-weights",
                    "--device", "cuda", "--dtype", "float32", "--prompts", "8"], 240),
    ("bench_bf16", [sys.executable, "-m", "benchmarks.benchmark", "--bundle", str(BUNDLE), "--random-weights",
                    "--device", "cuda", "--dtype", "bfloat16", "--prompts", "24", "--memory"], 300),
    ("bench_bf16_vs_vllm", [str(VLLM_PY), "-m", "benchmarks.benchmark", "--bundle", str(BUNDLE), "--random-weights",
                            "--device", "cuda", "--dtype", "bfloat16", "--prompts", "8", "--vs-vllm"], 300),
]


def main() -> int:
    out = Path(os.environ.get("OUT") or "/tmp/gpu_check")
    out.mkdir(parents=True, exist_ok=True)
    if not (BUNDLE / "rows.jsonl").is_file():
        print(f"no bundle at {BUNDLE}: run `make gpu-bundle` on the CPU machine first", file=sys.stderr)
        return 2
    env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    failed = []
    for name, cmd, limit in STEPS:
        t0 = time.perf_counter()
        print(f"== {name}: {' '.join(cmd[1:])}", flush=True)
        with open(out / f"{name}.txt", "w") as log:
            try:
                p = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                for line in p.stdout:
                    if "Loading weights" in line:
                        continue
                    log.write(line)
                    sys.stdout.write(line)
                rc = p.wait(timeout=max(1, limit - (time.perf_counter() - t0)))
            except subprocess.TimeoutExpired:
                p.kill()
                rc = "timeout"
        print(f"== {name}: exit {rc} in {time.perf_counter() - t0:.0f}s", flush=True)
        if rc != 0:
            failed.append(name)
    print("all GPU checks passed" if not failed else f"FAILED: {failed}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
