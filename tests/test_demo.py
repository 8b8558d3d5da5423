"""The README's main job: the demo compiles a small Llama and reports every replacement."""

import re

from hubcompile import demo


def test_demo_reports_replacements_and_accuracy(fresh, capsys):
    assert demo.main(["--layers", "1"]) == 0
    out = capsys.readouterr().out
    counts = dict(re.findall(r"^(\w+)\s+(\d+)\s", out, flags=re.M))
    # One layer: input norm, post-attention add+norm, final add+norm; one MLP; one attention;
    # the LM head and the loss (the demo passes labels); the attention's causal mask.
    assert counts == {"rmsnorm": "3", "layer_norm": "0", "silu_gate": "1", "gelu_tanh_gate": "0", "causal_conv1d": "0",
                      "attention": "1", "rotary": "2", "linear_cross_entropy": "1", "causal_mask": "1"}
    err_new, err_eager = map(float, re.search(r"hubkernels ([\d.e+-]+), eager ([\d.e+-]+)", out).groups())
    assert err_new <= 2 * err_eager + 1e-6
    loss_new, loss_eager = map(float, re.search(r"loss, .*hubkernels ([\d.e+-]+), eager ([\d.e+-]+)", out).groups())
    assert loss_new <= 2 * loss_eager + 1e-6
