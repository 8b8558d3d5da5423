"""Hub *layers* seen through the bundled repos' API.

A Hub layer is an ``nn.Module`` class in a kernel repo's ``layers`` module, written to
replace the ``forward`` of a model class: ``kernels.kernelize`` calls ``Layer.forward``
with the original module as ``self``, so the layer has no ``__init__`` and reads its
state from attributes (``self.weight``, ``self.variance_epsilon``, ...). Two class
flags say what it supports: ``has_backward`` (default True) and ``can_torch_compile``
(default False).

hubcompile has no module to hand over: a match is a subgraph. ``Standin`` is a small
module carrying what the layer reads, taken from the match (the weight, eps, ...), and
the adapter calls ``Layer.forward(standin, ...)`` inside the hubcompile op. So:

- the layer runs inside an opaque custom op and is never traced, whatever its
  ``can_torch_compile`` (which is why a layer that kernelize must refuse under
  ``torch.compile`` is usable here);
- a layer with ``has_backward=False`` serves inference only: in a training graph
  resolution moves on to the next candidate, as kernelize falls back in training;
- backward functions differentiate through the layer's own forward (its autograd),
  re-entering autograd inside the op (see ``_vjp``).

Which functions an adapter serves depends on the layer name it stands for (the
``#<name>`` of the spec): ``RMSNorm`` serves ``rms_norm_*``, ``LayerNorm``
``layer_norm_*``, the activations ``gated_act_*``, ``MLP``, ``SwiGLUMLP`` and ``GeGLUMLP``
``gated_mlp_*``, ``rotary_pos_emb`` ``rotary_*``, ``causal_conv1d_fn``
``causal_conv1d_*``, ``ForCausalLMLoss`` the ``linear_cross_entropy*`` forwards.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from torch import nn

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class Standin(nn.Module):
    """What a layer's ``forward`` finds as ``self``: the attributes it reads."""

    def __init__(self, **attributes):
        super().__init__()
        self.__dict__.update(attributes)


def _autograd_on():
    """Inside a custom op's implementation autograd is switched off (grad mode, and the
    autograd dispatch keys excluded): switch both back on for one differentiation."""
    C = torch._C
    exclude = (C._dispatch_tls_local_exclude_set() - C.DispatchKeySet(C.DispatchKey.AutogradFunctionality)
               - C.DispatchKeySet(C.DispatchKey.ADInplaceOrView))
    return C._ForceDispatchKeyGuard(C._dispatch_tls_local_include_set(), exclude)


def _vjp(fn, inputs, grad_out):
    """Gradients of ``fn(*inputs)`` (one tensor) for ``grad_out``, through whatever autograd
    the layer uses: plain ops or an ``autograd.Function`` (torch.func.vjp refuses
    old-style Functions, which is how liger writes its layers)."""
    with _autograd_on(), torch.enable_grad():
        leaves = [t.detach().requires_grad_(True) if t is not None else None for t in inputs]
        out = fn(*leaves)
        wanted = [t for t in leaves if t is not None]
        # A copy: liger's layers write the input gradient over the output gradient
        # (in_place=True), and the op's grad_out may have other readers in the graph.
        grads = torch.autograd.grad(out, wanted, grad_out.to(out.dtype, copy=True), allow_unused=True)
    it = iter(grads)
    result = []
    for t in leaves:
        if t is None:
            result.append(None)
        else:
            g = next(it)
            result.append(torch.zeros_like(t) if g is None else g.detach())
    return result


