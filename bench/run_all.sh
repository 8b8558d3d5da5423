#!/usr/bin/env bash
# The whole benchmark suite on a bare GPU machine, in one command:
#   bash bench/run_all.sh [OUTDIR]
# OUTDIR defaults to bench/results/<device>/<date>/ (device from torch, e.g. nvidia-h200).
# It needs torch, triton, transformers and `pip install -e .` (or the wheels in .whl/,
# installed as bench/device_run.sh does); liger-kernel is used when importable.
# Roughly 35 minutes on one H200; with several GPUs the end-to-end jobs run side by side.
#   1. per-op, kernels-benchmarks' workloads        -> OUTDIR/ops_kb/   (ops.jsonl, summary.md, CSV + SVG plots)
#   2. per-op, Llama/Mamba model sizes              -> OUTDIR/ops_models/
#   3. end to end: Llama eager/sdpa, 32k and 128k vocabularies, LFM2   -> OUTDIR/e2e/<job>/whole_model.jsonl
#   4. the 128k-vocabulary training step, fused linear cross-entropy vs Liger -> OUTDIR/lce/
set -uo pipefail
cd "$(dirname "$0")/.."
if [[ -d .whl ]] && ! python3 -c "import kernels" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1 TORCHINDUCTOR_FX_GRAPH_CACHE=0 TORCHINDUCTOR_AUTOGRAD_CACHE=0
device=$(python3 -c "import torch; print(torch.cuda.get_device_name(0).lower().replace(' ', '-') if torch.cuda.is_available() else 'cpu')")
DIR=${1:-bench/results/$device/$(date -u +%Y-%m-%d)}
mkdir -p "$DIR"
echo "results in $DIR"
python3 bench/ops.py --suite kb --out "$DIR/ops_kb" 2>&1 | tee "$DIR/ops_kb.log"
python3 bench/ops.py --suite models --out "$DIR/ops_models" 2>&1 | tee "$DIR/ops_models.log"
OUT="$DIR/e2e" bash bench/e2e_jobs.sh "llama-sdpa llama-eager llama-sdpa-128k lfm2" 2>&1 | tee "$DIR/e2e.log"
python3 bench/linear_cross_entropy.py --out "$DIR/lce" 2>&1 | tee "$DIR/lce.log"
echo "done: $DIR (per-op tables in */summary.md, plots beside them)"
