#!/usr/bin/env bash
# Submit a rayd run to the Ray cluster at $RAY_ADDRESS (default: the local head's dashboard).
#   launch/submit.sh configs/demo/onpolicy.yaml learner.zero_stage=3
set -euo pipefail
cd "$(dirname "$0")/.."
export RAY_ADDRESS="${RAY_ADDRESS:-http://127.0.0.1:8265}"
exec ray job submit --working-dir . --runtime-env launch/runtime_env.yaml \
  -- python -m rayd.train "$@"
