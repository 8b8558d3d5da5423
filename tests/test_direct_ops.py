"""Compiled graphs call the hubcompile ops through their twins ``hubcompile_direct::<op>``
(no custom-op wrapper, hubcompile/lowering/direct_ops.py): the same schema, fake and numbers."""

import re

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass
from torch._inductor.utils import run_and_get_code
from torch._library.custom_ops import OPDEFS

from hubcompile.lowering import direct_ops
from tiny_models import build, input_ids, replaced

CALL = re.compile(r"torch\.ops\.(hubcompile\w*)\.(\w+)\.default\(")


def _train_step_code(model, options):
    ids = input_ids()
    run = torch.compile(model, backend="hubkernels", options=options)

    def step():
        model.zero_grad(set_to_none=True)
        out = run(ids, labels=ids)
        out.loss.backward()
        return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    (loss, grads), codes = run_and_get_code(step)
    return loss, grads, [CALL.findall(code) for code in codes]


def test_compiled_step_calls_the_twins(fresh):
    model, _ = build("llama")
    model.train()
    loss, grads, calls = _train_step_code(model, {"perf_guard": "off"})
    assert replaced(fresh), "nothing replaced"
    forward, backward = calls
    assert {op for _, op in forward} >= {"rms_norm", "add_rms_norm", "gated_activation", "rotary"}, forward
    assert {op for _, op in backward} >= {"rms_norm_backward", "gated_activation_backward"}, backward
    assert {namespace for namespace, _ in forward + backward} == {"hubcompile_direct"}
    model.zero_grad(set_to_none=True)
    eager = model(input_ids(), labels=input_ids())
    eager.loss.backward()
    torch.testing.assert_close(loss, eager.loss.detach())
    for name, p in model.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_every_op_has_its_twin():
    for qualname, opdef in OPDEFS.items():
        if qualname.startswith("hubcompile::"):
            default = opdef._opoverload
            twin = direct_ops._DIRECT[default]
            assert str(twin._schema).replace("hubcompile_direct::", "hubcompile::") == str(default._schema)


class KeepGraph(CustomGraphPass):
    def __call__(self, graph):
        pass

    def uuid(self):
        return "keep-graph"


def test_a_post_grad_pass_of_the_users_own_is_kept(fresh):
    model, _ = build("llama")
    model.train()
    _, _, calls = _train_step_code(model, {"perf_guard": "off", "post_grad_custom_post_pass": KeepGraph()})
    assert {namespace for code in calls for namespace, _ in code} == {"hubcompile"}


def test_twins_exist_once_the_package_is_imported():
    """A graph loaded from Inductor's cache calls the twins without any compile (and so
    without the pass) having run in the process."""
    import subprocess
    import sys

    code = ("import torch, hubcompile; from torch._library.custom_ops import OPDEFS; "
            "ops = [q.split('::')[1] for q in OPDEFS if q.startswith('hubcompile::')]; "
            "[getattr(torch.ops.hubcompile_direct, op).default for op in ops]; print(len(ops))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and int(out.stdout.split()[-1]) >= 17, out.stderr[-2000:]
