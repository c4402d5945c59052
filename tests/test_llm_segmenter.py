"""LLMSegmenter against a real OpenAI-compatible HTTP server on loopback (no mocks of urllib).

The server picks its scripted behaviour from the request's ``model`` field, records every
request, and answers like ``/v1/chat/completions``.
"""

from __future__ import annotations

import json
import logging
import re
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from lalp_resources.method.segmentation import check_tiling, segment, segment_sentence
from lalp_resources.llm_segmenter import PROMPT_VERSION, LLMSegmenter, build_user_prompt

TEXT = (
    "\n  We need the sum of the roots of $x^2 - 5x + 6 = 0$. "
    "By Vieta's formulas, e.g. for a monic quadratic, the sum is $-b/a$.\n\n"
    "Here $a = 1$ and $b = -5$. So the sum is 5. "
    "Let us check by factoring. We get $(x-2)(x-3) = 0$, so the roots are 2 and 3.\n\n"
    "Indeed $2 + 3 = 5$. The answer is $\\boxed{5}$."
)

_LINE_RE = re.compile(r"^\[(\d+)\] (.*)$", re.MULTILINE)


def _numbered(req: dict) -> list[tuple[int, str]]:
    user = req["messages"][-1]["content"]
    return [(int(i), s) for i, s in _LINE_RE.findall(user)]


def _pairs(items: list) -> list[list]:
    return [items[i : i + 2] for i in range(0, len(items), 2)]


class _Handler(BaseHTTPRequestHandler):
    server: "_Server"

    def log_message(self, *args):  # keep test output quiet
        pass

    def _reply(self, status: int, payload: bytes, content_type: str = "application/json"):
        try:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
        except (BrokenPipeError, ConnectionResetError):  # client gave up (timeout test)
            pass

    def _chat(self, content: str):
        body = {
            "id": "chatcmpl-test",
            "object": "chat.completion",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
        }
        self._reply(200, json.dumps(body).encode())

    def do_POST(self):
        raw = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        req = json.loads(raw)
        with self.server.lock:
            self.server.requests.append(
                {"path": self.path, "headers": dict(self.headers.items()), "body": req, "raw": raw.decode()}
            )
            n_calls = sum(1 for r in self.server.requests if r["body"]["model"] == req["model"])
        numbered = _numbered(req)
        idx = [i for i, _ in numbered]
        model = req["model"]
        if model in ("good-indices", "chunked"):
            self._chat(json.dumps({"steps": _pairs(idx)}))
        elif model == "good-texts":
            groups = [" ".join(s for _, s in pair) for pair in _pairs(numbered)]
            self._chat(json.dumps({"steps": groups}))
        elif model == "fenced":
            steps = json.dumps({"steps": [idx[:3], idx[3:]]}, indent=2)
            self._chat(f"<think>Group them {{maybe}}.</think>Sure! Here is the grouping:\n```json\n{steps}\n```\nDone.")
        elif model == "one-based":
            self._chat(json.dumps({"steps": [[i + 1 for i in g] for g in _pairs(idx)]}))
        elif model == "garbage":
            self._chat("I think the solution has several steps, roughly three of them.")
        elif model == "non-contiguous":
            self._chat(json.dumps({"steps": [[idx[0], idx[2]], [idx[1]], idx[3:]]}))
        elif model == "incomplete":
            self._chat(json.dumps({"steps": [idx[:2], idx[3:]]}))
        elif model == "bad-texts":
            groups = [" ".join(s for _, s in pair).replace("sum", "total") for pair in _pairs(numbered)]
            self._chat(json.dumps({"steps": groups}))
        elif model == "http500":
            self._reply(500, b'{"error": "boom"}')
        elif model == "http400":
            self._reply(400, b'{"error": "bad request"}')
        elif model == "flaky":
            if n_calls == 1:
                self._reply(503, b'{"error": "warming up"}')
            else:
                self._chat(json.dumps({"steps": _pairs(idx)}))
        elif model == "slow":
            time.sleep(1.5)
            self._chat(json.dumps({"steps": _pairs(idx)}))
        elif model == "no-content":
            self._reply(200, json.dumps({"choices": [{"message": {"role": "assistant", "content": None}}]}).encode())
        else:
            self._reply(404, b'{"error": "unknown model"}')


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.requests: list[dict] = []
        self.lock = threading.Lock()

    def calls(self, model: str) -> list[dict]:
        with self.lock:
            return [r for r in self.requests if r["body"]["model"] == model]


