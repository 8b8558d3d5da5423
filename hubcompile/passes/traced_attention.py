"""Attention whose kernel is written in differentiable torch ops, traced into the graph.

The bundled attention kernel is PyTorch's fused ``scaled_dot_product_attention``. As an
opaque op it cost a training step twice: the op saves only q, k and v, so its backward
ran the forward again (``torch.func.vjp``), and every call paid the custom op's Python
dispatch. On an H200, the eager-attention Llama training step ran 80 attention forwards
per 5 steps instead of 40 (bench/results/h200/2026-12-01/).

So, in the joint graph, after the families and ``causal_mask`` have run (pipeline.py),
each ``hubcompile::attention`` call whose kernel declares its forward here
(``JOINT_TRACEABLE`` in the repo's ``__init__.py``) is traced, with its backward from
autograd, in place of the op and its ``attention_backward``: the graph then holds SDPA's
own fused ops (flash, cuDNN or memory-efficient, as PyTorch picks for the device and
shapes), AOTAutograd's partitioner saves the output and the log-sum-exp for the backward,
and Inductor calls them without the op's Python. The kernel and its numbers are the same.

Left as ops: graphs with symbolic shapes, Hub kernels (their Python runs on each call),
and runs with ``runtime_checks``; a call whose trace fails stays an op, with one log line.
"""

from __future__ import annotations

import contextlib
import logging
import operator

import torch
from torch._guards import detect_fake_mode
from torch._inductor.decomposition import select_decomp_table
from torch.fx.experimental.proxy_tensor import make_fx

from ..fx_utils import is_static, meta_val, op_args
from ..lowering import kernels

log = logging.getLogger(__name__)

FORWARD = "attention_forward"


def _module(spec, device: torch.device):
    """The kernel module of ``spec`` when its attention forward may be traced, else None."""
    module = kernels.bundled_module(spec, device)
    return module if FORWARD in getattr(module, "JOINT_TRACEABLE", ()) else None


def _trace(forward, call: dict, with_backward: bool) -> torch.fx.GraphModule:
    """The forward (q, k, v[, mask]) -> out, or with the backward (q, k, v[, mask], dout)
    -> (out, dq, dk, dv), traced to ATen in the fake mode of the graph's values."""
    scale, causal, has_mask = call["scale"], call["causal"], call["mask"] is not None

    def run(q, k, v, mask):
        return forward(q, k, v, mask, scale, **({"is_causal": True} if causal else {}))

    def fwd(q, k, v, *rest):
        return run(q, k, v, rest[0] if has_mask else None)

    def joint(q, k, v, *rest):
        mask, dout = (rest[0], rest[1]) if has_mask else (None, rest[0])
        out, vjp = torch.func.vjp(lambda q_, k_, v_: run(q_, k_, v_, mask), q, k, v)
        return (out, *vjp(dout))

    values = [meta_val(call[n]) for n in ("q", "k", "v")]
    values += [meta_val(call["mask"])] if has_mask else []
    values += [meta_val(call["dout"])] if with_backward else []
    with detect_fake_mode(values) or contextlib.nullcontext():
        return make_fx(joint if with_backward else fwd, decomposition_table=select_decomp_table())(*values)


def _splice(graph, traced, inputs: list, forward_node, backward_node) -> None:
    """Put the traced nodes in the graph: those that read the gradient (the last input when
    there is a backward) before ``backward_node``, the rest before ``forward_node``; then
    point the ops' users at the traced outputs and erase the ops."""
    if backward_node is not None and any(u.target is not operator.getitem for u in backward_node.users):
        raise RuntimeError(f"{backward_node} has a user that is not getitem")
    placeholders = [n for n in traced.graph.nodes if n.op == "placeholder"]
    output = next(n for n in traced.graph.nodes if n.op == "output").args[0]
    late = set()
    if backward_node is not None:
        late.add(placeholders[-1])
        for n in traced.graph.nodes:
            if n.op != "placeholder" and any(a in late for a in n.all_input_nodes):
                late.add(n)
    env = dict(zip(placeholders, inputs))
    for n in traced.graph.nodes:
        if n.op in ("placeholder", "output"):
            continue
        with graph.inserting_before(backward_node if n in late else forward_node):
            env[n] = graph.node_copy(n, lambda a: env[a])
    outputs = output if isinstance(output, (list, tuple)) else [output]
    forward_node.replace_all_uses_with(env[outputs[0]])
    graph.erase_node(forward_node)
    _drop_copies_made_for_the_old_layout(env[outputs[0]])
    if backward_node is not None:
        for user in list(backward_node.users):
            user.replace_all_uses_with(env[outputs[1 + user.args[1]]])
            graph.erase_node(user)
        graph.erase_node(backward_node)