class Layer:
    """A Hub layer standing in for the layer name ``NAME``; subclasses serve ``FUNCTIONS``."""

    NAME = ""
    FUNCTIONS: tuple[str, ...] = ()

    def __init__(self, module, layer: str, where: str):
        layers = getattr(module, "layers", None)
        if layers is None:
            raise ValueError(f"the repo {where} has no layers module")
        cls = getattr(layers, layer, None)
        if cls is None:
            names = sorted(n for n, v in vars(layers).items() if isinstance(v, type) and issubclass(v, nn.Module))
            raise ValueError(f"the repo {where} has no layer {layer} (its layers: {', '.join(names) or 'none'})")
        if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
            raise ValueError(f"{layer} of {where} is not an nn.Module class")
        if cls.__init__ is not nn.Module.__init__:
            # kernelize refuses these too: the layer is never instantiated, its state is the module's
            raise ValueError(f"layer {layer} of {where} defines __init__; a Hub layer must read its state from "
                             "the module it replaces")
        self.module, self.cls, self.layer, self.where = module, cls, layer, where
        self.has_backward = bool(getattr(cls, "has_backward", True))
        self.can_torch_compile = bool(getattr(cls, "can_torch_compile", False))

    def __repr__(self) -> str:
        return f"<layer {self.layer} of {self.where} as {self.NAME}>"

    def unsupported(self, fn: str, device, dtype, training: bool = False, **requirements) -> str | None:
        if fn not in self.FUNCTIONS:
            return f"layer {self.layer} ({self.NAME}) has no {fn} (it serves {', '.join(self.FUNCTIONS)})"
        if (training or fn.endswith("_backward")) and not self.has_backward:
            return f"layer {self.layer} has no backward (has_backward=False): used in inference only"
        if dtype not in DTYPES:
            return f"dtype {dtype} is not supported"
        return None

    def forward(self, standin, *args, **kwargs):
        return self.cls.forward(standin, *args, **kwargs)


class RMSNormLayer(Layer):
    """``forward(self, hidden_states)`` reading ``self.weight`` and ``self.variance_epsilon``
    (``self.eps`` for Gemma-style code; liger's layers read ``offset``, ``casting_mode``
    and ``in_place`` too)."""

    NAME = "RMSNorm"
    FUNCTIONS = ("rms_norm_forward", "rms_norm_backward")

    def unsupported(self, fn, device, dtype, training=False, weighted=True, **requirements):
        if not weighted:
            return f"layer {self.layer} scales by self.weight: it has no form without a weight"
        return super().unsupported(fn, device, dtype, training=training, **requirements)

    def _norm(self, h, weight, eps, weight_offset, cast_before_scale):
        if weight_offset != 0.0:
            # A layer computes w * norm(h): the Gemma form's (offset + w) is folded into
            # the weight (in fp32 where Gemma scales in fp32, else in the weight's dtype).
            weight = weight.float() + weight_offset if not cast_before_scale else weight + weight_offset
        standin = Standin(weight=weight, variance_epsilon=eps, eps=eps, offset=0.0, casting_mode="llama",
                          in_place=False)
        out_dtype = torch.promote_types(h.dtype, weight.dtype) if cast_before_scale else h.dtype
        return self.forward(standin, h).to(out_dtype)

    def rms_norm_forward(self, x, weight, eps, weight_offset, cast_before_scale, residual=None):
        h = x if residual is None else x + residual
        y = self._norm(h, weight, eps, weight_offset, cast_before_scale)
        # The op also returns rstd (saved for the backward), which a layer does not give:
        # one more read of h here, as one fp32 reduction (no fp32 copy of h).
        sum_sq = torch.linalg.vector_norm(h, dim=-1, dtype=torch.float32).square()
        rstd = torch.rsqrt(sum_sq / h.shape[-1] + eps)
        return y, rstd, h

    def rms_norm_backward(self, dy, h, weight, rstd, weight_offset, cast_before_scale, dh_extra=None, eps=None):
        if eps is None:
            raise ValueError("a layer's RMSNorm backward needs eps")
        dh, dw = _vjp(lambda h_, w_: self._norm(h_, w_, eps, weight_offset, cast_before_scale), (h, weight), dy)
        if dh_extra is not None:
            dh = dh + dh_extra
        return dh.to(h.dtype), dw.to(weight.dtype)


