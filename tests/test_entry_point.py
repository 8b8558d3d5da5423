"""The backend is found by name through the torch_dynamo_backends entry point."""

import json
import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import json, sys, torch
    from torch import nn

    class Norm(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(16))

        def forward(self, x):
            h = x.to(torch.float32)
            h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
            return self.weight * h.to(x.dtype)

    assert "hubcompile" not in sys.modules
    m, x = Norm(), torch.randn(3, 16)
    with torch.no_grad():
        out = torch.compile(m, backend="hubkernels")(x)
    torch.testing.assert_close(out, m(x))
    records = sys.modules["hubcompile"].RECORDS
    print(json.dumps({"replaced": records[-1].replaced["rmsnorm"]}))
    """
)


def test_backend_works_without_importing_hubcompile():
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT],
        capture_output=True, text=True, timeout=600,
        env={**{k: v for k, v in os.environ.items() if not k.startswith("HUBCOMPILE_")},
             "TORCHINDUCTOR_FX_GRAPH_CACHE": "0", "TORCHINDUCTOR_AUTOGRAD_CACHE": "0"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {"replaced": 1}


def test_torch_logs_shows_replacements():
    """TORCH_LOGS="+hubcompile" shows what a normal torch.compile replaced."""
    # torch resolves the module name at import, which imports hubcompile early.
    script = SCRIPT.replace('assert "hubcompile" not in sys.modules', "")
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=600,
        env={**{k: v for k, v in os.environ.items() if not k.startswith("HUBCOMPILE_")},
             "TORCHINDUCTOR_FX_GRAPH_CACHE": "0", "TORCHINDUCTOR_AUTOGRAD_CACHE": "0", "TORCH_LOGS": "+hubcompile"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "hubcompile: replaced 1 rmsnorm match(es)" in done.stderr


def test_help_lists_the_commands(capsys):
    """``hubcompile --help`` (the console script calls the same main) and ``python -m
    hubcompile --help`` print the usage with each command, and exit 0."""
    from hubcompile.__main__ import COMMANDS, main

    assert main(["--help"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("usage: hubcompile {demo,diff} [options]")
    for command in COMMANDS:
        assert f"\n  {command}  " in text
    done = subprocess.run([sys.executable, "-m", "hubcompile", "--help"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == text.strip(), done.stderr[-2000:]
    assert main(["bogus"]) == 2
    assert "got 'bogus'" in capsys.readouterr().err
