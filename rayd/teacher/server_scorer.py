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

A server is not trusted (docs/reliability.md, "Served teachers"). Every answer is checked before
it becomes a score, as strictly as the in-Ray teacher's: the structure vLLM gives it, one row
per prompt position, each token id a canonical integer in [0, vocab size) of the teacher, each
log-prob a finite number at or below zero. Up to LOGPROB_TOLERANCE above zero is float rounding
(an fp16 server's log-softmax) and is read as 0; -9999.0 (vLLM's -inf) passes. Anything else
fails the step with one line naming the URL and what was wrong, and is never retried: it is the
answer's fault, not the connection's. The served model's name must be teacher.served_model (or,
by default, what the run recorded at its first start: `record_or_check_served_model`).
`request_timeout_s` bounds the whole request (connect, send, every byte of the answer: each
socket read is given what is left of the deadline, so a server that drips bytes fails at it),
and an answer larger than teacher.max_response_mb is cut off and refused. An API key
(teacher.api_key_env) goes as `Authorization: Bearer`; https:// verifies against the system's
CAs or teacher.ca_bundle. No line names a credential: the config refuses URLs with userinfo.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import re
import ssl
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpcore
import httpx

from rayd.config import ConfigError
from rayd.rollout.spec import EngineSpec, ServerSpec, read_api_key
from rayd.staging import write_atomic
from rayd.teacher.scorer import Pair, TeacherSignalError, score_from_prompt_logprobs
from rayd.types import TeacherScore

# Wait between attempts: a server that restarts or sheds load gets a moment, a dead one costs
# little. Doubles per retry, capped.
_BACKOFF_S, _BACKOFF_MAX_S = 0.5, 5.0
# How far above zero a log-prob may be and still be read (as 0): float rounding, no more.
LOGPROB_TOLERANCE = 1e-4
_DEFAULT_MAX_BYTES = 64 << 20  # check_servers' answers are small: a bound for a hand-built call
RECORD_FILE = "served_teacher.json"  # in the run folder: the served model names at first start
_TOKEN_ID = re.compile(r"0|[1-9][0-9]*")  # a JSON key that is a token id, written canonically


class ServerError(RuntimeError):
    """A request that failed after its retries, or that the server refused."""


class ServerScorer:
    """`TeacherScorer` over teacher servers: no model in this process, only HTTP requests."""

    def __init__(self, spec: EngineSpec) -> None:
        if spec.server is None:
            raise ValueError("teacher.backend=server needs the servers' URLs (EngineSpec.server)")
        self.server: ServerSpec = spec.server
        if self.server.vocab_size is not None:
            self.vocab_size = int(self.server.vocab_size)
        else:  # the local copy of the teacher's config, as TeacherWorker's own check reads it
            from transformers import AutoConfig

            self.vocab_size = int(AutoConfig.from_pretrained(spec.model_path).vocab_size)
        self.client = _client(
            self.server.timeout_s,
            self.server.max_concurrency,
            api_key=self.server.api_key,
            ca_bundle=self.server.ca_bundle,
        )
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
        name = served_model(url, body)
        want = self.server.served_model
        if want is not None and name != want:
            raise TeacherSignalError(
                f"teacher server {url}/v1/models: serves {name!r}, not "
                f"teacher.served_model={want!r}"
            )
        return name

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
        try:
            rows = prompt_logprob_rows(
                url, answer, vocab_size=self.vocab_size, positions=len(prompt) + len(completion)
            )
        except ServerError as exc:  # never retried, never scored: the answer itself is wrong
            raise ServerError(f"teacher server {exc} (pair {i}: answer refused)") from None
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
        return request(
            self.client,
            url,
            method,
            path,
            body,
            timeout_s=self.server.timeout_s,
            max_bytes=self.server.max_response_bytes,
        )

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.client.close()


class _Retryable(ServerError):
    """No answer, a timeout, or a 5xx: the next attempt may succeed."""


# The whole-request deadline. httpx's timeout bounds each phase (connect, each read, each
# write), so a server that sends a byte now and then holds a request for ever. Each socket
# operation of a request is given instead what is left of that request's deadline, set per
# thread by `request` (sync httpx does a request's I/O in the calling thread): a dripping
# answer fails at the deadline, and so does a connect, a TLS handshake or a header that is slow.
_deadline = threading.local()


