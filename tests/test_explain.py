"""The graph-diff report: snapshots of the text report per family and per kind of near
miss, the CLI on a transformers model, and the HTML page in a real headless browser."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from expecttest import TestCase

import hubcompile
from explain_modules import Attention, CausalConv, GatedMLP, ReversedRMSNorm, RMSNorm, Rotary, UnweightedRMSNorm
from hubcompile.guards import numerical as guards
from hubcompile.lowering import kernels
from test_guards import WRONG, make_repo

ARTIFACTS = Path(os.environ.get("HUBCOMPILE_TEST_ARTIFACTS", Path(__file__).parent.parent / "test-artifacts"))


def report_text(model, *args, diff=False, **options):
    torch.manual_seed(0)
    kernels.clear_cache()
    guards.clear_cache()
    hubcompile.RECORDS.clear()
    report = hubcompile.explain(model, *args, options=options or None)
    text = report.text(diff=diff)
    # Measured errors differ from run to run (fresh random inputs): mask the numbers,
    # including a measured error that happens to print as an integer ("rmse 1").
    text = re.sub(r"\b(rmse|bound|original) [\d.e+-]+", r"\1 <x>", text)
    return re.sub(r"\d+(\.\d+)?(e[-+]\d+)?", lambda m: m.group(0) if "." not in m.group(0) and "e" not in
                  m.group(0) else "<x>", text), report


def g():
    return torch.Generator().manual_seed(0)


class TestReportSnapshots(TestCase):
    maxDiff = None

    def setUp(self):
        torch._dynamo.reset()
        hubcompile.reset_config()

    def test_rmsnorm_with_diff(self):
        text, _ = report_text(RMSNorm(), torch.randn(2, 3, 16), diff=True)
        self.assertExpectedInline(text, """\
hubcompile report: 1 graph(s)

  family                replaced  kept
  --------------------  --------  ----
  rmsnorm               1         0
  layer_norm            0         0
  silu_gate             0         0
  gelu_tanh_gate        0         0
  causal_conv1d         0         0
  attention             0         0
  rotary                0         0
  linear_cross_entropy  0         0
  causal_mask           0         0

== graph 0: 1 replaced, 0 kept ==
replacements:
  family   spelling           op                    kernel           guard   nodes  source
  -------  -----------------  --------------------  ---------------  ------  -----  -------------------------------------------------------------------------------------------------
  rmsnorm  llama_pow_w_first  hubcompile::rms_norm  bundled:rmsnorm  passed  6      explain_modules.py:17  h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps) (+1 lines)
near misses:
  (none)
launched (forward and backward graphs):
  op                    by Inductor  as op  why an op
  --------------------  -----------  -----  ------------------------------------------------------------
  hubcompile::rms_norm  0            1      not on a GPU (Inductor launches Triton kernels on GPUs only)
totals:
  family                replaced  kept
  --------------------  --------  ----
  rmsnorm               1         0
  layer_norm            0         0
  silu_gate             0         0
  gelu_tanh_gate        0         0
  causal_conv1d         0         0
  attention             0         0
  rotary                0         0
  linear_cross_entropy  0         0
  causal_mask           0         0
diff:
  --- before
  +++ after
  @@ -1,8 +1,4 @@
   def forward(self, arg0_1, arg1_1):
  -    pow_1 = torch.ops.aten.pow.Tensor_Scalar(arg0_1, 2)
  -    mean = torch.ops.aten.mean.dim(pow_1, [-1], True)
  -    add = torch.ops.aten.add.Tensor(mean, <x>)
  -    rsqrt = torch.ops.aten.rsqrt.default(add)
  -    mul = torch.ops.aten.mul.Tensor(arg0_1, rsqrt)
  -    mul_1 = torch.ops.aten.mul.Tensor(arg1_1, mul)
  -    return (mul_1,)
  +    rms_norm_default = torch.ops.hubcompile.rms_norm.default(arg0_1, arg1_1, <x>, <x>, True, None, 'bundled:rmsnorm', 'bundled:rmsnorm')
  +    getitem = rms_norm_default[0]
  +    return (getitem,)""")

    def test_families(self):
        text, _ = report_text(GatedMLP("silu"), torch.randn(2, 3, 16))
        self.assertExpectedInline(text, """\
