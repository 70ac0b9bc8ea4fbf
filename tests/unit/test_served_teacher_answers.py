"""A served teacher (teacher.backend=server) is not trusted: each malformed answer of a small fake
OpenAI-compatible server on 127.0.0.1 is refused in one line naming the URL, never scored.

The fake answers as `vllm serve` does (/v1/models with max_model_len, /tokenize, /v1/completions
with vLLM's `prompt_logprobs`: None at position 0, then {"<id>": {"logprob", "rank",
"decoded_token"}} per position, the actual token added when it is not in the top k), and each
test turns one thing bad: a NaN or positive log-prob, a negative or out-of-vocabulary id,
another model name, a dripping or oversized body, a missing API key, a password in the URL. The
real server is tests/ray/test_served_teacher.py's (heavy); these need no Ray and no model.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import ssl
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

import rayd.teacher.server_scorer as ss
from rayd.config import ConfigError, load_config
from rayd.rollout.spec import ServerSpec
from rayd.teacher.scorer import TeacherSignalError

from helpers import TINY_CONFIG, engine_spec

V = 64  # the fake teacher's vocabulary
TOP_K = 4
NAME = "teacher"
KEY = "s3cret-key-do-not-print"


class FakeTokenizer:
    """What check_servers asks of the student's tokenizer; the fake server tokenizes alike."""

    all_special_ids: tuple[int, ...] = ()

    def __len__(self) -> int:
        return V

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(chr(48 + i % 40) for i in ids)

    def __call__(self, text: str, add_special_tokens: bool = False) -> Any:
        return type("Encoded", (), {"input_ids": encode(text)})()


def encode(text: str) -> list[int]:
    return [ord(c) % V for c in text]


def logprob_rows(prompt: list[int]) -> list[dict[str, dict[str, Any]] | None]:
    """vLLM's prompt_logprobs for `prompt`: top-k ids 0..k-1 at -0.5, -1.0, ..., the actual
    token added at -6.0 when it is not among them."""
    rows: list[dict[str, dict[str, Any]] | None] = [None]
    for token in prompt[1:]:
        row = {
            str(i): {"logprob": -0.5 * (i + 1), "rank": i + 1, "decoded_token": "x"}
            for i in range(TOP_K)
        }
        if str(token) not in row:
            row[str(token)] = {"logprob": -6.0, "rank": 50, "decoded_token": "y"}
        rows.append(row)
    return rows


class Fake:
    """The server's behaviour, changed by each test."""

    def __init__(self) -> None:
        self.name = NAME
        self.rows: Any = None  # a function (prompt) -> rows replacing logprob_rows
        self.drip_s = 0.0  # seconds between bytes of the completions body
        self.pad_bytes = 0  # extra bytes in the completions body
        self.chunked = False  # no Content-Length (the body ends with the connection)
        self.key: str | None = None  # the Bearer token the server wants
        self.auth_seen: list[str | None] = []
        self.url = ""  # set by the fixture


def handler(fake: Fake) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: Any) -> None:  # quiet
            pass

        def _send(
            self, status: int, body: Any, *, drip_s: float = 0.0, chunked: bool = False
        ) -> None:
            data = json.dumps(body).encode()  # NaN written as NaN, as a careless server would
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            if chunked:
                self.send_header("Connection", "close")
                self.close_connection = True
            else:
                self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            try:
                if drip_s:
                    for i in range(len(data)):
                        self.wfile.write(data[i : i + 1])
                        self.wfile.flush()
                        time.sleep(drip_s)
                else:
                    self.wfile.write(data)
            except OSError:  # the client gave up
                self.close_connection = True

        def _authorized(self) -> bool:
            auth = self.headers.get("Authorization")
            fake.auth_seen.append(auth)
            if fake.key is not None and auth != f"Bearer {fake.key}":
                self._send(401, {"error": "Unauthorized"})
                return False
            return True

        def do_GET(self) -> None:
            if not self._authorized():
                return
            if self.path == "/v1/models":
                card = {
                    "id": fake.name,
                    "object": "model",
                    "created": 0,
                    "owned_by": "vllm",
                    "root": "/models/teacher",
                    "parent": None,
                    "max_model_len": 128,
                }
                self._send(200, {"object": "list", "data": [card]})
            else:
                self._send(404, {"error": {"message": "Not Found"}})

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length", 0))
            body = json.loads(self.rfile.read(length))
            if not self._authorized():
                return
            if self.path == "/tokenize":
                tokens = encode(body["prompt"])
                self._send(200, {"count": len(tokens), "max_model_len": 128, "tokens": tokens})
                return
            prompt = body["prompt"]
            rows = (fake.rows or logprob_rows)(prompt)
            answer = {
                "id": "cmpl-1",
                "object": "text_completion",
                "created": 0,
                "model": body["model"],
                "choices": [
                    {
                        "index": 0,
                        "text": "x",
                        "logprobs": None,
                        "finish_reason": "length",
                        "prompt_logprobs": rows,
                    }
                ],
                "usage": {"prompt_tokens": len(prompt), "completion_tokens": 1},
            }
            if fake.pad_bytes:
                answer["pad"] = "x" * fake.pad_bytes
            self._send(200, answer, drip_s=fake.drip_s, chunked=fake.chunked)

    return Handler


