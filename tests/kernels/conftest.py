"""Shared setup for the bundled kernel repository tests.

On a machine without CUDA the Triton (``build/torch-cuda``) variants run on CPU tensors in
Triton's interpreter. ``triton.jit`` decides between compiling and interpreting when a
kernel module is imported, so TRITON_INTERPRET is set here, at conftest import time,
before any test module loads a kernel.
"""

from __future__ import annotations

import os
import zlib
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

BUNDLED_DIR = Path(__file__).resolve().parents[2] / "hubcompile" / "lowering" / "bundled"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# The variant kernels.get_local_kernel(repo_root) picks on this machine.
HOST_VARIANT = "torch-cuda" if torch.version.cuda is not None else "torch-cpu"


def variant_dir(repo: str, variant: str | None = None) -> Path:
    """``bundled/<repo>`` (variant None) or ``bundled/<repo>/build/<variant>``."""
    root = BUNDLED_DIR / repo
    return root if variant is None else root / "build" / variant


def load_variant(path: str | os.PathLike) -> object:
    """Load a kernel repo root or one build variant directory with ``kernels``.

    A variant directory (``build/torch-cuda``) loads regardless of the machine's backend;
    a repo root loads the variant ``kernels`` selects for this machine."""
    from kernels import get_local_kernel

    return get_local_kernel(Path(path))


@pytest.fixture(scope="session")
def device() -> str:
    return DEVICE


@pytest.fixture(scope="session")
def load_kernel():
    """``load_kernel(repo, variant=None)`` -> the loaded kernel module."""

    def _load(repo: str, variant: str | None = None):
        return load_variant(variant_dir(repo, variant))

    return _load


@pytest.fixture(autouse=True)
def _seed_per_test(request):
    """Fresh, reproducible random inputs: each test gets its own seed."""
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))