@contextmanager
def _deadline_at(when: float) -> Iterator[None]:
    _deadline.at = when
    try:
        yield
    finally:
        _deadline.at = None


def _left(timeout: float | None, error: type[Exception]) -> float | None:
    """`timeout` cut to what is left of this thread's deadline (`error` once none is left)."""
    at = getattr(_deadline, "at", None)
    if at is None:
        return timeout
    left = at - time.monotonic()
    if left <= 0:
        raise error("the request's deadline passed")
    return left if timeout is None else min(timeout, left)


class _DeadlineStream(httpcore.NetworkStream):
    def __init__(self, inner: httpcore.NetworkStream) -> None:
        self._inner = inner

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._inner.read(max_bytes, _left(timeout, httpcore.ReadTimeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._inner.write(buffer, _left(timeout, httpcore.WriteTimeout))

    def close(self) -> None:
        self._inner.close()

    def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> httpcore.NetworkStream:
        inner = self._inner.start_tls(
            ssl_context, server_hostname, _left(timeout, httpcore.ConnectTimeout)
        )
        return _DeadlineStream(inner)

    def get_extra_info(self, info: str) -> Any:
        return self._inner.get_extra_info(info)


class _DeadlineBackend(httpcore.NetworkBackend):
    def __init__(self) -> None:
        self._inner = httpcore.SyncBackend()

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Any = None,
    ) -> httpcore.NetworkStream:
        stream = self._inner.connect_tcp(
            host, port, _left(timeout, httpcore.ConnectTimeout), local_address, socket_options
        )
        return _DeadlineStream(stream)

    def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Any = None
    ) -> httpcore.NetworkStream:
        stream = self._inner.connect_unix_socket(
            path, _left(timeout, httpcore.ConnectTimeout), socket_options
        )
        return _DeadlineStream(stream)

    def sleep(self, seconds: float) -> None:
        self._inner.sleep(seconds)


def _ssl_context(ca_bundle: str | None) -> ssl.SSLContext:
    """The system's CAs (certifi's where the system has none), or the PEM file `ca_bundle`."""
    if ca_bundle is not None:
        try:
            return ssl.create_default_context(cafile=ca_bundle)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(
                f"config error: teacher.ca_bundle: {ca_bundle}: not a readable PEM file of CAs "
                f"({exc.__class__.__name__})"
            ) from None
    context = ssl.create_default_context()
    if not context.cert_store_stats().get("x509_ca"):
        import certifi

        context.load_verify_locations(certifi.where())
    return context


def _client(
    timeout_s: float,
    connections: int,
    *,
    api_key: str | None = None,
    ca_bundle: str | None = None,
) -> httpx.Client:
    transport = httpx.HTTPTransport(
        verify=_ssl_context(ca_bundle),
        limits=httpx.Limits(max_connections=connections, max_keepalive_connections=connections),
        trust_env=False,
    )
    pool = getattr(transport, "_pool", None)
    if not isinstance(pool, httpcore.ConnectionPool) or not hasattr(pool, "_network_backend"):
        raise RuntimeError(
            f"httpx {httpx.__version__} / httpcore {httpcore.__version__}: the connection pool "
            "has no network backend to bound requests with; rayd was written for httpx 0.28"
        )
    pool._network_backend = _DeadlineBackend()  # every connection's I/O under the deadline
    headers = {"Accept-Encoding": "identity"}  # the size bound counts the bytes as sent
    if api_key is not None:
        headers["Authorization"] = f"Bearer {api_key}"
    return httpx.Client(
        transport=transport,
        timeout=httpx.Timeout(timeout_s),
        headers=headers,
        # Never an HTTP(S)_PROXY from the environment between rayd and its teacher.
        trust_env=False,
    )


