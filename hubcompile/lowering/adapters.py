"""Adapters: a loaded kernel repo seen through the bundled repos' API.

The bundled repos export functional forward and backward functions
(``rms_norm_forward``, ``gated_act_fused_forward``, ``rotary_forward``,
``causal_conv1d_forward``, ...). Community repos on the Hub use their own calling
conventions (FIELD_NOTES section 3): an adapter translates, and says which functions it
cannot serve so that resolution moves on to the next candidate.
"""

from __future__ import annotations

import torch


class Native:
    """A repo that exports the bundled API itself (the bundled repos, or a user's repo
    written to the same API)."""

    def __init__(self, module):
        self.module = module

    def unsupported(self, fn: str, device, dtype, **requirements) -> str | None:
        if not callable(getattr(self.module, fn, None)):
            return f"the repo has no function {fn}"
        return None

    def __getattr__(self, name):
        return getattr(self.module, name)


class _Community:
    """A community repo serving only the functions listed in ``FUNCTIONS``."""

    FUNCTIONS: dict[str, str] = {}  # bundled-API function -> the repo function it needs
    DTYPES = (torch.float32, torch.float16, torch.bfloat16)

    def __init__(self, module):
        self.module = module

    def unsupported(self, fn: str, device, dtype, **requirements) -> str | None:
        if fn not in self.FUNCTIONS:
            return f"{type(self).__name__} adapter has no {fn} (it serves {', '.join(self.FUNCTIONS)})"
        if not callable(getattr(self.module, self.FUNCTIONS[fn], None)):
            return f"the repo has no function {self.FUNCTIONS[fn]}"
        if dtype not in self.DTYPES:
            return f"dtype {dtype} is not supported"
        return None


class Activation(_Community):
    """kernels-community/activation: ``silu_and_mul(out, x)`` writes act(x[..., :d]) *
    x[..., d:] into ``out[..., d]``; forward only."""

    FUNCTIONS = {"gated_act_fused_forward": "silu_and_mul"}
    _BY_ACTIVATION = {"silu": "silu_and_mul", "gelu_tanh": "gelu_tanh_and_mul"}

    def unsupported(self, fn, device, dtype, activation="silu", **requirements):
        missing = super().unsupported(fn, device, dtype)
        if missing is None and not callable(getattr(self.module, self._BY_ACTIVATION[activation], None)):
            return f"the repo has no function {self._BY_ACTIVATION[activation]}"
        return missing

    def gated_act_fused_forward(self, x, activation):
        out = x.new_empty((*x.shape[:-1], x.shape[-1] // 2))
        getattr(self.module, self._BY_ACTIVATION[activation])(out, x.contiguous())
        return out


class Rotary(_Community):
    """kernels-community/rotary: ``apply_rotary(x1, x2, cos, sin, out1, out2, conj)``
    rotates the two halves (half-split form only), with cos/sin of half the rotary
    width; forward only. It takes the first half of cos/sin for both, so it serves the
    matches whose cos/sin are proven to repeat it (``halves_equal``: transformers'
    ``cat((freqs, freqs))``, patterns/rotary.py)."""

    FUNCTIONS = {"rotary_forward": "apply_rotary"}

    def unsupported(self, fn, device, dtype, interleaved=False, halves_equal=False, **requirements):
        if interleaved:
            return "apply_rotary has no interleaved form"
        if not halves_equal:
            return "apply_rotary reads the first half of cos/sin, and this match's are not known to repeat it"
        return super().unsupported(fn, device, dtype)

    def rotary_forward(self, x, cos, sin, interleaved):
        half = cos.shape[-1] // 2
        out = x.clone(memory_format=torch.contiguous_format)
        x1, x2 = x[..., :half], x[..., half : 2 * half]
        shape = x1.shape
        cos_h, sin_h = cos[..., :half].expand(shape), sin[..., :half].expand(shape)
        self.module.apply_rotary(x1, x2, cos_h, sin_h, out[..., :half], out[..., half : 2 * half], False)
        return out


class CausalConv1d(_Community):
    """kernels-community/causal-conv1d: ``causal_conv1d_fn(x[b, d, l], weight[d, w],
    bias, activation=None|"silu")``, differentiable through its own autograd."""

    FUNCTIONS = {"causal_conv1d_forward": "causal_conv1d_fn", "causal_conv1d_backward": "causal_conv1d_fn"}

    def causal_conv1d_forward(self, x, weight, bias=None, activation=None):
        return self.module.causal_conv1d_fn(x, weight, bias, activation=activation)

    def causal_conv1d_backward(self, dout, x, weight, bias=None, activation=None):
        # Through the repo's own autograd. torch.func.vjp, not autograd.grad: a custom op's
        # implementation runs below autograd, where autograd records nothing.
        inputs = (x, weight) if bias is None else (x, weight, bias)
        _, vjp = torch.func.vjp(
            lambda x_, w_, *b: self.module.causal_conv1d_fn(x_, w_, b[0] if b else None, activation=activation),
            *inputs)
        grads = vjp(dout)
        return grads[0], grads[1], grads[2] if bias is not None else None


class FlashAttn(_Community):
    """Flash-attention repos (kernels-community/flash-attn2, flash-attn3, and what
    transformers' ``attn_implementation="org/repo"`` loads): ``flash_attn_func(q, k, v,
    softmax_scale=, causal=)`` on ``[B, S, H, D]`` tensors, grouped-query by fewer k/v
    heads, differentiable through the repo's own autograd.

    flash_attn_func takes a causal flag, not a mask: an additive mask is handed over as
    ``causal=True`` when it is the causal mask (checked on each call: one pass over the
    mask and a device sync); any other mask runs PyTorch's SDPA with the mask instead,
    as the bundled attention does."""

    FUNCTIONS = {"attention_forward": "flash_attn_func", "attention_backward": "flash_attn_func"}

    @staticmethod
    def _causal(mask, q, k) -> bool:
        sq, sk = q.shape[2], k.shape[2]
        allowed = torch.ones(sq, sk, dtype=torch.bool, device=mask.device).tril(sk - sq)
        blocked = mask <= torch.finfo(mask.dtype).min / 2 if mask.is_floating_point() else ~mask
        if mask.dtype == torch.bool:
            return bool((mask == allowed).all())
        return bool(((mask == 0) == allowed).all() and (blocked == ~allowed).all())

    def _run(self, q, k, v, mask, scale, is_causal=False):
        # is_causal: proven at compile time, no check; a mask: checked here
        if mask is not None and not self._causal(mask, q, k):
            import torch.nn.functional as F

            mask = mask.to(q.dtype) if mask.dtype not in (q.dtype, torch.bool) else mask
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, is_causal=is_causal,
                                                  enable_gqa=k.shape[1] != q.shape[1])
        out = self.module.flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                          softmax_scale=scale, causal=is_causal or mask is not None)
        out = out[0] if isinstance(out, tuple) else out  # some builds return (out, lse)
        return out.transpose(1, 2)

    def attention_forward(self, q, k, v, mask, scale, is_causal=False):
        return self._run(q, k, v, mask, scale, is_causal)

    def attention_backward(self, dout, q, k, v, mask, scale, is_causal=False):
        from .layers import _vjp

        return tuple(_vjp(lambda q_, k_, v_: self._run(q_, k_, v_, mask, scale, is_causal), (q, k, v), dout))


