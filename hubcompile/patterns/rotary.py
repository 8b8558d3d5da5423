"""Rotary position embedding, per tensor, as transformers writes it:

  Llama:    q * cos + rotate_half(q) * sin,  rotate_half(x) = cat((-x[..., h:], x[..., :h]), -1)
  NeoX/Phi: q_rot, q_pass = q[..., :R], q[..., R:]
            cat((q_rot * cos + rotate_half(q_rot) * sin, q_pass), -1)
  GPT-J:    q * cos + rotate_every_two(q) * sin,
            rotate_every_two(x) = stack((-x[..., 1::2], x[..., ::2]), -1).flatten(-2)
            (and its partial form, with the slices and cat around it)
  NanoChat: q * cos + cat((x[..., h:], -x[..., :h]), -1) * sin: the rotation the other
            way, which is Llama's with -sin (exact: a negation rounds nothing)
  GPT-OSS:  x1, x2 = chunk(q, 2, -1); cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), -1)
            with cos/sin of half the head dim: Llama's with cos/sin repeated,
            cat((cos, cos), -1), which the op is given

``apply_rotary_pos_emb(q, k, ...)`` becomes two ops, one for q and one for k: they share
cos/sin, so a pattern over both would not fit models that rotate only one or rotate
them in different places (GPT-J). cos/sin are pattern inputs, taken after the model's
``unsqueeze`` / ``repeat_interleave``: that node feeds both q and k, so it cannot be
inside a single-tensor pattern (the matcher wants interior nodes used only inside it).

Slice bounds, cat dims and view shapes need no check: the matcher re-traces the search
function with each match's shapes and compares them literally (``x.shape[-1] // 2``,
``cos.shape[-1]``), so a slice at another place does not match.
"""

from __future__ import annotations

import torch
from torch.fx.experimental.symbolic_shapes import statically_known_true

from ..lowering import rotary_ops as ops  # registers torch.ops.hubcompile.rotary*
from .framework import Family, Spelling, chosen_kernels, meta_val, same_device

F32, BF16 = torch.float32, torch.bfloat16
DTYPES = [(F32,), (BF16,)]

# Example shapes: x [B, H, S, D] with cos/sin [B, 1, S, R], partial R < D.
B, H, S, D, R_PARTIAL = 2, 3, 5, 16, 8


def _rotate_half(x):
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def _rotate_every_two(x):
    x1 = x[..., ::2]
    x2 = x[..., 1::2]
    return torch.stack((-x2, x1), dim=-1).flatten(-2)


def _rotate_half_negated(x):
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2 :]
    return torch.cat((x2, -x1), dim=-1)


_ROTATE = {False: _rotate_half, True: _rotate_every_two}