hubcompile report: 1 graph(s)

  family                replaced  kept
  --------------------  --------  ----
  rmsnorm               0         0
  layer_norm            0         0
  silu_gate             1         0
  gelu_tanh_gate        0         0
  causal_conv1d         0         0
  attention             0         0
  rotary                0         0
  linear_cross_entropy  0         0
  causal_mask           0         0

== graph 0: 1 replaced, 0 kept ==
replacements:
  family     spelling         op                            kernel              guard   nodes  source
  ---------  ---------------  ----------------------------  ------------------  ------  -----  ----------------------------------------------------------------------------
  silu_gate  silu_gate_first  hubcompile::gated_activation  bundled:activation  passed  5      explain_modules.py:35  return self.down(self.act(self.gate(x)) * self.up(x))
near misses:
  (none)
launched (forward and backward graphs):
  op                            by Inductor  as op  why an op
  ----------------------------  -----------  -----  ------------------------------------------------------------
  hubcompile::gated_activation  0            1      not on a GPU (Inductor launches Triton kernels on GPUs only)
totals:
  family                replaced  kept
  --------------------  --------  ----
  rmsnorm               0         0
  layer_norm            0         0
  silu_gate             1         0
  gelu_tanh_gate        0         0
  causal_conv1d         0         0
  attention             0         0
  rotary                0         0
  linear_cross_entropy  0         0
  causal_mask           0         0""")
        text, _ = report_text(GatedMLP("gelu_tanh"), torch.randn(2, 3, 16))
        self.assertExpectedInline(text, """\
hubcompile report: 1 graph(s)

  family                replaced  kept
  --------------------  --------  ----
  rmsnorm               0         0
  layer_norm            0         0
  silu_gate             0         0
  gelu_tanh_gate        1         0
  causal_conv1d         0         0
  attention             0         0
  rotary                0         0
  linear_cross_entropy  0         0
  causal_mask           0         0

== graph 0: 1 replaced, 0 kept ==
replacements:
  family          spelling              op                            kernel              guard   nodes  source
  --------------  --------------------  ----------------------------  ------------------  ------  -----  ----------------------------------------------------------------------------
  gelu_tanh_gate  gelu_tanh_gate_first  hubcompile::gated_activation  bundled:activation  passed  10     explain_modules.py:35  return self.down(self.act(self.gate(x)) * self.up(x))
near misses:
  (none)
launched (forward and backward graphs):
  op                            by Inductor  as op  why an op
  ----------------------------  -----------  -----  ------------------------------------------------------------
  hubcompile::gated_activation  0            1      not on a GPU (Inductor launches Triton kernels on GPUs only)
totals:
  family                replaced  kept
  --------------------  --------  ----
  rmsnorm               0         0
  layer_norm            0         0
  silu_gate             0         0
  gelu_tanh_gate        1         0
  causal_conv1d         0         0
  attention             0         0
  rotary                0         0
  linear_cross_entropy  0         0
  causal_mask           0         0""")
        text, _ = report_text(Rotary(), torch.randn(2, 3, 5, 8), torch.randn(1, 1, 5, 8), torch.randn(1, 1, 5, 8))
        self.assertExpectedInline(text, """\
hubcompile report: 1 graph(s)

  family                replaced  kept
  --------------------  --------  ----
  rmsnorm               0         0
  layer_norm            0         0
  silu_gate             0         0
  gelu_tanh_gate        0         0
  causal_conv1d         0         0
  attention             0         0
  rotary                1         0
  linear_cross_entropy  0         0
  causal_mask           0         0

== graph 0: 1 replaced, 0 kept ==
replacements:
  family  spelling  op                  kernel          guard   nodes  source
  ------  --------  ------------------  --------------  ------  -----  ----------------------------------------------------------------
  rotary  half      hubcompile::rotary  bundled:rotary  passed  7      explain_modules.py:42  return q * cos + rotated * sin (+1 lines)
near misses:
  (none)
launched (forward and backward graphs):
  op                  by Inductor  as op  why an op
  ------------------  -----------  -----  ------------------------------------------------------------
  hubcompile::rotary  0            1      not on a GPU (Inductor launches Triton kernels on GPUs only)
