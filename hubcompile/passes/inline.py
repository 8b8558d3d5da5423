"""Bundled Triton kernels launched by Inductor itself, on GPUs (the default there).

A hubcompile op is opaque to Inductor: each call goes through the op's dispatch,
``kernels.call`` and the kernel module's Python wrapper, then Triton's JIT launcher, before
anything runs on the device. The H200 profile of a Llama training step
(bench/results/h200/2026-12-01) showed that host time, not the kernels, set the step's
time, and decoding, whose kernels are tiny, paid it on every token.

So, after AOTAutograd has split forward and backward (Inductor's
``post_grad_custom_pre_pass``), each call of a bundled kernel that declares its functions
traceable (``TRACEABLE`` in the repo's ``__init__.py``) is traced, functionalized, into
the graph in place of the op: tensor allocations, views and
``triton_kernel_wrapper_functional`` nodes, which Inductor compiles like the kernels a
user writes with ``torch.library.wrap_triton``: their launch is a line of Inductor's
generated code, with Inductor's precompiled launcher. The kernels are the same; only who
launches them changes.

A Hub or local repo's function kernel is traced the same way, through its adapter, on
any device: the adapter's allocations, ``contiguous()`` and slices become graph ops, and a
compiled ``torch.library`` op of the repo (the kernels-community CUDA repos register
``torch.ops._<name>_<hash>.*``) an ``auto_functionalized`` node that Inductor turns into one
extern kernel call writing into its buffer. A trace that holds anything but operators
(Python that reads values, say) is refused.

Left as ops, each with its reason in ``GraphRecord.launches`` (and the report): bundled
kernels on CPU (Inductor cannot launch Triton there), graphs with symbolic shapes (the
wrappers pick block sizes from the shapes), Hub layers (their forward runs in Python),
and runs with ``runtime_checks`` (those need the op's Python on every call). A call that
cannot be traced stays an op, with one log line; a compile that fails with the kernels
inlined is done again without them (pipeline.compile_graph), the backward included.
"""

from __future__ import annotations

import contextlib
import logging
import operator

import torch
from torch._guards import detect_fake_mode
from torch._library.custom_ops import OPDEFS
from torch._inductor.custom_graph_pass import CustomGraphPass
from torch._inductor.decomposition import select_decomp_table
from torch._subclasses.fake_tensor import UnsupportedOperatorException
from torch._subclasses.functional_tensor import dispatch_functionalize
from torch.fx.experimental.proxy_tensor import make_fx

from ..fx_utils import is_static, meta_val, op_args
from ..lowering import kernels
from ..records import source_hash

log = logging.getLogger(__name__)


def _hubcompile_op(node: torch.fx.Node) -> str | None:
    """The op name (``rms_norm``) when ``node`` calls a hubcompile op, else None."""
    if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
        return None
    namespace, _, op = node.target.name().partition("::")
    return op if namespace == "hubcompile" and f"hubcompile::{op}" in OPDEFS else None


TRITON_DEVICES = ("cuda", "xpu")
# How a call kept as an op only for its runtime checks is recorded ("op: " + reason);
# guards/runtime_checks.py compiles the code run between the checks for those.
RUNTIME_CHECKED = "runtime_checks compare"


def _candidate(node: torch.fx.Node, op: str):
    """(its Python body, its arguments by name, their fake values, whether its kernel is a
    Hub or local function kernel) when ``node``'s kernel may be traced, else the reason it
    stays an op."""
    bound = op_args(node)
    vals = {k: meta_val(v) for k, v in bound.items()}
    tensors = [v for v in vals.values() if isinstance(v, torch.Tensor)]
    spec = vals.get("kernel_spec")
    if spec is None:
        return "an ATen kernel behind an op (Inductor would decompose the ATen op)"
    if not tensors:
        return "no tensor argument"
    if not is_static([*vals.values(), meta_val(node)]):
        return "symbolic shapes"
    device = tensors[0].device
    module = kernels.bundled_module(spec, device)
    if module is not None:
        if device.type not in TRITON_DEVICES:
            return "not on a GPU (Inductor launches Triton kernels on GPUs only)"
        if op not in kernels.OPS or kernels.OPS[op][1] not in getattr(module, "TRACEABLE", ()):
            return getattr(module, "NOT_TRACEABLE", f"kernel {spec} does not declare {op} traceable")
        return OPDEFS[f"hubcompile::{op}"]._init_fn, bound, vals, False
    if spec == "reference":
        return "the eager reference"
    if kernels.is_layer(spec):
        return "a Hub layer (its forward runs in Python on each call)"
    if kernels.runtime_checks_for(spec):  # on by default for kernels not shipped here
        return f"{RUNTIME_CHECKED} its first calls with the reference"
    # A Hub or local repo's function, through its adapter: traced, its layout and dtype
    # handling become graph ops and a compiled torch.library op an extern kernel call.
    return OPDEFS[f"hubcompile::{op}"]._init_fn, bound, vals, True