def _chunked_half(x, cos, sin):
    x1, x2 = torch.chunk(x, 2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


# ------------------------------------------------------------------------------ checks


def _check(match) -> str | None:
    x, cos, sin = (match.kwargs[k] for k in ("x", "cos", "sin"))
    xv, cv, sv = meta_val(x), meta_val(cos), meta_val(sin)
    if not same_device(x, cos, sin):
        return "x, cos and sin on different devices"
    # The op returns no gradient for cos/sin. (In a training graph a cos/sin gradient
    # reads rotate(x), an interior node, so such a graph does not match anyway.)
    if cv.requires_grad or sv.requires_grad:
        return "cos/sin require grad (the op differentiates x only)"
    if not (xv.is_floating_point() and cv.is_floating_point() and sv.is_floating_point()):
        return "x, cos and sin are not all floating point"
    # The kernels take x as [B, A1, A2, D] and cos/sin of at most 4 dims.
    if xv.dim() != 4 or not 1 <= cv.dim() <= 4 or not 1 <= sv.dim() <= 4:
        return f"x {tuple(xv.shape)} is not 4-D or cos/sin {tuple(cv.shape)} have more than 4 dims"
    r, d = cv.shape[-1], xv.shape[-1]
    if sv.shape[-1] != r or r % 2 or not 0 < r <= d:
        return f"rotary dim {r} (cos) / {sv.shape[-1]} (sin) is not even and <= head dim {d}"
    # The full spelling also matches a cos of width 1 broadcast over D; the op reads
    # R = cos.shape[-1], so it must be the rotated width. cos/sin must not enlarge x.
    target = (*xv.shape[:-1], r)
    if any(torch.broadcast_shapes(t.shape, target) != target for t in (cv, sv)):
        return f"cos {tuple(cv.shape)} / sin {tuple(sv.shape)} do not broadcast to x[..., :R] {target}"
    return None


# ------------------------------------------------- cos/sin built with equal halves

# Whether cos/sin repeat their first half in their second, as transformers builds them
# (``emb = cat((freqs, freqs), -1)``): Hub rotary layers may read the first half only
# (liger's does), so they are offered a match only where its graph proves it. Proven by
# walking back from cos/sin to the duplication, through ops that keep equal halves equal.
aten, prims = torch.ops.aten, torch.ops.prims
# Elementwise (each tensor operand must have equal halves too, or a last dim of 1).
_ELEMENTWISE = {aten.cos.default, aten.sin.default, aten.mul.Tensor, aten.mul.Scalar, aten.div.Tensor,
                aten.div.Scalar, aten.neg.default, aten.add.Tensor, aten.sub.Tensor,
                prims.convert_element_type.default, aten._to_copy.default, aten.clone.default,
                aten.alias.default, aten.detach.default}
# Rearranging the leading dims: the last dim comes through whole.
_LEADING = {aten.unsqueeze.default, aten.squeeze.dim, aten.squeeze.dims, aten.expand.default, aten.slice.Tensor,
            aten.select.int, aten.index.Tensor, aten.permute.default, aten.view.default, aten.reshape.default,
            aten._unsafe_view.default}
_MAX_DEPTH = 64


def _last_dim_kept(node) -> bool:
    """Whether a ``_LEADING`` op passes its input's last dim through unchanged."""
    out, inp = meta_val(node), meta_val(node.args[0])
    if not (isinstance(out, torch.Tensor) and isinstance(inp, torch.Tensor)) or out.dim() == 0 or inp.dim() == 0:
        return False
    if not statically_known_true(out.shape[-1] == inp.shape[-1]):
        return False
    target = node.target
    if target in (aten.slice.Tensor, aten.select.int):
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        return dim % inp.dim() != inp.dim() - 1
    if target is aten.index.Tensor:
        return len(node.args[1]) < inp.dim()
    if target is aten.permute.default:
        return node.args[1][-1] % inp.dim() == inp.dim() - 1
    if target is aten.unsqueeze.default:
        return node.args[1] % out.dim() != out.dim() - 1
    # view / reshape with the last size unchanged: each row of the result is a row of x
    return True


def _repeated_pair(node) -> bool:
    """``node`` is [..., 2, h] holding the same [..., 1, h] twice: how a graph spells
    ``cat((f, f), -1)`` once decomposed, ``clone(expand(unsqueeze(f, -2), [..., 2, h]))``."""
    while isinstance(node, torch.fx.Node) and node.target in (aten.clone.default, aten.alias.default):
        node = node.args[0]
    if not (isinstance(node, torch.fx.Node) and node.target is aten.expand.default):
        return False
    inp = meta_val(node.args[0])
    return isinstance(inp, torch.Tensor) and inp.dim() >= 2 and statically_known_true(inp.shape[-2] == 1)


def halves_equal(node, depth: int = 0) -> bool:
    """Whether the tensor ``node`` computes has equal halves along its last dim, as proven
    from the graph (False when not proven)."""
    if not isinstance(node, torch.fx.Node) or node.op != "call_function" or depth > _MAX_DEPTH:
        return False
    target, value = node.target, meta_val(node)
    if not isinstance(value, torch.Tensor) or value.dim() == 0:
        return False
    if target is aten.cat.default:
        parts, dim = node.args[0], node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        return len(parts) == 2 and parts[0] is parts[1] and dim % value.dim() == value.dim() - 1
    if target in (aten.view.default, aten.reshape.default, aten._unsafe_view.default) and _repeated_pair(node.args[0]):
        inp = meta_val(node.args[0])
        return statically_known_true(value.shape[-1] == 2 * inp.shape[-1]) and statically_known_true(
            inp.shape[-2] == 2)
    if target in _LEADING:
        return _last_dim_kept(node) and halves_equal(node.args[0], depth + 1)
    if target in _ELEMENTWISE:
        tensors = [a for a in (*node.args, *node.kwargs.values()) if isinstance(a, torch.fx.Node)]
        return bool(tensors) and all(_broadcast_last(a) or halves_equal(a, depth + 1) for a in tensors)
    return False


def _broadcast_last(node) -> bool:
    value = meta_val(node)
    return isinstance(value, torch.Tensor) and (value.dim() == 0 or statically_known_true(value.shape[-1] == 1))


def _match_requirements(match) -> dict:
    return {"halves_equal": halves_equal(match.kwargs["cos"]) and halves_equal(match.kwargs["sin"])}


def _random_input(name, shape, dtype, device, gen, halves_equal=False):
    """cos/sin with equal halves where the match's are proven so (a kernel was chosen on
    that proof); otherwise the guard's default draw."""
    if not halves_equal or name not in ("cos", "sin") or shape[-1] % 2:
        return None
    half = torch.randn(*shape[:-1], shape[-1] // 2, dtype=dtype, device=device, generator=gen)
    return torch.cat((half, half), dim=-1)


def _check_half_width(match) -> str | None:
    """``_check`` for cos/sin of half the head dim, which the op gets repeated."""
    reason = _check(match)
    r, d = meta_val(match.kwargs["cos"]).shape[-1], meta_val(match.kwargs["x"]).shape[-1]
    if reason is None and 2 * r != d:
        return f"cos/sin width {r} is not half the head dim {d}"
    return reason


# ---------------------------------------------------------------------------- spellings


def _inputs(partial):
    r = R_PARTIAL if partial else D

    def inputs(dt):
        return [torch.randn(B, H, S, D, dtype=dt), torch.randn(B, 1, S, r, dtype=dt), torch.randn(B, 1, S, r, dtype=dt)]

    return inputs


def _spelling(interleaved: bool, partial: bool, negated: bool = False) -> Spelling:
    rotate = _rotate_half_negated if negated else _ROTATE[interleaved]

    if partial:
        def search(x, cos, sin):
            x_rot, x_pass = x[..., : cos.shape[-1]], x[..., cos.shape[-1] :]
            return torch.cat([(x_rot * cos) + (rotate(x_rot) * sin), x_pass], dim=-1)
    else:
        def search(x, cos, sin):
            return (x * cos) + (rotate(x) * sin)

    def replace(x, cos, sin):
        return ops.rotary(x, cos, -sin if negated else sin, interleaved, *chosen_kernels())

    name = f"{'interleaved' if interleaved else 'half'}{'_negated' if negated else ''}{'_partial' if partial else ''}"
    # Only x takes gradients in the training trace: cos/sin come from buffers under no_grad.
    return Spelling(name, search, replace, _inputs(partial), DTYPES, check=_check, grad_inputs=[0],
                    op="rotary", backward_op="rotary_backward", anchor="x", shrink_dims=(0, 2),
                    requirements={"interleaved": interleaved}, random_input=_random_input,
                    match_requirements=None if interleaved else _match_requirements)


def _chunked_spelling() -> Spelling:
    def replace(x, cos, sin):
        return ops.rotary(x, torch.cat((cos, cos), dim=-1), torch.cat((sin, sin), dim=-1), False, *chosen_kernels())

    def inputs(dt):
        return [torch.randn(B, H, S, D, dtype=dt), torch.randn(B, 1, S, D // 2, dtype=dt),
                torch.randn(B, 1, S, D // 2, dtype=dt)]

    return Spelling("half_chunked", _chunked_half, replace, inputs, DTYPES, check=_check_half_width,
                    grad_inputs=[0], op="rotary", backward_op="rotary_backward", anchor="x", shrink_dims=(0, 2),
                    requirements={"interleaved": False}, random_input=_random_input,
                    # the op's cos/sin are cat((cos, cos)): equal halves by construction
                    match_requirements=lambda match: {"halves_equal": True})


# Forward-only patterns, in training graphs too. The rotation is linear in x: its backward
# reads the tangent, cos and sin, never the forward's interior nodes, so a joint
# pattern's forward and backward halves share only cos/sin, which q and k (and every
# layer) share as well. The matcher could then pair one tensor's forward with another's
# backward, and did: wrong gradients where attention was not replaced (sdpa models,
# Gemma 2). The forward-only pattern keeps Inductor's own backward, which is right.
FAMILY = Family(
    name="rotary",
    description="rotary position embedding per q/k tensor: half-split (Llama, and NanoChat's other "
                "direction, GPT-OSS's chunks), partial (NeoX/Phi), interleaved (GPT-J)",
    # Partial first: the full form would match inside it and leave the slices and cat.
    stages=[[_spelling(i, True) for i in (False, True)],
            [_spelling(i, False) for i in (False, True)] + [_spelling(False, False, negated=True),
                                                             _chunked_spelling()]],
    joint=False,
    fusible=True,
)
