"""rayd/noise.py: the listed library warnings are demoted to DEBUG, everything else still shows;
the workers' runtime env leaves alone what the user or a submitted job already set."""

from __future__ import annotations

import io
import logging
import warnings

from rayd.noise import quiet_known_noise, worker_environ, worker_runtime_env


def _shown(logger_name: str, level: int, message: str, *args: object, debug=False) -> str:
    """What a handler without a level of its own prints (as Ray's), the logger at WARNING (as
    vLLM's at VLLM_LOGGING_LEVEL=WARNING) or DEBUG."""
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    logger = logging.getLogger(logger_name)
    logger.addHandler(handler)
    logger.propagate = False
    logger.setLevel(logging.DEBUG if debug else logging.WARNING)
    try:
        logger.log(level, message, *args)
    finally:
        logger.removeHandler(handler)
        logger.propagate = True
        logger.setLevel(logging.NOTSET)
    return out.getvalue()


def test_listed_warnings_are_demoted_others_and_errors_show():
    with warnings.catch_warnings():  # its warnings filter stays inside this test
        quiet_known_noise()
        quiet_known_noise()  # idempotent: one filter per logger
    assert len(logging.getLogger("vllm.engine.arg_utils").filters) == 1
    seed = "The global random seed is set to 0. Since VLLM_ENABLE_V1_MULTIPROCESSING is ..."
    assert _shown("vllm.engine.arg_utils", logging.WARNING, seed) == ""
    preload = "%s is not found in LD_PRELOAD. For best performance, ..."
    assert _shown("vllm.v1.worker.cpu_worker", logging.WARNING, preload, "libtcmalloc") == ""
    # another message from the same logger, the same text elsewhere, and any error: shown
    assert "max_model_len" in _shown("vllm.engine.arg_utils", logging.WARNING, "max_model_len")
    assert seed in _shown("vllm.other", logging.WARNING, seed)
    assert seed in _shown("vllm.engine.arg_utils", logging.ERROR, seed)
    # nothing lost: a logger at DEBUG shows the demoted record, as DEBUG
    assert _shown("vllm.engine.arg_utils", logging.WARNING, seed, debug=True) == f"DEBUG {seed}\n"


def test_torch_distributed_future_warnings_ignored_others_kept():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_known_noise()
        warnings.warn(
            "`torch.distributed.reduce_op` is deprecated, use ReduceOp", FutureWarning, stacklevel=1
        )
        warnings.warn("`other.thing` is deprecated", FutureWarning, stacklevel=1)
        warnings.warn("`torch.distributed.reduce_op` is deprecated", UserWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == [
        "`other.thing` is deprecated",
        "`torch.distributed.reduce_op` is deprecated",
    ]


def test_worker_runtime_env_leaves_taken_fields(monkeypatch):
    monkeypatch.delenv("HF_HUB_DISABLE_PROGRESS_BARS", raising=False)
    assert worker_runtime_env() == {
        "env_vars": {"HF_HUB_DISABLE_PROGRESS_BARS": "1"},
        "worker_process_setup_hook": "rayd.noise.quiet_known_noise",
    }
    taken = {"env_vars": {"HF_HUB_DISABLE_PROGRESS_BARS": "0"}, "worker_process_setup_hook": "x"}
    assert worker_runtime_env(taken) == {}
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "0")  # the user's choice wins
    assert "env_vars" not in worker_runtime_env()


def test_a_local_ray_starts_inside_the_worker_environment_then_it_is_restored(monkeypatch):
    import os

    monkeypatch.delenv("HF_HUB_DISABLE_PROGRESS_BARS", raising=False)
    with worker_environ():
        assert os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "1"
    assert "HF_HUB_DISABLE_PROGRESS_BARS" not in os.environ
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "0")  # the user's choice wins
    with worker_environ():
        assert os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "0"
    assert os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "0"
