"""The fused LM head + cross-entropy (``linear_cross_entropy``): on real transformers
causal LMs in training, on user-written losses, on the edge cases of ignore_index, and
on the ops directly, always against float64."""

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import transformers as T

from hubcompile.lowering import kernels
from hubcompile.lowering import linear_cross_entropy_ops as ops
from hubcompile.lowering.device import detect
from numerics import assert_close_to_reference
from tiny_models import LLAMA_LIKE, input_ids

NAME = "linear_cross_entropy"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# name: (config class, model class, config, what the head does)
LM_MODELS = {
    # the head tied to the embedding
    "llama_tied": (T.LlamaConfig, T.LlamaForCausalLM, {**LLAMA_LIKE, "tie_word_embeddings": True}, "plain"),
    # final_logit_softcapping: tanh(logits / 30) * 30
    "gemma2": (T.Gemma2Config, T.Gemma2ForCausalLM,
               {**LLAMA_LIKE, "head_dim": 12, "final_logit_softcapping": 30.0, "sliding_window": 64}, "softcap"),
    # logits * logit_scale
    "cohere": (T.CohereConfig, T.CohereForCausalLM, {**LLAMA_LIKE, "logit_scale": 0.0625}, "scaled"),
    # an untied head
    "qwen2_untied": (T.Qwen2Config, T.Qwen2ForCausalLM, {**LLAMA_LIKE, "tie_word_embeddings": False}, "plain"),
}


def build(name, dtype, seed=0):
    config_cls, model_cls, config, _ = LM_MODELS[name]
    torch.manual_seed(seed)
    config = config_cls(**config)
    config._attn_implementation = "eager"
    return model_cls(config).to(dtype).train()


def labels_for(ids):
    labels = ids.clone()
    labels[0, :4] = -100  # a prompt that is not trained on
    return labels


def fused(records, what="replaced"):
    return sum(r.replaced.get(NAME, 0) for r in records) if what == "replaced" else [
        s for r in records for s, _ in r.spellings.get(NAME, [])]


def grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def check_against_float64(model, run, ids, labels, dtype, what, **kwargs):
    """Loss and every parameter gradient of ``run`` within the accuracy rule of eager's."""
    ref_model = copy.deepcopy(model).double()
    results = {}
    for key, m, fn in (("eager", model, model), ("ref", ref_model, ref_model), ("compiled", model, run)):
        m.zero_grad(set_to_none=True)
        loss = fn(input_ids=ids, labels=labels, **kwargs).loss
        loss.backward()
        results[key] = (loss.detach(), grads(m))
    (eager_loss, eager_grads), (ref_loss, ref_grads), (loss, compiled_grads) = (
        results["eager"], results["ref"], results["compiled"])
    assert_close_to_reference(loss, eager_loss, ref_loss, dtype, f"{what} loss")
    assert set(compiled_grads) == set(ref_grads)
    for pname, ref_grad in ref_grads.items():
        assert_close_to_reference(compiled_grads[pname], eager_grads[pname], ref_grad, dtype, f"{what} grad {pname}")


@pytest.mark.parametrize("name", LM_MODELS)
def test_model_compiled_whole(fresh, name):
    """model(input_ids, labels) compiled whole: the graph returns the logits too."""
    model = build(name, torch.float32)
    ids = input_ids()
    run = torch.compile(model, backend="hubkernels")
    check_against_float64(model, run, ids, labels_for(ids), torch.float32, name)
    assert fused(fresh) == 1
    kind = LM_MODELS[name][3]
    spelling = fused(fresh, "spellings")[0]
    assert spelling.startswith("logits_") and (kind == "plain" or kind in spelling), spelling
    # the logits are still there and right (from the graph just checked: no second compile)
    out = run(input_ids=ids, labels=labels_for(ids)).logits.detach()
    torch.testing.assert_close(out, model(input_ids=ids).logits.detach(), rtol=1e-4, atol=1e-4)
    assert len(fresh) == 1


def _tangent_shapes(monkeypatch) -> list:
    """The shapes of the gradients AOTAutograd feeds each joint graph, as they arrive."""
    from hubcompile.passes.pipeline import HubcompilePass

    shapes, original = [], HubcompilePass.__call__

    def spy(self, graph):
        shapes.extend(tuple(n.meta["val"].shape) for n in graph.nodes
                      if n.op == "placeholder" and n.name.startswith("tangents"))
        return original(self, graph)

    monkeypatch.setattr(HubcompilePass, "__call__", spy)
    return shapes


