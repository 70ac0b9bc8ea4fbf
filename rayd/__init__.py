"""rayd: distil language models on Ray: vLLM rollouts, a served teacher, DeepSpeed learners."""

import logging

__version__ = "0.1.0"


class _KnownNoise(logging.Filter):
    """transformers imports torchao (pinned for `rayd export --quantize int8`) on every model
    load once it is installed; on CPU builds torchao's GPU-only kernels (mxfp8, cutlass sm90)
    cannot load and it warns, and torch warns about two of its enums: four lines in every actor
    at every start, about nothing rayd uses."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (
            (message.startswith("Failed to load") and "torchao" in message)
            or "is an Enum subclass and is now natively supported" in message
        )


for _name in ("torchao", "torch.utils._pytree"):
    logging.getLogger(_name).addFilter(_KnownNoise())
