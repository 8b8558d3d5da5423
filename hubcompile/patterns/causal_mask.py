"""Attention masks that the graph builds and that are exactly causal: ``causal_mask``.

Run eagerly, transformers calls SDPA with ``is_causal=True`` and no mask, and SDPA runs
its causal flash kernel. Under ``torch.compile`` it cannot look at the data to prove that
nothing is padded or packed, so it builds the mask in the graph (from aranges, and from
position ids it made itself) and passes it as ``attn_mask``; SDPA then runs its masked
kernel, which computes every block of the [S, S] scores and reads the mask too:

    mask = (kv_idx <= q_idx) & (segment[q_idx] == segment[kv_idx])   # [B, 1, S, S]
    F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=False)

Matched on the graph Dynamo captures, before AOTAutograd. A mask is dropped and SDPA
called with ``is_causal=True`` when query i sees exactly keys 0..i (a bool mask, or an
additive one of 0 and -inf or the dtype's minimum), which is known in one of two ways:

- proven from how the graph builds it (``causal_proof.py``): aranges, comparisons,
  ``tril``/``triu``, ``where``/``masked_fill``, offsets, for every size the graph accepts,
  so it holds under ``dynamic=True``, ``mark_dynamic`` and automatic dynamic shapes;
- otherwise, where the mask depends on no graph input and every shape is static,
  evaluated now, at compile time.

The result is exact: the same attention, with the causal kernel. Left as they are, and
named in the report: masks built from a graph input (a padding mask passed by the caller),
masks that are not causal (sliding windows, padding, a shifted diagonal), and masks the
proof does not cover under symbolic sizes (the reason names what stopped it).
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from .causal_proof import Unproven, dependencies, prove, writes_to
from .framework import Replacement, is_static, meta_val, source_line

log = logging.getLogger(__name__)

NAME = "causal_mask"
_SDPA = (F.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention)
_SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
# Evaluating a mask bigger than this at compile time would cost more than it saves.
MAX_EVAL_BYTES = 256 * 2**20


def evaluate(mask: torch.fx.Node, nodes: list[torch.fx.Node]) -> tuple[torch.Tensor | None, str | None]:
    """(the mask's value, None), or (None, why it cannot be known at compile time).
    ``nodes``: what makes the value (``causal_proof.dependencies``), in-place writes
    included, run in graph order."""
    for n in nodes:
        if isinstance(meta_val(n), (bool, int, float)):
            continue  # a size, read from its metadata
        if n.op in ("placeholder", "get_attr"):
            return None, f"the mask is computed from the graph input {n.name} (a padding mask?)"
        if n.op not in ("call_function", "call_method"):
            return None, f"the mask is computed by {n.op} {n.target}"
        if "functorch" in getattr(n.target, "__module__", "") or "functorch" in str(n.target):
            return None, "the mask is built under vmap"
        value = meta_val(n)
        if not is_static(value) or not all(is_static(meta_val(a)) for a in n.args if isinstance(a, torch.fx.Node)):
            return None, "the mask's shape is dynamic"
        if isinstance(value, torch.Tensor) and value.numel() * value.element_size() > MAX_EVAL_BYTES:
            return None, f"the mask is too large to check at compile time ({tuple(value.shape)})"
    from torch.utils._python_dispatch import _disable_current_modes

    env: dict = {}
    # Real tensors: inside Inductor's passes a fake (and proxy) mode is active.
    with _disable_current_modes(), torch.no_grad():
        for n in nodes:
            if isinstance(meta_val(n), (bool, int, float)):
                env[n] = meta_val(n)
                continue
            args, kwargs = torch.fx.node.map_arg((n.args, n.kwargs), env.__getitem__)
            if n.op == "call_method":
                env[n] = getattr(args[0], n.target)(*args[1:], **kwargs)
            else:
                env[n] = n.target(*args, **kwargs)
    value = env[mask]
    if not isinstance(value, torch.Tensor):
        return None, f"the mask is a {type(value).__name__}"
    return value, None


def verdict(mask: torch.fx.Node, reader: torch.fx.Node, q, k, nodes: list | None = None) -> str | None:
    """None when the value ``reader`` reads from ``mask`` is exactly causal for queries
    ``q`` and keys ``k`` (fake tensors), else why not: proven from how it is built, or
    else evaluated where the shapes are static. ``nodes``: ``dependencies(mask, reader)``."""
    from torch.utils._python_dispatch import _disable_current_modes

    try:
        nodes = nodes if nodes is not None else dependencies(mask, reader)
        prove(mask, reader, q, k, nodes)
        return None
    except Unproven as e:
        if e.definite:
            return e.reason
        proof = e.reason
    if not is_static(q) or not is_static(k) or not is_static(meta_val(mask)):
        proof = proof if proof.startswith("not proven causal") else f"not proven causal ({proof})"
        return f"{proof}; with symbolic sizes it cannot be evaluated either"
    value, why = evaluate(mask, nodes)
    if value is None:
        return f"{why}; not proven causal either ({proof.removeprefix('not proven causal: ')})"
    with _disable_current_modes():
        return is_causal(value, q.shape[0] if q.dim() == 4 else 1, q.shape[-2], k.shape[-2])


def is_causal(mask: torch.Tensor, batch: int, q_len: int, kv_len: int) -> str | None:
    """None when ``mask`` lets query i see exactly keys 0..i in every batch and head,
    else why not."""
    if q_len != kv_len:
        return f"{q_len} queries over {kv_len} keys (SDPA's causal mode aligns them top-left)"
    heads = mask.shape[-3] if mask.dim() >= 3 else 1
    try:
        full = torch.broadcast_to(mask, (batch, heads, q_len, kv_len))
    except RuntimeError:
        return f"mask shape {tuple(mask.shape)} does not broadcast to {(batch, heads, q_len, kv_len)}"
    causal = torch.ones(q_len, kv_len, dtype=torch.bool, device=mask.device).tril()
    if mask.dtype == torch.bool:
        allowed = full
    elif mask.is_floating_point():
        blocked = (full == float("-inf")) | (full == torch.finfo(mask.dtype).min)
        if not bool((blocked | (full == 0)).all()):
            return "an additive mask with values other than 0 and -inf (a bias, not a mask)"
        allowed = full == 0
    else:
        return f"a {mask.dtype} mask"
    if not torch.equal(allowed, causal.expand_as(allowed)):
        return "not causal (padding, packed sequences or a window)"
    return None


def _verdict_for(verdicts: dict, order: dict, mask: torch.fx.Node, reader: torch.fx.Node, q, k) -> str | None:
    """``verdict`` for ``reader``'s call with query and key values ``q``, ``k``,
    remembered in ``verdicts`` (the layers of a model share one mask node): {key: (why
    not or None, the nodes that make the mask)}. ``order``: the graph's node positions."""
    try:
        nodes = dependencies(mask, reader, order)
    except Unproven as e:
        return e.reason
    # The same mask node, written by the same in-place ops, for the same sizes.
    key = (mask, tuple(n for n in nodes if writes_to(n) is not None),
           str(tuple(q.shape[:1]) if q.dim() == 4 else ()), str(q.shape[-3:-1]), str(k.shape[-2]))
    if key not in verdicts:
        try:
            verdicts[key] = (verdict(mask, reader, q, k, nodes), nodes)
        except Exception as e:  # noqa: BLE001 - a failing check keeps the mask
            verdicts[key] = (f"check failed: {type(e).__name__}: {e}", nodes)
            log.warning("hubcompile: %s: %s", NAME, verdicts[key][0])
    return verdicts[key][0]


def _erase_dropped_masks(graph: torch.fx.Graph, verdicts: dict) -> None:
    """Erase the computation of each mask dropped where nothing else reads it, and only
    that: Dynamo's graph holds side-effecting calls with no users that a dead-code pass
    would drop. An in-place write goes only with the tensor it writes."""
    nodes = dict.fromkeys(n for why, deps in verdicts.values() if why is None for n in deps
                          if n.op in ("call_function", "call_method") and writes_to(n) is None)
    changed = True
    while changed:
        changed = False
        for n in reversed(list(nodes)):
            if n._erased:
                continue
            writes = [u for u in n.users if writes_to(u) is n and not u.users]
            if len(writes) == len(n.users):
                for w in writes:
                    graph.erase_node(w)
                graph.erase_node(n)
                changed = True


class CausalMask:
    """The family. Like ``linear_cross_entropy`` it rewrites Dynamo's graph and keeps the
    same records (accepted, refused, guarded, replacements) for the report."""

    name = NAME
    description = "SDPA with a mask built in the graph that is exactly causal -> is_causal=True"

    def __init__(self):
        self.accepted, self.refused, self.refused_at, self.guarded, self.replacements = [], [], [], [], []

    def apply(self, gm: torch.fx.GraphModule, cfg) -> int:
        for records in (self.accepted, self.refused, self.refused_at, self.guarded, self.replacements):
            records.clear()
        verdicts: dict = {}  # (mask node, writes, sizes) -> (None (causal) or why not, its nodes)
        order = {n: i for i, n in enumerate(gm.graph.nodes)}
        count = 0
        for node in [n for n in gm.graph.nodes if n.op == "call_function" and n.target in _SDPA]:
            args = dict(zip(_SDPA_ARGS, node.args)) | dict(node.kwargs)
            mask = args.get("attn_mask")
            if not isinstance(mask, torch.fx.Node) or args.get("is_causal"):
                continue  # no mask, or already causal: nothing to do
            try:
                reason = self._check(node, args, mask, verdicts, order)
                if reason is None:
                    node.args = tuple(args[name] for name in _SDPA_ARGS[:3])
                    node.kwargs = {**{name: args[name] for name in ("dropout_p", "scale", "enable_gqa") if name in args},
                                   "attn_mask": None, "is_causal": True}
            except Exception as e:  # noqa: BLE001 - a failing check keeps the original code
                reason = f"check failed: {type(e).__name__}: {e}"
                log.warning("hubcompile: %s: %s", NAME, reason)
            if reason is None:
                count += 1
                self.accepted.append(("sdpa_mask", "sdpa is_causal"))
                self.replacements.append(Replacement(
                    NAME, "sdpa_mask", "scaled_dot_product_attention(is_causal=True)", "sdpa is_causal",
                    "sdpa is_causal", bool(meta_val(args["query"]).requires_grad), (mask.name, node.name),
                    tuple(dict.fromkeys(filter(None, map(source_line, (mask, node)))))))
            else:
                self.refused.append(("sdpa_mask", reason))
                self.refused_at.append(source_line(node) or "")
                log.info("hubcompile: kept an SDPA mask: %s", reason)
        if count:
            _erase_dropped_masks(gm.graph, verdicts)
            gm.graph.lint()
            gm.recompile()
        return count

    @staticmethod
    def _check(node, args, mask, verdicts, order) -> str | None:
        """None when this call's mask is exactly causal, else why not."""
        q, k = meta_val(args["query"]), meta_val(args["key"])
        if not (isinstance(q, torch.Tensor) and isinstance(k, torch.Tensor)) or q.dim() < 3:
            return "query/key without tensor metadata"
        return _verdict_for(verdicts, order, mask, node, q, k)


def make_attention_causal(graph: torch.fx.Graph) -> tuple[list[tuple[str, ...]], list[str]]:
    """The same for ``hubcompile::attention`` (eager attention, replaced in the ATen graph
    by the attention family) and its backward: a mask argument proven causal becomes
    ``mask=None, causal=True``. Returns (the node names of each forward call made causal,
    the reasons of the forward calls left as they were)."""
    ops = {torch.ops.hubcompile.attention.default: 3, torch.ops.hubcompile.attention_backward.default: 4}
    verdicts: dict = {}
    order = {n: i for i, n in enumerate(graph.nodes)}
    done, kept = [], []
    for node in [n for n in graph.nodes if n.op == "call_function" and n.target in ops]:
        at = ops[node.target]
        mask = node.args[at] if len(node.args) > at else None
        if not isinstance(mask, torch.fx.Node) or node.kwargs.get("causal"):
            continue
        why = _verdict_for(verdicts, order, mask, node, meta_val(node.args[at - 3]), meta_val(node.args[at - 2]))
        forward = node.target is torch.ops.hubcompile.attention.default  # the backward follows it
        if why is not None:
            kept += [why] if forward else []
            continue
        node.args = (*node.args[:at], None, *node.args[at + 1:])
        node.kwargs = {**node.kwargs, "causal": True}
        done += [(mask.name, node.name)] if forward else []
    _erase_dropped_masks(graph, verdicts)
    return done, kept


FAMILY = CausalMask()