@pytest.fixture
def fake() -> Iterator[Any]:
    state = Fake()
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler(state))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{server.server_address[1]}"
    yield state
    server.shutdown()
    server.server_close()


@pytest.fixture
def teacher_dir(tmp_path: Path) -> str:
    """The local copy of the teacher's config.json (the vocabulary bound is read from it)."""
    folder = tmp_path / "teacher"
    folder.mkdir()
    (folder / "config.json").write_text(
        json.dumps({"model_type": "gpt2", "vocab_size": V, "bos_token_id": 0, "eos_token_id": 0})
    )
    return str(folder)


def scorer(url: str, teacher_dir: str, **server: Any) -> ss.ServerScorer:
    fields = {"timeout_s": 5.0, "retries": 0, "max_concurrency": 2, **server}
    return ss.ServerScorer(engine_spec(teacher_dir, "server", server=ServerSpec((url,), **fields)))


PAIR = ([1, 2, 3], [7, 9, 2])  # 7 and 9 are not in the top k (ids 0..3): added entries


def score_error(fake: Fake, teacher_dir: str) -> str:
    """The one line a scorer's score() of PAIR fails with."""
    s = scorer(fake.url, teacher_dir)
    try:
        with pytest.raises(TeacherSignalError) as err:
            s.score([PAIR], TOP_K)
    finally:
        s.close()
    text = str(err.value)
    assert len(text.splitlines()) == 1, text
    assert fake.url in text, text
    return text


def check(fake: Fake, **kw: Any) -> Any:
    return ss.check_servers(
        [fake.url], FakeTokenizer(), top_k=TOP_K, max_model_len=64, timeout_s=5, **kw
    )


def spoil(position: int, token: str, value: Any) -> Any:
    """Rows with the log-prob of `token` at `position` replaced (the entry added if missing)."""

    def rows(prompt: list[int]) -> Any:
        out = logprob_rows(prompt)
        out[position][token] = {"logprob": value, "rank": 1, "decoded_token": "z"}
        return out

    return rows


def swap_id(position: int, token: str, new: str) -> Any:
    """Rows with the id `token` at `position` written as `new` (same log-prob and rank)."""

    def rows(prompt: list[int]) -> Any:
        out = logprob_rows(prompt)
        out[position][new] = out[position].pop(token)
        return out

    return rows


# --- the scorer: a bad answer fails the step, never trains -------------------------------------


def test_a_good_answer_scores_and_minus_9999_passes(fake, teacher_dir):
    s = scorer(fake.url, teacher_dir)
    try:
        (good,) = s.score([PAIR], TOP_K)
        fake.rows = spoil(4, "9", -9999.0)  # vLLM's -inf
        (low,) = s.score([PAIR], TOP_K)
    finally:
        s.close()
    assert good.token_logprobs.tolist() == [-6.0, -6.0, -1.5]
    assert good.topk_ids.tolist() == [[0, 1, 2, 3]] * 3
    assert low.token_logprobs[1].item() == -9999.0


def test_a_nan_logprob_fails_the_step(fake, teacher_dir):
    fake.rows = spoil(4, "9", math.nan)  # the actual token's entry: today it reached the score
    assert "is not finite" in score_error(fake, teacher_dir)


def test_a_logprob_above_zero_fails_the_step(fake, teacher_dir):
    fake.rows = spoil(3, "0", 0.7)
    assert "above zero" in score_error(fake, teacher_dir)


def test_a_logprob_within_the_tolerance_is_read_as_zero(fake, teacher_dir):
    fake.rows = spoil(3, "0", 5e-5)
    s = scorer(fake.url, teacher_dir)
    try:
        (score,) = s.score([PAIR], TOP_K)
    finally:
        s.close()
    assert score.topk_logprobs[0, 0].item() == 0.0


