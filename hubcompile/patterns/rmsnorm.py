"""RMSNorm, as Llama/Mistral/Qwen and Gemma write it, with or without a residual add.

Llama form:  h = x.float(); h = h * rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
             return w * h.to(x.dtype)
Gemma form:  ((h * rsqrt(...)) * (1.0 + w.float())).type_as(x)
Weightless:  (x.float() * rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)).type_as(x)
             (FalconMamba's mixer norms of dt, B and C, NanoChat's norms, Llama 4's q/k L2
             norm), or the same in x's dtype with no casts
The forms differ in where the result is rounded and in the ``1 + w``: they map to the same
op with different arguments (``weight_offset``, ``cast_before_scale``, no weight), never to
each other. A residual add feeding the norm (``h = x + residual; norm(h)``) becomes the
fused ``add_rms_norm``, which also returns the sum.

The weightless forms are matched after the weighted ones, in later stages: a weighted
norm holds a weightless one, and must be replaced whole. When no weighted form replaced it
(the guard refused its kernel, or it is spelled some other way), the weightless forms
still see its inner ``x * rsqrt(...)``; their check leaves a match whose result is then
scaled per channel (or by one gain) alone, so a refused norm stays entirely Inductor's
code, with its refusal in the report.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from torch.fx.experimental.symbolic_shapes import statically_known_true

from ..lowering import ops
from .layer_norm import LayerNorm
from .framework import (Family, NotThisSpelling, Spelling, chosen_kernels, is_python_float, meta_val, norm_eps,
                        same_device)

EPS = 1.2345678e-5  # magic value: makes eps a match argument

F32, BF16 = torch.float32, torch.bfloat16


def _square(h, square):
    return h.pow(2) if square == "pow" else h * h


def _llama(x, w, eps, square, weight_first):
    h = x.to(torch.float32)
    var = _square(h, square).mean(-1, keepdim=True)
    h = h * torch.rsqrt(var + eps)
    return w * h.to(x.dtype) if weight_first else h.to(x.dtype) * w


def _gemma(x, w, eps, square):
    h = x.float()
    out = h * torch.rsqrt(_square(h, square).mean(-1, keepdim=True) + eps)
    out = out * (1.0 + w.float())
    return out.type_as(x)


def _weightless(x, eps, upcast):
    h = x.float() if upcast else x
    out = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return out.type_as(x) if upcast else out


# (spelling name, eager form, weight_offset, cast_before_scale)
_FORMS = [
    ("llama_pow_w_first", lambda x, w, eps: _llama(x, w, eps, "pow", True), 0.0, True),
    ("llama_pow_w_last", lambda x, w, eps: _llama(x, w, eps, "pow", False), 0.0, True),
    ("llama_mul_w_first", lambda x, w, eps: _llama(x, w, eps, "mul", True), 0.0, True),
    ("llama_mul_w_last", lambda x, w, eps: _llama(x, w, eps, "mul", False), 0.0, True),
    ("gemma_pow", lambda x, w, eps: _gemma(x, w, eps, "pow"), 1.0, False),
    ("gemma_mul", lambda x, w, eps: _gemma(x, w, eps, "mul"), 1.0, False),
]


def _eps_args(eps):
    """(float eps, eps tensor or None) for the ops: a lifted eps is passed as a tensor."""
    return (0.0, eps) if isinstance(eps, torch.Tensor) else (eps, None)


def _check(match) -> str | None:
    eps = norm_eps(match)
    eps_val = meta_val(eps)
    # Dynamo may lift a float module attribute into a 0-d CPU tensor input (dynamic=True).
    lifted = isinstance(eps_val, torch.Tensor) and eps_val.dim() == 0 and eps_val.device.type == "cpu"
    if not (is_python_float(eps) or lifted):
        return f"eps is {eps_val!r}, neither a Python float nor a 0-d CPU tensor"
    x, w = match.kwargs["x"], match.kwargs.get("w")
    if not same_device(x, match.kwargs.get("w", x), match.kwargs.get("residual", x)):
        return "inputs on different devices"
    xv = meta_val(x)
    if w is not None and (meta_val(w).dim() != 1 or xv.shape[-1] != meta_val(w).shape[0]):
        return f"weight shape {tuple(meta_val(w).shape)} does not fit hidden size {xv.shape[-1]}"
    if not xv.is_floating_point():
        return f"input dtype {xv.dtype} is not floating point"
    return None


def weight_after(normalised: torch.fx.Node, inside=()) -> torch.fx.Node | None:
    """The tensor that scales ``normalised`` (the ``h * rsqrt(...)`` node) per channel, or by one
    gain, right after it, through dtype casts, if any: the weight of a weighted norm. Users in
    ``inside`` (the match itself) are not scalings."""
    hidden = meta_val(normalised).shape[-1]
    frontier = [normalised]
    while frontier:
        node = frontier.pop()
        for user in node.users:
            if user.target == torch.ops.prims.convert_element_type.default:
                frontier.append(user)
            elif user.target == torch.ops.aten.mul.Tensor and user not in inside:
                other = user.args[1] if user.args[0] is node else user.args[0]
                v = meta_val(other)
                # [N], [1, ..., 1, N], [1] or 0-d: one factor per channel (Gemma's 1 + w too) or one
                # gain for all, unlike the per-token tensors Mamba multiplies its normed B and C with
                if isinstance(v, torch.Tensor) and all(statically_known_true(s == 1) for s in v.shape[:-1]) and (
                        v.dim() == 0 or statically_known_true(v.shape[-1] == hidden)
                        or statically_known_true(v.shape[-1] == 1)):
                    return other
    return None


def _check_weightless(match) -> str | None:
    normalised = next(n for n in match.nodes if n.target == torch.ops.aten.mul.Tensor
                      and any(getattr(a, "target", None) == torch.ops.aten.rsqrt.default for a in n.args))
    weight = weight_after(normalised, set(match.nodes))
    if weight is not None:
        return NotThisSpelling(f"scaled by {weight.name} after the norm: a weighted norm, which only a "
                               "weighted spelling replaces (whole)")
    return None


_ROTATED_VIEWS = (torch.ops.aten.view.default, torch.ops.aten.unsqueeze.default, torch.ops.aten.clone.default,
                  torch.ops.aten.expand.default)


def _rotated(node) -> bool:
    """Whether ``node`` is rotate_half's result, ``cat`` of halves one of them negated (or
    GPT-J's stack of them, a cat of unsqueezed halves viewed flat)."""
    while getattr(node, "target", None) in _ROTATED_VIEWS:
        node = node.args[0]
    if getattr(node, "target", None) != torch.ops.aten.cat.default:
        return False
    parts = [p.args[0] if p.target == torch.ops.aten.unsqueeze.default else p for p in node.args[0]]
    return any(p.target == torch.ops.aten.neg.default for p in parts)