totals:
  family                replaced  kept
  --------------------  --------  ----
  rmsnorm               0         0
  layer_norm            0         0
  silu_gate             0         0
  gelu_tanh_gate        0         0
  causal_conv1d         0         0
  attention             0         0
  rotary                1         0
  linear_cross_entropy  0         0
  causal_mask           0         0""")
        text, _ = report_text(Attention(), *(torch.randn(2, 4, 5, 8) for _ in range(3)), torch.randn(2, 1, 5, 5))
        self.assertExpectedInline(text, """\
hubcompile report: 1 graph(s)

  family                replaced  kept
  --------------------  --------  ----
  rmsnorm               0         0
  layer_norm            0         0
  silu_gate             0         0
  gelu_tanh_gate        0         0
  causal_conv1d         0         0
  attention             1         0
  rotary                0         0
  linear_cross_entropy  0         0
  causal_mask           0         1

== graph 0: 1 replaced, 1 kept ==
replacements:
  family     spelling        op                     kernel             guard   nodes  source
  ---------  --------------  ---------------------  -----------------  ------  -----  -------------------------------------------------------------------------------
  attention  mha_masked_ccc  hubcompile::attention  bundled:attention  passed  20     explain_modules.py:47  w = torch.matmul(q, k.transpose(2, 3)) * <x> (+2 lines)
near misses:
  family       where           kind     reason
  -----------  --------------  -------  ------------------------------------------------------------------
  causal_mask  attention_mask  refused  the mask is computed from the graph input arg2_1 (a padding mask?)
totals:
  family                replaced  kept
  --------------------  --------  ----
  rmsnorm               0         0
  layer_norm            0         0
  silu_gate             0         0
  gelu_tanh_gate        0         0
  causal_conv1d         0         0
  attention             1         0
  rotary                0         0
  linear_cross_entropy  0         0
  causal_mask           0         1""")
        text, _ = report_text(CausalConv(), torch.randn(2, 8, 7))
        self.assertExpectedInline(text, """\
hubcompile report: 1 graph(s)

  family                replaced  kept
  --------------------  --------  ----
  rmsnorm               0         0
  layer_norm            0         0
  silu_gate             0         0
  gelu_tanh_gate        0         0
  causal_conv1d         1         0
  attention             0         0
  rotary                0         0
  linear_cross_entropy  0         0
  causal_mask           0         0

== graph 0: 1 replaced, 0 kept ==
replacements:
  family         spelling              op                         kernel                 guard   nodes  source
  -------------  --------------------  -------------------------  ---------------------  ------  -----  ----------------------------------------------------------------------
  causal_conv1d  conv_slice_bias_silu  hubcompile::causal_conv1d  bundled:causal-conv1d  passed  6      explain_modules.py:58  return F.silu(self.conv(x)[..., : x.shape[-1]])
near misses:
  (none)
launched (forward and backward graphs):
  op                         by Inductor  as op  why an op
  -------------------------  -----------  -----  ------------------------------------------------------------
  hubcompile::causal_conv1d  0            1      not on a GPU (Inductor launches Triton kernels on GPUs only)
totals:
  family                replaced  kept
  --------------------  --------  ----
  rmsnorm               0         0
  layer_norm            0         0
  silu_gate             0         0
  gelu_tanh_gate        0         0
  causal_conv1d         1         0
  attention             0         0
  rotary                0         0
  linear_cross_entropy  0         0
  causal_mask           0         0""")

    def test_weightless_norm(self):
        text, _ = report_text(UnweightedRMSNorm(), torch.randn(2, 3, 16))
        self.assertExpectedInline(text, """\
hubcompile report: 1 graph(s)

  family                replaced  kept
  --------------------  --------  ----
  rmsnorm               1         0
  layer_norm            0         0
  silu_gate             0         0
  gelu_tanh_gate        0         0
  causal_conv1d         0         0
  attention             0         0
  rotary                0         0
  linear_cross_entropy  0         0
  causal_mask           0         0

== graph 0: 1 replaced, 0 kept ==
replacements:
  family   spelling        op                    kernel           guard   nodes  source
  -------  --------------  --------------------  ---------------  ------  -----  -------------------------------------------------------------------------------------
  rmsnorm  weightless_pow  hubcompile::rms_norm  bundled:rmsnorm  passed  5      explain_modules.py:25  return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + <x>)
near misses:
  (none)