_aten = torch.ops.aten
_VIEWS = (_aten.permute.default, _aten.transpose.int, _aten.view.default, _aten.reshape.default,
          _aten._unsafe_view.default)


def _drop_copies_made_for_the_old_layout(out: torch.fx.Node) -> None:
    """Eager attention writes ``out.transpose(1, 2).contiguous()``; traced with
    matmul's [B, H, S, D]-contiguous output, that became a clone. SDPA's output follows
    q's layout, [B, S, H, D] for a q transposed from the projection (lowering/layout.py),
    and then the clone copies a tensor into the layout it has. Refresh the metadata of
    the views that lead to such a clone and drop it: otherwise the partitioner saves both
    SDPA's output and the copy for the backward."""
    fake_mode = detect_fake_mode([out.meta.get("val")])
    if fake_mode is None:
        return
    frontier = [out]
    while frontier:
        node = frontier.pop()
        for user in list(node.users):
            is_clone = user.target is _aten.clone.default and user.kwargs.get("memory_format") in (
                None, torch.contiguous_format)
            if user.target not in _VIEWS and not is_clone:
                continue
            try:
                with fake_mode:
                    args, kwargs = torch.fx.node.map_arg((user.args, user.kwargs), lambda a: a.meta["val"])
                    val = user.target(*args, **kwargs)
            except Exception:  # noqa: BLE001 - e.g. a view the new layout cannot take: Inductor copies there
                continue
            if not is_clone:
                user.meta["val"] = val
                frontier.append(user)
            elif (args[0].is_contiguous() and val.stride() == args[0].stride()
                  and all(u.op != "output" for u in user.users)):  # an output keeps its own storage
                user.replace_all_uses_with(node)
                node.graph.erase_node(user)


def _backward_of(forward_call: dict, backward_nodes: list) -> torch.fx.Node | None:
    """The attention_backward node of the same call: the same q, k, v, mask, scale, causal."""
    keys = ("q", "k", "v", "mask", "scale", "causal")
    for node in backward_nodes:
        call = op_args(node)
        if all(call[k] is forward_call[k] or call[k] == forward_call[k] for k in keys):
            return node
    return None


def trace_attention(graph: torch.fx.Graph) -> int:
    """Trace the eligible attention calls of ``graph`` (see the module's docstring); the
    number traced."""
    if kernels.checks_every_kernel():
        return 0
    ops = torch.ops.hubcompile
    backward_nodes = [n for n in graph.nodes if n.target is ops.attention_backward.default]
    done = 0
    for node in [n for n in graph.nodes if n.target is ops.attention.default]:
        call = op_args(node)
        q = meta_val(call["q"])
        backward = _backward_of(call, backward_nodes)
        backward_call = op_args(backward) if backward is not None else None
        values = [meta_val(call[n]) for n in ("q", "k", "v", "mask")]
        if backward is not None:
            call["dout"] = backward_call["dout"]
            values.append(meta_val(call["dout"]))
        if not isinstance(q, torch.Tensor) or not is_static(values):
            continue
        module = _module(call["kernel_spec"], q.device)
        if module is None or (backward is not None and backward_call["kernel_spec"] != call["kernel_spec"]):
            continue
        try:
            traced = _trace(getattr(module, FORWARD), call, backward is not None)
            inputs = [call[n] for n in ("q", "k", "v")] + ([call["mask"]] if call["mask"] is not None else [])
            _splice(graph, traced, inputs + ([call["dout"]] if backward is not None else []), node, backward)
        except Exception as e:  # noqa: BLE001 - the op stays; it runs the same kernel
            log.info("hubcompile: attention stays an op (%s: %s)", type(e).__name__, str(e)[:300])
            continue
        if backward is not None:
            backward_nodes.remove(backward)
        done += 1
    if done:
        graph.eliminate_dead_code()
        log.info("hubcompile: %d attention call(s) traced to SDPA's fused ops, forward and backward", done)
    return done
