#!/usr/bin/env bash
# The streamed weight sync (sync.method=stream) with vLLM engines on GPUs, the part CI cannot
# run: two one-GPU engines and a tensor-parallel one (4 GPUs in all) get the weights of two
# ZeRO-3 learners (on CPU) in buckets over gloo, through host memory as on a GPU cluster, and
# must then score as the learners' model; tiny buckets, a withheld tensor, an engine lost
# mid-rollout or mid-sync, a stalled one and a skipped finalize step as on CPU. The same tests
# run on CPU in `make test`. From the repo root, in an environment with rayd[gpu] installed, on
# a machine with 4 GPUs:
#   launch/gpu_check_weight_stream.sh
# Not yet run on a GPU (docs/cluster.md says what ran where).
set -euo pipefail
RAYD_TEST_GPU=1 python -m pytest -q -s tests/ray/test_weight_stream.py "$@"