def request(
    client: httpx.Client,
    url: str,
    method: str,
    path: str,
    body: dict[str, Any] | None,
    *,
    timeout_s: float,
    max_bytes: int = _DEFAULT_MAX_BYTES,
) -> Any:
    """The JSON answer of `method url+path`, whole within `timeout_s` (connect, send, every
    byte) and at most `max_bytes` long; `_Retryable` for no answer in time or a 5xx,
    `ServerError` (with the server's own message) for a 4xx, an oversized or a non-JSON answer."""
    where = f"{url}{path}"
    start = time.monotonic()
    try:
        with (
            _deadline_at(start + timeout_s),
            client.stream(method, where, json=body, timeout=timeout_s) as answer,
        ):
            raw = _read_bounded(answer, where, max_bytes)
    except httpx.TimeoutException as exc:
        raise _Retryable(
            f"{where}: no whole answer within teacher.request_timeout_s={timeout_s:g}s "
            f"({exc.__class__.__name__} after {time.monotonic() - start:.1f}s)"
        ) from None
    except httpx.TransportError as exc:
        raise _Retryable(f"{where}: {exc.__class__.__name__}: {_first_line(exc)}") from None
    if answer.status_code >= 500:
        raise _Retryable(f"{where}: HTTP {answer.status_code}: {_message(answer, raw)}")
    if answer.status_code == 401:
        raise ServerError(
            f"{where}: HTTP 401: {_message(answer, raw)} (the server wants an API key: set "
            "teacher.api_key_env to the name of the environment variable holding it)"
        )
    if answer.status_code >= 400:
        raise ServerError(f"{where}: HTTP {answer.status_code}: {_message(answer, raw)}")
    try:
        return json.loads(raw)
    except ValueError:
        raise ServerError(f"{where}: the answer is not JSON ({raw[:80]!r})") from None


def _read_bounded(answer: httpx.Response, where: str, max_bytes: int) -> bytes:
    """The body of `answer`, refused (ServerError) once it is larger than `max_bytes`."""
    too_big = ServerError(
        f"{where}: the answer is larger than {max_bytes / (1 << 20):g} MiB "
        "(teacher.max_response_mb); refused"
    )
    declared = answer.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise too_big
    chunks, size = [], 0
    for chunk in answer.iter_raw():
        size += len(chunk)
        if size > max_bytes:
            raise too_big
        chunks.append(chunk)
    return b"".join(chunks)


def served_model(url: str, body: Any) -> str:
    """The one model a server's /v1/models lists (LoRA adapters, which have a parent, aside)."""
    cards = body.get("data") if isinstance(body, dict) else None
    if not isinstance(cards, list):
        raise TeacherSignalError(f"{url}/v1/models: not an OpenAI model list")
    bases = [
        c
        for c in cards
        if isinstance(c, dict) and isinstance(c.get("id"), str) and c["id"] and not c.get("parent")
    ]
    if len(bases) != 1:
        names = ", ".join(str(c.get("id")) for c in bases) or "none"
        raise TeacherSignalError(
            f"{url}/v1/models: serves {len(bases)} models ({names}); rayd needs one"
        )
    return str(bases[0]["id"])


def prompt_logprob_rows(
    url: str, answer: Any, *, vocab_size: int | None = None, positions: int | None = None
) -> list[dict[int, float] | None]:
    """The `prompt_logprobs` of a /v1/completions answer as one {token id: log-prob} per prompt
    position (None at position 0, which has no context), checked: `positions` rows (when
    given), each None or a mapping of canonical integer ids in [0, `vocab_size`) to entries
    with a finite `logprob` at most LOGPROB_TOLERANCE above zero (read as at most 0). Anything
    else is one ServerError line naming the URL, the position and what was wrong."""
    where = f"{url}/v1/completions"
    try:
        rows = answer["choices"][0]["prompt_logprobs"]
    except (KeyError, IndexError, TypeError):
        rows = None
    if not isinstance(rows, list):
        raise ServerError(
            f"{where}: the answer has no prompt_logprobs (a vLLM server returns "
            "them; other OpenAI-compatible servers may not)"
        )
    if positions is not None and len(rows) != positions:
        raise ServerError(
            f"{where}: prompt_logprobs has {len(rows)} positions for a prompt of {positions} tokens"
        )
    out: list[dict[int, float] | None] = []
    for t, row in enumerate(rows):
        if row is None:
            out.append(None)
            continue
        if not isinstance(row, dict):
            raise ServerError(f"{where}: prompt_logprobs[{t}] is not a mapping of token ids")
        parsed: dict[int, float] = {}
        for key, entry in row.items():
            bad = _bad_entry(key, entry, vocab_size)
            if bad:
                raise ServerError(f"{where}: prompt_logprobs[{t}]: {bad}")
            parsed[int(key)] = min(float(entry["logprob"]), 0.0)
        out.append(parsed)
    return out


