"""LayerNorm, as ``nn.LayerNorm`` and ``F.layer_norm`` compute it, with or without a
residual add before it: ``layer_norm`` and ``add_layer_norm``.

Matched on the graph Dynamo captures, before AOTAutograd, where a LayerNorm is still one
``F.layer_norm`` call. After AOTAutograd it is a decomposition that depends on the device
(on CPU the bf16 decomposition rounds mean and rstd to bf16 for the backward, on CUDA it
keeps them in fp32) and on the input's rank (the reductions name positive dims), so a
joint pattern traced here would not match a GPU's training graph. AOTAutograd traces the
op's autograd formula instead, as for ``linear_cross_entropy``. Walking back from each
``F.layer_norm(x, (N,), weight, bias, eps)``:

    y = F.layer_norm(x, ...)                                   weight and bias, either or none
    y = F.layer_norm(x.float(), ...).to(x.dtype)               the upcast around the norm (OLMo),
                                                               also .to(torch.float32), .type_as(x)
    x = a + b  (the sum may have other users: the residual)    -> add_layer_norm, returns the sum

One norm feeding attention and MLP (the parallel-residual blocks of GPT-NeoX, Phi,
Falcon, GPT-J) is one match like any other: its output simply has several users. Kept,
with the reason in the report: a normalized shape of more than the last dim, a
symbolic eps, a residual add that broadcasts or promotes.

LayerNorm written out by hand (Cohere, Cohere 2: no bias, computed in fp32) has no
``F.layer_norm`` call: it is matched on the joint graph like RMSNorm's spellings
(``HAND_WRITTEN``), with and without a residual add before it:

    h = x.to(float32); mean = h.mean(-1, keepdim=True)
    h = (h - mean) * rsqrt((h - mean).pow(2).mean(-1, keepdim=True) + eps)
    return (w.to(float32) * h).to(x.dtype)
"""

from __future__ import annotations

import inspect
import logging
import operator

import torch
import torch.nn.functional as F

from ..fx_utils import calls as _is
from ..fx_utils import hoist_before, is_python_float
from ..lowering import layer_norm_ops as ops
from .framework import (DynamoGraphFamily, Family, Replacement, Spelling, chosen_kernels, kernels_chosen,
                        launch_bound, meta_val, norm_eps, same_device, source_line)

log = logging.getLogger(__name__)

NAME = "layer_norm"
_LAYER_NORM = (F.layer_norm, torch.layer_norm)
_ADD = (operator.add, torch.add, "add")
_SIGNATURE = inspect.signature(lambda input, normalized_shape, weight=None, bias=None, eps=1e-5, *_, **__: None)
_CASTS_BACK = ("to", "type_as", "type", "bfloat16", "half")


def _tensor(node):
    value = meta_val(node) if isinstance(node, torch.fx.Node) else None
    return value if isinstance(value, torch.Tensor) else None


def _upcast_source(node):
    """x when ``node`` is ``x.float()`` or ``x.to(torch.float32)`` of a lower-precision x."""
    if not (_is(node, "float", "to") and node.args and isinstance(node.args[0], torch.fx.Node)):
        return None
    src, out = _tensor(node.args[0]), _tensor(node)
    if src is None or out is None or out.dtype != torch.float32 or src.dtype == torch.float32:
        return None
    if not src.is_floating_point() or src.device != out.device:
        return None
    return node.args[0]


def _cast_back(ln, dtype):
    """The one user of ``ln`` when it rounds the result back to ``dtype`` (nothing else)."""
    users = list(ln.users)
    if len(users) != 1 or not _is(users[0], *_CASTS_BACK) or users[0].args[0] is not ln:
        return None
    out, y = _tensor(users[0]), _tensor(ln)
    if out is None or out.dtype != dtype or out.device != y.device or out.shape != y.shape:
        return None
    return users[0]


class Match:
    """One LayerNorm traced back to its input, its upcast and its residual add."""

    def __init__(self, ln, args, base: str = NAME):
        self.ln, self.base, self.biased = ln, base, "bias" in args  # F.rms_norm has no bias
        self.weight, self.bias, self.eps = args["weight"], args.get("bias"), args["eps"]
        self.x = args["input"]
        self.upcast = self.cast_back = None
        src = _upcast_source(self.x)
        if src is not None:
            back = _cast_back(ln, meta_val(src).dtype)
            if back is not None:
                self.upcast, self.cast_back, self.x = self.x, back, src
        self.add = None
        self.residual = None

    @property
    def anchor(self):
        """Where the op goes: the residual add it fuses, else the norm."""
        return self.add if self.add is not None else self.ln

    @property
    def out(self):
        return self.cast_back if self.cast_back is not None else self.ln

    @property
    def nodes(self):
        return [n for n in (self.add, self.upcast, self.ln, self.cast_back) if n is not None]

    @property
    def spelling(self) -> str:
        if self.biased:
            affine = {(True, True): "", (True, False): "_no_bias", (False, True): "_bias_only",
                      (False, False): "_no_affine"}[(self.weight is not None, self.bias is not None)]
        else:
            affine = "" if self.weight is not None else "_no_weight"
        return f"{'add_' if self.add is not None else ''}{'upcast_' if self.upcast is not None else ''}" \
               f"{self.base}{affine}"