def count_launch(launches: dict | None, op: str, how: str) -> None:
    """Count one call of ``op`` as launched ``how`` in a record's ``launches``."""
    if launches is not None:
        per_op = launches.setdefault(op, {})
        per_op[how] = per_op.get(how, 0) + 1


def count_ops(graph: torch.fx.Graph, launches: dict | None, why: str) -> None:
    """Record every hubcompile op call of ``graph`` as staying an op, for ``why``."""
    for node in graph.nodes:
        op = _hubcompile_op(node)
        if op is not None:
            count_launch(launches, op, f"op: {why}")


def _layout(value):
    """What a trace depends on of an argument: a tensor's layout, else its value."""
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.shape), tuple(value.stride()), value.dtype, value.device)
    if isinstance(value, (list, tuple)):
        return tuple(map(_layout, value))
    return value


def _trace(body, names: list[str], vals: dict, extern: bool = False) -> tuple[torch.fx.GraphModule, list[str]]:
    """``body`` over the tensor arguments (the rest fixed), functionalized, so that its
    kernel launches become ``triton_kernel_wrapper_functional`` nodes and, for a Hub
    kernel (``extern``), its torch.library ops ``auto_functionalized`` ones (Inductor calls
    those as extern kernels, writing into the buffers they were given); and the names of
    the tensor arguments, in the order of the trace's placeholders."""
    tensor_names = [n for n in names if isinstance(vals[n], torch.Tensor)]

    def fn(*tensors):
        return body(**{**vals, **dict(zip(tensor_names, tensors))})

    # torch.func.functionalize refuses custom ops that write their arguments (the
    # kernels-community convention, ``silu_and_mul(out, x)``); the dispatcher's
    # functionalization, as AOTAutograd uses, wraps them in auto_functionalized.
    functional = dispatch_functionalize(fn) if extern else torch.func.functionalize(fn, remove="mutations")
    tensors = [vals[n] for n in tensor_names]
    # In the fake mode of the graph's values, so the kernel's own allocations are fake
    # too; with Inductor's decompositions, as the rest of a post-grad graph has them
    # (Inductor has no lowering for some ops it always decomposes, such as _to_copy).
    for attempt in range(8):
        try:
            with kernels.tracing_calls(), detect_fake_mode(tensors) or contextlib.nullcontext():
                traced = make_fx(functional, decomposition_table=select_decomp_table())(*tensors)
            break
        except UnsupportedOperatorException as e:
            # A compiled Hub op with no fake implementation (kernels-community's
            # activation and rotary have none): one that only writes its arguments and
            # returns nothing needs none; anything else cannot be traced.
            if not (extern and attempt < 7 and _add_fake_for_writer(e.func)):
                raise
    if extern:
        _check_extern(traced)
    return traced, tensor_names


def _add_fake_for_writer(op) -> bool:
    """Register an empty fake for ``op`` when its schema returns nothing and declares the
    arguments it writes; whether it did."""
    schema = getattr(op, "_schema", None)
    if schema is None or schema.returns or not any(a.is_write for a in schema.arguments if a.alias_info):
        return False
    torch.library.register_fake(op.name(), lambda *args, **kwargs: None, lib=_FAKES)
    log.debug("hubcompile: %s has no fake implementation; it returns nothing, so an empty one is used", op)
    return True


_FAKES = torch.library.Library("hubcompile_fakes", "FRAGMENT")  # noqa: TOR901 - owns the fakes registered above


def _check_extern(traced: torch.fx.GraphModule) -> None:
    """A Hub kernel's trace may hold only operators (ATen's, its own torch.library ops, in
    place through auto_functionalized, or Triton launches): Python that the trace ran once,
    such as a check of a tensor's values, would not run again."""
    allowed = (torch._ops.OpOverload, torch._ops.HigherOrderOperator)
    for node in traced.graph.nodes:
        if node.op == "call_function" and not isinstance(node.target, allowed) and node.target is not operator.getitem:
            raise RuntimeError(f"the traced kernel calls {node.target}, which is not an operator")


