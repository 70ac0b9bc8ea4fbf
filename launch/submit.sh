#!/usr/bin/env bash
# Submit a rayd run to the Ray cluster at $RAY_ADDRESS (default: a head on this machine).
#   launch/submit.sh configs/demo/onpolicy.yaml learner.zero_stage=3     (python -m rayd train)
#   launch/submit.sh generate configs/gpu/generate-gsm8k.yaml            (any `rayd` command)
#   launch/submit.sh --no-wait configs/gpu/qwen7b-to-0.5b-onpolicy.yaml  (return once submitted)
# Environment (all optional):
#   RAY_ADDRESS                the head's dashboard, e.g. http://127.0.0.1:8265 after
#                              `ray dashboard launch/aws-gpu.yaml`
#   RAYD_ENTRYPOINT_CPUS       CPUs reserved for the driver process       (--entrypoint-num-cpus)
#   RAYD_ENTRYPOINT_GPUS       GPUs reserved for the driver process       (--entrypoint-num-gpus)
#   RAYD_ENTRYPOINT_RESOURCES  custom resources for the driver, JSON      (--entrypoint-resources)
#                              '{"rayd_driver": 1}' puts it on the GPU node of launch/*.yaml
#   RAYD_RUNTIME_ENV           runtime env file (default launch/runtime_env.yaml)
#   RAYD_SUBMISSION_ID         the job's id (default rayd-<command>-<config>-<time>)
# Unset entrypoint variables reserve nothing, so the driver runs on the head (Ray's default):
# the driver only coordinates, and a reservation would take a CPU the actors may need.
set -euo pipefail
cd "$(dirname "$0")/.."
export RAY_ADDRESS="${RAY_ADDRESS:-http://127.0.0.1:8265}"

wait_flag=()
if [[ "${1:-}" == "--no-wait" ]]; then
  wait_flag=(--no-wait)
  shift
fi
command=train
case "${1:-}" in
  train | generate | eval) command="$1"; shift ;;
esac
if [[ $# -lt 1 ]]; then
  echo "usage: launch/submit.sh [--no-wait] [train|generate|eval] CONFIG [key=value ...]" >&2
  exit 2
fi

config_name="$(basename "${1%.*}")"
id="${RAYD_SUBMISSION_ID:-rayd-$command-$config_name-$(date +%Y%m%d-%H%M%S)}"
args=(--submission-id "$id" --working-dir . --runtime-env "${RAYD_RUNTIME_ENV:-launch/runtime_env.yaml}")
[[ -n "${RAYD_ENTRYPOINT_CPUS:-}" ]] && args+=(--entrypoint-num-cpus "$RAYD_ENTRYPOINT_CPUS")
[[ -n "${RAYD_ENTRYPOINT_GPUS:-}" ]] && args+=(--entrypoint-num-gpus "$RAYD_ENTRYPOINT_GPUS")
[[ -n "${RAYD_ENTRYPOINT_RESOURCES:-}" ]] && args+=(--entrypoint-resources "$RAYD_ENTRYPOINT_RESOURCES")

# The id first, so it is on screen before Ray's log stream: logs and stop both need it.
cat >&2 <<MSG
rayd: submitting $id to $RAY_ADDRESS
rayd:   follow: ray job logs -f $id    stop (checkpoints first): ray job stop $id
MSG
exec ray job submit "${args[@]}" "${wait_flag[@]}" -- python -m rayd "$command" "$@"
