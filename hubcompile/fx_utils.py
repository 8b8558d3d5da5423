"""Helpers that read FX nodes, shared by the pattern families and the graph passes."""

from __future__ import annotations

import torch


def is_joint_graph(graph: torch.fx.Graph) -> bool:
    """A training graph is the joint forward+backward graph: it takes tangents."""
    return any(n.op == "placeholder" and n.name.startswith("tangents") for n in graph.nodes)


def calls(node, *targets) -> bool:
    """Whether ``node`` of Dynamo's graph calls one of ``targets``: functions, or the
    names of tensor methods."""
    if not isinstance(node, torch.fx.Node):
        return False
    if node.op == "call_method":
        return node.target in targets
    return node.op == "call_function" and node.target in targets


def meta_val(node):
    """A node's fake value (``example_value`` in Dynamo's graph, ``val`` in ATen graphs);
    anything else as it is."""
    if not isinstance(node, torch.fx.Node):
        return node
    return node.meta["example_value"] if "example_value" in node.meta else node.meta.get("val")


def op_args(node: torch.fx.Node) -> dict:
    """The arguments of a node that calls an OpOverload, by their schema names, with the
    defaults of those not given."""
    arguments = node.target._schema.arguments
    bound = {a.name: a.default_value if a.has_default_value() else None for a in arguments}
    bound.update(zip([a.name for a in arguments], node.args))
    bound.update(node.kwargs)
    return bound


def is_static(value) -> bool:
    """No symbolic size in ``value``: a tensor's shape and strides, the items of a list or
    tuple, or the value itself."""
    if isinstance(value, torch.Tensor):
        return all(isinstance(s, int) for s in (*value.shape, *value.stride()))
    if isinstance(value, (list, tuple)):
        return all(is_static(v) for v in value)
    return not isinstance(value, (torch.SymInt, torch.SymFloat, torch.SymBool))


def is_python_float(value) -> bool:
    # With dynamic shapes a module's float attribute can arrive as a 0-d tensor or a
    # SymFloat; the ops take a real float.
    return isinstance(value, (float, int)) and not isinstance(value, bool)


def hoist_before(anchor: torch.fx.Node, *nodes) -> str | None:
    """Move ``nodes`` (None allowed), with what they read, to just before ``anchor``
    where they come after it, keeping their order: a replacement inserted at ``anchor``
    can then read them. Nothing moves, and the reason is returned, where one of them
    depends on ``anchor`` or the move would carry a call with side effects."""
    order = {n: i for i, n in enumerate(anchor.graph.nodes)}
    cone, todo = set(), [n for n in nodes if isinstance(n, torch.fx.Node)]
    while todo:
        node = todo.pop()
        if node in cone or order[node] < order[anchor]:
            continue
        if node is anchor:
            return f"an input is computed from {anchor.name}"
        if node.op not in ("call_function", "call_method", "get_attr") or node.is_impure():
            return f"{node.name} comes after {anchor.name} and cannot be moved before it ({node.op} {node.target})"
        cone.add(node)
        todo.extend(node.all_input_nodes)
    for node in sorted(cone, key=order.__getitem__):
        anchor.prepend(node)
    return None