def test_a_negative_token_id_fails_the_step(fake, teacher_dir):
    fake.rows = swap_id(3, "3", "-3")  # still k entries: today it was scored
    assert "'-3' is not a non-negative integer" in score_error(fake, teacher_dir)


def test_a_token_id_outside_the_vocabulary_fails_the_step(fake, teacher_dir):
    fake.rows = swap_id(3, "3", str(V + 5))
    assert f"outside the teacher's vocabulary [0, {V})" in score_error(fake, teacher_dir)


def test_rows_of_the_wrong_count_or_form_fail_the_step(fake, teacher_dir):
    fake.rows = lambda prompt: logprob_rows(prompt)[:-1]
    assert "prompt_logprobs has 5 positions for a prompt of 6" in score_error(fake, teacher_dir)
    fake.rows = lambda prompt: [*logprob_rows(prompt)[:-1], [["2", -0.1]]]
    assert "prompt_logprobs[5] is not a mapping" in score_error(fake, teacher_dir)
    fake.rows = spoil(3, "2", "-0.1")  # a string where a number belongs
    assert "no numeric logprob" in score_error(fake, teacher_dir)


def test_another_served_model_is_refused_by_the_scorer(fake, teacher_dir):
    fake.name = "someone-else"
    with pytest.raises(TeacherSignalError) as err:
        scorer(fake.url, teacher_dir, served_model=NAME)
    assert f"serves 'someone-else', not teacher.served_model='{NAME}'" in str(err.value)


def test_a_dripping_answer_fails_at_the_deadline(fake, teacher_dir):
    fake.drip_s = 0.01  # ~1000 bytes: 10 s, a byte well within every per-read timeout
    s = scorer(fake.url, teacher_dir, timeout_s=1.0)
    start = time.monotonic()
    try:
        with pytest.raises(TeacherSignalError) as err:
            s.score([PAIR], TOP_K)
    finally:
        s.close()
    took = time.monotonic() - start
    assert took < 2.5, f"the request ran {took:.1f}s past a 1s deadline"
    assert "no whole answer within teacher.request_timeout_s=1s" in str(err.value)


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "until-close"])
def test_an_oversized_answer_is_cut_off(fake, teacher_dir, chunked):
    fake.pad_bytes, fake.chunked = 3 << 20, chunked
    s = scorer(fake.url, teacher_dir, max_response_bytes=1 << 20)
    try:
        with pytest.raises(TeacherSignalError) as err:
            s.score([PAIR], TOP_K)
    finally:
        s.close()
    assert "larger than 1 MiB (teacher.max_response_mb)" in str(err.value)


# --- the start-up check -----------------------------------------------------------------------


def test_the_start_up_check_passes_a_good_server_and_says_what_it_serves(fake):
    (served,) = check(fake, vocab_size=V)
    assert (served.url, served.model, served.max_model_len) == (fake.url, NAME, 128)


def test_the_start_up_check_rejects_nan_logprobs(fake):
    fake.rows = spoil(1, "1", math.nan)
    with pytest.raises(ConfigError) as err:
        check(fake)
    assert f"teacher.urls: {fake.url}: an invalid answer to a probe" in str(err.value)
    assert "not finite" in str(err.value)


def test_the_start_up_check_rejects_another_model(fake):
    fake.name = "someone-else"
    with pytest.raises(ConfigError) as err:
        check(fake, served_model=NAME)
    assert f"serves 'someone-else', not teacher.served_model='{NAME}'" in str(err.value)