def _bad_entry(key: Any, entry: Any, vocab_size: int | None) -> str:
    """What is wrong with one `"<token id>": {"logprob": ...}` entry, or ''."""
    shown = repr(key)[:40]
    if not isinstance(key, str) or not _TOKEN_ID.fullmatch(key):
        return f"token id {shown} is not a non-negative integer"
    if vocab_size is not None and int(key) >= vocab_size:
        return f"token id {key} is outside the teacher's vocabulary [0, {vocab_size})"
    lp = entry.get("logprob") if isinstance(entry, dict) else None
    if isinstance(lp, bool) or not isinstance(lp, int | float):
        return f"token {key}: no numeric logprob ({repr(entry)[:60]})"
    if not math.isfinite(lp):
        return f"token {key}: log-prob {lp} is not finite"
    if lp > LOGPROB_TOLERANCE:
        return f"token {key}: log-prob {lp:g} is above zero (a probability above 1)"
    return ""


def _message(answer: httpx.Response, raw: bytes) -> str:
    """The server's error message: vLLM answers {"error": {"message": ...}} (older: {"message"})."""
    try:
        body = json.loads(raw)
    except ValueError:
        return _first_line(raw.decode("utf-8", "replace").strip()[:200] or answer.reason_phrase)
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


@dataclass(frozen=True)
class ServedTeacher:
    """What one server said it serves (/v1/models): provenance, and the run's record."""

    url: str
    model: str
    max_model_len: int | None  # None where the server does not say

    def as_dict(self) -> dict[str, Any]:
        return {"url": self.url, "model": self.model, "max_model_len": self.max_model_len}


def check_servers(
    urls: Sequence[str],
    tokenizer: Any,
    *,
    top_k: int,
    max_model_len: int,
    timeout_s: float,
    served_model: str | None = None,
    api_key_env: str | None = None,
    ca_bundle: str | None = None,
    vocab_size: int | None = None,
    max_response_bytes: int = _DEFAULT_MAX_BYTES,
) -> list[ServedTeacher]:
    """Before any actor starts: each server answers, serves one model (named `served_model`
    when given) whose context holds `max_model_len`, tokenizes a probe text as `tokenizer` (the
    student's) does, accepts the student's highest token id and returns valid prompt log-probs
    (finite, at most zero, ids below `vocab_size`: the teacher's) at `top_k`. One ConfigError
    line naming the URL and what differed. Returns what each server serves."""
    served: list[ServedTeacher] = []
    with _client(
        min(timeout_s, 30.0), 2, api_key=read_api_key(api_key_env), ca_bundle=ca_bundle
    ) as client:

        def ask(url: str, method: str, path: str, body: dict[str, Any] | None) -> Any:
            return request(
                client,
                url,
                method,
                path,
                body,
                timeout_s=min(timeout_s, 30.0),
                max_bytes=max_response_bytes,
            )

        for raw in urls:
            url = raw.rstrip("/")

            def fail(what: str, url: str = url) -> ConfigError:
                return ConfigError(f"config error: teacher.urls: {url}: {what}")

            try:
                listing = ask(url, "GET", "/v1/models", None)
                model = _served(url, listing)
            except (ServerError, TeacherSignalError) as exc:
                raise fail(f"no usable answer ({str(exc).removeprefix(url)})") from None
            if served_model is not None and model != served_model:
                raise fail(
                    f"serves {model!r}, not teacher.served_model={served_model!r} (/v1/models)"
                )
            card = next(c for c in listing["data"] if c.get("id") == model)
            served_len = card.get("max_model_len")
            if isinstance(served_len, bool) or not isinstance(served_len, int):
                served_len = None
            if served_len is not None and served_len < max_model_len:
                raise fail(
                    f"serves {model} with max_model_len={served_len}, below "
                    f"teacher.max_model_len={max_model_len}"
                )
            served.append(ServedTeacher(url, model, served_len))
            text = _probe_text(tokenizer)
            want = list(tokenizer(text, add_special_tokens=False).input_ids)
            try:
                got = ask(
                    url,
                    "POST",
                    "/tokenize",
                    {"model": model, "prompt": text, "add_special_tokens": False},
                )
                got = got.get("tokens") if isinstance(got, dict) else None
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
                    url,
                    ask(url, "POST", "/v1/completions", probe),
                    vocab_size=vocab_size,
                    positions=2,
                )
            except ServerError as exc:
                message = str(exc)
                if "max allowed" in message:
                    message = (
                        f"it returns fewer than teacher.top_k={top_k} prompt log-probs; start it "
                        f"with --max-logprobs {max(20, top_k)} or more ({exc})"
                    )
                elif "vocab" in message.lower() and "HTTP" in message:
                    message = (
                        f"serves {model}, whose vocabulary has no id {len(tokenizer) - 1}, the "
                        f"student's last ({exc})"
                    )
                else:
                    message = f"an invalid answer to a probe: {message.removeprefix(url)}"
                raise fail(message) from None
            widths = {len(row) for row in rows[1:] if row is not None}
            if not widths or min(widths) < top_k:
                raise fail(
                    f"returned {sorted(widths)} prompt log-probs per position for top_k={top_k}"
                )
            if rows[1] is not None and len(tokenizer) - 1 not in rows[1]:
                raise fail(
                    f"returned no log-prob for the probe's token {len(tokenizer) - 1} "
                    "(prompt_logprobs lists the actual token at each position)"
                )
    return served


