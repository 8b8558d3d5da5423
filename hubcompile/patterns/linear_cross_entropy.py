"""The LM head and its cross-entropy loss, fused: ``linear_cross_entropy``.

Matched on the graph Dynamo captures, before AOTAutograd, where the loss is still one
``F.cross_entropy`` call and the head one ``F.linear`` (after AOTAutograd, the loss is
dozens of decomposed nodes in forward and backward). Walking back from the loss's input:

    F.cross_entropy(z.view(-1, V), target, ignore_index=..., reduction="mean" | "sum")
    z = softcap(scale * F.linear(h, W, b)) [.float() | .to(torch.float32)] [.view/.reshape]

with ``scale`` any chain of ``* c`` / ``/ c`` by Python numbers (Cohere's logit_scale,
Granite's ``/ logits_scaling``) and ``softcap`` Gemma 2's ``tanh(z / cap) * cap``; the
weight tied to the embedding or not, with or without bias. transformers' causal-LM loss
(label shift, ``num_items_in_batch``) is this with reduction "sum" or "mean"; the shift and
the division stay as they are.

The loss becomes ``hubcompile::linear_cross_entropy``, whose kernel never holds the
[tokens, vocab] logits. Where the graph also returns the logits (a transformers model
compiled whole), it becomes ``linear_cross_entropy_logits`` instead, which produces them
once, in their dtype, with no fp32 copy. In training, where the logits only leave the
graph, it becomes ``linear_cross_entropy_logits_grads``: the logits leave without a
gradient, so that AOTAutograd neither saves them nor makes a [tokens, vocab] zeros
gradient for them when they go unused, and ``prepare_outputs`` gives them their gradient
back outside the compiled graph. AOTAutograd traces each op's autograd formula, so
training needs no joint-graph pattern.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import operator

import torch
import torch.nn.functional as F

from ..fx_utils import calls as _is
from ..lowering import linear_cross_entropy_ops as ops
from .framework import DynamoGraphFamily, Replacement, Spelling, chosen_kernels, kernels_chosen, meta_val, source_line

log = logging.getLogger(__name__)

NAME = "linear_cross_entropy"
_LINEAR = (F.linear, torch._C._nn.linear)
_CROSS_ENTROPY = (F.cross_entropy,)
_VIEWS = {"view", "reshape", "flatten", "contiguous"}
_MUL = (operator.mul, torch.mul, "mul")
_DIV = (operator.truediv, torch.div, torch.true_divide, "div", "true_divide")
_CE_SIGNATURE = inspect.signature(F.cross_entropy)


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _scalar_operand(node):
    """(tensor arg, number) of a multiply or divide of a tensor by a Python number."""
    args = list(node.args)
    if len(args) != 2 or node.kwargs:
        return None, None
    if _is(node, *_MUL):
        if _number(args[1]):
            return args[0], float(args[1])
        if _number(args[0]):
            return args[1], float(args[0])
    if _is(node, *_DIV) and _number(args[1]) and args[1] != 0:
        return args[0], 1.0 / float(args[1])
    return None, None


def _softcap(node):
    """(input, cap, [tanh node, divide node]) when ``node`` is ``tanh(y / cap) * cap`` (or
    ``tanh(y * (1/cap)) * cap``); else (None, None, [])."""
    t, cap = _scalar_operand(node)
    if cap is None or not _is(node, *_MUL) or not (_is(t, torch.tanh, "tanh") and len(t.users) == 1):
        return None, None, []
    y, inv = _scalar_operand(t.args[0]) if isinstance(t.args[0], torch.fx.Node) else (None, None)
    if inv is None or len(t.args[0].users) != 1 or abs(inv * cap - 1.0) > 1e-6:
        return None, None, []
    return y, cap, [t, t.args[0]]


def _is_cast(node) -> bool:
    """``.float()``, ``.to(torch.float32)``, or ``.to(device)`` to where it already is."""
    if _is(node, "float"):
        return True
    if not _is(node, "to"):
        return False
    out, inp = meta_val(node), meta_val(node.args[0])
    return (isinstance(out, torch.Tensor) and isinstance(inp, torch.Tensor) and out.device == inp.device
            and out.dtype in (inp.dtype, torch.float32))


@dataclasses.dataclass
class Chain:
    """A loss traced back to its linear layer."""

    loss: torch.fx.Node
    linear: torch.fx.Node
    nodes: list  # linear ... loss input, in graph order
    scale: float = 1.0
    softcap: float = 0.0
    external: torch.fx.Node | None = None  # the one chain node also used outside (the returned logits)

    @property
    def h(self):
        return self.linear.args[0]

    @property
    def weight(self):
        return self.linear.args[1] if len(self.linear.args) > 1 else self.linear.kwargs["weight"]

    @property
    def bias(self):
        return self.linear.args[2] if len(self.linear.args) > 2 else self.linear.kwargs.get("bias")


def _loss_args(node) -> dict:
    bound = _CE_SIGNATURE.bind(*node.args, **node.kwargs)
    bound.apply_defaults()
    return dict(bound.arguments)


def find_chain(loss) -> tuple[Chain | None, str | None]:
    """The chain from the loss back to its linear layer, or (None, why not)."""
    args = _loss_args(loss)
    for key, default in (("weight", None), ("size_average", None), ("reduce", None), ("label_smoothing", 0.0)):
        if args[key] != default:
            return None, f"cross_entropy with {key}={args[key]!r} (the fused kernel has none)"
    if args["reduction"] not in ("mean", "sum"):
        return None, f"cross_entropy with reduction={args['reduction']!r} (fused: 'mean' and 'sum')"
    if not isinstance(args["ignore_index"], int):
        return None, f"ignore_index is {args['ignore_index']!r}, not a Python int"
    z, target = meta_val(args["input"]), meta_val(args["target"])
    if not (isinstance(z, torch.Tensor) and z.dim() == 2 and isinstance(target, torch.Tensor) and target.dim() == 1):
        return None, "the loss's input is not [tokens, vocab] with a [tokens] target (class dim not last)"
    nodes, node, scale, softcap = [], args["input"], 1.0, 0.0
    while isinstance(node, torch.fx.Node) and not _is(node, *_LINEAR):
        nodes.append(node)
        if _is(node, *_VIEWS) or _is_cast(node):
            node = node.args[0]
            continue
        y, cap, inner = _softcap(node)
        if cap is not None:
            if softcap or scale != 1.0:
                return None, "logits soft-capped twice, or scaled after soft-capping"
            nodes += inner
            node, softcap = y, abs(cap)
            continue
        x, factor = _scalar_operand(node)
        if factor is not None:
            node, scale = x, scale * factor
            continue
        return None, f"the logits come from {node.op} {getattr(node.target, '__name__', node.target)}, not a linear layer"
    if not isinstance(node, torch.fx.Node):
        return None, "no linear layer before the loss"
    chain = Chain(loss, node, [node, *reversed(nodes)], scale, softcap)
    return _check(chain, args)


def _check(chain: Chain, args) -> tuple[Chain | None, str | None]:
    h, w = meta_val(chain.h), meta_val(chain.weight)
    b = meta_val(chain.bias) if chain.bias is not None else None
    z, target = meta_val(args["input"]), meta_val(args["target"])
    if not all(isinstance(t, torch.Tensor) for t in (h, w)) or w.dim() != 2 or h.shape[-1] != w.shape[1]:
        return None, "the linear layer's weight is not [vocab, hidden]"
    if z.shape[-1] != w.shape[0]:
        return None, f"the loss's classes ({z.shape[-1]}) are not the linear layer's outputs ({w.shape[0]})"
    if h.dtype != w.dtype or not h.dtype.is_floating_point or (b is not None and b.dtype != w.dtype):
        return None, f"mixed dtypes in the linear layer (h {h.dtype}, weight {w.dtype})"
    if len({t.device for t in (h, w, z, target) + ((b,) if b is not None else ())}) != 1:
        return None, "inputs on different devices"
    if target.dtype != torch.int64:
        return None, f"target dtype {target.dtype} (cross_entropy takes int64 class indices)"
    inside = set(chain.nodes) | {chain.loss}
    external = [n for n in chain.nodes if any(u not in inside for u in n.users)]
    if len(external) > 1:
        return None, "more than one intermediate of the logits is used outside the loss"
    if external:
        e = external[0]
        after = chain.nodes[chain.nodes.index(e) + 1:]
        if any(not (_is(n, *_VIEWS) or _is_cast(n)) for n in after):
            return None, "the logits are used before their scaling or soft-capping"
        ev = meta_val(e)
        if ev.dim() not in (2, h.dim()) or any(_is(n, "view", "reshape", "flatten") for n in chain.nodes[:chain.nodes.index(e) + 1]):
            return None, "the logits used outside the loss are reshaped"
        chain.external = e
    return chain, None


# -------------------------------------------------------------- the rewrite


def _flatten_rows(h):
    return h.reshape(-1, h.shape[-1])


def _flatten(t):
    return t.reshape(-1)


def _unflatten(logits, h):
    return logits.view(*h.shape[:-1], logits.shape[-1])


def _call(chain_kind, h, weight, bias, target, ignore_index, reduction, scale, softcap, extra, kernels):
    """The replacement, as traced by AOTAutograd: (loss, logits or None)."""
    h2, t1 = _flatten_rows(h), _flatten(target)
    if chain_kind == "logits_grads":
        loss, logits, *_ = ops.linear_cross_entropy_logits_grads(h2, weight, bias, t1, ignore_index, reduction,
                                                                 scale, softcap, extra, kernels[0])
        return loss, ops.Reattach.apply(logits, h2, weight, bias, scale, softcap)
    if chain_kind == "logits":
        loss, logits = ops.linear_cross_entropy_logits(h2, weight, bias, t1, ignore_index, reduction, scale, softcap,
                                                       extra, *kernels)
        return loss, logits
    return ops.linear_cross_entropy(h2, weight, bias, t1, ignore_index, reduction, scale, softcap, extra,
                                    kernels[0])[0], None


# The op each kind of chain becomes (an attribute of linear_cross_entropy_ops): the loss
# only; the logits returned too; the logits returned in training (see prepare_outputs).
_OPS = {"loss": NAME, "logits": "linear_cross_entropy_logits", "logits_grads": "linear_cross_entropy_logits_grads"}


class LinearCrossEntropy(DynamoGraphFamily):
    """The family: each cross-entropy loss over an LM head's logits, on Dynamo's graph."""

    name = NAME
    description = "LM head + cross-entropy loss, chunked: no [tokens, vocab] fp32 logits (Liger-style)"
    anchors = _CROSS_ENTROPY
    anchor_name = "cross_entropy"
    find = staticmethod(find_chain)

    def replace(self, gm, chain: Chain) -> str | None:
        from ..lowering import kernels
        from ..lowering.device import detect

        args = _loss_args(chain.loss)
        h = meta_val(chain.h)
        training = bool(meta_val(chain.loss).requires_grad)
        kind = "logits" if chain.external is not None else "loss"
        if kind == "logits" and training and _reattachable(chain):
            kind = "logits_grads"
        op = _OPS[kind]
        device = detect(h.device)
        overrides, trusted = self.cfg.kernel_overrides(), self.cfg.trusted_orgs
        # The mode picks a mapping's ForCausalLMLoss entry; a layer may not take the scale or cap.
        needs = dict(training=training, scale=chain.scale, softcap=chain.softcap)
        forward = kernels.choose(op, device, h.dtype, overrides, trusted, **needs)
        if forward.spec is None:
            return f"no usable kernel for {device} {h.dtype}: " + "; ".join(forward.reasons)
        backward = "reference"
        if kind == "logits" and training:  # an inference graph runs no backward
            backward = kernels.choose("linear_cross_entropy_logits_backward", device, h.dtype, overrides,
                                      trusted, **needs).spec or "reference"
        chosen = (forward.spec, backward)
        extra = meta_val(chain.external).dtype if kind != "loss" else training
        scalars = (args["ignore_index"], args["reduction"], chain.scale, chain.softcap, extra)
        guard = None
        if self.cfg.guard:
            guard = self._guard(gm, chain, args, kind, scalars, chosen, training=training)
            if not guard.passed:
                log.warning("hubcompile: %s: kernel %s failed its numerical guard, keeping the original code: %s",
                            NAME, chosen[0], guard.summary())
                return f"guard failed for {chosen[0]}: {guard.summary()}"
        graph = gm.graph
        loss_dtype = meta_val(chain.loss).dtype
        op_overload = getattr(ops, op)._opoverload
        kernel_args = chosen if kind == "logits" else chosen[:1]
        hidden = meta_val(chain.weight).shape[1]
        # Only tensor methods, ops and getitem: nodes AOTAutograd's cache accepts.
        with graph.inserting_before(chain.loss):
            h2 = _node(graph, "call_method", "reshape", (chain.h, -1, hidden))
            t1 = _node(graph, "call_method", "reshape", (args["target"], -1))
            out = _node(graph, "call_function", op_overload,
                        (h2, chain.weight, chain.bias, t1, *scalars, *kernel_args))
            loss = _node(graph, "call_function", operator.getitem, (out, 0))
            if loss_dtype != torch.float32:  # no upcast: F.cross_entropy returns the logits' dtype
                loss = _node(graph, "call_method", "to", (loss, loss_dtype))
            if kind != "loss":
                logits = _node(graph, "call_function", operator.getitem, (out, 1))
                if meta_val(chain.external).dim() > 2:
                    sizes = [_node(graph, "call_method", "size", (chain.h, i)) for i in range(meta_val(chain.h).dim() - 1)]
                    logits = _node(graph, "call_method", "view", (logits, *sizes, -1))
                chain.external.replace_all_uses_with(logits, delete_user_cb=lambda u: u not in chain.nodes)
            if kind == "logits_grads":
                # prepare_outputs makes h2 a graph output, to give the logits their gradient.
                gm.meta.setdefault(REATTACH, []).append(
                    {"logits": logits, "h": h2, "weight": chain.weight, "bias": chain.bias,
                     "scale": chain.scale, "softcap": chain.softcap})
        for new in [n for n in graph.nodes if n.meta.get("hubcompile_new")]:
            new.meta.pop("hubcompile_new")
            new.meta.update({k: v for k, v in chain.loss.meta.items() if k in ("stack_trace", "nn_module_stack")})
        chain.loss.replace_all_uses_with(loss)
        # Erase what the op replaced, and only that: Dynamo's graph holds side-effecting
        # calls with no users (vmap's nesting counters) that a dead-code pass would drop.
        for node in reversed([*chain.nodes, chain.loss]):
            if not node.users:
                graph.erase_node(node)
        spelling = f"{'logits_' if kind != 'loss' else ''}{'softcap_' if chain.softcap else ''}" \
                   f"{'scaled_' if chain.scale != 1.0 else ''}{'bias_' if chain.bias is not None else ''}{args['reduction']}"
        self.accepted.append((spelling, chosen[0]))
        consumed = [*chain.nodes, chain.loss]
        self.replacements.append(Replacement(
            NAME, spelling, op, chosen[0], chosen[1], training,
            tuple(n.name for n in consumed), tuple(dict.fromkeys(filter(None, map(source_line, consumed)))), guard))
        return None

    def _guard(self, gm, chain, args, kind, scalars, chosen, training):
        """The numerical guard of framework.py, on the original nodes lifted into a small
        graph of (h [tokens, hidden], weight, bias, target [tokens])."""
        from ..guards import numerical as guards

        sub = torch.fx.Graph()
        env = {chain.h: sub.placeholder("h"), chain.weight: sub.placeholder("weight"),
               args["target"]: sub.placeholder("target")}
        bias_in = sub.placeholder("bias")
        if chain.bias is not None:
            env[chain.bias] = bias_in
        for node in [*chain.nodes, chain.loss]:
            def lookup(a):
                if a not in env:
                    raise KeyError(f"the loss depends on {a.name}, outside the matched nodes")
                return env[a]
            env[node] = sub.node_copy(node, lookup)
        sub.output((env[chain.loss], env[chain.external]) if kind != "loss" else env[chain.loss])
        original = torch.fx.GraphModule(torch.nn.Module(), sub)
        vocab = meta_val(chain.weight).shape[0]
        ignore_index = args["ignore_index"]

        def search(h, weight, target, bias):
            return original(h, weight, target, bias)

        loss_dtype = meta_val(chain.loss).dtype

        def replace(h, weight, target, bias):
            loss, logits = _call(kind, h, weight, bias, target, *scalars, chosen_kernels())
            return (loss.to(loss_dtype), logits) if kind != "loss" else loss.to(loss_dtype)

        def random_input(name, shape, dtype, device, gen):
            if name != "target":
                return None
            t = torch.randint(0, vocab, shape, device=device, generator=gen)
            return torch.where(torch.rand(shape, device=device, generator=gen) < 0.1, ignore_index, t)

        h = meta_val(chain.h)
        values = {"h": h.reshape(-1, h.shape[-1]), "weight": meta_val(chain.weight),
                  "target": meta_val(args["target"]).reshape(-1),
                  "bias": meta_val(chain.bias) if chain.bias is not None else None}

        def drop_rows(inputs, keep):
            # an ignored target adds nothing to the loss, its count or any gradient
            return {**inputs, "target": inputs["target"].masked_fill(~keep.reshape(-1), ignore_index)}

        spelling = Spelling(f"{NAME}.{kind}", search, replace, lambda: [], (), grad_inputs=(0, 1, 3), op=NAME,
                            anchor="h", shrink_dims=(0,), random_input=random_input,
                            guard_whole=False,
                            # sampled: token rows (a row of logits each), the loss over those
                            # rows alone: the others are ignored
                            input_rows={"weight": {}, "bias": {}, "target": {0: 0}},
                            row_cost=lambda shapes: shapes["h"][1] + shapes["weight"][0], drop_rows=drop_rows)
        with kernels_chosen(chosen):
            result = guards.check(spelling, values, chosen, backward=training and self.cfg.guard_backward,
                                  tolerances=self.cfg.tolerances_for(NAME))
        self.guarded.append((spelling.name, chosen[0], result))
        return result


REATTACH = "hubcompile_reattach"  # gm.meta key: the logits that prepare_outputs gives a gradient


def _reattachable(chain: Chain) -> bool:
    """Whether the returned logits can leave the graph without a gradient and get it back
    outside (``prepare_outputs``): they only go to the graph's output, and the head's weight
    and bias are the graph's inputs or attributes, at hand outside it."""
    outside = [u for u in chain.external.users if u not in chain.nodes]
    return (all(u.op == "output" for u in outside)
            and all(n is None or n.op in ("placeholder", "get_attr") for n in (chain.weight, chain.bias)))


