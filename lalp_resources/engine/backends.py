"""Other backends for the same scores: vLLM in-process, or an OpenAI-compatible server.

They compute exactly the engine's definition (docs/method.md): the engine's grouping, window
plans, tasks, cache keys and assembly (`ScoringEngine`), with the model's work replaced by
requests that return per-token prompt log-probs. A *request* is the templated prefix followed by
window tokens; every window whose own tokens `ids[:j1]` are a prefix of the request's tokens
reads its scored tokens' log-probs from it (position j's log-prob depends on the prefix and
`ids[:j]` only, so the context is exactly the reference's). Windows that share a start share a
request, as the engine's units do (`merge=True`); `merge=False` sends one request per window,
which is what a plain script around vLLM does (the benchmark's peer).

A window's sums (its score and its head sums) are taken in one place, `engine.head.window_sums`,
the definition the reference uses too.
"""

from __future__ import annotations

import json
import logging
import random
import threading
import time
import urllib.error
import urllib.request
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from lalp_resources.engine.exact import ScoringEngine
from lalp_resources.engine.head import window_sums
from lalp_resources.engine.plan import GALP_STEP
from lalp_resources.engine.types import EngineStats
from lalp_resources.method.tokenization import scored_range, text_ids
from lalp_resources.method.windows import WindowSpec

log = logging.getLogger("lalp.backends")


@dataclass
class Request:
    prompt: int                                   # index into the group's prefixes
    ids: list[int]                                # window tokens after the prefix
    members: list[tuple[int, int, int]] = field(default_factory=list)  # (task, j0, j1): scored ids[j0:j1]


def plan_requests(items, plans, toks, tasks, todo, prompt_index, merge: bool = True) -> list[Request]:
    """Requests for the missing tasks. With `merge`, the windows of a response that share a start
    character (the engine's units) go into as few requests as their tokenizations allow: the
    longest first, then each window joins a request its tokens are a prefix of."""
    groups: dict[tuple[int, int], list[tuple[list[int], int, int, int]]] = defaultdict(list)
    for k in todo:
        t = tasks[k]
        wins, galp_tid = plans[t.item]
        if t.step == GALP_STEP:
            a, tid, lo, hi = 0, galp_tid, 0, len(items[t.item].text)
        else:
            _, a, tid, lo, hi = wins[t.step]
        ids, starts = toks[tid]  # arrays from the engine's window_tokens; requests are lists of ints
        j0, j1 = scored_range(starts, lo - a, hi - a)
        if j1 > j0:
            groups[(t.item, a)].append((np.asarray(ids[:j1]).tolist(), k, j0, j1))
    out: list[Request] = []
    for (n, _), wins in groups.items():
        p = prompt_index[items[n].prompt]
        mine: list[Request] = []
        for ids, k, j0, j1 in sorted(wins, key=lambda w: -len(w[0])):
            host = next((r for r in mine if r.ids[: len(ids)] == ids), None) if merge else None
            if host is None:
                host = Request(p, list(ids))
                mine.append(host)
            host.members.append((k, j0, j1))
        out += mine
    return out


class RequestScoringEngine(ScoringEngine):
    """The engine's planning and assembly; requests instead of the engine's forward passes.
    Subclasses implement `_logprobs(requests, prefixes)` -> per request, the log-probs of its ids."""

    def __init__(self, tokenizer, *, template: str = "chat", window: str | WindowSpec = "fixed:4", namespace: str = "",
                 cache=None, galp: bool = True, group_tokens: int | None = None, merge: bool = True,
                 max_context: int | None = None, host_workers: int = 0):
        self._init_definition(None, tokenizer, template, window, namespace, cache, galp, host_workers)
        self.merge = merge
        self.max_context = max_context
        self.group_tokens = group_tokens or 16384
        self.attention = "requests"
        self.stats = EngineStats(attention=self.attention)

    def _build_units(self, items, plans, toks, tasks, todo, prompt_index):
        return plan_requests(items, plans, toks, tasks, todo, prompt_index, merge=self.merge)

    def _run(self, requests: list[Request], prefixes, totals) -> None:
        """Each task is one window of one request (logprobs[j]: log p(ids[j] | prefix, ids[:j]));
        its scored tokens ids[j0:j1] give totals[:, task] = (sum, count, head1, head2)."""
        t0 = time.perf_counter()
        results = self._logprobs(requests, prefixes)
        for r, lps in zip(requests, results):
            for k, j0, j1 in r.members:
                s, c, h1, h2 = window_sums(lps[j0:j1])
                totals[:, k] = (s, c, h1 or 0.0, h2 or 0.0)
            self.stats.forward_calls += 1
            self.stats.tokens_forwarded += len(r.ids)
            self.stats.prefix_tokens += len(prefixes[r.prompt])
            self.stats.scored_tokens += sum(j1 - j0 for _, j0, j1 in r.members)
        self.stats.batches += 1
        self._model_seconds += time.perf_counter() - t0

    def _logprobs(self, requests: list[Request], prefixes) -> list[np.ndarray]:
        raise NotImplementedError


