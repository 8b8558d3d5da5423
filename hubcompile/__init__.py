"""hubcompile: ``torch.compile(model, backend="hubkernels")``.

Matches subgraphs such as RMSNorm and SiLU-gate multiplies in the captured graph,
replaces them with ``torch.ops.hubcompile`` ops that run Hub kernels, and hands the rest
to Inductor.
"""

from __future__ import annotations

import logging

import torch._logging

__version__ = "0.1.0"

# TORCH_LOGS="+hubcompile" works without this (hubcompile is a module name); the
# registration lets torch._logging.set_logs(hubcompile=logging.DEBUG) work too.
torch._logging._internal.register_log("hubcompile", "hubcompile")

from . import lowering  # noqa: E402,F401  (registers torch.ops.hubcompile.*)
from .backend import hubkernels  # noqa: E402
from .records import RECORDS  # noqa: E402
from .config import FAMILIES, configure, reset as reset_config  # noqa: E402
from .explain import Report, explain  # noqa: E402

logging.getLogger(__name__).addHandler(logging.NullHandler())


def _register_backend_name() -> None:
    """backend="hubkernels" by name even where the package is not installed (a source
    checkout on PYTHONPATH has no entry point): register on import, once."""
    from importlib.metadata import entry_points

    from torch._dynamo.backends import registry

    # Installed, torch loads the entry point itself (registering here too would make its
    # lazy load fail with "duplicate name").
    installed = any(ep.name == "hubkernels" for ep in entry_points(group="torch_dynamo_backends"))
    if not installed and "hubkernels" not in registry._COMPILER_FNS:
        registry.register_backend(hubkernels, name="hubkernels")


_register_backend_name()

__all__ = ["FAMILIES", "RECORDS", "Report", "configure", "explain", "hubkernels", "reset_config", "__version__"]