def inline_bundled_kernels(graph: torch.fx.Graph, launches: dict | None = None) -> int:
    """Trace the eligible hubcompile op calls of ``graph`` into it; the number inlined.
    Each call is counted in ``launches`` (a GraphRecord's) by how it will be launched."""
    if kernels.checks_every_kernel():
        count_ops(graph, launches, f"{RUNTIME_CHECKED} each call with the reference")
        return 0
    done, traces = 0, {}
    for node in list(graph.nodes):
        op = _hubcompile_op(node)
        if op is None:
            continue
        found = _candidate(node, op)
        if isinstance(found, str):
            count_launch(launches, op, f"op: {found}")
            continue
        body, bound, vals, extern = found
        try:
            # Calls alike in all but their tensors' identity (a model's layers) share a trace.
            key = (op, *((k, _layout(v)) for k, v in vals.items()))
            if key not in traces:
                traces[key] = _trace(body, list(bound), vals, extern)
            traced, tensor_names = traces[key]
            _splice(graph, node, traced, [bound[n] for n in tensor_names])
        except Exception as e:  # noqa: BLE001 - the op stays; it runs the same kernel (checked before the graph changes)
            log.info("hubcompile: %s stays an op (%s: %s)", op, type(e).__name__, str(e)[:300],
                     exc_info=log.isEnabledFor(logging.DEBUG))
            count_launch(launches, op, f"op: its kernel could not be traced ({type(e).__name__})")
            continue
        count_launch(launches, op, "Inductor: extern kernel" if extern else "Inductor")
        done += 1
    if done:
        graph.eliminate_dead_code()
        log.info("hubcompile: %d kernel call(s) launched by Inductor", done)
    return done


def _splice(graph: torch.fx.Graph, node: torch.fx.Node, traced: torch.fx.GraphModule, args: list) -> None:
    """Put ``traced``'s nodes before ``node`` and point ``node``'s users at its outputs."""
    outputs = next(n for n in traced.graph.nodes if n.op == "output").args[0]
    if isinstance(outputs, (list, tuple)) and any(u.target is not operator.getitem for u in node.users):
        raise RuntimeError(f"{node} has a user that is not getitem")
    if any(n.op == "get_attr" for n in traced.graph.nodes):  # a constant the trace lifted
        raise RuntimeError("the traced kernel holds a constant")
    # Where Triton cannot tell which arguments a kernel writes (no GPU driver), all are
    # taken as written, and the trace copies them back into the op's inputs.
    written = [n for n in traced.graph.nodes
               if isinstance(n.target, torch._ops.OpOverload) and n.target._schema.is_mutable]
    if written:
        raise RuntimeError(f"the traced kernel writes its inputs ({written[0].target})")
    env = {}
    placeholders = iter(args)
    with graph.inserting_before(node):
        for sub in traced.graph.nodes:
            if sub.op == "placeholder":
                env[sub] = next(placeholders)
            elif sub.op != "output":
                env[sub] = graph.node_copy(sub, lambda n: env[n])
    if isinstance(outputs, (list, tuple)):
        for user in list(node.users):
            user.replace_all_uses_with(env[outputs[user.args[1]]])
            graph.erase_node(user)
    else:
        node.replace_all_uses_with(env[outputs])
    graph.erase_node(node)


class InlinePass(CustomGraphPass):
    """Inductor's ``post_grad_custom_pre_pass``: ``inline_bundled_kernels`` on each graph,
    counted in ``record.launches``. With ``why_not`` (inlining is off, or the graph is not
    on a GPU), it only counts the calls as ops, for that reason."""

    def __init__(self, record_of=lambda: None, why_not: str | None = None):
        self.record_of = record_of  # the GraphRecord of this compile, once the joint pass made it
        self.why_not = why_not

    def __call__(self, graph: torch.fx.Graph) -> None:
        record = self.record_of()
        launches = record.launches if record is not None else None
        if self.why_not is not None:
            count_ops(graph, launches, self.why_not)
            return
        try:
            inline_bundled_kernels(graph, launches)
        except Exception as e:  # noqa: BLE001 - a launch path must never fail the compile
            log.warning("hubcompile: inlining kernels failed (%s: %s); the ops stay", type(e).__name__, e)

    def uuid(self) -> str:
        return f"{source_hash()}|{self.why_not}"
