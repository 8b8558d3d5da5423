"""The pipeline: every pass a graph goes through under ``backend="hubkernels"``, in order.

  where                                  pass                                 module
  -------------------------------------  -----------------------------------  -------------------------------
  Dynamo's graph, before AOTAutograd     whole MLPs for a mapped MLP layer,   patterns/gated_mlp.py,
                                         LayerNorm, LM head + loss,           patterns/layer_norm.py,
                                         causal masks                         patterns/linear_cross_entropy.py,
                                                                              patterns/causal_mask.py
  Inductor's joint_custom_post_pass      pattern families (JOINT_STEPS[0])    patterns/{rmsnorm,...}.py
  (ATen, normalized; inference graphs    attention made causal                patterns/causal_mask.py
  and the joint fwd+bwd of training)     topological order restored           (Inductor's stable sort)
                                         attention traced to SDPA's ops       passes/traced_attention.py
                                         embedding backward without fp32      passes/embedding_backward.py
  post_grad_custom_pre_pass (fwd, bwd)   bundled kernels launched by Inductor passes/inline.py
  post_grad_custom_post_pass (fwd, bwd)  ops left called without a wrapper    passes/direct_ops.py

The joint pass is the one hook that sees both inference graphs and training's joint graph
(later hooks see a partitioned graph whose intermediates are saved for backward, which
blocks matching). The post-grad passes change how replaced ops are launched, not what they
compute. Each graph's record (records.GraphRecord) says what every pass did to it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import warnings

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass
from torch._inductor.pattern_matcher import stable_topological_sort

from .. import config as hub_config
from ..fx_utils import is_joint_graph
from ..patterns import dynamo_graph_families, families
from ..records import RECORDS, GraphRecord, graph_code, source_hash

log = logging.getLogger(__name__)


# ------------------------------------------------------------ the joint graph's steps


def match_families(graph: torch.fx.Graph, record: GraphRecord, joint: "HubcompilePass") -> None:
    """Each enabled pattern family's matcher pass, in ``patterns.families()`` order."""
    training = is_joint_graph(graph)
    wanted = wanted_families(joint.cfg, joint.hinted)
    if joint.tracing is not None:  # started before AOTAutograd (backend.py): its results first
        joint.tracing.finish()
    prepare(wanted, training)
    for family in wanted:
        try:
            register(family, training)
        except Exception as e:  # noqa: BLE001 - a family that cannot register must not fail the compile
            log.warning("hubcompile: %s patterns could not be registered (%s: %s); leaving them to Inductor",
                        family.name, type(e).__name__, e)
            record.refused[family.name] = [("*", f"registration failed: {type(e).__name__}: {e}")]
            continue
        with warnings.catch_warnings():
            # The matcher erases shared nodes of multi-output joint patterns twice;
            # fx warns about the second erase, which is harmless.
            warnings.filterwarnings("ignore", message="erase_node.*already erased")
            count = family.apply(graph, joint.cfg)
        _copy_records(record, family.name, family, count)
        if count:
            log.info("hubcompile: replaced %d %s match(es): %s", count, family.name, family.accepted)
        for spelling, reason in family.refused:
            log.info("hubcompile: kept a %s match (%s): %s", family.name, spelling, reason)


def make_attention_causal(graph: torch.fx.Graph, record: GraphRecord, joint: "HubcompilePass") -> None:
    """Eager attention replaced above whose mask is exactly causal runs the kernel's
    causal mode (patterns/causal_mask.py), recorded under causal_mask."""
    from ..patterns.causal_mask import NAME, make_attention_causal as make_causal
    from ..patterns.framework import Replacement

    if not (joint.cfg.enabled("causal_mask") and record.replaced.get("attention")):
        return
    try:
        done, kept = make_causal(graph)
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


def restore_order(graph: torch.fx.Graph, record: GraphRecord, joint: "HubcompilePass") -> None:
    """A joint-graph replacement is inserted in one place but its backward part reads
    gradients computed later: restore a topological order (the steps below insert nodes
    before the nodes they read from)."""
    if any(record.replaced.values()):
        stable_topological_sort(graph)


def trace_attention(graph: torch.fx.Graph, record: GraphRecord, joint: "HubcompilePass") -> None:
    """Attention ops whose kernel is SDPA become SDPA's own ops (passes/traced_attention.py)."""
    from .traced_attention import trace_attention as trace

    if not record.replaced.get("attention"):
        return
    try:
        trace(graph)
    except Exception as e:  # noqa: BLE001 - each call is checked before the graph changes
        log.warning("hubcompile: tracing attention failed (%s: %s)", type(e).__name__, e)


def embedding_backward(graph: torch.fx.Graph, record: GraphRecord, joint: "HubcompilePass") -> None:
    """The embedding's backward without an fp32 copy (passes/embedding_backward.py), part
    of the linear_cross_entropy family."""
    from .embedding_backward import rewrite_embedding_backward

    if not joint.cfg.enabled("linear_cross_entropy"):
        return
    try:
        rewrite_embedding_backward(graph)
    except Exception as e:  # noqa: BLE001 - a memory saving must not fail the compile
        log.warning("hubcompile: embedding backward rewrite failed (%s: %s); keeping Inductor's",
                    type(e).__name__, e)


