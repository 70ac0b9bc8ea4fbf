"""Teacher: scoring student rollouts.

`scorer.py` is the small interface and the validation every backend's output goes through,
`vllm_scorer.py` and `hf_scorer.py` the two backends (both run in CI), `worker.py` the thin Ray
actor class (built from a `rayd.rollout.spec.EngineSpec`), `group.py` the driver's handle on the
teacher pools and their combination. Backends are imported lazily by the worker.
"""
