"""Teacher scoring by a teacher served elsewhere (backend=server): OpenAI-compatible `vllm serve`.

The same primitive as the in-Ray vLLM scorer (rayd/teacher/vllm_scorer.py), over HTTP: each
(prompt_ids, completion_ids) pair is one request to the server's /v1/completions with the token
ids as the prompt (no text round trip), `max_tokens=1`, `temperature=0` and vLLM's extra
`prompt_logprobs=top_k`. The returned per-position dicts ({"<token id>": {"logprob": ...}}) go
through the same `scorer.score_from_prompt_logprobs` as the in-Ray engine's, so both backends
make the same `TeacherScore` from the same numbers. vLLM's server writes -inf log-probs as
-9999.0 (JSON has no infinities): they pass as very unlikely, as they are.

Requests run concurrently (a thread pool over one httpx client: the actor does nothing else while
it waits), pair i goes to URL i mod n, and a request that fails to connect, times out or gets a
5xx is retried on the next URL, at most `retries` times. Then the call fails with one line naming
the URL: never a hang (every request has a deadline) and never a partial signal. A 4xx is the
request's fault (too long, top_k above the server's --max-logprobs), so it is not retried.

`check_servers` runs on the driver before any actor starts: each server answers, serves one
model with a long enough context, tokenizes like the student, knows every student token id and
returns prompt log-probs at top_k.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx

from rayd.config import ConfigError
from rayd.rollout.spec import EngineSpec, ServerSpec
from rayd.teacher.scorer import Pair, TeacherSignalError, score_from_prompt_logprobs
from rayd.types import TeacherScore

# Wait between attempts: a server that restarts or sheds load gets a moment, a dead one costs
# little. Doubles per retry, capped.
_BACKOFF_S, _BACKOFF_MAX_S = 0.5, 5.0


class ServerError(RuntimeError):
    """A request that failed after its retries, or that the server refused."""


class ServerScorer:
    """`TeacherScorer` over teacher servers: no model in this process, only HTTP requests."""

    def __init__(self, spec: EngineSpec) -> None:
        if spec.server is None:
            raise ValueError("teacher.backend=server needs the servers' URLs (EngineSpec.server)")
        self.server: ServerSpec = spec.server
        self.client = _client(self.server.timeout_s, self.server.max_concurrency)
        self.pool = ThreadPoolExecutor(self.server.max_concurrency, "rayd-teacher-http")
        self.retries = 0  # cumulative, every retried request of this actor
        self._lock = threading.Lock()
        # The name each server serves the teacher under (`vllm serve PATH` names it PATH, which
        # differs between machines); every request must carry it.
        self.models = {url: self._served_model(url) for url in self.server.urls}

    def _served_model(self, url: str) -> str:
        try:
            body = self._request(url, "GET", "/v1/models", None)
        except ServerError as exc:
            raise TeacherSignalError(str(exc)) from None
        return served_model(url, body)

    def score(self, pairs: list[Pair], top_k: int) -> list[TeacherScore]:
        if not pairs:
            return []
        futures = [
            self.pool.submit(self._score_one, i, p, c, top_k) for i, (p, c) in enumerate(pairs)
        ]
        try:
            return [f.result() for f in futures]
        except ServerError as exc:
            for f in futures:  # the rest would only be thrown away
                f.cancel()
            raise TeacherSignalError(str(exc)) from None

    def _score_one(
        self, i: int, prompt: list[int], completion: list[int], top_k: int
    ) -> TeacherScore:
        def body(url: str) -> dict[str, Any]:
            return {
                "model": self.models[url],
                "prompt": [*prompt, *completion],
                "max_tokens": 1,
                # The one sampled token is thrown away: greedy costs no random draw.
                "temperature": 0.0,
                "prompt_logprobs": top_k,
            }

        url, answer = self._with_retries(i, "POST", "/v1/completions", body)
        rows = prompt_logprob_rows(url, answer)
        return score_from_prompt_logprobs(
            i, prompt, completion, rows, top_k, source=f"teacher server {url}"
        )

    def _with_retries(
        self, i: int, method: str, path: str, body: Callable[[str], dict[str, Any]]
    ) -> tuple[str, Any]:
        urls = self.server.urls
        last: ServerError | None = None
        for attempt in range(self.server.retries + 1):
            url = urls[(i + attempt) % len(urls)]  # a retry goes to the next server
            if attempt:
                with self._lock:
                    self.retries += 1
                print(
                    f"rayd: teacher server: {last}; retry {attempt}/{self.server.retries} on {url}",
                    file=sys.stderr,
                    flush=True,
                )
                time.sleep(min(_BACKOFF_S * 2 ** (attempt - 1), _BACKOFF_MAX_S))
            try:
                return url, self._request(url, method, path, body(url))
            except _Retryable as exc:
                last = ServerError(str(exc))
        tried = ", ".join(
            dict.fromkeys(urls[(i + a) % len(urls)] for a in range(self.server.retries + 1))
        )
        raise ServerError(
            f"{last} (gave up after {self.server.retries + 1} attempts on {tried}: "
            "is the teacher server running?)"
        )

    def _request(self, url: str, method: str, path: str, body: dict[str, Any] | None) -> Any:
        return request(self.client, url, method, path, body)

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.client.close()


class _Retryable(ServerError):
    """No answer, a timeout, or a 5xx: the next attempt may succeed."""


def _client(timeout_s: float, connections: int) -> httpx.Client:
    # httpx's timeout bounds each phase (connect, each read, write, pool wait): a non-streamed
    # vLLM answer arrives in one piece, so this is the request's deadline in practice.
    return httpx.Client(
        timeout=httpx.Timeout(timeout_s),
        limits=httpx.Limits(max_connections=connections, max_keepalive_connections=connections),
        # Never an HTTP(S)_PROXY from the environment between rayd and its teacher.
        trust_env=False,
    )


def request(
    client: httpx.Client, url: str, method: str, path: str, body: dict[str, Any] | None
) -> Any:
    """The JSON answer of `method url+path`; `_Retryable` for no answer or a 5xx, `ServerError`
    (with the server's own message) for a 4xx."""
    where = f"{url}{path}"
    try:
        answer = client.request(method, where, json=body)
    except httpx.TimeoutException as exc:
        raise _Retryable(
            f"{where}: no answer within {client.timeout.read:.0f}s ({exc.__class__.__name__})"
        ) from None
    except httpx.TransportError as exc:
        raise _Retryable(f"{where}: {exc.__class__.__name__}: {_first_line(exc)}") from None
    if answer.status_code >= 500:
        raise _Retryable(f"{where}: HTTP {answer.status_code}: {_message(answer)}")
    if answer.status_code >= 400:
        raise ServerError(f"{where}: HTTP {answer.status_code}: {_message(answer)}")
    try:
        return answer.json()
    except ValueError:
        raise ServerError(f"{where}: the answer is not JSON ({answer.text[:80]!r})") from None


def served_model(url: str, body: Any) -> str:
    """The one model a server's /v1/models lists (LoRA adapters, which have a parent, aside)."""
    cards = body.get("data") if isinstance(body, dict) else None
    if not isinstance(cards, list):
        raise TeacherSignalError(f"{url}/v1/models: not an OpenAI model list")
    bases = [c for c in cards if isinstance(c, dict) and c.get("id") and not c.get("parent")]
    if len(bases) != 1:
        names = ", ".join(str(c.get("id")) for c in bases) or "none"
        raise TeacherSignalError(
            f"{url}/v1/models: serves {len(bases)} models ({names}); rayd needs one"
        )
    return str(bases[0]["id"])


def prompt_logprob_rows(url: str, answer: Any) -> list[dict[int, float] | None]:
    """The `prompt_logprobs` of a /v1/completions answer as one {token id: log-prob} per prompt
    position (None at position 0, which has no context)."""
    try:
        rows = answer["choices"][0]["prompt_logprobs"]
    except (KeyError, IndexError, TypeError):
        rows = None
    if not isinstance(rows, list):
        raise ServerError(
            f"{url}/v1/completions: the answer has no prompt_logprobs (a vLLM server returns "
            "them; other OpenAI-compatible servers may not)"
        )
    try:
        return [
            None if row is None else {int(tok): float(lp["logprob"]) for tok, lp in row.items()}
            for row in rows
        ]
    except (AttributeError, KeyError, TypeError, ValueError):
        raise ServerError(f"{url}/v1/completions: prompt_logprobs not in vLLM's form") from None


def _message(answer: httpx.Response) -> str:
    """The server's error message: vLLM answers {"error": {"message": ...}} (older: {"message"})."""
    try:
        body = answer.json()
    except ValueError:
        return answer.text.strip()[:200] or answer.reason_phrase
    error = body.get("error", body) if isinstance(body, dict) else body
    message = error.get("message") if isinstance(error, dict) else None
    return _first_line(message or body)[:300]


def _first_line(what: Any) -> str:
    lines = str(what).strip().splitlines()
    return lines[0] if lines else what.__class__.__name__


def _probe_text(tokenizer: Any, limit: int = 256) -> str:
    """Text that exercises the tokenizer across its vocabulary: a fixed sentence and up to
    `limit` tokens spread evenly over the ids (special tokens left out)."""
    special = set(tokenizer.all_special_ids)
    size = len(tokenizer)
    step = max(1, size // limit)
    ids = [i for i in range(0, size, step) if i not in special]
    return "The sum 12 + 34 = 46.\n" + tokenizer.decode(ids, skip_special_tokens=True)


def check_servers(
    urls: Sequence[str], tokenizer: Any, *, top_k: int, max_model_len: int, timeout_s: float
) -> None:
    """Before any actor starts: each server answers, serves one model whose context holds
    `max_model_len`, tokenizes a probe text as `tokenizer` (the student's) does, accepts the
    student's highest token id and returns prompt log-probs at `top_k`. One ConfigError line
    naming the URL and what differed."""
    with _client(min(timeout_s, 30.0), 2) as client:
        for raw in urls:
            url = raw.rstrip("/")

            def fail(what: str, url: str = url) -> ConfigError:
                return ConfigError(f"config error: teacher.urls: {url}: {what}")

            try:
                listing = request(client, url, "GET", "/v1/models", None)
                model = served_model(url, listing)
            except (ServerError, TeacherSignalError) as exc:
                raise fail(f"no usable answer ({str(exc).removeprefix(url)})") from None
            card = next(c for c in listing["data"] if c.get("id") == model)
            served_len = card.get("max_model_len")
            if isinstance(served_len, int) and served_len < max_model_len:
                raise fail(
                    f"serves {model} with max_model_len={served_len}, below "
                    f"teacher.max_model_len={max_model_len}"
                )
            text = _probe_text(tokenizer)
            want = list(tokenizer(text, add_special_tokens=False).input_ids)
            try:
                got = request(
                    client,
                    url,
                    "POST",
                    "/tokenize",
                    {"model": model, "prompt": text, "add_special_tokens": False},
                ).get("tokens")
            except ServerError as exc:
                raise fail(f"cannot check its tokenizer ({exc})") from None
            if got != want:
                at = next(
                    (j for j, (a, b) in enumerate(zip(got or [], want, strict=False)) if a != b),
                    min(len(got or []), len(want)),
                )
                raise fail(
                    f"serves {model}, whose tokenizer differs from the student's (a probe text of "
                    f"{len(want)} student tokens: first difference at token {at}, server "
                    f"{(got or [])[at : at + 3]} vs student {want[at : at + 3]}); token-level "
                    "distillation needs the same tokenizer"
                )
            # The student's highest id must be one the served model scores (a smaller
            # vocabulary is refused by vLLM), and top_k must be within its --max-logprobs.
            probe = {
                "model": model,
                "prompt": [want[0], len(tokenizer) - 1],
                "max_tokens": 1,
                "temperature": 0.0,
                "prompt_logprobs": top_k,
            }
            try:
                rows = prompt_logprob_rows(
                    url, request(client, url, "POST", "/v1/completions", probe)
                )
            except ServerError as exc:
                message = str(exc)
                if "max allowed" in message:
                    message = (
                        f"it returns fewer than teacher.top_k={top_k} prompt log-probs; start it "
                        f"with --max-logprobs {max(20, top_k)} or more ({exc})"
                    )
                elif "vocab" in message.lower():
                    message = (
                        f"serves {model}, whose vocabulary has no id {len(tokenizer) - 1}, the "
                        f"student's last ({exc})"
                    )
                raise fail(message) from None
            widths = {len(row) for row in rows[1:] if row is not None}
            if not widths or min(widths) < top_k:
                raise fail(
                    f"returned {sorted(widths)} prompt log-probs per position for top_k={top_k}"
                )