def _bind(ln, signature=_SIGNATURE) -> dict:
    bound = signature.bind(*ln.args, **ln.kwargs)
    bound.apply_defaults()
    return dict(bound.arguments)


def find(ln, signature=_SIGNATURE, base: str = NAME, eps_optional: bool = False) -> tuple[Match | None, str | None]:
    """The match at the norm call ``ln`` (``F.layer_norm`` or, with its ``signature``,
    another of torch's norm functions, named ``base`` in the spellings; ``eps_optional``:
    an eps of None is its default), or (None, why not)."""
    args = _bind(ln, signature)
    x, shape, eps = _tensor(args["input"]), args["normalized_shape"], args["eps"]
    if x is None or not x.is_floating_point() or x.dim() == 0:
        return None, "the input is not a floating-point tensor"
    if isinstance(shape, int):
        shape = (shape,)
    if isinstance(shape, torch.fx.Node):
        return None, "normalized_shape is computed in the graph (not a tuple of sizes)"
    if not isinstance(shape, (tuple, list, torch.Size)) or len(shape) != 1:
        return None, f"normalized_shape {shape!r} spans more than the last dim"
    if not (isinstance(eps, (int, float)) and not isinstance(eps, bool)) and not (eps is None and eps_optional):
        return None, f"eps is {eps!r}, not a Python float"
    n = x.shape[-1]
    for what in ("weight", "bias"):
        t = args.get(what)
        if t is None:
            continue
        v = _tensor(t)
        if v is None or v.dim() != 1 or v.shape[0] != n or not v.is_floating_point():
            return None, f"{what} of shape {tuple(v.shape) if v is not None else t!r} does not fit hidden size {n}"
        if v.device != x.device:
            return None, "inputs on different devices"
    y = _tensor(ln)
    if y is None or y.dtype != x.dtype:
        return None, f"the result's dtype {getattr(y, 'dtype', None)} is not the input's {x.dtype}"
    match = Match(ln, args, base)
    _find_add(match)
    return match, None


def _find_add(match: Match) -> None:
    """Fold ``x = a + b`` into the match when it is a plain same-shape, same-dtype add."""
    add = match.x
    if not _is(add, *_ADD) or len(add.args) != 2 or add.kwargs:
        return
    a, b = (_tensor(arg) for arg in add.args)
    h = _tensor(add)
    if a is None or b is None or not (a.shape == b.shape == h.shape and a.dtype == b.dtype == h.dtype):
        return
    if a.device != b.device or add.args[0] is add.args[1]:  # x + x: the guard would draw two inputs
        return
    # The sum's other users (the residual stream) read the op's second output.
    match.add, match.x, match.residual = add, add.args[0], add.args[1]


# -------------------------------------------------------------- the rewrite


