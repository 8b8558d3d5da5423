"""Lowering of hubcompile's ops: custom op definitions, kernel resolution, guards."""

# Registers torch.ops.hubcompile.*: a graph loaded from Inductor's cache calls them
# without any pattern module having been imported.
from . import (  # noqa: F401
    attention_ops, causal_conv1d_ops, embedding_ops, layer_norm_ops, linear_cross_entropy_ops, mlp_ops, ops,
    rotary_ops)
from . import direct_ops  # noqa: E402

direct_ops.define_twins()  # hubcompile_direct::<op>, which compiled graphs call