class LayerNorm(_Community):
    """kernels-community/layer-norm (flash-attention's fused dropout + residual + LayerNorm):
    ``dropout_add_ln_fwd(x[rows, n], gamma, beta, rowscale, colscale, x0_subset, z_subset,
    dropout_p, epsilon, rowscale_const, z_numrows, gen, residual_in_fp32, is_rms_norm)`` ->
    ``[z, x, dmask, mu, rsigma]``, CUDA only. Forward only: the repo's Python
    ``dropout_add_ln_bwd`` passes 15 arguments to an op of 17 (it lacks ``x0`` and
    ``dmask``), and the op has no autograd. Its Python API takes no residual, so the sum is
    computed here; gamma is required (ones stand in for a norm without weight)."""

    FUNCTIONS = {"layer_norm_forward": "dropout_add_ln_fwd"}

    def layer_norm_forward(self, x, weight, bias, eps, residual=None):
        h = x if residual is None else x + residual
        n = h.shape[-1]
        gamma = weight if weight is not None else torch.ones(n, dtype=(bias if bias is not None else h).dtype,
                                                             device=h.device)
        out = self.module.dropout_add_ln_fwd(h.reshape(-1, n).contiguous(), gamma.contiguous(),
                                             bias.contiguous() if bias is not None else None, None, None, None,
                                             None, 0.0, float(eps), 1.0, 0, None, False, False)
        rows = h.shape[:-1]
        return out[0].view(h.shape), out[3].float().view(rows), out[4].float().view(rows), h


ADAPTERS = {"native": Native, "activation": Activation, "rotary": Rotary, "causal_conv1d": CausalConv1d,
            "flash_attn": FlashAttn, "layer_norm": LayerNorm}

# Community repos whose calling convention an adapter knows.
_COMMUNITY = {
    "kernels-community/activation": "activation",
    "kernels-community/rotary": "rotary",
    "kernels-community/causal-conv1d": "causal_conv1d",
    "kernels-community/layer-norm": "layer_norm",
    "kernels-community/flash-attn2": "flash_attn",
    "kernels-community/flash-attn3": "flash_attn",
    "kernels-community/vllm-flash-attn3": "flash_attn",
}


def default_adapter(repo_id: str) -> str:
    return _COMMUNITY.get(repo_id, "native")


# Hub layers (``layers.py``): the layer names of kernel mappings, each the adapter that
# calls a layer standing in for that name (``#RMSNorm`` in a spec).
LAYER_ADAPTERS = ("RMSNorm", "LayerNorm", "rotary_pos_emb", "SiLU", "SiluAndMul", "GeluTanh", "NewGELU", "FastGELU",
                  "GeluTanhAndMul", "MLP", "SwiGLUMLP", "GeGLUMLP", "causal_conv1d_fn", "ForCausalLMLoss")


def layer_adapter(name: str, module, layer: str, where: str):
    from . import layers

    return layers.make(name, module, layer, where)
