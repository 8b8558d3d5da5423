#!/usr/bin/env bash
# Run end-to-end jobs (bench/whole_model.py) spread over the GPUs of this machine: job i
# goes to GPU i mod N, and each GPU runs its jobs one after another, so no two timings
# share a GPU. Records and logs go to $OUT.
#   bash bench/e2e_jobs.sh "llama-sdpa llama-eager llama-sdpa-128k lfm2 mamba2"
set -uo pipefail
declare -A ARGS=(
  [llama-sdpa]="--arch llama --attn sdpa --vocab 32000"
  [llama-eager]="--arch llama --attn eager --vocab 32000"
  [llama-sdpa-128k]="--arch llama --attn sdpa --vocab 128256"
  [llama-eager-128k]="--arch llama --attn eager --vocab 128256"
  [lfm2]="--arch lfm2 --attn sdpa --vocab 65536"
  [mamba2]="--arch mamba2 --layers 4 --vocab 32000"
)
read -ra JOBS <<< "$1"
GPUS=$(python3 -c "import torch; print(max(torch.cuda.device_count(), 1))")
for ((g = 0; g < GPUS; g++)); do
  (
    for ((i = g; i < ${#JOBS[@]}; i += GPUS)); do
      job=${JOBS[$i]}
      [[ -n "${ARGS[$job]:-}" ]] || { echo "unknown job $job; choose from ${!ARGS[*]}"; continue; }
      mkdir -p "$OUT/$job"
      CUDA_VISIBLE_DEVICES=$g python3 bench/whole_model.py ${ARGS[$job]} ${E2E_ARGS:-} --out "$OUT/$job" \
        > "$OUT/$job.log" 2>&1
      echo "GPU $g: $job done (rc $?)"
    done
  ) &
done
wait
tail -n 20 "$OUT"/*.log