JOINT_STEPS = (match_families, make_attention_causal, restore_order, trace_attention, embedding_backward)


class HubcompilePass(CustomGraphPass):
    """Inductor's ``joint_custom_post_pass``: ``JOINT_STEPS`` on the graph, one record each."""

    def __init__(self, cfg: hub_config.HubConfig, early: dict | None = None, hinted: frozenset | None = None):
        self.cfg = cfg
        # Families that rewrote Dynamo's graph before AOTAutograd: name -> their records
        self.early = early or {}
        # The families whose spellings could occur in this graph (patterns.hinted); None: all
        self.hinted = hinted
        # Pattern-tracing workers started before AOTAutograd (trace_cache.Tracing), or None
        self.tracing = None
        self.record: GraphRecord | None = None  # the last graph's, which the post-grad passes add to

    def __call__(self, graph: torch.fx.Graph) -> None:
        from ..explain import survey

        disabled = tuple(f for f in hub_config.FAMILIES if not self.cfg.enabled(f))
        record = GraphRecord({}, {}, {}, disabled, code_before=graph_code(graph))
        record.sources, record.tells = survey(graph)
        for name, family in self.early.items():
            _copy_records(record, name, family)
        for step in JOINT_STEPS:
            step(graph, record, self)
        if record.disabled:
            log.info("hubcompile: disabled by config: %s", ", ".join(record.disabled))
        if any(record.replaced.values()):
            graph.eliminate_dead_code()
            graph.lint()
        record.code_after = graph_code(graph)
        RECORDS.append(record)
        self.record = record

    def __getstate__(self):
        # Worker processes do not travel: a copy of the pass has none to wait for.
        return {**self.__dict__, "tracing": None}

    def uuid(self) -> str:
        import hubcompile

        from ..guards.numerical import kernel_identity
        from ..lowering import kernels as kernels_module

        # The bytes of configured local kernels too: an edited local repo must recompile.
        kernels = sorted({spec for _, specs in self.cfg.kernels for spec in specs}
                         | {entry.spec for entry in self.cfg.kernel_mapping})
        identities = ",".join(kernel_identity(spec, fresh=True) for spec in kernels)
        # The code run between runtime checks launches the checked kernels itself: another key.
        unchecked = kernels_module.compiling_unchecked_now()
        key = f"{hubcompile.__version__}|{source_hash()}|{self.cfg.fingerprint()}|{identities}|{unchecked}"
        return hashlib.sha256(key.encode()).hexdigest()


def _copy_records(record: GraphRecord, name: str, family, count: int | None = None) -> None:
    """Add a family's records to the graph's. A name may come twice: from Dynamo's graph
    (whole MLPs given to a mapped layer, under their gate's family) and from the joint pass."""
    record.replaced[name] = record.replaced.get(name, 0) + (len(family.accepted) if count is None else count)
    for field, records in (("spellings", family.accepted), ("refused", family.refused),
                           ("refused_at", family.refused_at), ("guards", family.guarded),
                           ("replacements", family.replacements)):
        getattr(record, field).setdefault(name, []).extend(records)


# ------------------------------------------------------------ before AOTAutograd


_SNAPSHOT = ("accepted", "refused", "refused_at", "guarded", "replacements")


@dataclasses.dataclass
class _Snapshot:
    accepted: list = dataclasses.field(default_factory=list)
    refused: list = dataclasses.field(default_factory=list)
    refused_at: list = dataclasses.field(default_factory=list)
    guarded: list = dataclasses.field(default_factory=list)
    replacements: list = dataclasses.field(default_factory=list)


def rewrite_dynamo_graph(gm: torch.fx.GraphModule, cfg) -> dict:
    """The families matched on Dynamo's graph, before AOTAutograd (the fused linear +
    cross-entropy): {name: family records}. A failure leaves the graph to Inductor."""
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


def wanted_families(cfg, hinted: frozenset | None) -> list:
    """The enabled pattern-matcher families that Dynamo's graph hints at (None: all)."""
    return [f for f in families() if cfg.enabled(f.name) and (hinted is None or f.name in hinted)]


def _untraced(wanted, training: bool) -> dict:
    """{pattern cache name: [keys]} of the stages of ``wanted`` that have no cache file."""
    todo = {}
    for family in wanted:
        try:
            todo.update(family.untraced(training))
        except Exception as e:  # noqa: BLE001 - register() traces and reports
            log.debug("hubcompile: %s: cannot list untraced patterns (%s)", family.name, e)
    return todo