def _from_prompt_logprobs(entries, full: list[int], n_prefix: int) -> np.ndarray:
    """The window tokens' log-probs out of vLLM's prompt_logprobs (one entry per prompt token, the
    first None; each maps token id -> log-prob, the prompt's own token always among them)."""
    out = np.empty(len(full) - n_prefix, dtype=np.float64)
    for j in range(len(out)):
        e = entries[n_prefix + j]
        tok = full[n_prefix + j]
        v = e.get(tok, e.get(str(tok))) if e is not None else None
        if v is None:
            raise RuntimeError(f"the backend returned no log-prob for prompt token {tok} at position {n_prefix + j}")
        out[j] = v if isinstance(v, float) else (v["logprob"] if isinstance(v, dict) else v.logprob)
    return out


# --- vLLM in-process ----------------------------------------------------------------------


def vllm_llm(path: str, *, dtype: str, tp: int = 1, pp: int = 1, gpu_memory: float = 0.9, max_model_len: int = 0,
             batch_tokens: int = 2048, seed: int = 0):
    """A vLLM `LLM` for scoring: prefix caching off (prompt log-probs skip reading it, and with it
    on they have been seen to change with request order), at most `batch_tokens` tokens per step
    (prompt log-probs hold a vocabulary row per token of the step)."""
    from vllm import LLM

    kw = dict(model=path, tokenizer=path, dtype=dtype, tensor_parallel_size=tp, pipeline_parallel_size=pp,
              gpu_memory_utilization=gpu_memory, enable_prefix_caching=False, max_num_batched_tokens=batch_tokens,
              enable_chunked_prefill=True, seed=seed, max_logprobs=1)
    if max_model_len:
        kw["max_model_len"] = max_model_len
    return LLM(**kw)


class VLLMScoringEngine(RequestScoringEngine):
    """Scores through an in-process vLLM `LLM` (`vllm_llm`), one `generate` call per group with
    `TokensPrompt`s and `prompt_logprobs=0`."""

    def __init__(self, llm, tokenizer, **kw):
        super().__init__(tokenizer, **kw)
        self.llm = llm
        self.attention = self.stats.attention = "vllm"

    def _logprobs(self, requests, prefixes):
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0, detokenize=False)
        fulls = [prefixes[r.prompt] + r.ids for r in requests]
        limit = self.max_context
        for f in fulls:
            if limit and len(f) > limit:
                raise ValueError(f"a window of {len(f)} tokens (prefix included) is longer than vLLM's max_model_len "
                                 f"{limit}: raise LALP_VLLM_MAX_MODEL_LEN or use a smaller window")
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=f) for f in fulls], params, use_tqdm=False)
        return [_from_prompt_logprobs(o.prompt_logprobs, f, len(prefixes[r.prompt]))
                for o, f, r in zip(outs, fulls, requests)]


# --- an OpenAI-compatible server ----------------------------------------------------------


class ServerError(RuntimeError):
    """The scoring server failed a request after every retry, or is not serving the student."""


