"""Why the attention pattern does (not) match on this machine: compile a tiny eager-attention
Llama with hubkernels, print what was replaced/refused and the graph around the softmax."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import hubcompile  # noqa: E402
from tiny_models import build, input_ids  # noqa: E402

device = "cuda" if torch.cuda.is_available() else "cpu"
for dtype in (torch.bfloat16, torch.float32):
    torch._dynamo.reset()
    hubcompile.RECORDS.clear()
    model, _ = build("llama", dtype)
    model.to(device)
    with torch.no_grad():
        torch.compile(model, backend=hubcompile.hubkernels)(input_ids().to(device))
    record = hubcompile.RECORDS[-1]
    print(dtype, record.replaced, record.refused.get("attention"))
    lines = record.code_before.splitlines()
    first = [i for i, line in enumerate(lines) if "amax" in line][0]
    print("\n".join(lines[first - 22:first + 14]))
