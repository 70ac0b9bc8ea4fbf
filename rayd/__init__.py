"""rayd: distil language models on Ray: vLLM rollouts, a served teacher, DeepSpeed learners."""

__version__ = "0.1.0"