def _ends_a_rotation(match) -> bool:
    """Whether the add is the end of a rotation, ``q * cos + rotate_half(q) * sin``, normed
    after it (NanoChat's q/k norm): fused here as a residual add, it would leave the rotation
    nothing to match, and attention an op in place of its q."""
    adds = [n for n in match.nodes if n.target == torch.ops.aten.add.Tensor
            and match.kwargs["x"] in n.args and match.kwargs["residual"] in n.args]
    return any(getattr(a, "target", None) == torch.ops.aten.mul.Tensor and any(_rotated(b) for b in a.args)
               for add in adds for a in add.args)


def _check_add(match) -> str | None:
    if _ends_a_rotation(match):
        return NotThisSpelling("the add ends a rotation (q * cos + rotate_half(q) * sin): not a residual add")
    x, r = meta_val(match.kwargs["x"]), meta_val(match.kwargs["residual"])
    if x.shape != r.shape or x.dtype != r.dtype:
        return "residual add broadcasts or promotes dtypes"
    return _check(match)


def _check_plain_weightless(match) -> str | None:
    return _check_weightless(match) or _check(match)


def _check_add_weightless(match) -> str | None:
    return _check_weightless(match) or _check_add(match)


def _inputs(x_dtype, w_dtype):
    return [torch.randn(2, 3, 16, dtype=x_dtype), torch.randn(16, dtype=w_dtype)]


def _add_inputs(x_dtype, w_dtype):
    return [torch.randn(2, 3, 16, dtype=x_dtype), *_inputs(x_dtype, w_dtype)]


def _pair(name, form, offset, cast_before):
    """The plain and the residual-add spelling of one form (closures, since the
    matcher reads the search function's signature as its list of inputs)."""
    # Gemma keeps fp32 weights beside bf16 activations, which removes a cast.
    dtypes = [(F32, F32), (BF16, BF16)] + ([(BF16, F32)] if offset else [])

    def search(x, w, eps):
        return form(x, w, eps)

    def replace(x, w, eps):
        eps, eps_tensor = _eps_args(eps)
        return ops.rms_norm(x, w, eps, offset, cast_before, eps_tensor, *chosen_kernels())[0]

    def search_add(x, residual, w, eps):
        h = x + residual
        return form(h, w, eps), h

    def replace_add(x, residual, w, eps):
        eps, eps_tensor = _eps_args(eps)
        y, h, _ = ops.add_rms_norm(x, residual, w, eps, offset, cast_before, eps_tensor, *chosen_kernels())
        return y, h

    ops_ = dict(backward_op="rms_norm_backward", anchor="x", read_scalars=lambda m: {"eps": norm_eps(m)})
    plain = Spelling(name, search, replace, _inputs, dtypes, {"eps": EPS}, _check, op="rms_norm", **ops_)
    fused = Spelling(f"add_{name}", search_add, replace_add, _add_inputs, dtypes, {"eps": EPS}, _check_add,
                     op="add_rms_norm", **ops_)
    return plain, fused


