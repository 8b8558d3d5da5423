"""Pattern families, one module each. ``families()`` lists them in pass order."""

from __future__ import annotations


def families():
    from . import attention, causal_conv1d, gated_activation, rmsnorm, rotary

    return [rmsnorm.FAMILY, *gated_activation.FAMILIES, causal_conv1d.FAMILY, attention.FAMILY, rotary.FAMILY]
