"""The ``hubkernels`` Dynamo backend: hubcompile's passes (passes/pipeline.py lists them,
in order), then Inductor, under the performance guard (guards/performance.py)."""

from __future__ import annotations

import copy
import dataclasses
import logging

import torch

from . import cached_records
from . import config as hub_config
from .passes import pipeline
from .patterns.linear_cross_entropy import prepare_outputs
from .records import RECORDS, GraphRecord  # noqa: F401  (hubcompile.backend.RECORDS, as before)

log = logging.getLogger(__name__)


def hubkernels(gm: torch.fx.GraphModule, example_inputs, *, mode: str | None = None, options=None):
    """The Dynamo backend. ``mode`` and ``options`` come from ``torch.compile``."""
    from torch._inductor import list_mode_options
    from torch._inductor.compile_fx import compile_fx

    from .guards import performance as perf_guard

    ours, inductor_patches = hub_config.split_options(options)
    cfg = hub_config.resolve(ours)
    patches = dict(list_mode_options(mode)) if mode else {}
    patches.update(inductor_patches)
    cudagraphs = _cudagraphs(patches)

    setting = cfg.perf_guard
    # The performance guard compiles variants of the graph as Dynamo gave it (the passes
    # rewrite the graph they are given: each variant gets its own copy).
    aside = perf_guard.why_not(setting.mode, example_inputs, gm, cudagraphs)
    pristine = None
    if aside is None:
        try:
            pristine = _copy(gm)
        except Exception as e:  # noqa: BLE001
            aside = f"the graph could not be copied ({type(e).__name__}: {e})"
    if aside is not None:
        perf_guard.stood_aside(aside, example_inputs)
        return _hub_or_inductor(gm, example_inputs, cfg, patches)

    def compile_variant(dropped):
        """Plain Inductor (``dropped`` None), or hubcompile without the families ``dropped``."""
        if dropped is None:
            return perf_guard.Variant(perf_guard.PLAIN, compile_fx(_copy(pristine), example_inputs,
                                                                   config_patches=patches))
        variant_cfg = dataclasses.replace(cfg, disable=tuple(dict.fromkeys(cfg.disable + tuple(dropped))))
        variant = _compile_hub(_copy(pristine) if dropped else gm, example_inputs, variant_cfg, patches)
        variant.dropped = tuple(dropped)
        if dropped:
            variant.name = "-".join((perf_guard.HUB, *dropped))
        return variant

    try:
        key = perf_guard.signature(pristine, example_inputs, pipeline.HubcompilePass(cfg).uuid())
        return perf_guard.choose(key, example_inputs, compile_variant, setting.max_slowdown,
                                 perf_guard.mutated_inputs(pristine))
    except Exception as e:  # noqa: BLE001 - compilation never fails because of the guard
        log.warning("hubcompile: the performance guard failed (%s: %s); keeping the replacements",
                    type(e).__name__, e)
        return _hub_or_inductor(_copy(pristine), example_inputs, cfg, patches, pristine)


def _hub_or_inductor(gm, example_inputs, cfg, patches, pristine=None):
    """hubcompile's compile of ``gm``, its records published; should it fail, Inductor's
    own compile of the graph as Dynamo gave it (``pristine``, or a copy made first: the
    passes rewrite ``gm``), with one warning: compilation never fails because of hubcompile."""
    from torch._dynamo.exc import RestartAnalysis
    from torch._inductor.compile_fx import compile_fx

    if pristine is None:
        try:
            pristine = _copy(gm)
        except Exception:  # noqa: BLE001 - a graph that cannot be copied compiles without the net
            pass
    before = len(RECORDS)
    try:
        variant = _compile_hub(gm, example_inputs, cfg, patches)
    except RestartAnalysis:  # Dynamo's signal to trace again, not a failure
        raise
    except Exception as e:  # noqa: BLE001
        if pristine is None:
            raise
        del RECORDS[before:]  # a half-done compile's records
        why = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
        log.warning("hubcompile: compiling this graph with hubcompile's passes failed (%s); Inductor compiles it "
                    "alone. Please report this with the output of TORCH_LOGS=+hubcompile", why)
        fn = compile_fx(pristine, example_inputs, config_patches=patches)
        RECORDS.append(GraphRecord({}, {}, {}, (), failed=f"hubcompile's passes failed ({why}); "
                                                          "Inductor compiled this graph alone"))
        return fn
    RECORDS.extend(variant.records)
    return variant.fn


