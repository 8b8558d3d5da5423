#!/usr/bin/env bash
# Run on the lent GPU machine (the device tool), from the repository root, with the
# `kernels` wheel carried in .whl/ (the image lacks it). Results go to $OUT.
#   bash bench/device_run.sh kernels|model|tests|lce|lcetests|gpuchecks|attn-train|layernorm ...
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 TORCHINDUCTOR_FX_GRAPH_CACHE=0 TORCHINDUCTOR_AUTOGRAD_CACHE=0
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv,noheader
python3 -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)"
for what in "$@"; do
  case "$what" in
    kernels) python3 bench/kernels_vs_inductor.py --out "$OUT" 2>&1 | tee "$OUT/kernels.log" ;;
    hubops) python3 bench/kernels_vs_inductor.py --impls inductor,hubkernels --out "$OUT" 2>&1 | tee "$OUT/hubops.log" ;;
    conv) python3 bench/kernels_vs_inductor.py --ops causal_conv1d_silu --out "$OUT" 2>&1 | tee "$OUT/conv.log"
          python3 bench/whole_model.py --arch mamba2 --layers 4 --modes prefill,train --out "$OUT" 2>&1 | tee "$OUT/mamba2.log" ;;
    attn-train) python3 bench/whole_model.py --attn eager --modes train --out "$OUT" 2>&1 | tee "$OUT/llama_eager_attn_train.log" ;;
    attn) python3 bench/whole_model.py --attn eager --out "$OUT" 2>&1 | tee "$OUT/llama_eager_attn.log" ;;
    debug-attn) python3 bench/debug_attention.py 2>&1 | tee "$OUT/debug_attention.log" ;;
    profile) python3 bench/profile_op.py 2>&1 | tee "$OUT/profile.log" ;;
    model) python3 bench/whole_model.py --out "$OUT" 2>&1 | tee "$OUT/whole_model.log" ;;
    pytest) python3 -m pytest -q -p no:cacheprovider ${PYTEST_ARGS:-tests/test_inline.py} 2>&1 | tail -40 | tee "$OUT/pytest.log" ;;
    tests) python3 -m pytest -q -p no:cacheprovider tests/kernels tests/test_ops.py 2>&1 | tail -25 | tee "$OUT/tests.log" ;;
    gpuchecks) python3 bench/gpu_checks.py --out "$OUT" 2>&1 | tee "$OUT/gpu_checks.log" ;;
    lcemem) python3 bench/lce_memory.py --out "$OUT" ${LCEMEM_ARGS:-} 2>&1 | tee "$OUT/lce_memory.log" ;;
    mapping) # transformers 5.22 (which takes kernels 0.17.2) and its dependencies, carried in .whl522/;
      # liger-kernel's wheel in .whl/ (the liger-kernels repo is built from it); MAPPING_ARGS="--modes memory" ...
      python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site522 .whl522/*.whl 2>/dev/null
      PYTHONPATH=/tmp/site522:/tmp/site python3 bench/kernel_mapping.py --out "$OUT" ${MAPPING_ARGS:-} 2>&1 | tee "$OUT/kernel_mapping.log" ;;
    ops) # per-op suite; its plots stay on the machine (the device tool brings back 8 files): --report rebuilds them here
      python3 bench/ops.py --suite "${OPS_SUITE:-models}" --budget-s 480 --out /tmp/ops 2>&1 | tee "$OUT/ops.log"
      cp /tmp/ops/ops.jsonl /tmp/ops/summary.md "$OUT"/ ;;
    e2e) # the end-to-end suite, its jobs spread over the machine's GPUs (one job per GPU at a time)
      bash bench/e2e_jobs.sh "${E2E_JOBS:-llama-sdpa llama-eager}" ;;
    profile-model) python3 bench/profile_model.py --out "$OUT" ${PROFILE_ARGS:-} 2>&1 | grep -v USDT | tee "$OUT/profile_model.log" ;;
    lce) python3 bench/linear_cross_entropy.py --out "$OUT" ${LCE_ARGS:-} 2>&1 | tee "$OUT/linear_cross_entropy.log" ;;
    lcetests) python3 -m pytest -q -p no:cacheprovider tests/kernels/test_ce_rows_triton.py tests/test_linear_cross_entropy.py tests/test_models.py -k "not inference_replaces" 2>&1 | tail -25 | tee "$OUT/lcetests.log" ;;
    layernorm) # issue 23 on the GPU: the bundled LayerNorm kernels against float64, then the per-op
      # kernels-benchmarks LayerNorm workloads (16384x4096 among them); the end-to-end rows are
      # repeat.sh's train-neox and prefill-neox jobs
      python3 -m pytest -q -p no:cacheprovider tests/kernels/test_bundled_layer_norm.py 2>&1 | tail -4 | tee "$OUT/layernorm_tests.log"
      python3 bench/ops.py --suite kb --ops layer_norm,add_layer_norm --impls inductor,bundled-triton,hubkernels-noguard \
        --budget-s 120 --out /tmp/ops-ln 2>&1 | tail -40 | tee "$OUT/layernorm_ops.log"
      cp /tmp/ops-ln/ops.jsonl "$OUT/layernorm_ops.jsonl" ;;
    newtests) python3 -m pytest -q -p no:cacheprovider tests/test_rotary.py tests/test_guards.py tests/test_attention.py 2>&1 | tail -25 | tee "$OUT/newtests.log" ;;
  esac
done