def _served(url: str, listing: Any) -> str:
    """`served_model`, under a name check_servers' `served_model` argument does not hide."""
    return served_model(url, listing)


def record_or_check_served_model(
    run_dir: str | Path, served: Sequence[ServedTeacher], setting: str | None, write: bool = True
) -> None:
    """The run's record of the served model names (`<run_dir>/served_teacher.json`): written
    (`write`) by the driver at the first start, once every check has passed, into its run folder
    (held under its lock; preflight and `rayd score` only check), and on every later start
    with teacher.served_model unset, each server's name must be one recorded there; one
    ConfigError line otherwise. An explicit teacher.served_model (checked by `check_servers`)
    replaces the record."""
    folder = Path(run_dir)
    record = folder / RECORD_FILE
    names = sorted({s.model for s in served})
    if setting is None and record.exists():
        try:
            recorded = json.loads(record.read_text(encoding="utf-8"))["models"]
            if not isinstance(recorded, list) or not all(isinstance(n, str) for n in recorded):
                raise TypeError("models")
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ConfigError(
                f"config error: {record}: unreadable ({exc.__class__.__name__}); set "
                "teacher.served_model to the teacher's served name, which rewrites it"
            ) from None
        for s in served:
            if s.model not in recorded:
                raise ConfigError(
                    f"config error: teacher.urls: {s.url} serves {s.model!r}, but this run "
                    f"started with {', '.join(map(repr, recorded))} (recorded in {record}); "
                    f"serve that model again, or set teacher.served_model={s.model} to accept "
                    "the change"
                )
        return
    if not write or not folder.is_dir():  # write=False: the check only (preflight's)
        return
    try:
        current = json.loads(record.read_text(encoding="utf-8")) if record.is_file() else None
    except (OSError, ValueError):
        current = None
    if isinstance(current, dict) and current.get("models") == names:
        return
    text = json.dumps(
        {
            "models": names,
            "servers": [s.as_dict() for s in served],
            "recorded": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        },
        indent=2,
    )
    write_atomic(record, text + "\n")


def describe_servers(
    urls: Sequence[str],
    *,
    timeout_s: float,
    api_key_env: str | None = None,
    ca_bundle: str | None = None,
) -> list[dict[str, Any]]:
    """What each server says it serves (/v1/models: name, max_model_len): the provenance of a
    served teacher's signal (`rayd score`), which no local folder can give."""
    out = []
    with _client(
        min(timeout_s, 30.0), 2, api_key=read_api_key(api_key_env), ca_bundle=ca_bundle
    ) as client:
        for raw in urls:
            url = raw.rstrip("/")
            try:
                listing = request(
                    client, url, "GET", "/v1/models", None, timeout_s=min(timeout_s, 30.0)
                )
                model = served_model(url, listing)
            except (ServerError, TeacherSignalError) as exc:
                raise ConfigError(f"config error: teacher.urls: {url}: {exc}") from None
            card = next(c for c in listing["data"] if c.get("id") == model)
            length = card.get("max_model_len")
            ok = isinstance(length, int) and not isinstance(length, bool)
            out.append(ServedTeacher(url, model, length if ok else None).as_dict())
    return out