def _weightless_pair(name, upcast, dtypes):
    """The plain and the residual-add spelling of a norm with no weight: the op's
    ``weight=None`` (no weight read, no weight gradient). Without the casts, the op
    still computes in fp32 and rounds once, which is closer to float64 than the bf16 code."""

    def search(x, eps):
        return _weightless(x, eps, upcast)

    def replace(x, eps):
        eps, eps_tensor = _eps_args(eps)
        return ops.rms_norm(x, None, eps, 0.0, True, eps_tensor, *chosen_kernels())[0]

    def search_add(x, residual, eps):
        h = x + residual
        return _weightless(h, eps, upcast), h

    def replace_add(x, residual, eps):
        eps, eps_tensor = _eps_args(eps)
        y, h, _ = ops.add_rms_norm(x, residual, None, eps, 0.0, True, eps_tensor, *chosen_kernels())
        return y, h

    def inputs(x_dtype):
        return [torch.randn(2, 3, 16, dtype=x_dtype)]

    def add_inputs(x_dtype):
        return [torch.randn(2, 3, 16, dtype=x_dtype), torch.randn(2, 3, 16, dtype=x_dtype)]

    ops_ = dict(backward_op="rms_norm_backward", anchor="x", read_scalars=lambda m: {"eps": norm_eps(m)},
                requirements={"weighted": False})
    plain = Spelling(name, search, replace, inputs, dtypes, {"eps": EPS}, _check_plain_weightless,
                     op="rms_norm", **ops_)
    fused = Spelling(f"add_{name}", search_add, replace_add, add_inputs, dtypes, {"eps": EPS},
                     _check_add_weightless, op="add_rms_norm", **ops_)
    return plain, fused


_PAIRS = [_pair(*form) for form in _FORMS]
# In fp32 the casts vanish from the trace, so the form without them is new in bf16 only.
_WEIGHTLESS = [_weightless_pair("weightless_pow", True, [(F32,), (BF16,)]),
               _weightless_pair("weightless_pow_no_cast", False, [(BF16,)])]

FAMILY = Family(
    name="rmsnorm",
    description="RMSNorm (Llama and Gemma forms, and without a weight), fused with a preceding residual add",
    stages=[[f for _, f in _PAIRS], [p for p, _ in _PAIRS], [f for _, f in _WEIGHTLESS], [p for p, _ in _WEIGHTLESS]],
    fusible=True,
)


# ------------------------------------------------------- torch's own F.rms_norm / nn.RMSNorm


class TorchRMSNorm(LayerNorm):
    """``F.rms_norm`` (``nn.RMSNorm``, torch's own), matched on Dynamo's graph as
    layer_norm.py matches ``F.layer_norm``, with the same residual add and upcast around
    it. After AOTAutograd it is ``_fused_rms_norm``'s decomposition (its reduction names
    a positive dim, its eps an ``add.Scalar``) with that op's own backward formula, which
    none of the spellings above traces to. torch computes the Gemma form with no offset,
    ``(x.float() * rsqrt(mean(x.float() ** 2) + eps) * w).to(x.dtype)``, eps by default
    fp32's machine epsilon (fp64's for float64 input)."""

    name = FAMILY.name
    description = "torch's F.rms_norm / nn.RMSNorm, fused with a preceding residual add"
    anchors = (F.rms_norm, torch.rms_norm)
    anchor_name = "rms_norm"
    signature = inspect.signature(lambda input, normalized_shape, weight=None, eps=None: None)
    ops = ops
    op_name, fused_op_name, backward_op_name = "rms_norm", "add_rms_norm", "rms_norm_backward"
    eps_optional = True

    def op_args(self, x, residual, weight, bias, eps: float, kernels) -> tuple:
        norm = (weight, eps, 0.0, False, None, *kernels)  # no offset, scaled before the cast back
        return (x, *norm) if residual is None else (x, residual, *norm)

    def eps(self, match, x) -> float:
        if match.eps is not None:
            return float(match.eps)
        return torch.finfo(torch.float64 if x.dtype == torch.float64 else torch.float32).eps

    def requirements(self, match) -> dict:
        return {} if match.weight is not None else {"weighted": False}


TORCH_RMS_NORM = TorchRMSNorm()
