"""The ``hubkernels`` Dynamo backend: hubcompile's pattern passes, then Inductor.

The passes sit in Inductor's ``joint_custom_post_pass``: there the graph is ATen-level
and normalized, and it is the one hook that sees both inference graphs and the joint
forward+backward graph of training (later hooks see a partitioned graph whose
intermediates are saved for backward, which blocks matching).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import logging
import re
import warnings
from pathlib import Path

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass
from torch._inductor.pattern_matcher import stable_topological_sort

from . import config as hub_config
from .patterns import families
from .patterns.framework import is_joint_graph
from .patterns.linear_cross_entropy import prepare_outputs

log = logging.getLogger(__name__)


@dataclasses.dataclass
class GraphRecord:
    """What hubcompile did to one graph handed to Inductor."""

    replaced: dict[str, int]  # family -> number of matches replaced
    spellings: dict[str, list[tuple[str, str]]]  # family -> (spelling, kernel) of each replacement
    refused: dict[str, list[tuple[str, str]]]  # family -> (spelling, reason)
    disabled: tuple[str, ...]  # families that did not run
    refused_at: dict[str, list[str]] = dataclasses.field(default_factory=dict)  # source line per refusal
    # family -> (spelling, kernel, guards.GuardResult) of each numerical guard consulted
    guards: dict[str, list] = dataclasses.field(default_factory=dict)
    # family -> framework.Replacement of each match replaced
    replacements: dict[str, list] = dataclasses.field(default_factory=dict)
    # Before the passes: node -> source line, and nodes that suggest a family (explain.py)
    sources: dict[str, str] = dataclasses.field(default_factory=dict)
    tells: dict[str, dict[str, str | None]] = dataclasses.field(default_factory=dict)  # node -> {family: why not}
    code_before: str = ""  # the graph as Python code, before and after the passes
    code_after: str = ""

    @property
    def total(self) -> int:
        return sum(self.replaced.values())


# Every graph rewritten in this process, in order. ``hubcompile.reports()`` reads it.
RECORDS: list[GraphRecord] = []


def _source_hash() -> str:
    """Hash of hubcompile's sources: a code change must miss Inductor's caches."""
    root = Path(__file__).parent
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def _code(graph: torch.fx.Graph) -> str:
    """The graph as Python, without fx's ``;  x = None`` memory-freeing suffixes."""
    src = graph.python_code(root_module="self").src.strip()
    return "\n".join(re.sub(r";\s+[\w\s=,]+= None$", "", line) for line in src.splitlines())


