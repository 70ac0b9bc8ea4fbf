#!/usr/bin/env bash
# The models and GSM8K questions that configs/gpu/*.yaml read, under ROOT (default /mnt/rayd):
#   ROOT/models/Qwen2.5-{7B,1.5B,0.5B}-Instruct   Hugging Face checkpoints
#   ROOT/data/gsm8k/train.jsonl                   {"question": ..., "answer": "... #### 72"}
# With RAYD_LLAMA=1 also Llama-3.3-70B-Instruct and Llama-3.1-8B-Instruct (~160 GB; gated on
# the Hub: accept Meta's license there and set HF_TOKEN) for llama70b-to-8b-onpolicy.yaml.
# rayd loads local checkpoints only (a hub name is refused before any actor starts), so run
# this where the driver and actors run, before submitting. Safe to re-run: `hf download`
# resumes and skips complete files, and the JSONL is written once.
#   launch/prepare_data.sh [ROOT]
set -euo pipefail
root="${1:-/mnt/rayd}"
mkdir -p "$root/models" "$root/data/gsm8k"
for model in Qwen2.5-7B-Instruct Qwen2.5-1.5B-Instruct Qwen2.5-0.5B-Instruct; do
  hf download "Qwen/$model" --local-dir "$root/models/$model"
done
if [[ "${RAYD_LLAMA:-0}" == 1 ]]; then
  for model in Llama-3.3-70B-Instruct Llama-3.1-8B-Instruct; do
    hf download "meta-llama/$model" --local-dir "$root/models/$model" --exclude "original/*"
  done
fi

out="$root/data/gsm8k/train.jsonl"
if [[ ! -s "$out" ]]; then
  python - "$out" <<'PY'
import json
import os
import sys

from datasets import load_dataset

# The instruction makes the teacher end with GSM8K's own "#### <number>" line, which the jsonl
# task reads as the final answer and `rayd generate` splits rationale from answer at.
HINT = "\nSolve it step by step, then give the final answer on its own line as '#### <number>'."
out = sys.argv[1]
with open(out + ".tmp", "w", encoding="utf-8") as f:
    for row in load_dataset("openai/gsm8k", "main", split="train"):
        f.write(json.dumps({"question": row["question"] + HINT, "answer": row["answer"]}) + "\n")
os.replace(out + ".tmp", out)  # a reader never sees half a file
PY
fi
echo "prepare_data: models in $root/models, questions in $out"