@pytest.fixture(scope="module")
def server():
    srv = _Server()
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()
        thread.join(timeout=5)


def _seg(server, model, **kw) -> LLMSegmenter:
    host, port = server.server_address[:2]
    kw.setdefault("timeout", 5.0)
    kw.setdefault("retry_backoff", 0.0)
    return LLMSegmenter(f"http://{host}:{port}/v1/", model, **kw)


@pytest.fixture
def sentences():
    return segment_sentence(TEXT)


def _expected_pairs(sentence_spans):
    return [(p[0][0], p[-1][1]) for p in _pairs(sentence_spans)]


def _fallback_logged(caplog, reason):
    return any(
        r.name == "lalp.segmentation" and r.levelno == logging.WARNING and reason in r.getMessage()
        for r in caplog.records
    )


# ------------------------------------------------------------------------------------------


def test_sentences_of_fixture_text(sentences):
    # The fixture text needs enough sentences for the groupings below to be meaningful.
    assert len(sentences) >= 7
    assert TEXT[sentences[0][0] : sentences[0][1]].startswith("\n  We need")


def test_good_index_reply(server, sentences, caplog):
    caplog.set_level(logging.INFO, logger="lalp.segmentation")
    seg = _seg(server, "good-indices", api_key="sk-test-123", temperature=0.0)
    spans, reason = seg.segment(TEXT)
    assert reason is None
    check_tiling(TEXT, spans)
    assert spans == _expected_pairs(sentences)
    assert not _fallback_logged(caplog, "")

    (call,) = server.calls("good-indices")
    assert call["path"] == "/v1/chat/completions"
    assert call["headers"]["Authorization"] == "Bearer sk-test-123"
    body = call["body"]
    assert body["model"] == "good-indices"
    assert body["temperature"] == 0.0
    assert [m["role"] for m in body["messages"]] == ["system", "user"]
    user = body["messages"][-1]["content"]
    assert "[0] We need the sum of the roots of $x^2 - 5x + 6 = 0$." in user
    assert "[1] By Vieta's formulas, e.g. for a monic quadratic, the sum is $-b/a$." in user
    last = len(sentences) - 1
    assert f"[{last}] The answer is $\\boxed{{5}}$." in user
    assert f"from 0 to {last}" in user
    assert '"steps"' in user
    assert user == build_user_prompt([TEXT[s:e] for s, e in sentences])
    assert "good-indices" in call["raw"]


def test_dispatch_through_segment(server, sentences):
    seg = _seg(server, "good-indices")
    assert segment(TEXT, "llm", llm=seg) == _expected_pairs(sentences)


def test_good_text_reply(server, sentences):
    spans, reason = _seg(server, "good-texts").segment(TEXT)
    assert reason is None
    check_tiling(TEXT, spans)
    assert spans == _expected_pairs(sentences)
    assert "".join(TEXT[s:e] for s, e in spans) == TEXT


def test_fenced_json_reply(server, sentences):
    spans, reason = _seg(server, "fenced").segment(TEXT)
    assert reason is None
    check_tiling(TEXT, spans)
    assert spans == [(0, sentences[2][1]), (sentences[3][0], len(TEXT))]


def test_one_based_reply_is_shifted(server, sentences):
    spans, reason = _seg(server, "one-based").segment(TEXT)
    assert reason is None
    assert spans == _expected_pairs(sentences)


