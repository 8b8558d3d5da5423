"""Lowering of hubcompile's ops: custom op definitions, kernel resolution, guards."""

# Registers torch.ops.hubcompile.*: a graph loaded from Inductor's cache calls them
# without any pattern module having been imported.
from . import attention_ops, causal_conv1d_ops, linear_cross_entropy_ops, ops, rotary_ops  # noqa: F401