class LayerNormLayer(Layer):
    """``forward(self, hidden_states)`` reading ``self.weight`` and ``self.variance_epsilon``
    (kernels-community/layer-norm's ``LayerNorm``), or ``nn.LayerNorm``'s attributes
    (``normalized_shape``, ``weight``, ``bias``, ``eps``). The stand-in's bias is None and
    the match's bias is added after the layer: kernels-community's layer ignores a bias,
    so a layer cannot be trusted to add one (in bf16 that rounds once more)."""

    NAME = "LayerNorm"
    FUNCTIONS = ("layer_norm_forward", "layer_norm_backward")

    def _norm(self, h, weight, bias, eps):
        n = h.shape[-1]
        if weight is None:  # the layers expect a weight
            weight = torch.ones(n, dtype=h.dtype, device=h.device)
        standin = Standin(weight=weight, bias=None, variance_epsilon=eps, eps=eps, normalized_shape=(n,),
                          elementwise_affine=True)
        y = self.forward(standin, h)
        return y.to(h.dtype) if bias is None else (y.float() + bias.float()).to(h.dtype)

    def layer_norm_forward(self, x, weight, bias, eps, residual=None):
        h = x if residual is None else x + residual
        # The op also returns mean and rstd (saved for the backward), which a layer does
        # not give: one more read of h.
        var, mean = torch.var_mean(h.float(), dim=-1, correction=0)
        return self._norm(h, weight, bias, eps), mean, torch.rsqrt(var + eps), h

    def layer_norm_backward(self, dy, h, weight, bias, mean, rstd, dh_extra=None, eps=None):
        if eps is None:
            raise ValueError("a layer's LayerNorm backward needs eps")
        dh, dw, db = _vjp(lambda h_, w_, b_: self._norm(h_, w_, b_, eps), (h, weight, bias), dy)
        if dh_extra is not None:
            dh = dh + dh_extra
        return (dh.to(h.dtype), dw.to(weight.dtype) if weight is not None else None,
                db.to(bias.dtype) if bias is not None else None)


class ActivationLayer(Layer):
    """Activation layers of kernels-community/activation and transformers: elementwise
    ``forward(self, x)`` (``Silu``, ``GeluTanh``, ...), or gated ``forward(self, x[..., 2d])``
    -> ``act(x[..., :d]) * x[..., d:]`` when the layer is a ``...AndMul``."""

    FUNCTIONS = ("gated_act_forward", "gated_act_backward", "gated_act_fused_forward", "gated_act_fused_backward")
    ACTIVATION = "silu"

    def unsupported(self, fn, device, dtype, training=False, activation="silu", **requirements):
        if activation != self.ACTIVATION:
            return f"layer {self.layer} stands for {self.NAME} ({self.ACTIVATION}), not {activation}"
        if self.layer.startswith("MulAnd"):
            return f"layer {self.layer} applies the activation to the second half"
        return super().unsupported(fn, device, dtype, training)

    @property
    def _and_mul(self) -> bool:
        return self.layer.endswith("AndMul")

    def _gated(self, gate, up):
        if self._and_mul:
            gate, up = torch.broadcast_tensors(gate, up)
            dtype = torch.promote_types(gate.dtype, up.dtype)
            return self.forward(Standin(), torch.cat([gate.to(dtype), up.to(dtype)], dim=-1))
        return self.forward(Standin(), gate.contiguous()) * up

    def _fused(self, x):
        if self._and_mul:
            return self.forward(Standin(), x.contiguous())
        d = x.shape[-1] // 2
        return self.forward(Standin(), x[..., :d].contiguous()) * x[..., d:]

    def gated_act_forward(self, gate, up, activation):
        return self._gated(gate, up).to(torch.promote_types(gate.dtype, up.dtype))

    def gated_act_backward(self, dout, gate, up, activation):
        dgate, dup = _vjp(self._gated, (gate, up), dout)
        return dgate.to(gate.dtype), dup.to(up.dtype)

    def gated_act_fused_forward(self, x, activation):
        return self._fused(x).to(x.dtype)

    def gated_act_fused_backward(self, dout, x, activation):
        return _vjp(self._fused, (x,), dout)[0].to(x.dtype)


