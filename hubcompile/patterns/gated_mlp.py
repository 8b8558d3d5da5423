"""A whole gated MLP handed to a Hub MLP layer of a kernel mapping (``MLP``, ``SwiGLUMLP``,
``GeGLUMLP``, e.g. liger-kernels' ``LigerSwiGLUMLP``, which reads ``gate_proj``,
``up_proj`` and ``down_proj``):

    F.linear(act(F.linear(x, Wg, bg)) * F.linear(x, Wu, bu), Wd, bd)      (Llama)
    g, u = F.linear(x, W, b).chunk(2, -1)  (or split, or slices at the half)
    F.linear(act(g) * u, Wd, bd)                                           (Phi-3)

with the product in either order and ``act`` ``F.silu``, ``x * sigmoid(x)`` or
``F.gelu(approximate="tanh")``. It becomes ``hubcompile::gated_mlp`` (lowering/mlp_ops.py).

Only where a mapping names such a layer for the match's device, mode and activation:
otherwise nothing here runs, the gate alone is replaced by the silu_gate /
gelu_tanh_gate patterns and the projections stay Inductor's matmuls; the same happens to
a match the mapped layer does not serve or whose guard fails. Matched on Dynamo's graph,
before AOTAutograd, where each projection is still one ``F.linear`` (the op's autograd
formula serves training). Recorded under the gate's family, whose settings switch it.
"""

from __future__ import annotations

import logging
import operator

import torch
import torch.nn.functional as F

from ..fx_utils import calls as _is
from ..lowering import mlp_ops as ops
from .framework import DynamoGraphFamily, Replacement, Spelling, chosen_kernels, kernels_chosen, meta_val, source_line

log = logging.getLogger(__name__)

_LINEAR = (F.linear, torch._C._nn.linear)
_MUL = (operator.mul, torch.mul, "mul")
_SIGMOID = (torch.sigmoid, F.sigmoid, "sigmoid")
_GETITEM = (operator.getitem,)


def _linear(node):
    """(x, weight, bias) of an ``F.linear`` node, else None."""
    if not _is(node, *_LINEAR):
        return None
    args = list(node.args) + [None] * (3 - len(node.args))
    x = node.kwargs.get("input", args[0])
    weight = node.kwargs.get("weight", args[1])
    bias = node.kwargs.get("bias", args[2])
    return x, weight, bias


def _activation(node):
    """(activation, its input, the activation's nodes) when ``node`` applies one, else None."""
    if _is(node, F.silu, torch.nn.functional.silu, "silu") and len(node.args) == 1 \
            and not node.kwargs.get("inplace", False):
        return "silu", node.args[0], [node]
    if _is(node, F.gelu, "gelu") and len(node.args) == 1 and node.kwargs.get("approximate") == "tanh":
        return "gelu_tanh", node.args[0], [node]
    if _is(node, *_MUL) and len(node.args) == 2 and not node.kwargs:
        for g, s in (node.args, reversed(node.args)):
            if _is(s, *_SIGMOID) and len(s.args) == 1 and s.args[0] is g and len(s.users) == 1:
                return "silu", g, [node, s]
    return None


