"""Float scalars that Dynamo lifts into graph inputs under dynamic shapes, and what they do
to matching training graphs.

With symbolic sizes (``dynamic=True``, and from the second shape a model sees), Dynamo
turns a float module attribute (attention's ``self.scaling``, a norm's eps) into a 0-d
tensor input read with ``.item()``; AOTAutograd's ``tensorify_python_scalars`` pass then
turns each use of the float back into a tensor op, with one
``prims.convert_element_type(input, dtype)`` per use. Two things follow for the joint
forward+backward patterns:

- attention's scale is used by the forward and by the backward, each through its own
  conversion, while the pattern has one ``scale`` argument for both: the matcher saw two
  different nodes and the match failed (0 of 2 attentions in a training graph under
  ``dynamic=True``). ``merge_conversions`` makes them one node.
- at each match the matcher traces the spelling again with the match's fake tensors, and
  for a joint trace AOTAutograd runs ``tensorify_python_scalars`` on that small graph with
  the compile's shape environment. It finds the compile's float symbols, none of which the
  small graph tensorified, marks them all to be specialised (a global set Dynamo reads at
  its next trace) and raises ``TensorifyScalarRestartAnalysis``; the matcher takes it for
  a shape mismatch. The first joint match of every compile failed so (RMSNorm 3 of 4),
  and the marks were left for later compiles. ``retraces_without_restart`` marks them for
  the duration of the matching, so no retrace restarts, and puts the set back after.
"""

from __future__ import annotations

import contextlib

import torch


def merge_conversions(graph: torch.fx.Graph) -> int:
    """Make the identical ``convert_element_type`` nodes of each 0-d graph input (a lifted
    scalar) one node (the first in the graph); returns how many were merged. Converting an
    input is pure and reads nothing else, so the first conversion can stand for the later
    ones. Only 0-d inputs: a weight shared by several matches (tied weights, a chain of
    gates over one parameter) keeps one conversion per match, which each pattern needs as
    its own interior node (merged, one of three gates sharing a weight stopped matching)."""
    convert = torch.ops.prims.convert_element_type.default
    order = {n: i for i, n in enumerate(graph.nodes)}
    merged = 0
    for placeholder in graph.find_nodes(op="placeholder"):
        val = placeholder.meta.get("val")
        if not (isinstance(val, torch.Tensor) and val.dim() == 0):
            continue
        first: dict = {}
        for user in sorted(placeholder.users, key=order.__getitem__):
            if user.op != "call_function" or user.target is not convert or user.kwargs:
                continue
            key = tuple(user.args[1:])
            if key in first:
                user.replace_all_uses_with(first[key])
                graph.erase_node(user)
                merged += 1
            else:
                first[key] = user
    return merged


@contextlib.contextmanager
def retraces_without_restart(graph: torch.fx.Graph):
    """While the pattern passes run on ``graph``: the compile's float symbols are marked as
    specialised in Dynamo's ``TensorifyState``, so a joint retrace does not ask Dynamo to
    restart; the set is restored afterwards. The compile's own tensorify pass has already
    run (it precedes Inductor's joint passes), so the marks change nothing else."""
    try:
        from torch._dynamo.symbolic_convert import TensorifyState
        from torch.fx.experimental.symbolic_shapes import SymT, symbol_is_type
    except ImportError:  # another torch: nothing to protect
        yield
        return
    floats = {str(s) for s in _backed_values(graph) if symbol_is_type(s, SymT.FLOAT)}
    saved = set(TensorifyState.force_specializations)
    TensorifyState.force_specializations.update(floats)
    try:
        yield
    finally:
        TensorifyState.force_specializations.clear()
        TensorifyState.force_specializations.update(saved)


def _backed_values(graph: torch.fx.Graph) -> dict:
    """The symbols of the graph's shape environment with their values (empty without one)."""
    from torch._guards import detect_fake_mode

    vals = [n.meta.get("val") for n in graph.find_nodes(op="placeholder")]
    mode = detect_fake_mode([v for v in vals if isinstance(v, torch.Tensor)])
    env = getattr(mode, "shape_env", None)
    if env is None:
        return {}
    # backed_var_to_val in torch 2.13 (var_to_val warns there), var_to_val before
    return env.backed_var_to_val if hasattr(env, "backed_var_to_val") else getattr(env, "var_to_val", {})
