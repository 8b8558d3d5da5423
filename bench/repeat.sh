#!/usr/bin/env bash
# Each job N times, each time in a fresh process, one after another on one GPU, all rows
# appended to the job's JSONL under OUTDIR; then the medians over the processes
# (bench/medians.py). The first process of a job compiles in empty Inductor and Triton
# caches (its compile times are the cold ones); the later ones reuse what it left on disk,
# so a median of N costs about one compile, not N.
#   bash bench/repeat.sh N OUTDIR "train-eager train-sdpa decode ..."
# With DEADLINE (seconds since the epoch) set, a process that would likely end after it
# (judged by the job's last process) is not started, and the log says so: a device call
# then returns its results instead of being killed mid-row.
# Jobs: train-eager, train-sdpa, prefill-eager, prefill-sdpa (bench/whole_model.py, Inductor
# against hubkernels with the performance guard off; the -guard jobs with it on, as by
# default on CUDA), decode, decode-ro (bench/decode.py,
# default mode and reduce-overhead, batch 1 and 8; decode-guard-all guarded with every op
# replaced, min_elements 0, so the guard decides the KV-cache graph), decode-interleaved (Inductor
# and hubkernels timed in alternating rounds in each process), host, host-families
# (bench/host_cost.py), train-neox, prefill-neox (a Pythia-1B-shaped GPT-NeoX, LayerNorm),
# train-checks, decode-checks and decode-nochecks (a local repo's RMSNorm with the default
# runtime checks against runtime_checks=0; decode's two need a process each),
# compile-train-eager (bench/compile_time.py: it runs its own fresh processes, cold and
# warm, 3 each; give it N=1).
set -uo pipefail
cd "$(dirname "$0")/.."
N=$1 DIR=$2
read -ra JOBS <<< "$3"
declare -A CMD=(
  [train-eager]="bench/whole_model.py --attn eager --modes train --impls inductor,hubkernels-noguard"
  [train-sdpa]="bench/whole_model.py --attn sdpa --modes train --impls inductor,hubkernels-noguard"
  [prefill-eager]="bench/whole_model.py --attn eager --modes prefill --impls inductor,hubkernels-noguard"
  [prefill-sdpa]="bench/whole_model.py --attn sdpa --modes prefill --impls inductor,hubkernels-noguard"
  [train-eager-guard]="bench/whole_model.py --attn eager --modes train --impls inductor,hubkernels"
  [train-sdpa-guard]="bench/whole_model.py --attn sdpa --modes train --impls inductor,hubkernels"
  [prefill-eager-guard]="bench/whole_model.py --attn eager --modes prefill --impls inductor,hubkernels"
  [train-128k-guard]="bench/whole_model.py --attn sdpa --vocab 128256 --modes train --impls inductor,hubkernels"
  [decode-guard]="bench/decode.py --impls inductor,hubkernels --modes default --batches 1,8 --perf-guard on"
  [decode-guard-all]="bench/decode.py --impls inductor,hubkernels --modes default --batches 1,8 --perf-guard on --min-elements 0"
  [decode]="bench/decode.py --impls inductor,hubkernels --modes default --batches 1,8"
  [decode-ro]="bench/decode.py --impls inductor,hubkernels --modes reduce-overhead --batches 1,8"
  [decode-interleaved]="bench/decode.py --interleave --impls inductor,hubkernels --modes default,reduce-overhead --batches 1,8 --reps 8"
  [decode-checks]="bench/decode.py --interleave --impls inductor,hubkernels-local --modes default --batches 1 --reps 4"
  [decode-nochecks]="bench/decode.py --interleave --impls inductor,hubkernels-local-nochecks --modes default --batches 1 --reps 4"
  [train-checks]="bench/whole_model.py --attn eager --modes train --impls hubkernels-local,hubkernels-local-nochecks"
  [train-neox]="bench/whole_model.py --arch gpt_neox --vocab 50304 --modes train --impls inductor,hubkernels-noguard"
  [prefill-neox]="bench/whole_model.py --arch gpt_neox --vocab 50304 --modes prefill --impls inductor,hubkernels-noguard"
  [host]="bench/host_cost.py"
  [host-families]="bench/host_cost.py --families add_rmsnorm,silu_gate,silu_gate_fused,rotary,causal_conv1d --variants inductor,inductor-unfused,hubkernels --k 16"
  [compile-train-eager]="bench/compile_time.py --attn eager --mode train --impls inductor,hubkernels-noguard --repeats 3"
)
export PYTHONUNBUFFERED=1 TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-/tmp/inductor-cache-repeat}
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-/tmp/triton-cache-repeat}
mkdir -p "$DIR"
# Round by round (each job's process 1, then each job's process 2, ...): under a deadline
# every job gets as many processes as time allows, not the first jobs all of theirs.
declare -A LAST
for job in "${JOBS[@]}"; do
  [[ -n "${CMD[$job]:-}" ]] || { echo "unknown job $job; choose from ${!CMD[*]}"; exit 2; }
  LAST[$job]=0
done
for ((i = 1; i <= N; i++)); do
  for job in "${JOBS[@]}"; do
    if [[ -n "${DEADLINE:-}" ]] && (( $(date +%s) + LAST[$job] > DEADLINE )); then
      echo "$job process $i: not started, it would likely end after the deadline (last took ${LAST[$job]} s)"
      continue
    fi
    cache=warm; [[ $i == 1 ]] && cache=fresh
    extra=""; [[ ${CMD[$job]} == bench/whole_model.py* ]] && extra="--inductor-cache $cache"
    start=$(date +%s)
    limit=(); [[ -n "${DEADLINE:-}" ]] && limit=(timeout $(( DEADLINE - start )))
    "${limit[@]}" python3 ${CMD[$job]} $extra --out "$DIR/$job" > "$DIR/$job.$i.log" 2>&1
    rc=$? LAST[$job]=$(( $(date +%s) - start ))
    echo "$job process $i: rc $rc in ${LAST[$job]} s"
    tail -n 4 "$DIR/$job.$i.log"
  done
done
python3 bench/medians.py "$DIR" --md "$DIR/medians.md"