def _halves(gate, up):
    """The fused projection whose halves ``gate`` (first) and ``up`` (second) are, and the
    nodes that cut it: ``chunk(2, -1)``, ``split(n // 2, -1)`` or slices at the half."""
    if not (_is(gate, *_GETITEM) and _is(up, *_GETITEM)):
        return None
    if gate.args[0] is up.args[0] and gate.args[1] == 0 and up.args[1] == 1:
        cut = gate.args[0]
        fused = cut.args[0] if cut.args else None
        n = meta_val(fused).shape[-1] if isinstance(meta_val(fused), torch.Tensor) else None
        if n is None or not isinstance(n, int) or n % 2:
            return None
        args, kwargs = list(cut.args[1:]), dict(cut.kwargs)
        dim = kwargs.pop("dim", args[1] if len(args) > 1 else 0)
        chunked = _is(cut, torch.chunk, "chunk") and args[:1] == [2]
        split = _is(cut, torch.split, "split") and args[:1] in ([n // 2], [[n // 2, n // 2]])
        if (chunked or split) and not kwargs and dim in (-1, meta_val(fused).dim() - 1) \
                and set(cut.users) == {gate, up}:
            return fused, [cut, gate, up]
        return None
    fused = gate.args[0]
    if up.args[0] is not fused or not isinstance(meta_val(fused), torch.Tensor):
        return None
    n = meta_val(fused).shape[-1]
    first, second = (Ellipsis, slice(None, n // 2, None)), (Ellipsis, slice(n // 2, None, None))
    if isinstance(n, int) and n % 2 == 0 and gate.args[1] == first and up.args[1] == second:
        return fused, [gate, up]
    return None


class Match:
    """One MLP found in the graph."""

    def __init__(self, down, activation, nodes, x, gate_weight, gate_bias, up_weight, up_bias):
        self.down, self.activation, self.nodes, self.x = down, activation, nodes, x
        _, self.down_weight, self.down_bias = _linear(down)
        self.gate_weight, self.gate_bias, self.up_weight, self.up_bias = gate_weight, gate_bias, up_weight, up_bias

    @property
    def fused(self) -> bool:
        return self.up_weight is None

    @property
    def spelling(self) -> str:
        return f"mlp{'_fused_gate_up' if self.fused else ''}"

    @property
    def weights(self):
        return (self.gate_weight, self.gate_bias, self.up_weight, self.up_bias, self.down_weight, self.down_bias)


def find(down) -> Match | None:
    """The MLP whose down projection is ``down``, or None."""
    y = _linear(down)[0]
    if not (_is(y, *_MUL) and len(y.args) == 2 and not y.kwargs and all(isinstance(a, torch.fx.Node) for a in y.args)):
        return None
    for a, b in (y.args, reversed(y.args)):
        act = _activation(a)
        if act is None:
            continue
        activation, gate, act_nodes = act
        interior = [*act_nodes, y]
        gate_linear, up_linear = _linear(gate), _linear(b)
        if gate_linear is not None and up_linear is not None and gate_linear[0] is up_linear[0]:
            match = Match(down, activation, [gate, b, *interior, down], gate_linear[0], gate_linear[1],
                          gate_linear[2], up_linear[1], up_linear[2])
        else:
            halves = _halves(gate, b)
            fused_linear = _linear(halves[0]) if halves is not None else None
            if fused_linear is None:
                continue
            match = Match(down, activation, [halves[0], *halves[1], *interior, down], fused_linear[0],
                          fused_linear[1], fused_linear[2], None, None)
        if _contained(match):
            return match
    return None


def _contained(match: Match) -> bool:
    """Every node of the match but the down projection is used inside it only."""
    inside = set(match.nodes)
    return all(all(u in inside for u in n.users) for n in match.nodes if n is not match.down)


def _check(match: Match) -> str | None:
    tensors = [meta_val(t) for t in (match.x, *match.weights) if t is not None]
    if not all(isinstance(t, torch.Tensor) for t in tensors):
        return "an input is not a tensor"
    x = tensors[0]
    if not x.is_floating_point() or x.dim() < 2 or any(t.dtype != x.dtype for t in tensors):
        return f"mixed or non-float dtypes ({', '.join(sorted({str(t.dtype) for t in tensors}))})"
    if len({t.device for t in tensors}) != 1:
        return "inputs on different devices"
    return None


class MappedMLP(DynamoGraphFamily):
    """The MLPs of one activation family (silu_gate, gelu_tanh_gate), given to the mapped
    layer. Rewrites Dynamo's graph and keeps the families' records."""

    anchors = _LINEAR  # the down projection

    def __init__(self, name: str, activation: str):
        super().__init__()
        self.name, self.activation = name, activation
        self.description = f"a whole gated MLP ({activation}) for a kernel mapping's MLP layer"

    def applies(self, cfg) -> bool:
        return any(e.group == "mlp" for e in cfg.kernel_mapping)

    def find(self, down):
        match = find(down)
        if match is None or match.activation != self.activation:
            return None, None
        return match, _check(match)

    def kept(self, anchor, reason: str) -> None:
        # Not a refusal: the gate inside is still offered to the gate patterns.
        log.info("hubcompile: %s: an MLP is not given to a mapped layer (%s); its gate is matched alone",
                 self.name, reason)

    def replace(self, gm, match: Match) -> str | None:
        from ..lowering import kernels
        from ..lowering.device import detect

        x = meta_val(match.x)
        training = bool(meta_val(match.down).requires_grad)
        device = detect(x.device)
        overrides, trusted = self.cfg.kernel_overrides(), self.cfg.trusted_orgs
        needs = dict(training=training, activation=match.activation, fused=match.fused)
        forward = kernels.choose("gated_mlp", device, x.dtype, overrides, trusted, **needs)
        if forward.spec is None:
            return f"no usable MLP layer for {device} {x.dtype}: " + "; ".join(forward.reasons)
        backward = kernels.choose("gated_mlp_backward", device, x.dtype, overrides, trusted, **needs)
        chosen = (forward.spec, backward.spec or "reference")
        guard = None
        if self.cfg.guard:
            guard = self._guard(match, chosen, training)
            if not guard.passed:
                log.warning("hubcompile: %s mlp: kernel %s failed its numerical guard, keeping the original code: %s",
                            self.name, chosen[0], guard.summary())
                return f"guard failed for {chosen[0]}: {guard.summary()}"
        self._rewrite(gm, match, chosen)
        self.accepted.append((match.spelling, chosen[0]))
        self.replacements.append(Replacement(
            self.name, match.spelling, "gated_mlp", chosen[0], chosen[1], training,
            tuple(n.name for n in match.nodes), tuple(dict.fromkeys(filter(None, map(source_line, match.nodes)))),
            guard))
        return None

    def _rewrite(self, gm, match: Match, chosen) -> None:
        graph = gm.graph
        # Parameters read through get_attr may come after the first projection: move them before it.
        first = min(match.nodes, key=list(graph.nodes).index)
        order = {n: i for i, n in enumerate(graph.nodes)}
        for t in match.weights:
            if t is not None and t.op == "get_attr" and order[t] > order[first]:
                first.prepend(t)
        with graph.inserting_before(match.down):
            out = graph.create_node("call_function", ops.gated_mlp._opoverload,
                                    (match.x, *match.weights, match.activation, *chosen))
        out.meta["example_value"] = ops.gated_mlp._opoverload(
            *torch.fx.node.map_arg((match.x, *match.weights), meta_val), match.activation, *chosen)
        out.meta.update({k: v for k, v in match.down.meta.items() if k in ("stack_trace", "nn_module_stack")})
        match.down.replace_all_uses_with(out)
        for node in reversed(match.nodes):
            if not node.users:
                graph.erase_node(node)

    def _guard(self, match: Match, chosen, training: bool):
        """The numerical guard of framework.py, on the original nodes lifted into a small
        graph of (x, the weights and biases)."""
        from ..guards import numerical as guards

        names = ("x", "gate_weight", "gate_bias", "up_weight", "up_bias", "down_weight", "down_bias")
        sub = torch.fx.Graph()
        placeholders = {name: sub.placeholder(name) for name in names}
        env = {node: placeholders[name] for name, node in zip(names, (match.x, *match.weights)) if node is not None}

        def lookup(a):
            if a not in env:
                raise KeyError(f"the MLP depends on {a.name}, outside the matched nodes")
            return env[a]

        for node in sorted(match.nodes, key=list(match.down.graph.nodes).index):
            env[node] = sub.node_copy(node, lookup)
        sub.output(env[match.down])
        original = torch.fx.GraphModule(torch.nn.Module(), sub)
        activation = match.activation

        def search(x, gate_weight, gate_bias, up_weight, up_bias, down_weight, down_bias):
            return original(x, gate_weight, gate_bias, up_weight, up_bias, down_weight, down_bias)

        def replace(x, gate_weight, gate_bias, up_weight, up_bias, down_weight, down_bias):
            return ops.gated_mlp(x, gate_weight, gate_bias, up_weight, up_bias, down_weight, down_bias, activation,
                                 *chosen_kernels())

        values = {name: meta_val(node) if node is not None else None
                  for name, node in zip(names, (match.x, *match.weights))}
        x = values["x"]
        spelling = Spelling(f"{self.name}.{match.spelling}", search, replace, lambda: [], (), op="gated_mlp",
                            shrink_dims=tuple(range(x.dim() - 1)),
                            # every token row reads all of the weights; its reference work is
                            # its row of x and three intermediate rows (gate, up, product)
                            input_rows={name: {} for name in names[1:]},
                            row_cost=lambda shapes: shapes["x"][-1] + 3 * shapes["down_weight"][-1])
        with kernels_chosen(chosen):
            result = guards.check(spelling, values, chosen, backward=training and self.cfg.guard_backward,
                                  tolerances=self.cfg.tolerances_for(self.name))
        self.guarded.append((spelling.name, chosen[0], result))
        return result


FAMILIES = [MappedMLP("silu_gate", "silu"), MappedMLP("gelu_tanh_gate", "gelu_tanh")]