class RotaryLayer(Layer):
    """transformers' ``apply_rotary_pos_emb`` as a layer: ``forward(self, q, k, cos, sin,
    unsqueeze_dim=1) -> (q_embed, k_embed)`` (kernels-community/rotary's
    ``apply_rotary_transformers``, liger-kernels' ``liger_rotary_pos_emb_layer``),
    half-split form, cos/sin before their unsqueeze.

    transformers hands such a layer cos/sin whose halves are equal (``cat((freqs,
    freqs))``), and layers rely on it: liger's kernel reads only the first half. A match
    is offered to a layer only where its graph proves that of cos and sin
    (``halves_equal``, patterns/rotary.py); the guard then draws them so."""

    NAME = "rotary_pos_emb"
    FUNCTIONS = ("rotary_forward", "rotary_backward")

    def unsupported(self, fn, device, dtype, training=False, interleaved=False, halves_equal=False,
                    **requirements):
        if interleaved:
            return f"layer {self.layer} has no interleaved form"
        if not halves_equal:
            return (f"layer {self.layer} may read only the first half of cos/sin (liger's does), and this match's "
                    "cos/sin are not known to repeat it (transformers' cat((freqs, freqs)))")
        return super().unsupported(fn, device, dtype, training)

    def _rotate(self, x, cos, sin):
        r = cos.shape[-1]
        while cos.dim() < x.dim():
            cos, sin = cos.unsqueeze(0), sin.unsqueeze(0)
        # The dim the model unsqueezed cos/sin at: the heads (1) where it is a broadcast
        # dim, as unsqueeze_dim's default says, else another size-1 dim.
        dims = [d for d in range(x.dim() - 1) if cos.shape[d] == 1 and sin.shape[d] == 1]
        if not dims:
            raise ValueError(f"cos {tuple(cos.shape)} has no broadcast dim to hand over as unsqueeze_dim")
        dim = 1 if 1 in dims else dims[-1]
        # Fresh tensors, in x's layout where x is dense: liger rotates in place whenever
        # its [B, S, H, D] view of q or k is contiguous (batch 1 or one token), which would
        # write over the op's input, and over q through a k that is a slice of it.
        part = x[..., :r]
        q_in = torch.empty_like(part).copy_(part)
        # The layer rotates q and k; only one tensor is wanted here, so k is one slice
        # along the broadcast dim (1/heads of the work, thrown away).
        k_in = q_in.narrow(dim, 0, 1).clone()
        q, _ = self.forward(Standin(), q_in, k_in, cos.squeeze(dim), sin.squeeze(dim), unsqueeze_dim=dim)
        return q if r == x.shape[-1] else torch.cat((q, x[..., r:].to(q.dtype)), dim=-1)

    def rotary_forward(self, x, cos, sin, interleaved):
        dtype = torch.promote_types(torch.promote_types(x.dtype, cos.dtype), sin.dtype)
        return self._rotate(x, cos, sin).to(dtype)

    def rotary_backward(self, dout, cos, sin, interleaved):
        # The rotation is linear in x: its vjp is the same at every x.
        return _vjp(lambda x_: self._rotate(x_, cos, sin), (dout.new_zeros(dout.shape),), dout)[0].to(dout.dtype)


class CausalConv1dLayer(Layer):
    """transformers' ``causal_conv1d_fn(hidden_states[b, d, l], weight[d, w], bias=None,
    activation=None)`` as a layer (kernels-community/mamba-ssm)."""

    NAME = "causal_conv1d_fn"
    FUNCTIONS = ("causal_conv1d_forward", "causal_conv1d_backward")

    def causal_conv1d_forward(self, x, weight, bias=None, activation=None):
        return self.forward(Standin(), x, weight, bias, activation).to(x.dtype)

    def causal_conv1d_backward(self, dout, x, weight, bias=None, activation=None):
        return tuple(_vjp(lambda x_, w_, b_: self.forward(Standin(), x_, w_, b_, activation), (x, weight, bias), dout))


class Projection(nn.Module):
    """What an ``nn.Linear`` offers a layer, over the match's tensors (not copies)."""

    def __init__(self, weight, bias):
        super().__init__()
        self.__dict__.update(weight=weight, bias=bias, in_features=weight.shape[1], out_features=weight.shape[0])

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)


