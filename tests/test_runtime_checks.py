"""Runtime checks without their cost between checks (hubcompile/guards/runtime_checks.py):
a graph whose kernel did not come with hubcompile runs the checked ops on its first calls
and on one call in runtime_check_every, and the kernel launched from Inductor's code on
the others; a kernel that fails a sampled check runs its reference from then on."""

import warnings

import pytest
import torch

from hubcompile.guards import runtime_checks
from hubcompile.lowering import kernels
from test_guards import CORRECT, UserNorm, clean, make_repo  # noqa: F401  (clean: a fixture)

# Right while the test leaves the variable unset (the fast code is traced then), wrong after.
BREAKS_ON_DEMAND = """
        y, rstd, h = _ok.rms_norm_forward(x, weight, eps, weight_offset, cast_before_scale, residual)
        import os
        return (y * 1.5 if os.environ.get("HUBCOMPILE_TEST_BROKEN") else y), rstd, h"""


@pytest.fixture
def calls(monkeypatch):
    """Per model call: (whether the checked code ran, how many kernel calls it checked)."""
    seen = []
    due, check = runtime_checks.SampledChecks.checks_due, kernels._runtime_check

    def checks_due(self):
        seen.append([due(self), 0])
        return seen[-1][0]

    def counted(*args, **kwargs):
        seen[-1][1] += 1
        return check(*args, **kwargs)

    monkeypatch.setattr(runtime_checks.SampledChecks, "checks_due", checks_due)
    monkeypatch.setattr(kernels, "_runtime_check", counted)
    return seen


def compiled(model, spec, **options):
    return torch.compile(model, backend="hubkernels", options={"kernels": {"rmsnorm": spec}, "perf_guard": "off",
                                                               "runtime_check_every": 4, **options})


SCHEDULE = [True, True, True, False, False, False, True, False]  # 3 first calls, then 1 in 4


def assert_close(a, b):
    # the kernel against eager fp32: rounding, summed over steps for gradients
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_first_calls_and_samples_run_the_checked_ops(clean, tmp_path, calls):
    model = UserNorm()
    fn = compiled(model, make_repo(tmp_path, "correct", CORRECT))
    x = torch.randn(5, 33)
    with torch.no_grad():
        for _ in SCHEDULE:
            assert_close(fn(x), model(x))
    assert [checked for checked, _ in calls] == SCHEDULE
    assert [n > 0 for _, n in calls] == SCHEDULE  # no check, and no synchronisation, between them
    (record,) = clean
    assert record.launches == {"rms_norm": {"op: runtime_checks compare its first calls with the reference": 1}}
    assert record.launches_between_checks == {"rms_norm": {"Inductor: extern kernel": 1}}


def test_training_checks_the_backward_of_a_sampled_step(clean, tmp_path, calls):
    model, ref = UserNorm(), UserNorm()
    ref.load_state_dict(model.state_dict())
    fn = compiled(model, make_repo(tmp_path, "correct", CORRECT))
    for _ in SCHEDULE:
        x = torch.randn(5, 33)
        fn(x).square().sum().backward()
        ref(x).square().sum().backward()
    for p, q in zip(model.parameters(), ref.parameters()):
        assert_close(p.grad, q.grad)
    assert [checked for checked, _ in calls] == SCHEDULE
    assert [n > 0 for _, n in calls] == SCHEDULE


def test_a_kernel_failing_a_sampled_check_runs_its_reference_from_then_on(clean, tmp_path, calls, monkeypatch):
    model = UserNorm()
    spec = make_repo(tmp_path, "breaks", BREAKS_ON_DEMAND)
    fn = compiled(model, spec)
    x = torch.randn(5, 33)
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for i in range(10):
            if i == 4:
                monkeypatch.setenv("HUBCOMPILE_TEST_BROKEN", "1")
            assert_close(fn(x), model(x))
    # broken from call 5: the fast code (traced while it was right) runs calls 5 and 6,
    # the sample at call 7 fails, and every call after it runs the reference
    assert [checked for checked, _ in calls] == [True, True, True, False, False, False, True, True, True, True]
    (message,) = [str(w.message) for w in caught if "failed its runtime check" in str(w.message)]
    assert spec in message


def test_no_second_compile_without_checks(clean, tmp_path, calls):
    model = UserNorm()
    fn = compiled(model, make_repo(tmp_path, "correct", CORRECT), runtime_checks=0)
    with torch.no_grad():
        fn(torch.randn(5, 33))
    assert calls == []
    (record,) = clean
    assert record.launches == {"rms_norm": {"Inductor: extern kernel": 1}} and not record.launches_between_checks
