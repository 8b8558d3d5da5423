"""Which kernel runs an op on a given device and dtype.

``kernel_for(op, tensor)`` returns a loaded kernel module whose functions follow the
bundled repos' API, or None to run the eager reference.
"""

from __future__ import annotations

import torch


def kernel_for(op: str, tensor: torch.Tensor):
    return None
