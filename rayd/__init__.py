"""rayd: distil language models on Ray with vLLM rollouts, a served teacher and DeepSpeed learners."""

__version__ = "0.1.0"
