"""Launch-bound matches are left to Inductor (option ``min_elements``,
hubcompile/patterns/framework.py): on a GPU, with or without CUDA graphs, an RMSNorm, gate or rotary
match smaller than ``min_elements`` elements is not replaced, as in a decode step. Tested
on CPU with the rule's device list widened to CPU."""

import pytest
import torch

from hubcompile.patterns import framework
from tiny_models import build, input_ids, replaced

LAUNCH_BOUND = ("rmsnorm", "silu_gate", "rotary")


@pytest.fixture
def cpu_counts_as_gpu(monkeypatch):
    monkeypatch.setattr(framework, "LAUNCH_BOUND_DEVICES", ("cpu", "cuda", "xpu"))


def _compile(fresh, ids, **compile_kwargs):
    model, _ = build("llama")
    with torch.no_grad():
        out = torch.compile(model, backend="hubkernels", **compile_kwargs)(ids).logits
        eager = model(ids).logits
    reasons = {fam: [why for r in fresh for _, why in r.refused.get(fam, [])] for fam in LAUNCH_BOUND}
    return replaced(fresh), reasons, out, eager


def test_small_matches_are_left_to_inductor(fresh, cpu_counts_as_gpu):
    # 2 x 11 tokens: the norms hold 2 * 11 * 48 = 1056 elements, the gates 1760, q 1056
    counts, reasons, out, eager = _compile(fresh, input_ids(), options={"perf_guard": "off", "min_elements": 4096})
    assert not any(counts.get(f) for f in LAUNCH_BOUND), counts
    assert counts["attention"] == 2, counts  # not a fusible family: replaced whatever its size
    # (a norm after a residual add is refused twice: as add+RMSNorm, then as RMSNorm)
    assert all(reasons[f] and all(r.startswith("launch-bound: ") for r in reasons[f]) for f in LAUNCH_BOUND), reasons
    assert "launch-bound: 1056 elements, under min_elements=4096; " in reasons["rmsnorm"][0]
    torch.testing.assert_close(out, eager)


@pytest.mark.parametrize("min_elements", [0, 528])  # 528: k of 2 x 11 tokens, 2 heads of 12
def test_matches_at_or_over_min_elements_are_replaced(fresh, cpu_counts_as_gpu, min_elements):
    counts, reasons, _, _ = _compile(fresh, input_ids(), options={"perf_guard": "off", "min_elements": min_elements})
    assert {f: counts.get(f) for f in LAUNCH_BOUND} == {"rmsnorm": 5, "silu_gate": 2, "rotary": 4}, counts
    assert not any(reasons.values()), reasons


def test_under_cuda_graphs_small_matches_are_left_to_inductor(fresh, cpu_counts_as_gpu):
    """mode="reduce-overhead": the replay takes the host out, but each kernel still costs
    its launch on the GPU and Inductor's fusions are still lost."""
    import hubcompile

    hubcompile.configure(min_elements=4096)  # torch.compile takes mode= or options=, not both
    counts, reasons, out, eager = _compile(fresh, input_ids(), mode="reduce-overhead")
    assert not any(counts.get(f) for f in LAUNCH_BOUND), counts
    assert all(reasons[f] and all(r.startswith("launch-bound: ") for r in reasons[f]) for f in LAUNCH_BOUND), reasons
    torch.testing.assert_close(out, eager)


def test_on_cpu_the_rule_does_not_apply(fresh):
    counts, reasons, _, _ = _compile(fresh, input_ids(), options={"perf_guard": "off", "min_elements": 10**9})
    assert {f: counts.get(f) for f in LAUNCH_BOUND} == {"rmsnorm": 5, "silu_gate": 2, "rotary": 4}, counts


def test_min_elements_is_validated():
    import hubcompile

    with pytest.raises(ValueError, match="min_elements"):
        hubcompile.configure(min_elements=-1)
