"""Lowering of hubcompile's ops: custom op definitions, kernel resolution, guards."""

from . import ops  # noqa: F401  (registers torch.ops.hubcompile.*)
