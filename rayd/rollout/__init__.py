"""Rollout: sampling completions from the student.

`engine.py` is the small interface, `vllm_engine.py` and `hf_engine.py` the two backends (both run
in CI), `worker.py` the thin Ray actor class, `spec.py` the `EngineSpec` it is built from (the
teacher's engines take it too), `group.py` the driver's start of the rollout pool. Backends are
imported lazily by the worker so that a process that never rolls out (a learner) never imports
vLLM.
"""