def _names_read(fn) -> set[str]:
    """Attribute and global names the code of ``fn`` reads (its decorators unwrapped)."""
    code = getattr(inspect.unwrap(fn), "__code__", None)
    return set(code.co_names) if code is not None else set()


class MLPLayer(Layer):
    """A gated MLP as transformers' ``LlamaMLP`` holds it: ``forward(self, x)`` reading
    ``gate_proj``, ``up_proj`` and ``down_proj`` (liger-kernels' ``LigerSwiGLUMLP``), or
    Phi-3's fused ``gate_up_proj`` (gate rows first) and ``down_proj``. The stand-in of a
    fused match carries both spellings (``gate_proj``/``up_proj`` are views of the fused
    weight), so any such layer serves it; a layer that reads only ``gate_up_proj`` does not
    serve separate projections. The activation is the layer name's (``ACTIVATION``): the
    layer computes its own."""

    NAME = "MLP"
    ACTIVATION = "silu"
    FUNCTIONS = ("gated_mlp_forward", "gated_mlp_backward")

    def unsupported(self, fn, device, dtype, training=False, activation="silu", fused=False, **requirements):
        if activation != self.ACTIVATION:
            return f"layer {self.layer} stands for {self.NAME} ({self.ACTIVATION}), not {activation}"
        names = _names_read(self.cls.forward)
        if not fused and "gate_up_proj" in names and "gate_proj" not in names:
            return f"layer {self.layer} reads gate_up_proj: it serves a fused gate/up projection only"
        return super().unsupported(fn, device, dtype, training)

    @staticmethod
    def _standin(gate_weight, gate_bias, up_weight, up_bias, down_weight, down_bias):
        inter = down_weight.shape[1]
        attributes = dict(down_proj=Projection(down_weight, down_bias), hidden_size=down_weight.shape[0],
                          intermediate_size=inter)
        if up_weight is None:  # one [2 * inter, hidden] projection, the gate's rows first
            attributes.update(
                gate_up_proj=Projection(gate_weight, gate_bias),
                gate_proj=Projection(gate_weight[:inter], None if gate_bias is None else gate_bias[:inter]),
                up_proj=Projection(gate_weight[inter:], None if gate_bias is None else gate_bias[inter:]))
        else:
            attributes.update(gate_proj=Projection(gate_weight, gate_bias), up_proj=Projection(up_weight, up_bias))
        return Standin(**attributes)

    def _mlp(self, x, *weights):
        return self.forward(self._standin(*weights), x)

    def gated_mlp_forward(self, x, gate_weight, gate_bias, up_weight, up_bias, down_weight, down_bias, activation):
        return self._mlp(x, gate_weight, gate_bias, up_weight, up_bias, down_weight, down_bias).to(x.dtype)

    def gated_mlp_backward(self, dout, x, gate_weight, gate_bias, up_weight, up_bias, down_weight, down_bias,
                           activation):
        # The layer's forward again, differentiated through its own autograd (the op keeps
        # no intermediate of it): the MLP's three matmuls once more.
        return tuple(_vjp(self._mlp, (x, gate_weight, gate_bias, up_weight, up_bias, down_weight, down_bias), dout))