def test_chunked_requests(server, sentences):
    seg = _seg(server, "chunked", max_sentences=3)
    spans, reason = seg.segment(TEXT)
    assert reason is None
    check_tiling(TEXT, spans)
    calls = server.calls("chunked")
    assert len(calls) == -(-len(sentences) // 3)
    # Indices are global: the second chunk starts at [3].
    assert "[3] " in calls[1]["body"]["messages"][-1]["content"]
    assert "from 3 to 5" in calls[1]["body"]["messages"][-1]["content"]
    # Steps never cross a chunk edge.
    edges = {sentences[i][0] for i in range(0, len(sentences), 3)}
    starts = {s for s, _ in spans}
    assert edges <= starts


@pytest.mark.parametrize(
    "model, reason",
    [
        ("garbage", "reply not JSON"),
        ("non-contiguous", "groups not contiguous/complete"),
        ("incomplete", "groups not contiguous/complete"),
        ("bad-texts", "groups do not map to text"),
        ("no-content", "reply has no content"),
    ],
)
def test_unusable_reply_falls_back(server, sentences, caplog, model, reason):
    caplog.set_level(logging.WARNING, logger="lalp.segmentation")
    spans, got = _seg(server, model).segment(TEXT)
    assert got == reason
    assert spans == sentences
    check_tiling(TEXT, spans)
    assert _fallback_logged(caplog, reason)


def test_http_500_retries_then_falls_back(server, sentences, caplog):
    caplog.set_level(logging.WARNING, logger="lalp.segmentation")
    spans, reason = _seg(server, "http500", max_retries=2).segment(TEXT)
    assert reason == "http error 500"
    assert spans == sentences
    assert len(server.calls("http500")) == 3  # first try + 2 retries
    assert _fallback_logged(caplog, "http error 500")


def test_http_400_is_not_retried(server, sentences):
    spans, reason = _seg(server, "http400", max_retries=2).segment(TEXT)
    assert reason == "http error 400"
    assert spans == sentences
    assert len(server.calls("http400")) == 1


def test_transient_error_is_retried(server, sentences):
    spans, reason = _seg(server, "flaky", max_retries=1).segment(TEXT)
    assert reason is None
    assert spans == _expected_pairs(sentences)
    assert len(server.calls("flaky")) == 2


def test_slow_reply_times_out(server, sentences, caplog):
    caplog.set_level(logging.WARNING, logger="lalp.segmentation")
    t0 = time.perf_counter()
    spans, reason = _seg(server, "slow", timeout=0.3, max_retries=0).segment(TEXT)
    assert time.perf_counter() - t0 < 1.4
    assert reason == "timeout"
    assert spans == sentences
    assert _fallback_logged(caplog, "timeout")


def test_connection_refused_falls_back(sentences, caplog):
    caplog.set_level(logging.WARNING, logger="lalp.segmentation")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    seg = LLMSegmenter(f"http://127.0.0.1:{port}/v1", "nobody", timeout=1.0, max_retries=0)
    spans, reason = seg.segment(TEXT)
    assert reason is not None and reason.startswith("connection error")
    assert spans == sentences
    assert _fallback_logged(caplog, "connection error")


def test_single_sentence_needs_no_request(server):
    spans, reason = _seg(server, "never-called").segment("  Just one sentence here.  ")
    assert (spans, reason) == ([(0, 27)], None)
    assert server.calls("never-called") == []


def test_empty_text_raises(server):
    with pytest.raises(ValueError, match="empty"):
        _seg(server, "good-indices").segment("   ")


def test_version_and_repr_hide_key(server):
    seg = _seg(server, "m1", api_key="sk-secret")
    assert seg.version.startswith("llm@") and PROMPT_VERSION in seg.version and "m1" in seg.version
    assert "sk-secret" not in repr(seg)
    assert seg.url.endswith("/v1/chat/completions") and "//chat" not in seg.url


def test_engine_equals_reference_on_llm_steps(server, tiny_model, smol_tokenizer):
    """The engine is exact on steps from the LLM segmenter too (real loopback endpoint)."""
    from lalp_resources.engine import ScoreItem, ScoringEngine
    from lalp_resources.reference import reference_score

    spans, reason = _seg(server, "good-indices").segment(TEXT)
    assert reason is None and len(spans) > 1
    item = ScoreItem("llm", "Solve it.", TEXT, spans)
    out = ScoringEngine(tiny_model, smol_tokenizer, window="fixed:2").score_all([item])
    ref = reference_score(tiny_model, smol_tokenizer, item.prompt, TEXT, spans, "fixed:2", "chat")
    for s, rs, rc in zip(sorted(out.steps, key=lambda s: s.step_index), ref.step_sums, ref.step_counts):
        assert s.n_tokens == rc and abs(s.mean_logprob - rs / rc) < 1e-4
