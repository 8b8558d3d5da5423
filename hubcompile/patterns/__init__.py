"""Pattern families, one module each. ``families()`` lists them in pass order."""

from __future__ import annotations


def families():
    """The pattern-matcher families (Inductor's joint graph)."""
    from . import attention, causal_conv1d, gated_activation, layer_norm, rmsnorm, rotary

    return [rmsnorm.FAMILY, layer_norm.HAND_WRITTEN, *gated_activation.FAMILIES, causal_conv1d.FAMILY,
            attention.FAMILY, rotary.FAMILY]


def forget_traced() -> None:
    """Drop every family's registered patterns, as a new process starts: they are
    registered again at the next compile, from the pattern cache on disk or traced."""
    for family in families():
        family._passes.clear()


def dynamo_graph_families():
    """Families that rewrite Dynamo's graph before AOTAutograd, in order."""
    from . import causal_mask, gated_mlp, layer_norm, linear_cross_entropy, rmsnorm

    return [*gated_mlp.FAMILIES, layer_norm.FAMILY, rmsnorm.TORCH_RMS_NORM, linear_cross_entropy.FAMILY,
            causal_mask.FAMILY]


# Names of the torch functions, tensor methods or modules that each family's spellings
# call, as Dynamo's graph names them. A family with none of them in a graph cannot match
# there, so its patterns need not be traced for it (attention's take seconds).
HINTS = {
    # (torch's F.rms_norm is matched on Dynamo's graph: rmsnorm.TorchRMSNorm)
    "rmsnorm": {"rsqrt", "rmsnorm"},
    "layer_norm": {"rsqrt"},  # written out by hand (F.layer_norm is matched on Dynamo's graph)
    "silu_gate": {"silu", "sigmoid"},
    "gelu_tanh_gate": {"gelu", "tanh"},
    "causal_conv1d": {"conv1d", "convolution"},
    "attention": {"softmax", "_softmax"},
    "rotary": {"cat", "stack", "neg"},
}


def _called_names(gm) -> set[str]:
    names = set()
    for node in gm.graph.nodes:
        if node.op == "call_function":
            names.add(getattr(node.target, "__name__", str(node.target)).lower())
        elif node.op == "call_method":
            names.add(str(node.target).lower())
        elif node.op == "call_module":
            names.add(type(gm.get_submodule(node.target)).__name__.lower())
    return names


def hinted(gm) -> frozenset[str]:
    """The pattern-matcher families whose spellings could occur in Dynamo's graph ``gm``."""
    names = _called_names(gm)
    return frozenset(f for f, hints in HINTS.items() if any(h in name for name in names for h in hints))
