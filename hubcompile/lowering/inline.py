"""Bundled Triton kernels launched by Inductor itself, on CUDA.

A hubcompile op is opaque to Inductor: each call goes through the custom op's dispatch,
``kernels.call`` and the kernel module's Python wrapper before Triton launches anything.
The H200 profile of a Llama training step (bench/results/h200/2026-12-01) showed that host
time, not the kernels, set the step's time: the GPU was busy 52% of it.

So, after AOTAutograd has split forward and backward (Inductor's
``post_grad_custom_pre_pass``), each call of a bundled kernel that declares its functions
traceable (``TRACEABLE`` in the repo's ``__init__.py``) is traced, functionalized, into
the graph in place of the op: tensor allocations, views and
``triton_kernel_wrapper_functional`` nodes, which Inductor compiles like the kernels a
user writes with ``torch.library.wrap_triton``. The kernels are the same; only who
launches them changes.

Off by default (option ``inline_kernels``): on an H200 it made Llama steps 1-2% faster,
for 4-22 s more compile time (bench/results/h200/2026-12-01/README.md).

Left as ops: CPU (Inductor cannot launch Triton there), graphs with symbolic shapes (the
wrappers pick block sizes from the shapes), Hub kernels, and runs with
``runtime_checks`` (those need the op's Python on every call). A call that cannot be
traced stays an op, with one log line; a compile that fails with the kernels inlined is
done again without them (backend._compile), the backward included.
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
from torch.fx.experimental.proxy_tensor import make_fx

from ..patterns.framework import is_static, meta_val, op_args
from . import kernels

log = logging.getLogger(__name__)


def _traceable(spec: str, op: str, device: torch.device) -> bool:
    """Whether ``spec``'s function for ``op`` may be traced into the graph on ``device``."""
    module = kernels.bundled_module(spec, device)
    return module is not None and op in kernels.OPS and kernels.OPS[op][1] in getattr(module, "TRACEABLE", ())


def _candidate(node: torch.fx.Node):
    """(op name, its Python body, its arguments by name, their fake values) when ``node``
    calls a hubcompile op whose kernel may be traced, else None."""
    if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
        return None
    name = node.target.name()  # "hubcompile::rms_norm"
    namespace, _, op = name.partition("::")
    opdef = OPDEFS.get(name)
    if namespace != "hubcompile" or opdef is None:
        return None
    bound = op_args(node)
    vals = {k: meta_val(v) for k, v in bound.items()}
    tensors = [v for v in vals.values() if isinstance(v, torch.Tensor)]
    if not tensors or tensors[0].device.type != "cuda" or not is_static([*vals.values(), meta_val(node)]):
        return None
    if not _traceable(vals.get("kernel_spec"), op, tensors[0].device):
        return None
    return op, opdef._init_fn, bound, vals


def _layout(value):
    """What a trace depends on of an argument: a tensor's layout, else its value."""
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.shape), tuple(value.stride()), value.dtype, value.device)
    if isinstance(value, (list, tuple)):
        return tuple(map(_layout, value))
    return value


def _trace(body, names: list[str], vals: dict) -> tuple[torch.fx.GraphModule, list[str]]:
    """``body`` over the tensor arguments (the rest fixed), functionalized, so that its
    kernel launches become ``triton_kernel_wrapper_functional`` nodes; and the names of
    the tensor arguments, in the order of the trace's placeholders."""
    tensor_names = [n for n in names if isinstance(vals[n], torch.Tensor)]

    def fn(*tensors):
        return body(**{**vals, **dict(zip(tensor_names, tensors))})

    tensors = [vals[n] for n in tensor_names]
    # In the fake mode of the graph's values, so the kernel's own allocations are fake
    # too; with Inductor's decompositions, as the rest of a post-grad graph has them
    # (Inductor has no lowering for some ops it always decomposes, such as _to_copy).
    with kernels.tracing_calls(), detect_fake_mode(tensors) or contextlib.nullcontext():
        traced = make_fx(torch.func.functionalize(fn, remove="mutations"),
                         decomposition_table=select_decomp_table())(*tensors)
    return traced, tensor_names


def inline_bundled_kernels(graph: torch.fx.Graph) -> int:
    """Trace the eligible hubcompile op calls of ``graph`` into it; the number inlined."""
    if kernels._runtime_checks["n"]:
        return 0
    done, traces = 0, {}
    for node in list(graph.nodes):
        found = _candidate(node)
        if found is None:
            continue
        op, body, bound, vals = found
        try:
            # Calls alike in all but their tensors' identity (a model's layers) share a trace.
            key = (op, *((k, _layout(v)) for k, v in vals.items()))
            if key not in traces:
                traces[key] = _trace(body, list(bound), vals)
            traced, tensor_names = traces[key]
        except Exception as e:  # noqa: BLE001 - the op stays; it runs the same kernel
            log.info("hubcompile: %s stays an op (%s: %s)", op, type(e).__name__, str(e)[:300],
                     exc_info=log.isEnabledFor(logging.DEBUG))
            continue
        try:
            _splice(graph, node, traced, [bound[n] for n in tensor_names])
        except RuntimeError as e:  # checked before the graph changes
            log.info("hubcompile: %s stays an op (%s)", op, e)
            continue
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
    """Inductor's ``post_grad_custom_pre_pass``: ``inline_bundled_kernels`` on each graph."""

    def __call__(self, graph: torch.fx.Graph) -> None:
        try:
            inline_bundled_kernels(graph)
        except Exception as e:  # noqa: BLE001 - a launch path must never fail the compile
            log.warning("hubcompile: inlining kernels failed (%s: %s); the ops stay", type(e).__name__, e)

    def uuid(self) -> str:
        from ..backend import _source_hash

        return _source_hash()