class HubcompilePass(CustomGraphPass):
    def __init__(self, cfg: hub_config.HubConfig, early: dict | None = None, hinted: frozenset | None = None):
        self.cfg = cfg
        # Families that rewrote Dynamo's graph before AOTAutograd: name -> their records
        self.early = early or {}
        # The families whose spellings could occur in this graph (patterns.hinted); None: all
        self.hinted = hinted

    def __call__(self, graph: torch.fx.Graph) -> None:
        disabled = tuple(f for f in hub_config.FAMILIES if not self.cfg.enabled(f))
        from .explain import survey

        record = GraphRecord({}, {}, {}, disabled, code_before=_code(graph))
        record.sources, record.tells = survey(graph)
        training = is_joint_graph(graph)
        for name, family in self.early.items():
            _copy_records(record, name, family)
        for family in families():
            if not self.cfg.enabled(family.name) or (self.hinted is not None and family.name not in self.hinted):
                continue
            try:
                family.passes(training)
            except Exception as e:  # noqa: BLE001 - a family that cannot register must not fail the compile
                log.warning("hubcompile: %s patterns could not be registered (%s: %s); leaving them to Inductor",
                            family.name, type(e).__name__, e)
                record.refused[family.name] = [("*", f"registration failed: {type(e).__name__}: {e}")]
                continue
            with warnings.catch_warnings():
                # The matcher erases shared nodes of multi-output joint patterns twice;
                # fx warns about the second erase, which is harmless.
                warnings.filterwarnings("ignore", message="erase_node.*already erased")
                count = family.apply(graph, self.cfg)
            _copy_records(record, family.name, family, count)
            if count:
                log.info("hubcompile: replaced %d %s match(es): %s", count, family.name, family.accepted)
            for spelling, reason in family.refused:
                log.info("hubcompile: kept a %s match (%s): %s", family.name, spelling, reason)
        if self.cfg.enabled("causal_mask") and record.replaced.get("attention"):
            self._causal_attention(graph, record)
        if record.disabled:
            log.info("hubcompile: disabled by config: %s", ", ".join(record.disabled))
        if any(record.replaced.values()):
            # A joint-graph replacement is inserted in one place but its backward part
            # reads gradients computed later: restore a topological order (the steps below
            # insert nodes before the nodes they read from).
            stable_topological_sort(graph)
            if record.replaced.get("attention"):
                self._trace_attention(graph)
        if self.cfg.enabled("linear_cross_entropy"):
            from .lowering.embedding_backward import rewrite_embedding_backward

            try:
                rewrite_embedding_backward(graph)
            except Exception as e:  # noqa: BLE001 - a memory saving must not fail the compile
                log.warning("hubcompile: embedding backward rewrite failed (%s: %s); keeping Inductor's",
                            type(e).__name__, e)
        if any(record.replaced.values()):
            graph.eliminate_dead_code()
            graph.lint()
        record.code_after = _code(graph)
        RECORDS.append(record)

    @staticmethod
    def _trace_attention(graph) -> None:
        """Attention ops whose kernel is SDPA become SDPA's own ops (lowering/traced_attention.py)."""
        from .lowering.traced_attention import trace_attention

        try:
            trace_attention(graph)
        except Exception as e:  # noqa: BLE001 - each call is checked before the graph changes
            log.warning("hubcompile: tracing attention failed (%s: %s)", type(e).__name__, e)

    @staticmethod
    def _causal_attention(graph, record: GraphRecord) -> None:
        """Eager attention replaced above whose mask is exactly causal runs the kernel's
        causal mode (patterns/causal_mask.py), recorded under causal_mask."""
        from .patterns.causal_mask import NAME, make_attention_causal
        from .patterns.framework import Replacement

        try:
            done, kept = make_attention_causal(graph)
        except Exception as e:  # noqa: BLE001 - the masks stay as they are
            done, kept = [], [f"check failed: {type(e).__name__}: {e}"]
            log.warning("hubcompile: %s on attention failed (%s: %s); keeping the masks", NAME, type(e).__name__, e)
        record.replaced[NAME] = record.replaced.get(NAME, 0) + len(done)
        record.spellings.setdefault(NAME, []).extend(("attention_mask", "attention causal") for _ in done)
        record.replacements.setdefault(NAME, []).extend(
            Replacement(NAME, "attention_mask", "hubcompile::attention(causal=True)", "attention causal",
                        "attention causal", False, names, ()) for names in done)
        record.refused.setdefault(NAME, []).extend(("attention_mask", why) for why in kept)
        if done:
            log.info("hubcompile: %d attention call(s) run causal, their mask dropped", len(done))

    def uuid(self) -> str:
        import hubcompile

        from .lowering.guards import kernel_identity

        # The bytes of configured local kernels too: an edited local repo must recompile.
        kernels = sorted({spec for _, specs in self.cfg.kernels for spec in specs}
                         | {entry.spec for entry in self.cfg.kernel_mapping})
        identities = ",".join(kernel_identity(spec, fresh=True) for spec in kernels)
        key = f"{hubcompile.__version__}|{_source_hash()}|{self.cfg.fingerprint()}|{identities}"
        return hashlib.sha256(key.encode()).hexdigest()


def _copy_records(record: GraphRecord, name: str, family, count: int | None = None) -> None:
    record.replaced[name] = len(family.accepted) if count is None else count
    record.spellings[name] = list(family.accepted)
    record.refused[name] = list(family.refused)
    record.refused_at[name] = list(family.refused_at)
    record.guards[name] = list(family.guarded)
    record.replacements[name] = list(family.replacements)


def _rewrite_dynamo_graph(gm: torch.fx.GraphModule, cfg) -> dict:
    """The families matched on Dynamo's graph, before AOTAutograd (the fused linear +
    cross-entropy): {name: family records}. A failure leaves the graph to Inductor."""
    from .patterns import dynamo_graph_families

    early = {}
    for family in dynamo_graph_families():
        if not cfg.enabled(family.name):
            continue
        try:
            count = family.apply(gm, cfg)
        except Exception as e:  # noqa: BLE001 - compilation never fails because of a kernel
            log.warning("hubcompile: %s rewrite failed (%s: %s); leaving it to Inductor", family.name,
                        type(e).__name__, e)
            continue
        if count:
            log.info("hubcompile: replaced %d %s match(es): %s", count, family.name, family.accepted)
        early[family.name] = _Snapshot(**{k: list(getattr(family, k)) for k in _SNAPSHOT})
    return early