class LossLayer(Layer):
    """transformers' ``ForCausalLMLoss`` as a layer that takes the hidden states and the LM
    head instead of the logits (liger-kernels' ``LigerForCausalLMLossLayer``):
    ``forward(self, logits=None, labels=None, vocab_size=None, num_items_in_batch=None,
    ignore_index=-100, shift_labels=None, hidden_states=None, lm_head_weight=None,
    lm_head_bias=None, hidden_size=None)`` -> the loss.

    The graph has shifted the labels already: they go in as ``shift_labels`` (so the layer
    shifts nothing), and as ``labels`` for a layer that reads those. A sum is asked for as
    the layer's ``num_items_in_batch=1`` (it divides a sum by that). The layer takes no
    logit scale or soft-capping. Where the graph also returns the logits, they are one more
    matmul here: the layer never builds them."""

    NAME = "ForCausalLMLoss"
    FUNCTIONS = ("linear_cross_entropy_forward", "linear_cross_entropy_logits_forward",
                 "linear_cross_entropy_logits_grads_forward")

    def unsupported(self, fn, device, dtype, training=False, scale=1.0, softcap=0.0, **requirements):
        if scale != 1.0 or softcap:
            return f"layer {self.layer} takes no logit scale or soft-capping (this loss has scale {scale}, " \
                   f"softcap {softcap})"
        return super().unsupported(fn, device, dtype, training)

    def _loss(self, h, weight, bias, target, ignore_index, reduction):
        loss = self.forward(Standin(), logits=None, labels=target, vocab_size=weight.shape[0],
                            num_items_in_batch=1 if reduction == "sum" else None, ignore_index=ignore_index,
                            shift_labels=target, hidden_states=h, lm_head_weight=weight, lm_head_bias=bias,
                            hidden_size=h.shape[-1])
        return loss.float()

    def _loss_and_grads(self, h, weight, bias, target, ignore_index, reduction):
        """The loss and its gradients for a loss gradient of 1, through the layer's autograd
        (liger's computes them in its forward; its backward only scales them)."""
        with _autograd_on(), torch.enable_grad():
            leaves = [t.detach().requires_grad_(True) if t is not None else None for t in (h, weight, bias)]
            loss = self._loss(*leaves, target, ignore_index, reduction)
            grads = torch.autograd.grad(loss, [t for t in leaves if t is not None], allow_unused=True)
        grads = [torch.zeros_like(t) if g is None else g.detach() for t, g in zip(leaves, grads)]
        grad_b = grads[2].to(bias.dtype) if bias is not None else h.new_empty(0)
        return loss.detach(), grads[0].to(h.dtype), grads[1].to(weight.dtype), grad_b

    def linear_cross_entropy_forward(self, h, weight, bias, target, ignore_index, reduction, scale, softcap,
                                     compute_grads):
        if compute_grads:
            return self._loss_and_grads(h, weight, bias, target, ignore_index, reduction)
        empty = h.new_empty(0)
        return self._loss(h, weight, bias, target, ignore_index, reduction), empty, empty, empty

    def linear_cross_entropy_logits_forward(self, h, weight, bias, target, ignore_index, reduction, scale, softcap,
                                            logits_dtype):
        return (self._loss(h, weight, bias, target, ignore_index, reduction),
                F.linear(h, weight, bias).to(logits_dtype))

    def linear_cross_entropy_logits_grads_forward(self, h, weight, bias, target, ignore_index, reduction, scale,
                                                  softcap, logits_dtype):
        loss, grad_h, grad_w, grad_b = self._loss_and_grads(h, weight, bias, target, ignore_index, reduction)
        return loss, F.linear(h, weight, bias).to(logits_dtype), grad_h, grad_w, grad_b


def _activation(name: str, activation: str):
    return type(f"{name}Layer", (ActivationLayer,), {"NAME": name, "ACTIVATION": activation})


def _mlp(name: str, activation: str):
    return type(f"{name}Layer", (MLPLayer,), {"NAME": name, "ACTIVATION": activation})


KINDS = {
    "RMSNorm": RMSNormLayer,
    "LayerNorm": LayerNormLayer,
    "rotary_pos_emb": RotaryLayer,
    "causal_conv1d_fn": CausalConv1dLayer,
    **{n: _activation(n, "silu") for n in ("SiLU", "SiluAndMul")},
    **{n: _activation(n, "gelu_tanh") for n in ("GeluTanh", "NewGELU", "FastGELU", "GeluTanhAndMul")},
    **{n: _mlp(n, "silu") for n in ("MLP", "SwiGLUMLP")},
    "GeGLUMLP": _mlp("GeGLUMLP", "gelu_tanh"),
    "ForCausalLMLoss": LossLayer,
}


def make(name: str, module, layer: str, where: str) -> Layer:
    return KINDS[name](module, layer, where)
