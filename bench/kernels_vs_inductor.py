"""Kept for the commands that still name it (bench/device_run.sh: kernels, hubops, conv):
the per-op benchmark is now bench/ops.py, run here on the model-size workloads.

    python bench/kernels_vs_inductor.py --out DIR [--small] [--ops a,b] [--impls a,b]

is ``python bench/ops.py --suite models ...`` (it writes DIR/ops.jsonl, not kernels.jsonl).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ops import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main(["--suite", "models", *sys.argv[1:]]))