def test_the_name_recorded_at_the_first_start_is_checked_on_resume(fake, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    ss.record_or_check_served_model(run, check(fake), None)  # the first start records it
    assert json.loads((run / ss.RECORD_FILE).read_text())["models"] == [NAME]
    ss.record_or_check_served_model(run, check(fake), None)  # the same model resumes
    fake.name = "someone-else"
    with pytest.raises(ConfigError) as err:
        ss.record_or_check_served_model(run, check(fake), None)
    assert f"serves 'someone-else', but this run started with '{NAME}'" in str(err.value)
    # An explicit setting accepts the change, and becomes the record.
    ss.record_or_check_served_model(run, check(fake, served_model="someone-else"), "someone-else")
    assert json.loads((run / ss.RECORD_FILE).read_text())["models"] == ["someone-else"]


def test_the_api_key_is_sent_as_bearer_and_never_printed(fake, teacher_dir, monkeypatch, capsys):
    fake.key = KEY
    with pytest.raises(ConfigError) as err:  # no key: the server's 401, with what to set
        check(fake)
    assert "HTTP 401" in str(err.value) and "teacher.api_key_env" in str(err.value)
    with pytest.raises(ConfigError) as err:  # a named variable that is not set
        check(fake, api_key_env="RAYD_TEST_TEACHER_KEY")
    assert "RAYD_TEST_TEACHER_KEY is not set" in str(err.value)
    monkeypatch.setenv("RAYD_TEST_TEACHER_KEY", KEY)
    check(fake, api_key_env="RAYD_TEST_TEACHER_KEY")
    assert fake.auth_seen[-1] == f"Bearer {KEY}"
    spec = ServerSpec((fake.url,), 5.0, 0, 2, api_key=KEY, vocab_size=V)
    s = ss.ServerScorer(engine_spec(teacher_dir, "server", server=spec))
    try:
        s.score([PAIR], TOP_K)
    finally:
        s.close()
    assert fake.auth_seen[-1] == f"Bearer {KEY}"
    assert KEY not in repr(spec)
    out = capsys.readouterr()
    assert KEY not in out.out + out.err


def test_provenance_is_what_the_server_says_it_serves(fake):
    assert ss.describe_servers([fake.url], timeout_s=5) == [
        {"url": fake.url, "model": NAME, "max_model_len": 128}
    ]


# --- credentials and TLS in the config --------------------------------------------------------


def served(*overrides: str) -> list[str]:
    return ["teacher.backend=server", *overrides]


def test_a_password_in_a_teacher_url_is_refused_and_never_shown():
    for url, why in (
        ("http://user:hunter2@127.0.0.1:8000", "give the key with teacher.api_key_env"),
        ("user:hunter2@127.0.0.1:8000", "is not an http:// or https:// base URL"),
    ):
        with pytest.raises(ConfigError) as err:
            load_config(TINY_CONFIG, served(f"teacher.urls=[{url}]"))
        text = str(err.value)
        assert "hunter2" not in text, text
        assert "user:***@127.0.0.1:8000" in text and why in text, text


def test_the_api_key_setting_names_a_variable_and_is_never_echoed():
    with pytest.raises(ConfigError) as err:
        load_config(TINY_CONFIG, served("teacher.urls=[http://h:1]", f"teacher.api_key_env={KEY}"))
    assert KEY not in str(err.value) and "not the key itself" in str(err.value)


def test_a_missing_ca_bundle_is_refused_at_config_time(tmp_path):
    missing = tmp_path / "ca.pem"
    with pytest.raises(ConfigError) as err:
        load_config(
            TINY_CONFIG, served("teacher.urls=[https://h:1]", f"teacher.ca_bundle={missing}")
        )
    assert f"teacher.ca_bundle: {str(missing)!r} does not exist" in str(err.value)


def _tls_files(folder: Path) -> tuple[Path, Path, Path]:
    """A private CA (ca.pem) and a certificate it signs for 127.0.0.1 (cert.pem, key.pem)."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = dt.datetime.now(dt.UTC)

    def cert(subject: str, key: Any, issuer: str, signer: Any, ca: bool) -> x509.Certificate:
        build = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if ca:
            usage = x509.KeyUsage(False, False, False, False, False, True, True, False, False)
            build = build.add_extension(usage, critical=True)
        else:
            san = x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
            build = build.add_extension(san, critical=False)
        return build.sign(signer, hashes.SHA256())

    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = cert("rayd test CA", ca_key, "rayd test CA", ca_key, True)
    leaf = cert("127.0.0.1", key, "rayd test CA", ca_key, False)
    paths = folder / "ca.pem", folder / "cert.pem", folder / "key.pem"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return paths


def test_https_with_a_private_ca_needs_its_bundle(tmp_path):
    ca, cert, key = _tls_files(tmp_path)
    state = Fake()
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler(state))
    server.daemon_threads = True
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    url = f"https://127.0.0.1:{server.server_address[1]}"
    try:
        args = ([url], FakeTokenizer())
        kw: dict[str, Any] = {"top_k": TOP_K, "max_model_len": 64, "timeout_s": 5}
        with pytest.raises(ConfigError) as err:  # the system's CAs do not know it
            ss.check_servers(*args, **kw)
        assert "CERTIFICATE_VERIFY_FAILED" in str(err.value) or "SSL" in str(err.value)
        (got,) = ss.check_servers(*args, **kw, ca_bundle=str(ca))
        assert got.model == NAME
    finally:
        server.shutdown()
        server.server_close()