class LayerNorm(DynamoGraphFamily):
    """The family: each layer_norm call on Dynamo's graph. A subclass serves another of
    torch's norm functions (rmsnorm.py: ``F.rms_norm``) through its class attributes and
    ``op_args``."""

    name = NAME
    description = "LayerNorm (nn.LayerNorm, F.layer_norm, upcast or not), fused with a preceding residual add"
    anchors = _LAYER_NORM
    anchor_name = "layer_norm"
    signature = _SIGNATURE
    ops = ops
    op_name, fused_op_name, backward_op_name = "layer_norm", "add_layer_norm", "layer_norm_backward"
    eps_optional = False  # True: an eps of None is the function's default (F.rms_norm)

    def find(self, ln):
        return find(ln, self.signature, self.anchor_name, self.eps_optional)

    def op_args(self, x, residual, weight, bias, eps: float, kernels) -> tuple:
        """The arguments of the op (``fused_op_name`` where ``residual`` is given)."""
        if residual is None:
            return (x, weight, bias, eps, *kernels)
        return (x, residual, weight, bias, eps, *kernels)

    def call(self, x, residual, weight, bias, eps: float, kernels):
        """The replacement: (y, h or None); both ops return y first and the fused op h second."""
        op = getattr(self.ops, self.op_name if residual is None else self.fused_op_name)
        out = op(*self.op_args(x, residual, weight, bias, eps, kernels))
        return out[0], (None if residual is None else out[1])

    def eps(self, match: Match, x) -> float:
        return float(match.eps)

    def requirements(self, match: Match) -> dict:
        """What the kernel must support beyond the op (lowering/kernels.py ``choose``)."""
        return {}

    def replace(self, gm, match: Match) -> str | None:
        from ..lowering import kernels
        from ..lowering.device import detect

        x = meta_val(match.x)
        inputs = [t for t in (match.x, match.residual, match.weight, match.bias) if t is not None]
        reason = launch_bound([meta_val(t) for t in inputs], self.cfg.min_elements)
        if reason is not None:
            return reason
        # The op goes where the residual add is. The weight and bias may be computed after it
        # (Nemotron's LayerNorm1P normalizes with weight + 1), or read through a get_attr
        # that comes after it: they move before it.
        reason = hoist_before(match.anchor, match.weight, match.bias)
        if reason is not None:
            return f"the weight or bias cannot be computed before the residual add: {reason}"
        training = bool(meta_val(match.out).requires_grad)
        op = self.fused_op_name if match.add is not None else self.op_name
        device = detect(x.device)
        overrides, trusted = self.cfg.kernel_overrides(), self.cfg.trusted_orgs
        needs = {"training": training, **self.requirements(match)}
        forward = kernels.choose(op, device, x.dtype, overrides, trusted, **needs)
        if forward.spec is None:
            return f"no usable kernel for {device} {x.dtype}: " + "; ".join(forward.reasons)
        backward = kernels.choose(self.backward_op_name, device, x.dtype, overrides, trusted, **needs)
        chosen = (forward.spec, backward.spec or "reference")
        eps = self.eps(match, x)
        guard = None
        if self.cfg.guard:
            guard = self._guard(match, op, eps, chosen, training)
            if not guard.passed:
                log.warning("hubcompile: %s: kernel %s failed its numerical guard, keeping the original code: %s",
                            self.name, chosen[0], guard.summary())
                return f"guard failed for {chosen[0]}: {guard.summary()}"
        self._rewrite(gm, match, op, eps, chosen)
        self.accepted.append((match.spelling, chosen[0]))
        self.replacements.append(Replacement(
            self.name, match.spelling, op, chosen[0], chosen[1], training, tuple(n.name for n in match.nodes),
            tuple(dict.fromkeys(filter(None, map(source_line, match.nodes)))), guard))
        return None

    def _rewrite(self, gm, match: Match, op: str, eps: float, chosen) -> None:
        graph = gm.graph
        overload = getattr(self.ops, op)._opoverload
        with graph.inserting_before(match.anchor):
            out = _node(graph, overload, self.op_args(match.x, match.residual, match.weight, match.bias, eps, chosen))
            if match.add is not None:
                h = _node(graph, operator.getitem, (out, 1))
            y = _node(graph, operator.getitem, (out, 0))
        for new in [n for n in graph.nodes if n.meta.pop("hubcompile_new", False)]:
            new.meta.update({k: v for k, v in match.ln.meta.items() if k in ("stack_trace", "nn_module_stack")})
        match.out.replace_all_uses_with(y)
        if match.add is not None:
            match.add.replace_all_uses_with(h)
        # Erase what the op replaced, and only that: Dynamo's graph holds side-effecting
        # calls with no users that a dead-code pass would drop.
        for node in reversed(match.nodes):
            if not node.users:
                graph.erase_node(node)

    def _guard(self, match: Match, op: str, eps: float, chosen, training: bool):
        """The numerical guard of framework.py, on the original nodes lifted into a small
        graph of (x, residual, weight, bias)."""
        from ..guards import numerical as guards

        sub = torch.fx.Graph()
        env = {}
        names = ("x", "residual", "weight", "bias")
        placeholders = {name: sub.placeholder(name) for name in names}
        for name, node in zip(names, (match.x, match.residual, match.weight, match.bias)):
            if node is not None:
                env[node] = placeholders[name]
        for node in match.nodes:
            def lookup(a):
                if a not in env:
                    raise KeyError(f"the norm depends on {a.name}, outside the matched nodes")
                return env[a]
            if node is match.ln:
                # A symbolic normalized_shape ((x.shape[-1],) under dynamic=True) is a node
                # outside the match: the guard's copy reads the size off its own input.
                args = _bind(node, self.signature)
                size = sub.call_method("size", (env[args["input"]], -1))
                env[node] = sub.call_function(node.target, (env[args["input"]], (size,)) + tuple(
                    lookup(args[k]) if isinstance(args[k], torch.fx.Node) else args[k]
                    for k, p in self.signature.parameters.items()
                    if p.kind is p.POSITIONAL_OR_KEYWORD and k not in ("input", "normalized_shape")))
                continue
            env[node] = sub.node_copy(node, lookup)
        sub.output((env[match.out], env[match.add]) if match.add is not None else env[match.out])
        original = torch.fx.GraphModule(torch.nn.Module(), sub)
        fused = match.add is not None

        def search(x, residual, weight, bias):
            return original(x, residual, weight, bias)

        def replace(x, residual, weight, bias):
            y, h = self.call(x, residual, weight, bias, eps, chosen_kernels())
            return (y, h) if fused else y

        values = {"x": meta_val(match.x), "residual": meta_val(match.residual) if fused else None,
                  "weight": meta_val(match.weight) if match.weight is not None else None,
                  "bias": meta_val(match.bias) if match.bias is not None else None}
        spelling = Spelling(f"{self.name}.{match.spelling}", search, replace, lambda: [], (), op=op)
        with kernels_chosen(chosen):
            result = guards.check(spelling, values, chosen, backward=training and self.cfg.guard_backward,
                                  tolerances=self.cfg.tolerances_for(self.name))
        self.guarded.append((spelling.name, chosen[0], result))
        return result