def start_tracing(cfg, hinted: frozenset | None, training: bool):
    """Worker processes tracing what the pattern cache lacks of the families hinted at,
    started as the backend receives Dynamo's graph, so that their start (importing torch)
    and tracing overlap the Dynamo-graph rewrite and AOTAutograd's trace; the joint pass
    waits for them (``match_families``). None where nothing is missing or workers would
    not save time (patterns/trace_cache.py). Only stages without a cache file count (no
    file is read: a compile that Inductor's cache answers must not pay for that)."""
    from ..patterns import trace_cache

    try:
        return trace_cache.start_tracing(_untraced(wanted_families(cfg, hinted), training))
    except Exception as e:  # noqa: BLE001 - the joint pass traces what is missing
        log.warning("hubcompile: starting pattern-tracing workers failed (%s: %s)", type(e).__name__, e)
        return None


def prepare(wanted, training: bool) -> None:
    """What the pattern cache still lacks of the ``wanted`` families, traced by worker
    processes where that is sooner than tracing it here (patterns/trace_cache.py)."""
    from ..patterns import trace_cache

    try:
        trace_cache.trace_elsewhere(_untraced(wanted, training))
    except Exception as e:  # noqa: BLE001 - register() traces what is missing
        log.warning("hubcompile: tracing patterns in worker processes failed (%s: %s); tracing them here",
                    type(e).__name__, e)


def register(family, training: bool) -> None:
    """Trace (or load from the pattern cache) a family's patterns, outside this compile's
    tracing context. Traced with it, under dynamic shapes, the pattern traces met this
    compile's shape environment and made Dynamo restart (TensorifyScalarRestartAnalysis),
    which cost the whole family. Called from the joint pass, so a compile that Inductor's
    cache answers registers nothing (loading every family's patterns is most of
    hubcompile's cost in a warm compile), and only for the families hinted at in the
    graph, with joint forward+backward patterns only for a training graph."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    with torch._guards.tracing(None), unset_fake_temporarily():
        family.passes(training)


# ------------------------------------------------------------ the compile


def on_gpu(example_inputs) -> bool:
    """Whether the graph runs on a device where Inductor launches Triton kernels (CUDA,
    ROCm, XPU)."""
    return any(isinstance(x, torch.Tensor) and x.device.type in ("cuda", "xpu") for x in example_inputs)


def names_function_kernels(cfg) -> bool:
    """Whether the settings name a Hub or local repo's function kernel (not a layer):
    those are traced into the graph on any device (passes/inline.py)."""
    from ..lowering.kernels import is_layer

    specs = {spec for _, group in cfg.kernels for spec in group}
    return any(spec.split(":")[0] in ("hub", "local", "locked") and not is_layer(spec) for spec in specs)


def why_not_inline(cfg, example_inputs, patches: dict) -> str | None:
    """Why Inductor will not launch the replaced ops' kernels of this graph itself, or None."""
    if not cfg.inline_kernels:
        return "inline_kernels=False"
    if not on_gpu(example_inputs) and not names_function_kernels(cfg):
        return "not on a GPU (Inductor launches Triton kernels on GPUs only)"
    if "post_grad_custom_pre_pass" in patches:
        return "the options hold a post_grad_custom_pre_pass of their own"
    return None


def compile_graph(gm, example_inputs, patches: dict, joint_pass: HubcompilePass, why_not: str | None):
    """Inductor with the pipeline's passes. Unless ``why_not`` says otherwise, Inductor
    launches the bundled kernels itself (passes/inline.py); should that compile fail, it is
    done again with the kernels called through their ops."""
    from torch._functorch import config as functorch_config
    from torch._inductor.compile_fx import compile_fx

    from .direct_ops import DirectOpsPass
    from .inline import InlinePass

    def record_of():
        return joint_pass.record

    config = {**patches, "joint_custom_post_pass": joint_pass}
    if "post_grad_custom_post_pass" not in patches:  # a pass of the user's own comes first
        config["post_grad_custom_post_pass"] = DirectOpsPass()
    if why_not is None:
        before = len(RECORDS)
        # The backward compiled now, not at the first backward: its failure is caught here.
        eager_backward = (functorch_config.patch(force_non_lazy_backward_lowering=True)
                          if hasattr(functorch_config, "force_non_lazy_backward_lowering") else contextlib.nullcontext())
        try:
            with eager_backward:
                return compile_fx(gm, example_inputs,
                                  config_patches={**config, "post_grad_custom_pre_pass": InlinePass(record_of)})
        except Exception as e:  # noqa: BLE001 - compilation never fails because of a kernel
            log.warning("hubcompile: compiling with the kernels launched by Inductor failed (%s: %s); compiling "
                        "again with them called through their ops", type(e).__name__, str(e)[:500])
            del RECORDS[before:]
            why_not = f"the compile with the kernels launched by Inductor failed ({type(e).__name__})"
    if "post_grad_custom_pre_pass" not in patches:
        config["post_grad_custom_pre_pass"] = InlinePass(record_of, why_not)
    return compile_fx(gm, example_inputs, config_patches=config)