launched (forward and backward graphs):
  op                    by Inductor  as op  why an op
  --------------------  -----------  -----  ------------------------------------------------------------
  hubcompile::rms_norm  0            1      not on a GPU (Inductor launches Triton kernels on GPUs only)
totals:
  family                replaced  kept
  --------------------  --------  ----
  rmsnorm               1         0
  layer_norm            0         0
  silu_gate             0         0
  gelu_tanh_gate        0         0
  causal_conv1d         0         0
  attention             0         0
  rotary                0         0
  linear_cross_entropy  0         0
  causal_mask           0         0""")

    def test_near_miss_not_matched(self):
        text, _ = report_text(ReversedRMSNorm(), torch.randn(2, 3, 16))
        self.assertExpectedInline(text, """\
hubcompile report: 1 graph(s)

  family                replaced  kept
  --------------------  --------  ----
  rmsnorm               0         1
  layer_norm            0         0
  silu_gate             0         0
  gelu_tanh_gate        0         0
  causal_conv1d         0         0
  attention             0         0
  rotary                0         0
  linear_cross_entropy  0         0
  causal_mask           0         0

== graph 0: 0 replaced, 1 kept ==
replacements:
  (none)
near misses:
  family   where                                                                                                        kind         reason
  -------  -----------------------------------------------------------------------------------------------------------  -----------  -------------------------------------------------------------------------------------------------------------------------------------------------
  rmsnorm  rsqrt (explain_modules.py:69  return torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + <x>) * x * self.weight)  not matched  an RMSNorm scaled by a weight after the norm, in a spelling none of the weighted forms matches (the weightless forms leave a weighted norm whole)
totals:
  family                replaced  kept
  --------------------  --------  ----
  rmsnorm               0         1
  layer_norm            0         0
  silu_gate             0         0
  gelu_tanh_gate        0         0
  causal_conv1d         0         0
  attention             0         0
  rotary                0         0
  linear_cross_entropy  0         0
  causal_mask           0         0""")

    def test_near_miss_refused_by_check(self):
        # A weight of shape (1,) broadcasts over the hidden size: the op cannot take it.
        text, _ = report_text(RMSNorm(weight_shape=1), torch.randn(2, 3, 16))
        self.assertExpectedInline(text, """\
hubcompile report: 1 graph(s)

  family                replaced  kept
  --------------------  --------  ----
  rmsnorm               0         1
  layer_norm            0         0
  silu_gate             0         0
  gelu_tanh_gate        0         0
  causal_conv1d         0         0
  attention             0         0
  rotary                0         0
  linear_cross_entropy  0         0
  causal_mask           0         0

== graph 0: 0 replaced, 1 kept ==
replacements:
  (none)
near misses:
  family   where                                                                                                       kind     reason
  -------  ----------------------------------------------------------------------------------------------------------  -------  ---------------------------------------------
  rmsnorm  llama_pow_w_first (explain_modules.py:17  h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps))  refused  weight shape (1,) does not fit hidden size 16
totals:
  family                replaced  kept
  --------------------  --------  ----
  rmsnorm               0         1
  layer_norm            0         0
  silu_gate             0         0
  gelu_tanh_gate        0         0
  causal_conv1d         0         0
  attention             0         0
  rotary                0         0
  linear_cross_entropy  0         0
  causal_mask           0         0""")

    def test_near_miss_disabled(self):
        text, _ = report_text(GatedMLP("silu"), torch.randn(2, 3, 16), disable=["silu_gate"])
        self.assertExpectedInline(text, """\
hubcompile report: 1 graph(s)

  family                replaced  kept
  --------------------  --------  ----
  rmsnorm               0         0
  layer_norm            0         0
  silu_gate             0         1
  gelu_tanh_gate        0         0
  causal_conv1d         0         0
  attention             0         0
  rotary                0         0
  linear_cross_entropy  0         0
  causal_mask           0         0

== graph 0: 0 replaced, 1 kept ==
replacements:
  (none)
near misses:
  family     where                                                                               kind      reason
  ---------  ----------------------------------------------------------------------------------  --------  --------------------------------------------------------------------------------------------
  silu_gate  exp (explain_modules.py:35  return self.down(self.act(self.gate(x)) * self.up(x)))  disabled  family disabled by config (options patterns/disable, HUBCOMPILE_PATTERNS/HUBCOMPILE_DISABLE)
