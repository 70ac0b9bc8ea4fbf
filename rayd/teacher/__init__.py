"""Teacher: scoring student rollouts.

`scorer.py` is the small interface and the validation every backend's output goes through,
`vllm_scorer.py` and `hf_scorer.py` the two backends (both run in CI), `worker.py` the thin Ray
actor class. Backends are imported lazily by the worker.
"""