def _node(graph, target, args):
    """A new call_function node, with the example value Dynamo's graphs carry (computed
    on the fake tensors of its inputs)."""
    node = graph.create_node("call_function", target, args)
    node.meta["example_value"] = target(*torch.fx.node.map_arg(args, meta_val))
    node.meta["hubcompile_new"] = True
    return node


FAMILY = LayerNorm()


# -------------------------------------------------------- written out by hand (joint graph)

EPS = 2.3456789e-5  # magic value: makes eps a match argument


def _cohere(x, w, eps):
    h = x.to(torch.float32)
    mean = h.mean(-1, keepdim=True)
    variance = (h - mean).pow(2).mean(-1, keepdim=True)
    h = (h - mean) * torch.rsqrt(variance + eps)
    return (w.to(torch.float32) * h).to(x.dtype)


def _check(match) -> str | None:
    eps = norm_eps(match)
    if not is_python_float(eps):  # the op takes a float (a lifted eps under dynamic=True is a tensor)
        return f"eps is {meta_val(eps)!r}, not a Python float"
    x, w = meta_val(match.kwargs["x"]), meta_val(match.kwargs["w"])
    if not same_device(match.kwargs["x"], match.kwargs["w"], match.kwargs.get("residual", match.kwargs["x"])):
        return "inputs on different devices"
    if w.dim() != 1 or w.shape[0] != x.shape[-1]:
        return f"weight shape {tuple(w.shape)} does not fit hidden size {x.shape[-1]}"
    if "residual" in match.kwargs:
        r = meta_val(match.kwargs["residual"])
        if r.shape != x.shape or r.dtype != x.dtype:
            return "residual add broadcasts or promotes dtypes"
    return None


def _hand_written(fused: bool) -> Spelling:
    if fused:
        def search(x, residual, w, eps):
            h = x + residual
            return _cohere(h, w, eps), h

        def replace(x, residual, w, eps):
            y, h, _, _ = ops.add_layer_norm(x, residual, w, None, eps, *chosen_kernels())
            return y, h

        def inputs(dt, wdt):
            return [torch.randn(2, 3, 16, dtype=dt), torch.randn(2, 3, 16, dtype=dt), torch.randn(16, dtype=wdt)]
    else:
        def search(x, w, eps):
            return _cohere(x, w, eps)

        def replace(x, w, eps):
            return ops.layer_norm(x, w, None, eps, *chosen_kernels())[0]

        def inputs(dt, wdt):
            return [torch.randn(2, 3, 16, dtype=dt), torch.randn(16, dtype=wdt)]

    return Spelling("add_cohere_no_bias" if fused else "cohere_no_bias", search, replace, inputs,
                    [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16)], {"eps": EPS}, _check,
                    op="add_layer_norm" if fused else "layer_norm", backward_op="layer_norm_backward", anchor="x",
                    read_scalars=lambda m: {"eps": norm_eps(m)})


HAND_WRITTEN = Family(
    name=NAME,
    description="LayerNorm written out by hand (Cohere: mean-centred, no bias, in fp32), fused with a preceding "
                "residual add",
    stages=[[_hand_written(True)], [_hand_written(False)]],
    fusible=True,
)
