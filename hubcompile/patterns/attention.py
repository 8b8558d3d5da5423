"""Attention written eagerly, as transformers' ``eager_attention_forward`` spells it:

    k, v = repeat_kv(k, n_rep), repeat_kv(v, n_rep)        # grouped-query attention
    w = torch.matmul(q, k.transpose(2, 3)) * scaling
    w = w + causal_mask                                       # additive mask built in the graph
    w = softmax(w, dim=-1, dtype=torch.float32).to(q.dtype)
    out = torch.matmul(w, v)

Also GPT-J's form (q/k upcast to fp32, divided by sqrt(d)), user code that divides by
``sqrt(d)`` or applies a bool mask with ``masked_fill(mask, -inf)``, and the softmax in q's
dtype, ``softmax(w, dim=-1)`` with no ``dtype=float32`` (Llama 4's text attention): in bf16
its forward is the fp32 softmax's graph (the decomposition computes in fp32 and rounds
once), but its backward reads the rounded probabilities, so a bf16 training graph needs
this spelling.

It becomes ``hubcompile::attention``, which runs a fused kernel (PyTorch's SDPA by
default) and never materialises the repeated k/v or the [S, S] scores in the forward.
Left to Inductor, and named in the report (``hubcompile diff``): dropout with p > 0 in
training and logit soft-capping (Gemma 2).

Under ``dynamic=True`` Dynamo lifts the model's float scale (``self.scaling``) into a 0-d
tensor input, which the op's float ``scale`` cannot take, nor can it be read at compile
time (the graph runs with whatever value the attribute holds). Such a scale is applied to q
before the op, which then scales by 1: the same product, rounded once more in q's dtype
(the numerical guard measures it).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from ..lowering import attention_ops as ops
from .framework import Family, Spelling, chosen_kernels, is_python_float, meta_val, same_device

F32, BF16 = torch.float32, torch.bfloat16
SCALE = 0.1234567  # magic value: makes the scale a match argument


def _repeat_kv(x, n_rep):
    b, kv, s, d = x.shape
    return x[:, :, None, :, :].expand(b, kv, n_rep, s, d).reshape(b, kv * n_rep, s, d)


def _eager(q, k, v, mask, scale, grouped, form="mul_add", softmax_fp32=True):
    """form: "mul_add" (transformers: ``* scaling``, ``+ mask``), "div_add" (``/ sqrt(d)``,
    ``+ mask``), or "mul_fill" (``* scale``, ``masked_fill(mask, -inf)`` with a bool mask
    that is True where attention is not allowed). softmax_fp32=False: the softmax in q's
    dtype."""
    # The group size comes from the shapes, so one traced spelling serves every ratio.
    n_rep = q.shape[1] // k.shape[1]
    if grouped:
        k, v = _repeat_kv(k, n_rep), _repeat_kv(v, n_rep)
    scores = torch.matmul(q, k.transpose(2, 3))
    w = scores / scale if form == "div_add" else scores * scale
    if mask is not None:
        # masked_fill as Inductor's graph holds it: a where over a 0-d full (its
        # decomposition traces to scalar_tensor, which Inductor has turned into full)
        minus_inf = torch.full([], float("-inf"), dtype=w.dtype, device=w.device) if form == "mul_fill" else None
        w = torch.where(mask, minus_inf, w) if form == "mul_fill" else w + mask
    w = F.softmax(w, dim=-1, dtype=torch.float32).to(q.dtype) if softmax_fp32 else F.softmax(w, dim=-1)
    return torch.matmul(w, v)


def _eager_upcast(q, k, v, mask, scale):
    # GPT-J (and CodeGen): q and k upcast to fp32, scores divided by sqrt(head_dim),
    # softmax in fp32, cast to v's dtype.
    w = torch.matmul(q.to(torch.float32), k.to(torch.float32).transpose(-1, -2)) / scale
    if mask is not None:
        w = w + mask
    w = F.softmax(w, dim=-1).to(v.dtype)
    return torch.matmul(w, v)


def _read_scale(match) -> dict:
    # The scores' scalar multiply (or GPT-J's divide) holds the scale.
    for node in match.nodes:
        if node.target in (torch.ops.aten.mul.Tensor, torch.ops.aten.div.Tensor) and isinstance(node.args[1], float):
            return {"scale": node.args[1]}
    return {}


def _scaled(q, scale, divide: bool):
    """(q, float scale) for the op: a lifted 0-d tensor scale is applied to q."""
    if isinstance(scale, torch.Tensor):
        return (q / scale if divide else q * scale).to(q.dtype), 1.0
    return q, 1.0 / scale if divide else scale


def _row_cost(shapes) -> int:
    """The guard's reference work per sampled query row: a q row and a row of scores per head."""
    _, heads, _, head_dim = shapes["q"]
    return heads * (head_dim + shapes["k"][2])