totals:
  family                replaced  kept
  --------------------  --------  ----
  rmsnorm               0         0
  layer_norm            0         0
  silu_gate             0         1
  gelu_tanh_gate        0         0
  causal_conv1d         0         0
  attention             0         0
  rotary                0         0
  linear_cross_entropy  0         0
  causal_mask           0         0""")

    def test_near_miss_no_kernel(self):
        text, _ = report_text(RMSNorm(), torch.randn(2, 3, 16), kernels={"rmsnorm": "local:/nonexistent/rmsnorm"})
        self.assertExpectedInline(text, """\
hubcompile report: 1 graph(s)

  family                replaced  kept
  --------------------  --------  ----
  rmsnorm               0         1
  layer_norm            0         0
  silu_gate             0         0
  gelu_tanh_gate        0         0
  causal_conv1d         0         0
  attention             0         0
  rotary                0         0
  linear_cross_entropy  0         0
  causal_mask           0         0

== graph 0: 0 replaced, 1 kept ==
replacements:
  (none)
near misses:
  family   where                                                                                                       kind       reason
  -------  ----------------------------------------------------------------------------------------------------------  ---------  -----------------------------------------------------------------------------------------------------------------------------------------------------------
  rmsnorm  llama_pow_w_first (explain_modules.py:17  h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps))  no kernel  no usable kernel for cpu torch.float32: local:/nonexistent/rmsnorm: FileNotFoundError: Cannot find a build variant for this system in /nonexistent/rmsnorm:
totals:
  family                replaced  kept
  --------------------  --------  ----
  rmsnorm               0         1
  layer_norm            0         0
  silu_gate             0         0
  gelu_tanh_gate        0         0
  causal_conv1d         0         0
  attention             0         0
  rotary                0         0
  linear_cross_entropy  0         0
  causal_mask           0         0""")

    def test_near_miss_failed_guard(self):
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            spec = make_repo(Path(tmp), "ignores_weight", WRONG["ignores_weight"])
            text, _ = report_text(RMSNorm(), torch.randn(2, 3, 16), kernels={"rmsnorm": spec})
        # The temporary path and the measured numbers set the column widths: normalize them.
        text = re.sub(r"-{3,}", "---", re.sub(r" {2,}", "  ", text.replace(spec, "local:<repo>")))
        self.assertExpectedInline(text, """\
hubcompile report: 1 graph(s)

  family  replaced  kept
  ---  ---  ---
  rmsnorm  0  1
  layer_norm  0  0
  silu_gate  0  0
  gelu_tanh_gate  0  0
  causal_conv1d  0  0
  attention  0  0
  rotary  0  0
  linear_cross_entropy  0  0
  causal_mask  0  0

== graph 0: 0 replaced, 1 kept ==
replacements:
  (none)
near misses:
  family  where  kind  reason
  ---  ---  ---  ---
  rmsnorm  llama_pow_w_first (explain_modules.py:17  h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps))  guard  guard failed for local:<repo>: out: rmse <x> > bound <x> (original <x>)