@pytest.mark.parametrize("name", ["llama_tied", "gemma2"])
def test_model_compiled_whole_keeps_no_logits_gradient(fresh, name, monkeypatch):
    """In training, the returned logits leave the graph without a gradient: AOTAutograd
    takes no [tokens, vocab] gradient for them (it made a zeros one when they went
    unused), and the op saves none. Differentiating them still works: loss + a term on
    the logits, every parameter gradient against float64."""
    shapes = _tangent_shapes(monkeypatch)
    model = build(name, torch.float32)
    ref_model = copy.deepcopy(model).double()
    vocab = model.config.vocab_size
    ids = input_ids()
    tangent = torch.randn(*ids.shape, vocab, generator=torch.Generator().manual_seed(1))
    run = torch.compile(model, backend="hubkernels")
    results = {}
    for key, m, fn in (("eager", model, model), ("ref", ref_model, ref_model), ("compiled", model, run)):
        m.zero_grad(set_to_none=True)
        out = fn(input_ids=ids, labels=labels_for(ids))
        (out.loss + (out.logits * tangent.to(out.logits.dtype)).sum() * 1e-3).backward()
        results[key] = (out.loss.detach(), grads(m))
    assert shapes and all(shape[-1:] != (vocab,) for shape in shapes), shapes
    ops_used = [r.op for rec in fresh for r in rec.replacements.get(NAME, [])]
    assert ops_used == ["linear_cross_entropy_logits_grads"], ops_used
    (_, eager), (_, ref), (loss, compiled) = results["eager"], results["ref"], results["compiled"]
    assert_close_to_reference(loss, results["eager"][0], results["ref"][0], torch.float32, "loss")
    for pname, ref_grad in ref.items():
        assert_close_to_reference(compiled[pname], eager[pname], ref_grad, torch.float32, f"grad {pname}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_compiled_training_step_never_builds_logits(fresh, dtype):
    """A compiled function that returns only the loss: the logits are never materialised
    (no op in the compiled code makes a [tokens, vocab] tensor)."""
    model = build("llama_tied", dtype)

    def loss_fn(input_ids, labels):
        return model(input_ids=input_ids, labels=labels)

    run = torch.compile(lambda input_ids, labels: type("O", (), {"loss": loss_fn(input_ids, labels).loss})(),
                        backend="hubkernels")
    ids = input_ids()
    check_against_float64(model, run, ids, labels_for(ids), dtype, f"step {dtype}")
    assert fused(fresh) == 1
    assert fused(fresh, "spellings") == ["mean"]
    code = "\n".join(r.code_after for r in fresh)
    assert "hubcompile.linear_cross_entropy.default" in code
    assert "linear_cross_entropy_logits" not in code


def test_bf16_model_with_num_items_in_batch(fresh):
    """transformers' gradient-accumulation form: reduction "sum", divided by a token count."""
    model = build("qwen2_untied", torch.bfloat16)
    ids = input_ids()
    labels = labels_for(ids)
    n = torch.tensor(int((labels[:, 1:] != -100).sum()) + 3)
    run = torch.compile(model, backend="hubkernels")
    check_against_float64(model, run, ids, labels, torch.bfloat16, "num_items", num_items_in_batch=n)
    assert fused(fresh, "spellings") == ["logits_sum"]


# ------------------------------------------------------------------ user-written losses


class Head(nn.Module):
    def __init__(self, hidden=24, vocab=101, bias=False):
        super().__init__()
        self.proj = nn.Linear(hidden, vocab, bias=bias)

    def forward(self, h, y):
        return F.cross_entropy(self.proj(h), y)


def _user_cases():
    def plain(h, w, b, y):
        return F.cross_entropy(F.linear(h, w), y)

    def with_bias_sum(h, w, b, y):
        return F.cross_entropy(F.linear(h, w, b), y, reduction="sum")

    def upcast_view(h, w, b, y):
        logits = F.linear(h.view(-1, h.shape[-1]), w)
        return F.cross_entropy(logits.float().view(-1, w.shape[0]), y.view(-1), ignore_index=7)

    def module_loss(h, w, b, y):
        return nn.CrossEntropyLoss()(F.linear(h, w, b) / 2.5, y)

    return {"plain": plain, "with_bias_sum": with_bias_sum, "upcast_view": upcast_view, "module_loss": module_loss}


@pytest.mark.parametrize("case", list(_user_cases()))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_user_written_loss(fresh, case, dtype):
    fn = _user_cases()[case]
    h = torch.randn(13, 24, dtype=dtype, device=DEVICE, requires_grad=True)
    w = (torch.randn(101, 24, dtype=dtype, device=DEVICE) * 0.3).requires_grad_()
    b = torch.randn(101, dtype=dtype, device=DEVICE, requires_grad=True)
    y = torch.randint(0, 101, (13,), device=DEVICE)
    y[::5] = -100 if case != "upcast_view" else 7
    results = {}
    for key, run in (("eager", fn), ("compiled", torch.compile(fn, backend="hubkernels"))):
        loss = run(h, w, b, y)
        results[key] = (loss.detach(), *torch.autograd.grad(loss, (h, w, b), allow_unused=True))
    h64, w64, b64 = (t.detach().double().requires_grad_() for t in (h, w, b))
    ref = fn(h64, w64, b64, y)
    results["ref"] = (ref.detach(), *torch.autograd.grad(ref, (h64, w64, b64), allow_unused=True))
    assert fused(fresh) == 1, fresh[0].refused
    for i, what in enumerate(("loss", "grad h", "grad weight", "grad bias")):
        new, orig, r = (results[k][i] for k in ("compiled", "eager", "ref"))
        if r is None:
            assert new is None
            continue
        assert_close_to_reference(new, orig, r, dtype, f"{case} {what}")


def test_module_head(fresh):
    head = Head(bias=True)
    h, y = torch.randn(2, 9, 24), torch.randint(0, 101, (18,))
    loss = torch.compile(head, backend="hubkernels")(h.view(-1, 24), y)
    torch.testing.assert_close(loss, head(h.view(-1, 24), y))
    assert fused(fresh) == 1


@pytest.mark.parametrize("kwargs,reason", [
    ({"label_smoothing": 0.1}, "label_smoothing=0.1"),
    ({"reduction": "none"}, "reduction='none'"),
])
def test_unsupported_loss_options_are_kept_and_reported(fresh, kwargs, reason):
    def fn(h, w, y):
        return F.cross_entropy(F.linear(h, w), y, **kwargs)

    h, w, y = torch.randn(7, 8), torch.randn(11, 8), torch.randint(0, 11, (7,))
    torch.testing.assert_close(torch.compile(fn, backend="hubkernels")(h, w, y), fn(h, w, y))
    assert fused(fresh) == 0
    assert any(reason in why for _, why in fresh[0].refused[NAME]), fresh[0].refused[NAME]


def test_disabled_by_config(fresh):
    def fn(h, w, y):
        return F.cross_entropy(F.linear(h, w), y)

    h, w, y = torch.randn(7, 8), torch.randn(11, 8), torch.randint(0, 11, (7,))
    torch.compile(fn, backend="hubkernels", options={"disable": [NAME]})(h, w, y)
    assert fused(fresh) == 0 and NAME in fresh[0].disabled


# ------------------------------------------------------------------ the ops, directly

KERNELS = ["reference", "bundled:linear-cross-entropy"]


@pytest.fixture
def small_chunks():
    """Chunks of a few rows, so that every test crosses chunk boundaries (and the vocab
    is no multiple of anything)."""
    module = kernels.load("bundled:linear-cross-entropy", detect(torch.device(DEVICE))).module
    saved = module.MAX_CHUNK_BYTES
    module.MAX_CHUNK_BYTES = 3 * 37 * 4  # 3 rows of 37 fp32 logits
    yield
    module.MAX_CHUNK_BYTES = saved


def _op_inputs(dtype, bias, n=11, hidden=9, vocab=37, ignore=(0, 4)):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(n, hidden, generator=g).to(dtype).to(DEVICE).requires_grad_()
    w = torch.randn(vocab, hidden, generator=g).to(dtype).to(DEVICE).requires_grad_()
    b = torch.randn(vocab, generator=g).to(dtype).to(DEVICE).requires_grad_() if bias else None
    t = torch.randint(0, vocab, (n,), generator=g).to(DEVICE)
    t[list(ignore)] = -100
    return h, w, b, t


def _reference_run(h, w, b, t, reduction, scale, softcap, with_logits, tangent):
    z = ops.reference_logits(h, w, b, scale, softcap)
    loss = F.cross_entropy(z, t, ignore_index=-100, reduction=reduction)
    total = loss + ((z * tangent).sum() if with_logits else 0)
    return loss, z, torch.autograd.grad(total, [x for x in (h, w, b) if x is not None])


def _logits_op(mode, h, w, b, t, reduction, scale, softcap, dtype, kernel):
    """(loss, logits) of the op a graph that returns the logits gets: "with_logits" in
    inference, "logits_grads" in training (the logits given their gradient outside)."""
    if mode == "with_logits":
        return ops.linear_cross_entropy_logits(h, w, b, t, -100, reduction, scale, softcap, dtype, kernel, kernel)
    loss, logits, *_ = ops.linear_cross_entropy_logits_grads(h, w, b, t, -100, reduction, scale, softcap, dtype,
                                                             kernel)
    assert not logits.requires_grad
    return loss, ops.Reattach.apply(logits, h, w, b, scale, softcap)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("with_logits", [False, "with_logits", "logits_grads"],
                         ids=["loss_only", "with_logits", "logits_grads"])
@pytest.mark.parametrize("transform", [(1.0, 0.0), (0.37, 0.0), (1.0, 2.5), (2.0, 2.5)], ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_ops_against_float64(small_chunks, kernel, with_logits, transform, reduction, bias, dtype):
    scale, softcap = transform
    h, w, b, t = _op_inputs(dtype, bias)
    tangent = torch.randn(t.shape[0], w.shape[0], generator=torch.Generator().manual_seed(2)).to(DEVICE) * 0.01
    inputs = [x for x in (h, w, b) if x is not None]
    if with_logits:
        loss, logits = _logits_op(with_logits, h, w, b, t, reduction, scale, softcap, dtype, kernel)
        new = torch.autograd.grad(loss + (logits * tangent.to(dtype)).sum(), inputs)
    else:
        loss = ops.linear_cross_entropy(h, w, b, t, -100, reduction, scale, softcap, True, kernel)[0]
        new = torch.autograd.grad(loss * 1.7, inputs)
        logits = None
    eager_loss, eager_z, eager = _reference_run(h, w, b, t, reduction, scale, softcap, with_logits,
                                                tangent.to(dtype))
    d = [x.detach().double().requires_grad_() for x in (h, w, b) if x is not None]
    ref_loss, ref_z, ref = _reference_run(d[0], d[1], d[2] if bias else None, t, reduction, scale, softcap,
                                          with_logits, tangent.double())
    if not with_logits:
        eager, ref = [g * 1.7 for g in eager], [g * 1.7 for g in ref]
    assert_close_to_reference(loss, eager_loss, ref_loss, dtype, "loss")
    if logits is not None:
        assert logits.dtype == dtype
        assert_close_to_reference(logits, eager_z.to(dtype), ref_z, dtype, "logits")
    for name, n_, e_, r_ in zip(("h", "weight", "bias"), new, eager, ref):
        assert_close_to_reference(n_, e_, r_, dtype, f"grad {name}")


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("with_logits", [False, "with_logits", "logits_grads"],
                         ids=["loss_only", "with_logits", "logits_grads"])
def test_every_row_ignored_gives_eager_results(small_chunks, kernel, with_logits):
    """Eager gives NaN for the mean over no tokens and zero gradients; so do the ops
    (never a NaN gradient). With reduction "sum" the loss is 0."""
    h, w, b, t = _op_inputs(torch.float32, True, ignore=list(range(11)))
    for reduction, expected in (("mean", float("nan")), ("sum", 0.0)):
        if with_logits:
            loss = _logits_op(with_logits, h, w, b, t, reduction, 1.0, 0.0, torch.float32, kernel)[0]
        else:
            loss = ops.linear_cross_entropy(h, w, b, t, -100, reduction, 1.0, 0.0, True, kernel)[0]
        eager = F.cross_entropy(F.linear(h, w, b), t, reduction=reduction)
        torch.testing.assert_close(loss, eager, equal_nan=True)
        torch.testing.assert_close(loss, torch.tensor(expected, device=DEVICE), equal_nan=True)
        for g in torch.autograd.grad(loss, (h, w, b)):
            assert torch.equal(g, torch.zeros_like(g))


def test_chunk_rows_follow_vocab_and_free_memory():
    module = kernels.load("bundled:linear-cross-entropy", detect(torch.device("cpu"))).module
    big = module.chunk_rows(1 << 20, 128256, 2, torch.device("cpu"))
    small = module.chunk_rows(1 << 20, 32000, 2, torch.device("cpu"))
    assert 1 <= big < small and big * 128256 * 2 <= module.MAX_CHUNK_BYTES
    assert module.chunk_rows(5, 128256, 2, torch.device("cpu")) == 5


@pytest.mark.parametrize("op,args", [
    (torch.ops.hubcompile.linear_cross_entropy.default, ("mean", 0.5, 3.0, True)),
    (torch.ops.hubcompile.linear_cross_entropy.default, ("sum", 1.0, 0.0, False)),  # no grads: 3 empty outputs
    (torch.ops.hubcompile.linear_cross_entropy_logits.default, ("sum", 0.5, 3.0, torch.float32)),
    (torch.ops.hubcompile.linear_cross_entropy_logits_grads.default, ("mean", 0.5, 3.0, torch.float32)),
])
def test_opcheck(op, args):
    h, w, b, t = _op_inputs(torch.float32, True)
    if args[-1] is False:  # compiled without gradients: its inputs do not require them
        h, w, b = h.detach(), w.detach(), b.detach()
    torch.library.opcheck(op, (h, w, b, t, -100, *args, "bundled:linear-cross-entropy"))


def test_report_names_the_fused_loss_and_the_kept_one(fresh):
    import hubcompile

    class TwoLosses(nn.Module):
        def __init__(self):
            super().__init__()
            self.head = nn.Linear(8, 11, bias=False)

        def forward(self, h, y):
            fused_loss = F.cross_entropy(self.head(h), y)
            smoothed = F.cross_entropy(self.head(h) * 0.5, y, label_smoothing=0.1)
            return fused_loss + smoothed

    h, y = torch.randn(7, 8), torch.randint(0, 11, (7,))
    text = str(hubcompile.explain(TwoLosses(), h, y))
    assert f"{NAME}" in text and "hubcompile::linear_cross_entropy" in text, text
    assert "fused_loss = F.cross_entropy(self.head(h), y)" in text, text
    assert "label_smoothing=0.1" in text, text


def test_embedding_gradient_is_not_built_in_fp32(fresh):
    """With tied weights the embedding's gradient is vocab x hidden: hubkernels runs ATen's
    embedding backward (gradient in the weight's dtype) instead of Inductor's decomposition
    into an fp32 zeros tensor + index_put_, and the gradients stay right."""
    from torch._inductor.utils import run_and_get_code

    model = build("llama_tied", torch.bfloat16)
    ids = input_ids()
    run = torch.compile(lambda i, lab: model(input_ids=i, labels=lab).loss, backend="hubkernels")

    def step():
        model.zero_grad(set_to_none=True)
        run(ids, labels_for(ids)).backward()

    _, codes = run_and_get_code(step)
    code = "\n".join(codes)
    # called through its twin without the custom-op wrapper (lowering/direct_ops.py)
    assert "hubcompile_direct.embedding_dense_backward" in code
    assert "index_put" not in code
    compiled_grad = model.model.embed_tokens.weight.grad.clone()
    ref = copy.deepcopy(model).double()
    ref(input_ids=ids, labels=labels_for(ids)).loss.backward()
    model.zero_grad(set_to_none=True)
    model(input_ids=ids, labels=labels_for(ids)).loss.backward()
    assert_close_to_reference(compiled_grad, model.model.embed_tokens.weight.grad, ref.model.embed_tokens.weight.grad,
                              torch.bfloat16, "tied embedding grad")


def test_embedding_backward_rewrite_is_skipped_under_cuda_graphs():
    """The decomposed form is put back to ATen's kernel, except under CUDA graphs."""
    from hubcompile.passes.embedding_backward import rewrite_embedding_backward

    emb = nn.Embedding(11, 4).to(torch.bfloat16)
    ids = torch.randint(0, 11, (2, 3))
    graphs = []
    with torch._inductor.config.patch(joint_custom_post_pass=lambda g: graphs.append(copy.deepcopy(g))):
        torch._dynamo.reset()
        torch.compile(lambda i: emb(i).float().sum(), backend="inductor")(ids).backward()
    (graph,) = graphs
    with torch._inductor.config.patch({"triton.cudagraphs": True}):
        assert rewrite_embedding_backward(copy.deepcopy(graph)) == 0
    assert rewrite_embedding_backward(graph) == 1
    code = graph.python_code("self").src
    assert "hubcompile.embedding_dense_backward" in code and "index_put" not in code
    torch._dynamo.reset()
