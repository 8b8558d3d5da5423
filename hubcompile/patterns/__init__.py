"""Pattern families, one module each. ``families()`` lists them in pass order."""

from __future__ import annotations


def families():
    """The pattern-matcher families (Inductor's joint graph)."""
    from . import attention, causal_conv1d, gated_activation, rmsnorm, rotary

    return [rmsnorm.FAMILY, *gated_activation.FAMILIES, causal_conv1d.FAMILY, attention.FAMILY, rotary.FAMILY]


def dynamo_graph_families():
    """Families that rewrite Dynamo's graph before AOTAutograd, in order."""
    from . import causal_mask, linear_cross_entropy

    return [linear_cross_entropy.FAMILY, causal_mask.FAMILY]
