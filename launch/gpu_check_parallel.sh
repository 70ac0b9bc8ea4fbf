#!/usr/bin/env bash
# Multi-GPU vLLM engines on a GPU machine (2 GPUs or more), the part CI cannot run: a TP=2
# teacher scores as a TP=1 one and a TP=2 rollout engine follows two weight syncs, with each
# engine's actor in its placement group and vLLM's Ray executor putting one rank on each GPU.
# The same tests run on CPU in `make test` (vLLM's mp executor). From the repo root, in an
# environment with rayd[gpu] installed:
#   launch/gpu_check_parallel.sh
set -euo pipefail
RAYD_TEST_GPU=1 python -m pytest -q -s tests/ray/test_parallel_engines.py "$@"