def prepare_outputs(gm: torch.fx.GraphModule):
    """For a graph whose logits leave without a gradient: add each one's h to the graph's
    outputs, and return ``wrap(fn)``, which gives the compiled ``fn``'s logits their
    gradient (``ops.Reattach``) and drops the added outputs. None when there is nothing to do."""
    records = gm.meta.pop(REATTACH, None)
    if not records:
        return None
    output = gm.graph.output_node()
    outs = list(output.args[0])
    count = len(outs)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]

    def source(node):
        if node is None:
            return None
        if node.op == "placeholder":
            return ("arg", placeholders.index(node))
        return ("attr", operator.attrgetter(node.target)(gm))

    plan = []
    for r in records:
        plan.append(([i for i, o in enumerate(outs) if o is r["logits"]], len(outs), source(r["weight"]),
                     source(r["bias"]), r["scale"], r["softcap"]))
        outs.append(r["h"])
    output.args = (tuple(outs),)
    gm.recompile()

    def pick(src, args):
        return None if src is None else (args[src[1]] if src[0] == "arg" else src[1])

    def wrap(fn):
        def with_logits_gradient(*args):
            result = list(fn(*args))
            for logits_at, h_at, weight, bias, scale, softcap in plan:
                for i in logits_at:
                    result[i] = ops.Reattach.apply(result[i], result[h_at], pick(weight, args), pick(bias, args),
                                                   scale, softcap)
            return result[:count]

        return with_logits_gradient

    return wrap


def _node(graph, op, target, args):
    """A new node, with the example value Dynamo's graphs carry (computed on the fake
    tensors of its inputs)."""
    node = graph.create_node(op, target, args)
    values = torch.fx.node.map_arg(args, meta_val)
    fn = getattr(values[0], target) if op == "call_method" else target
    node.meta["example_value"] = fn(*values[1:]) if op == "call_method" else fn(*values)
    node.meta["hubcompile_new"] = True
    return node


FAMILY = LinearCrossEntropy()