def _check(match, form: str = "mul_add") -> str | None:
    scale = match.kwargs.get("scale")
    scale_val = meta_val(scale)
    # Dynamo may lift a float module attribute into a 0-d CPU tensor input (dynamic=True).
    lifted = (isinstance(scale_val, torch.Tensor) and scale_val.dim() == 0 and scale_val.is_floating_point()
              and scale_val.device.type == "cpu" and not scale_val.requires_grad)
    if scale is not None and not (is_python_float(scale) or lifted):
        return f"scale is {scale_val!r}, neither a Python float nor a 0-d CPU tensor"
    q, k = meta_val(match.kwargs["q"]), meta_val(match.kwargs["k"])
    if not same_device(*[match.kwargs[n] for n in ("q", "k", "v")]):
        return "q, k, v on different devices"
    if q.dim() != 4 or k.dim() != 4 or q.shape[1] % k.shape[1]:
        return f"heads do not group: q {tuple(q.shape)}, k {tuple(k.shape)}"
    mask = meta_val(match.kwargs["mask"]) if "mask" in match.kwargs else None
    if mask is not None and (mask.requires_grad or mask.dim() != 4):
        return "the mask takes gradients or is not 4-D"
    if mask is not None and (mask.dtype == torch.bool) != (form == "mul_fill"):
        return f"a {mask.dtype} mask where this form needs {'a bool' if form == 'mul_fill' else 'an additive'} mask"
    return None


def _heads(b, h, s, d, dt, transposed):
    # Models project to [B, S, H*D], view as [B, S, H, D] and transpose to [B, H, S, D]; the
    # non-contiguous layout adds copies before the matmuls, so it is its own spelling.
    return torch.randn(b, s, h, d, dtype=dt).transpose(1, 2) if transposed else torch.randn(b, h, s, d, dtype=dt)


# Layouts of (q, k, v), True = transposed [B, S, H, D] view. Rotary makes q and k
# contiguous while v stays a transposed view (Llama), no rotary leaves all three
# transposed (GPT-2 style), and a fused qkv cut by chunk gives transposed slices. Under
# grouped-query attention, repeat_kv copies k and v whatever their layout, so only q's
# layout changes the graph.
GQA_LAYOUTS = [(True, True, True), (False, False, False)]
MHA_LAYOUTS = [(q, k, v) for q in (True, False) for k in (True, False) for v in (True, False)]