totals:
  family  replaced  kept
  ---  ---  ---
  rmsnorm  0  1
  layer_norm  0  0
  silu_gate  0  0
  gelu_tanh_gate  0  0
  causal_conv1d  0  0
  attention  0  0
  rotary  0  0
  linear_cross_entropy  0  0
  causal_mask  0  0""")


def test_json_report_has_everything(fresh):
    _, report = report_text(RMSNorm(), torch.randn(2, 3, 16))
    data = json.loads(report.to_json())
    (graph,) = data["graphs"]
    (rep,) = graph["replacements"]
    assert rep["family"] == "rmsnorm" and rep["op"] == "rms_norm" and rep["kernel"] == "bundled:rmsnorm"
    assert rep["guard"]["passed"] and rep["guard"]["comparisons"][0]["error"] <= rep["guard"]["comparisons"][0]["bound"]
    assert any("explain_modules.py" in s for s in rep["sources"])
    assert data["totals"]["rmsnorm"] == {"replaced": 1, "kept": 0}
    assert graph["diff"].startswith("--- before\n+++ after")


def test_cli_counts_equal_the_backends(tmp_path):
    """`hubcompile diff qwen3 --format json` in a fresh process; its counts are what the
    backend reached in that process."""
    out = tmp_path / "report.json"
    env = {**os.environ, "TORCHINDUCTOR_FX_GRAPH_CACHE": "1", "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "ind")}
    proc = subprocess.run([sys.executable, "-m", "hubcompile", "diff", "qwen3", "--format", "json", "-o", str(out)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    # Qwen3, 2 layers: 9 RMSNorms (4 fused with the residual add, 4 on q/k heads), 2 MLPs, 2 attentions, 4 rotations.
    replaced = {f: c["replaced"] for f, c in data["totals"].items() if c["replaced"]}
    assert replaced == {"rmsnorm": 9, "silu_gate": 2, "attention": 2, "rotary": 4, "causal_mask": 2}
    graph_counts = {}
    for graph in data["graphs"]:
        for rep in graph["replacements"]:
            graph_counts[rep["family"]] = graph_counts.get(rep["family"], 0) + 1
    assert graph_counts == replaced
    assert all(c["kept"] == 0 for c in data["totals"].values()), data["totals"]


def test_cli_errors_name_the_choices(capsys):
    from hubcompile.explain import main

    assert main(["no_such_model_type"]) == 2
    assert "unknown transformers model type 'no_such_model_type'" in capsys.readouterr().err
    assert main(["missing.py:build"]) == 2
    assert "no such file 'missing.py'" in capsys.readouterr().err


def _chromium():
    return next((p for p in (shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome")) if p), None)


@pytest.mark.skipif(_chromium() is None, reason="Chromium is not installed (apt-get install chromium; CI installs it)")
def test_html_renders_in_headless_chromium(fresh, tmp_path):
    _, report = report_text(GatedMLP("silu"), torch.randn(2, 3, 16))
    page = tmp_path / "report.html"
    page.write_text(report.html())
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / "explain_report.png"
    common = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"]
    dom = subprocess.run([*common, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    # The browser parsed both graphs and the highlights.
    assert 'id="before"' in dom.stdout and 'id="after"' in dom.stdout
    assert dom.stdout.count('class="consumed"') >= 3
    assert 'class="replaced"' in dom.stdout and "torch.ops.hubcompile.gated_activation" in dom.stdout
    subprocess.run([*common, f"--screenshot={shot}", "--window-size=1400,900", page.as_uri()],
                   capture_output=True, timeout=120, check=True)
    assert shot.stat().st_size > 10_000  # a rendered page, not a blank one


# ------------------------------------------------------- variants left alone on purpose


def _attention_misses(report):
    return [m for g in report.graphs for m in g.near_misses if m.family == "attention"]


def test_softcapped_attention_is_left_alone_with_reason(fresh):
    """Gemma 2 soft-caps the scores (tanh(s / cap) * cap): no attention kernel here has a
    soft-cap, so the attention stays with Inductor and the report says why."""
    import transformers as T
    from tiny_models import LLAMA_LIKE, input_ids

    torch.manual_seed(0)
    config = T.Gemma2Config(**{**LLAMA_LIKE, "head_dim": 12})
    config._attn_implementation = "eager"
    model = T.Gemma2ForCausalLM(config).eval()
    ids = input_ids()
    report = hubcompile.explain(model, ids)
    assert report.totals["attention"] == {"replaced": 0, "kept": 2}
    misses = _attention_misses(report)
    assert len(misses) == 2 and all("soft-capping" in m.reason for m in misses), misses
    assert all("modeling_gemma2.py" in m.source for m in misses)
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(model, backend="hubkernels")(ids).logits, model(ids).logits,
                                   rtol=1e-4, atol=1e-4)


def test_attention_with_dropout_is_left_alone_with_reason(fresh):
    import transformers as T
    from tiny_models import LLAMA_LIKE, input_ids

    torch.manual_seed(0)
    config = T.LlamaConfig(**LLAMA_LIKE, attention_dropout=0.25)
    config._attn_implementation = "eager"
    model = T.LlamaForCausalLM(config).train()
    report = hubcompile.explain(lambda ids: model(ids, labels=ids), input_ids(), train=True)
    assert report.totals["attention"]["replaced"] == 0
    misses = _attention_misses(report)
    assert len(misses) == 2 and all("dropout p > 0" in m.reason for m in misses), misses
    # the rest of the model is still replaced
    assert report.totals["rmsnorm"]["replaced"] >= 4 and report.totals["rotary"]["replaced"] == 4