class OpenAIScoringEngine(RequestScoringEngine):
    """Scores through `/v1/completions` with token-id prompts and `prompt_logprobs` (vLLM's
    OpenAI-compatible server). At most `concurrency` requests are in flight; a failed request is
    retried `retries` times with backoff (1, 2, 4, ... s, jittered), then the group fails with
    `ServerError` and nothing of it is committed. Before the first request, the server's tokenizer
    is compared with the student's on a probe string (`check_server`)."""

    # plain text (no control-token strings: a server reads those as control tokens, the student as text)
    PROBE = "LALP probe: 12 + 30 = 42; naïve café, 東京\n\n- step 1: x² ≥ 0, so\tthe   answer is \\boxed{7}."

    def __init__(self, base_url: str, tokenizer, *, model: str = "", concurrency: int = 4, timeout_s: float = 300.0,
                 retries: int = 4, **kw):
        super().__init__(tokenizer, **kw)
        self.base_url = base_url.rstrip("/")
        if self.base_url.endswith("/v1"):
            self.base_url = self.base_url[:-3]
        self.model_name = model
        self.concurrency = concurrency
        self.timeout_s = timeout_s
        self.retries = retries
        self.attention = self.stats.attention = "openai"
        self._checked = False
        self._lock = threading.Lock()

    def _post(self, path: str, body: dict, retries: int | None = None) -> dict:
        retries = self.retries if retries is None else retries
        data = json.dumps(body).encode()
        last = None
        for attempt in range(retries + 1):
            if attempt:
                time.sleep(min(30.0, 2.0 ** (attempt - 1)) * (0.75 + 0.5 * random.random()))
            req = urllib.request.Request(self.base_url + path, data=data, headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                    return json.loads(resp.read())
            except urllib.error.HTTPError as e:
                detail = e.read().decode(errors="replace")[:500]
                if e.code < 500 and e.code != 429:  # the request itself is wrong: retrying will not help
                    raise ServerError(f"{self.base_url}{path}: HTTP {e.code}: {detail}") from None
                last = f"HTTP {e.code}: {detail}"
            except (urllib.error.URLError, OSError, ValueError) as e:
                last = f"{type(e).__name__}: {getattr(e, 'reason', e)}"
            log.warning("%s%s failed (%s); attempt %d of %d", self.base_url, path, last, attempt + 1, retries + 1)
        raise ServerError(f"the scoring server {self.base_url} failed {path} {retries + 1} times; last: {last}. "
                          "Chunks committed before stay; rerun when the server is back and they are read from the cache")

    def _get(self, path: str) -> dict:
        try:
            with urllib.request.urlopen(self.base_url + path, timeout=self.timeout_s) as resp:
                return json.loads(resp.read())
        except (urllib.error.URLError, OSError, ValueError) as e:
            raise ServerError(f"the scoring server {self.base_url} cannot be reached ({path}): {e}") from None

    def check_server(self) -> None:
        """The model name (the one served when none was given), then the probe string's token ids
        by the server's /tokenize and by the student's tokenizer: they must match."""
        served = [m.get("id") for m in self._get("/v1/models").get("data", [])]
        if not self.model_name:
            if len(served) != 1:
                raise ServerError(f"{self.base_url} serves {served}: set LALP_SERVER_MODEL to one of them")
            self.model_name = served[0]
        elif self.model_name not in served:
            raise ServerError(f"{self.base_url} does not serve {self.model_name!r} (it serves {served})")
        mine = list(text_ids(self.tokenizer, self.PROBE))
        theirs = self._post("/tokenize", {"model": self.model_name, "prompt": self.PROBE, "add_special_tokens": False},
                            retries=1).get("tokens")
        if theirs != mine:
            raise ServerError(
                f"the server's model {self.model_name!r} tokenizes differently from the student (LALP_MODEL): the probe "
                f"string gives {theirs[:12] if theirs else theirs}... there and {mine[:12]}... here. Scores would not "
                "be the student's: serve the same model, or point LALP_MODEL at the served one")
        self._checked = True

    def _one(self, full: list[int], n_prefix: int) -> np.ndarray:
        body = {"model": self.model_name, "prompt": full, "max_tokens": 1, "temperature": 0.0,
                "prompt_logprobs": 0, "logprobs": None}
        res = self._post("/v1/completions", body)
        entries = res["choices"][0].get("prompt_logprobs")
        if entries is None:
            raise ServerError(f"{self.base_url} returned no prompt_logprobs: it must be an OpenAI-compatible vLLM server")
        return _from_prompt_logprobs(entries, full, n_prefix)

    def _logprobs(self, requests, prefixes):
        if not self._checked:
            self.check_server()
        fulls = [(prefixes[r.prompt] + r.ids, len(prefixes[r.prompt])) for r in requests]
        with ThreadPoolExecutor(self.concurrency) as pool:  # its queue bounds what is in flight
            futures = [pool.submit(self._one, f, n) for f, n in fulls]
            try:
                return [f.result() for f in futures]
            except BaseException:
                for f in futures:
                    f.cancel()
                raise


__all__: Sequence[str] = ("OpenAIScoringEngine", "Request", "ServerError", "VLLMScoringEngine",
                          "plan_requests", "vllm_llm")
