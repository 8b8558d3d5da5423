"""Runtime checks that cost nothing between the checked calls.

A kernel that did not come with hubcompile (a Hub kernel, a local repo) is compared with
its reference on its first calls, then on one call in ``runtime_check_every``
(lowering/kernels.py). A check needs the op's Python around the kernel, so a graph whose
kernels are checked would call them as ops on every step: host time that Inductor's own
launches do not cost (issue 21), paid on every step to count calls.

So such a graph is compiled twice: the checked code, its kernels called as ops with
their checks, and the fast code, the same replacements with the kernels launched by
Inductor (Triton kernels traced into its code, compiled ``torch.library`` ops as extern
kernels). ``SampledChecks`` runs the checked code for the graph's first
``runtime_checks`` calls and then one call in ``runtime_check_every``; there, each kernel
function's next call (the forward now, the backward when it runs) is checked. The other
calls run the fast code. Once a kernel has failed a check (it then runs its reference),
every later call runs the checked code.

No second compile where nothing would be saved: under CUDA graphs (a replay runs no
Python; the checks run before capture), where Inductor cannot launch the kernels
(``pipeline.why_not_inline``), and where no kernel is checked.
"""

from __future__ import annotations

import logging

from ..lowering import kernels

log = logging.getLogger(__name__)

def may_need_fast_code(cfg, why_not_inline: str | None, cudagraphs: bool) -> bool:
    """Whether a graph compiled with ``cfg`` may call checked kernels as ops that the fast
    code would launch from Inductor's: decided before the compile, which then tells
    (``checked_ops``)."""
    from ..passes.pipeline import names_function_kernels

    if cudagraphs or why_not_inline is not None or cfg.runtime_checks == 0:
        return False
    return bool(cfg.runtime_checks) or names_function_kernels(cfg)


def checked_ops(records) -> dict[str, int]:
    """{op: calls} that the compile left as ops only for their runtime checks."""
    from ..passes.inline import RUNTIME_CHECKED

    found: dict[str, int] = {}
    for record in records:
        for op, ways in record.launches.items():
            n = sum(calls for how, calls in ways.items() if how.startswith(f"op: {RUNTIME_CHECKED}"))
            if n:
                found[op] = found.get(op, 0) + n
    return found


class SampledChecks:
    """The compiled graph: ``checked`` on the first ``first`` calls, on one call in
    ``every`` after them and on every call once a kernel has failed a check; ``fast``
    on the others."""

    def __init__(self, checked, fast, first: int, every: int):
        self.checked, self.fast, self.first, self.every = checked, fast, first, every
        self.calls = 0
        self.fallbacks = kernels.fallbacks()
        self._boxed_call = getattr(checked, "_boxed_call", False)

    def checks_due(self) -> bool:
        self.calls += 1
        if kernels.fallbacks() != self.fallbacks:
            return True  # a kernel runs its reference now: the fast code would still run it
        n = self.calls - self.first
        return n <= 0 or bool(self.every and n % self.every == 0)

    def __call__(self, *args, **kwargs):
        if self.checks_due():
            kernels.request_sample()
            return self.checked(*args, **kwargs)
        return self.fast(*args, **kwargs)


def first_calls(cfg) -> int:
    return kernels.DEFAULT_RUNTIME_CHECKS if cfg.runtime_checks is None else cfg.runtime_checks