def _spelling(n_rep: int, masked: bool, layout: tuple[bool, bool, bool], upcast: bool = False,
              form: str = "mul_add", softmax_fp32: bool = True) -> Spelling:
    kv = 4 // n_rep
    q_t, k_t, v_t = layout

    def qkv(dt):
        return [_heads(2, 4, 5, 8, dt, q_t), _heads(2, kv, 5, 8, dt, k_t), _heads(2, kv, 5, 8, dt, v_t)]

    if upcast:  # GPT-J's form, multi-head; its mask is built in fp32 whatever the dtype
        def search(q, k, v, mask, scale):
            return _eager_upcast(q, k, v, mask, scale)

        def replace(q, k, v, mask, scale):
            q, scale = _scaled(q, scale, divide=True)
            return ops.attention(q, k, v, mask, scale, *chosen_kernels())

        def inputs(dt):
            return [*qkv(dt), torch.randn(2, 1, 5, 5, dtype=torch.float32)]
    elif masked:
        def search(q, k, v, mask, scale):
            return _eager(q, k, v, mask, scale, n_rep > 1, form, softmax_fp32)

        def replace(q, k, v, mask, scale):
            if form == "mul_fill":  # the op takes an additive mask
                mask = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill(mask, float("-inf"))
            q, scale = _scaled(q, scale, divide=form == "div_add")
            return ops.attention(q, k, v, mask, scale, *chosen_kernels())

        def inputs(dt):
            if form == "mul_fill":
                return [*qkv(dt), torch.randn(2, 1, 5, 5) > 0.5]
            return [*qkv(dt), torch.randn(2, 1, 5, 5, dtype=dt)]
    else:
        def search(q, k, v, scale):
            return _eager(q, k, v, None, scale, n_rep > 1, form, softmax_fp32)

        def replace(q, k, v, scale):
            q, scale = _scaled(q, scale, divide=form == "div_add")
            return ops.attention(q, k, v, None, scale, *chosen_kernels())

        inputs = qkv

    tag = "".join("t" if t else "c" for t in (layout[:1] if n_rep > 1 else layout)) + ("_upcast_div" if upcast else "")
    tag += "" if form == "mul_add" or upcast else f"_{form}"
    tag += "" if softmax_fp32 else "_softmax_in_dtype"
    name = f"{'gqa' if n_rep > 1 else 'mha'}_{'masked' if masked else 'unmasked'}_{tag}"
    # In fp32 the softmax in q's dtype is the fp32 softmax: the same graph, traced once.
    dtypes = [(F32,), (BF16,)] if softmax_fp32 else [(BF16,)]
    return Spelling(name, search, replace, inputs, dtypes, {"scale": SCALE},
                    functools.partial(_check, form=form),
                    grad_inputs=[0, 1, 2], op="attention", backward_op="attention_backward", anchor="q",
                    shrink_dims=(0, 2), guard_whole=False, read_scalars=_read_scale,
                    # sampled: query rows of sampled batches, against all keys (an output row
                    # reads its q row, its mask row, and the whole of k and v)
                    row_dims=(0, 2), input_rows={"k": {0: 0}, "v": {0: 0}, "mask": {0: 0, 2: 2}},
                    row_cost=_row_cost)


FAMILY = Family(
    name="attention",
    description="eager attention (repeat_kv, matmul, scale, additive mask, softmax in fp32 or q's dtype, matmul)",
    stages=[[_spelling(n_rep, masked, layout) for n_rep in (2, 1) for masked in (True, False)
             for layout in (GQA_LAYOUTS if n_rep > 1 else MHA_LAYOUTS)]
            + [_spelling(1, True, (True, True, True), upcast=True)]
            # user code: divided by sqrt(d), or a bool mask applied with masked_fill; the
            # layouts models produce (all transposed without rotary, q/k contiguous with it)
            + [_spelling(n_rep, masked, layout, form=form) for form in ("div_add", "mul_fill")
               for masked in ((True, False) if form == "div_add" else (True,))
               for n_rep, layout in ((2, (True, True, True)), (2, (False, False, False)), (1, (True, True, True)),
                                     (1, (False, False, True)))]
            # the softmax in q's dtype, laid out as Llama 4 lays it out: q, k, v transposed
            # views (its q/k norm and its temperature give a contiguous [B, S, H, D] q), under
            # its mask (unmasked, Inductor's joint-graph pass rewrites softmax(x * scale)
            # before this pass, so no unmasked spelling matches: README, Known limits)
            + [_spelling(n_rep, True, (True, True, True), softmax_fp32=False) for n_rep in (2, 1)]],
)