def _copy(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    # Parameters and buffers stay shared: a copy of them could double the memory.
    shared = {id(t): t for t in (*gm.parameters(), *gm.buffers())}
    return copy.deepcopy(gm, memo=shared)


def _compile_hub(gm, example_inputs, cfg, patches):
    """Inductor with hubcompile's passes, as a perf-guard Variant whose records are kept
    out of RECORDS (the guard publishes the kept variant's). A graph whose kernels are
    runtime-checked is compiled a second time without the checks, run between them
    (guards/runtime_checks.py)."""
    from .guards import performance as perf_guard
    from .guards import runtime_checks

    why_not = pipeline.why_not_inline(cfg, example_inputs, patches)
    pristine = _copy(gm) if runtime_checks.may_need_fast_code(cfg, why_not, _cudagraphs(patches)) else None
    fn, records, families = _compile_once(gm, example_inputs, cfg, patches, why_not)
    checked = runtime_checks.checked_ops(records) if pristine is not None else {}
    if checked:
        from .lowering import kernels

        try:
            with kernels.compiling_unchecked():
                fast, fast_records, _ = _compile_once(pristine, example_inputs, cfg, patches, why_not)
        except Exception as e:  # noqa: BLE001 - the checked code alone still runs
            log.warning("hubcompile: compiling the code run between runtime checks failed (%s: %s); every call "
                        "runs the checked ops", type(e).__name__, e)
        else:
            first, every = runtime_checks.first_calls(cfg), cfg.runtime_check_every
            for record, between in zip(records, fast_records):
                record.launches_between_checks = between.launches
            log.info("hubcompile: runtime-checked kernels (%s) run as ops on the first %d call(s) and one in %d; "
                     "launched by Inductor on the others", ", ".join(sorted(checked)), first, every)
            fn = runtime_checks.SampledChecks(fn, fast, first, every)
    return perf_guard.Variant(perf_guard.HUB, fn, families, (), records)


def _will_train(gm, example_inputs) -> bool:
    """Whether AOTAutograd will trace a joint forward+backward graph: as it decides, grad
    mode on and an input (the parameters among them) that requires grad."""
    tensors = [*example_inputs, *gm.parameters()]
    return torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in tensors)


def _cudagraphs(patches) -> bool:
    """Whether Inductor compiles with CUDA graphs under these config patches (a mode's)."""
    from torch._inductor import config as inductor_config

    return bool(patches.get("triton.cudagraphs", inductor_config.triton.cudagraphs))


def _compile_once(gm, example_inputs, cfg, patches, why_not_inline: str | None):
    """(compiled fn, the graphs' records, the families replaced, in FAMILIES order)."""
    from .patterns import hinted as hinted_families

    hinted = hinted_families(gm)
    joint_pass = pipeline.HubcompilePass(cfg, None, hinted)
    records_key = cached_records.key(gm, example_inputs, joint_pass.uuid())
    joint_pass.tracing = pipeline.start_tracing(cfg, hinted, _will_train(gm, example_inputs))
    try:
        early = pipeline.rewrite_dynamo_graph(gm, cfg)
        reattach = prepare_outputs(gm)  # logits that left the graph without a gradient
        from .lowering import kernels

        kernels.set_runtime_checks(cfg.runtime_checks, cfg.runtime_check_every)
        before = len(RECORDS)
        joint_pass.early = early
        fn = pipeline.compile_graph(gm, example_inputs, patches, joint_pass, why_not_inline)
    finally:
        if joint_pass.tracing is not None:  # Inductor's cache answered: the traces are kept for later
            joint_pass.tracing.finish()
    records = RECORDS[before:]
    del RECORDS[before:]
    if records:
        cached_records.store(records_key, records)
    else:  # Inductor's cache answered: its code holds the passes' work, which they recorded then
        records = cached_records.load(records_key)
    families = {f for r in records for f, n in r.replaced.items() if n}
    families |= {name for name, f in early.items() if f.accepted}
    ordered = tuple(f for f in hub_config.FAMILIES if f in families)
    return (reattach(fn) if reattach else fn), records, ordered
