"""The ``hubkernels`` Dynamo backend: hubcompile's passes (passes/pipeline.py lists them,
in order), then Inductor, under the performance guard (guards/performance.py)."""

from __future__ import annotations

import copy
import logging

import torch

from . import config as hub_config
from .passes import pipeline
from .patterns.linear_cross_entropy import prepare_outputs
from .records import RECORDS, GraphRecord  # noqa: F401  (hubcompile.backend.RECORDS, as before)

log = logging.getLogger(__name__)


def hubkernels(gm: torch.fx.GraphModule, example_inputs, *, mode: str | None = None, options=None):
    """The Dynamo backend. ``mode`` and ``options`` come from ``torch.compile``."""
    from torch._inductor import config as inductor_config
    from torch._inductor import list_mode_options
    from torch._inductor.compile_fx import compile_fx

    from .guards import performance as perf_guard

    ours, inductor_patches = hub_config.split_options(options)
    cfg = hub_config.resolve(ours)
    patches = dict(list_mode_options(mode)) if mode else {}
    patches.update(inductor_patches)
    cudagraphs = bool(patches.get("triton.cudagraphs", inductor_config.triton.cudagraphs))

    # The performance guard needs the graph as Dynamo gave it (the passes rewrite it).
    aside = perf_guard.why_not(cfg.perf_guard, example_inputs, gm, cudagraphs)
    plain_gm = None
    if aside is None:
        try:
            # Parameters and buffers stay shared: a copy of them could double the memory.
            shared = {id(t): t for t in (*gm.parameters(), *gm.buffers())}
            plain_gm = copy.deepcopy(gm, memo=shared)
        except Exception as e:  # noqa: BLE001
            aside = f"the graph could not be copied ({type(e).__name__}: {e})"
    if aside is not None and cfg.perf_guard != "off":
        log.debug("hubcompile: perf guard stands aside: %s", aside)

    compiled = []

    def compile_hub():
        """Inductor with hubcompile's passes (compiled once, however often asked)."""
        if not compiled:
            from .patterns import hinted as hinted_families

            hinted = hinted_families(gm)
            pipeline.register_families(cfg, hinted, perf_guard.is_training(example_inputs))
            early = pipeline.rewrite_dynamo_graph(gm, cfg)
            reattach = prepare_outputs(gm)  # logits that left the graph without a gradient
            if cfg.runtime_checks:
                from .lowering import kernels

                kernels.set_runtime_checks(cfg.runtime_checks)
            before = len(RECORDS)
            fn = pipeline.compile_graph(gm, example_inputs, patches, pipeline.HubcompilePass(cfg, early, hinted),
                                        pipeline.why_not_inline(cfg, example_inputs, patches))
            replaced = sum(r.total for r in RECORDS[before:]) + sum(len(f.accepted) for f in early.values())
            compiled.append((reattach(fn) if reattach else fn, replaced))
        return compiled[0]

    if plain_gm is None:
        return compile_hub()[0]
    try:
        key = perf_guard.signature(plain_gm, example_inputs, pipeline.HubcompilePass(cfg).uuid())
        return perf_guard.choose(key, example_inputs, compile_hub,
                                 lambda: compile_fx(plain_gm, example_inputs, config_patches=patches))
    except Exception as e:  # noqa: BLE001 - compilation never fails because of the guard
        log.warning("hubcompile: the performance guard failed (%s: %s); keeping the replacements",
                    type(e).__name__, e)
        return compile_hub()[0]