_SNAPSHOT = ("accepted", "refused", "refused_at", "guarded", "replacements")


@dataclasses.dataclass
class _Snapshot:
    accepted: list = dataclasses.field(default_factory=list)
    refused: list = dataclasses.field(default_factory=list)
    refused_at: list = dataclasses.field(default_factory=list)
    guarded: list = dataclasses.field(default_factory=list)
    replacements: list = dataclasses.field(default_factory=list)


def _register_families(cfg, hinted: frozenset, training: bool) -> None:
    """Trace the enabled families' patterns now, outside this compile's tracing context.
    Traced lazily inside the pass, under dynamic shapes, the pattern traces met this
    compile's shape environment and made Dynamo restart (TensorifyScalarRestartAnalysis),
    which cost the whole family. Only the families hinted at in the graph, and their
    joint forward+backward patterns only for a training compile: tracing attention's
    spellings alone takes seconds."""
    with torch._guards.tracing(None):
        for family in families():
            if cfg.enabled(family.name) and family.name in hinted:
                try:
                    family.passes(training)
                except Exception:  # noqa: BLE001 - the pass retries, and reports the error
                    pass


def _on_cuda(example_inputs) -> bool:
    return any(isinstance(x, torch.Tensor) and x.device.type == "cuda" for x in example_inputs)


def _compile(gm, example_inputs, patches: dict, joint_pass: HubcompilePass, inline: bool):
    """Inductor with hubcompile's pass; with ``inline``, also with the bundled kernels
    launched by Inductor (lowering/inline.py), and, should that compile fail, again without."""
    from torch._functorch import config as functorch_config
    from torch._inductor.compile_fx import compile_fx

    config = {**patches, "joint_custom_post_pass": joint_pass}
    if "post_grad_custom_post_pass" not in patches:  # a pass of the user's own comes first
        from .lowering.direct_ops import DirectOpsPass

        config["post_grad_custom_post_pass"] = DirectOpsPass()
    if inline:
        from .lowering.inline import InlinePass

        before = len(RECORDS)
        # The backward compiled now, not at the first backward: its failure is caught here.
        eager_backward = (functorch_config.patch(force_non_lazy_backward_lowering=True)
                          if hasattr(functorch_config, "force_non_lazy_backward_lowering") else contextlib.nullcontext())
        try:
            with eager_backward:
                return compile_fx(gm, example_inputs,
                                  config_patches={**config, "post_grad_custom_pre_pass": InlinePass()})
        except Exception as e:  # noqa: BLE001 - compilation never fails because of a kernel
            log.warning("hubcompile: compiling with the kernels launched by Inductor failed (%s: %s); compiling "
                        "again with them called through their ops", type(e).__name__, str(e)[:500])
            del RECORDS[before:]
    return compile_fx(gm, example_inputs, config_patches=config)


def hubkernels(gm: torch.fx.GraphModule, example_inputs, *, mode: str | None = None, options=None):
    """The Dynamo backend. ``mode`` and ``options`` come from ``torch.compile``."""
    from torch._inductor import config as inductor_config
    from torch._inductor import list_mode_options
    from torch._inductor.compile_fx import compile_fx

    from . import perf_guard

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
            _register_families(cfg, hinted, perf_guard.is_training(example_inputs))
            early = _rewrite_dynamo_graph(gm, cfg)
            reattach = prepare_outputs(gm)  # logits that left the graph without a gradient
            if cfg.runtime_checks:
                from .lowering import kernels

                kernels.set_runtime_checks(cfg.runtime_checks)
            before = len(RECORDS)
            inline = cfg.inline_kernels and _on_cuda(example_inputs) and "post_grad_custom_pre_pass" not in patches
            fn = _compile(gm, example_inputs, patches, HubcompilePass(cfg, early, hinted), inline)
            replaced = sum(r.total for r in RECORDS[before:]) + sum(len(f.accepted) for f in early.values())
            compiled.append((reattach(fn) if reattach else fn, replaced))
        return compiled[0]

    if plain_gm is None:
        return compile_hub()[0]
    try:
        key = perf_guard.signature(plain_gm, example_inputs, HubcompilePass(cfg).uuid())
        return perf_guard.choose(key, example_inputs, compile_hub,
                                 lambda: compile_fx(plain_gm, example_inputs, config_patches=patches))
    except Exception as e:  # noqa: BLE001 - compilation never fails because of the guard
        log.warning("hubcompile: the performance guard failed (%s: %s); keeping the replacements",
                    type(e).__name__, e)
        return compile_hub()[0]
