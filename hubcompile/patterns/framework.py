"""The pattern framework: families of source spellings, each rewritten to one op.

A ``Family`` (RMSNorm, SiLU-gate, ...) holds ``Spelling``s: eager functions written the
way model code writes the computation, with a replacement that calls a hubcompile op.
Each spelling is registered with Inductor's pattern matcher (``register_replacement``)
once per example dtype and per trace function: ``fwd_only`` for inference graphs and
``joint_fwd_bwd`` for training graphs, where the forward and its backward are replaced
together by the op and its autograd formula.

The matcher is literal (``x * x`` and ``x.pow(2)`` are different graphs, and so are the
dtype casts of fp32 and bf16 code), which is why each family lists many spellings.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import logging
from collections.abc import Callable, Sequence

import torch
from torch._inductor.pattern_matcher import (
    Match,
    PatternMatcherPass,
    fwd_only,
    joint_fwd_bwd,
    register_replacement,
)

# The families read nodes through these, and name the kernels of a match through those.
from ..fx_utils import calls, is_joint_graph, is_python_float, is_static, meta_val, op_args  # noqa: F401
from ..lowering.kernels import chosen_kernels, kernels_chosen, set_chosen_kernels  # noqa: F401
from . import lifted_scalars, trace_cache

log = logging.getLogger(__name__)

# A check returns None when the match is fine, else the reason it is not replaced.
Check = Callable[[Match], "str | None"]


class NotThisSpelling(str):
    """A check's reason saying the match is another computation that happens to have this
    spelling's graph (a rotation's final add taken for a residual add): it is not kept, as
    a refusal would be, but left to the later spellings that do fit, and not reported."""


@dataclasses.dataclass(frozen=True)
class Spelling:
    """One way model code writes a family's computation."""

    name: str
    search: Callable
    replace: Callable
    # Builds example inputs for one dtype combination (a tuple of dtypes).
    example_inputs: Callable[..., list]
    # Dtype combinations to trace: the casts in a trace depend on them.
    dtypes: Sequence[tuple[torch.dtype, ...]]
    # Python scalars of the search function, given magic values that appear nowhere
    # else so that the matcher captures them as arguments (Inductor's scalar_workaround).
    scalars: dict[str, float] = dataclasses.field(default_factory=dict)
    check: Check | None = None
    # Indices of example inputs that take gradients in the training trace.
    grad_inputs: Sequence[int] | None = None
    # The hubcompile op the replacement calls and its backward op (kernel resolution
    # keys), the match input whose device and dtype pick the kernel, and what else the
    # kernel must support (e.g. activation="silu").
    op: str = ""
    backward_op: str = ""
    anchor: str = "x"
    requirements: dict = dataclasses.field(default_factory=dict)
    # Dims of the anchor the numerical guard may cut to bound its cost (batch, sequence).
    shrink_dims: tuple[int, ...] = (0, 1)
    # Whether the guard checks a match whole when its inputs fit guards.numerical's budget:
    # False where the work grows faster than the inputs (attention's scores, the logits).
    guard_whole: bool = True
    # Rows, for a match too large to check whole: dims of the anchor along which the
    # outputs are independent problems (an output row depends on the same row of the
    # inputs only), so the guard can run the kernel at the real shape and compare sampled
    # rows with a reference computed on those rows alone. None: the dims of shrink_dims
    # but the last (the last dim, which kernels tile over, is never sampled).
    row_dims: tuple[int, ...] | None = None
    # {input: {its dim: the anchor's row dim it follows}} for inputs that do not broadcast
    # against the anchor (a conv weight's channels, attention's keys); {} for an input
    # with no rows (a weight every row reads). Inputs not named broadcast against the
    # anchor, aligned from the right, as elementwise code does.
    input_rows: dict[str, dict[int, int]] = dataclasses.field(default_factory=dict)
    # Elements of reference work per sampled row, from the inputs' shapes ({name: shape}),
    # where it is more than the anchor's row (attention's scores, the logits).
    row_cost: Callable[[dict], int] | None = None
    # For outputs reduced over the rows (a mean loss): (inputs, keep) -> inputs in which
    # the rows where ``keep`` (a bool tensor broadcastable to the anchor) is False add
    # nothing to any output, so the kernel's result at the real shape is the sample's.
    drop_rows: Callable[[dict, torch.Tensor], dict] | None = None
    # Reads the scalar arguments off a match where the matcher does not hand them over
    # (torch <= 2.11 leaves them out of match.kwargs).
    read_scalars: Callable[[Match], dict] | None = None
    # Draws the guard's random value for an input (name, shape, dtype, device, generator),
    # or None for the default (class indices must lie in [0, vocab), for example).
    random_input: Callable | None = None
    # What a kernel must support that only the match tells (rotary: whether cos/sin are
    # built with equal halves): {requirement: value}, added to ``requirements`` when the
    # kernels are chosen, and handed to ``random_input`` as keywords, so that the guard
    # draws inputs with the property the kernel was chosen for.
    match_requirements: Callable[[Match], dict] | None = None


@dataclasses.dataclass(frozen=True)
class Replacement:
    """One match replaced: the nodes it consumed, their source lines and the op it became."""

    family: str
    spelling: str
    op: str
    kernel: str
    backward_kernel: str
    training: bool  # a joint forward+backward match
    nodes: tuple[str, ...]
    sources: tuple[str, ...]  # "file:line  code" of the model code the nodes came from
    guard: object = None  # guards.GuardResult, when the guard ran


@dataclasses.dataclass
class Family:
    """A pattern family: its spellings in stages, earlier stages taking precedence
    (e.g. the fused residual-add + RMSNorm before plain RMSNorm)."""

    name: str
    description: str
    stages: list[list[Spelling]]
    # Register training (joint forward+backward) patterns too; False keeps Inductor's
    # backward (see rotary.py for why a family may want that).
    joint: bool = True
    # Memory-bound code that Inductor fuses with its neighbours at the copy ceiling: a
    # small match is left to it (option min_elements, ``_launch_bound``).
    fusible: bool = False
    # (stage index, "joint" or "fwd") -> its pass, traced on first use
    _passes: dict = dataclasses.field(default_factory=dict)
    # (spelling name, kernel spec) of each accepted match, in the order of acceptance.
    accepted: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    # (spelling, reason) for each match that a check refused.
    refused: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    refused_at: list[str] = dataclasses.field(default_factory=list)  # source line of each refused match
    # (spelling, kernel, GuardResult) of each numerical guard consulted, passed or not.
    guarded: list = dataclasses.field(default_factory=list)
    # What each accepted match consumed and what it became (the graph-diff report).
    replacements: list[Replacement] = dataclasses.field(default_factory=list)

    def passes(self, training: bool = True) -> list[PatternMatcherPass]:
        """The passes a graph needs, stage by stage: the forward-only patterns and, for a
        training (joint) graph, the joint forward+backward patterns before them. Each is
        traced on first use (or loaded from the pattern cache): joint traces are three
        quarters of the tracing time, and an inference compile never needs them."""
        keys = self._pass_keys(training)
        for i, kind in keys:
            if (i, kind) not in self._passes:
                self._passes[(i, kind)] = self.register_stage(i, kind)
        return [self._passes[key] for key in keys]

    def register_stage(self, stage: int, kind: str, cache_name: str | None = None) -> PatternMatcherPass:
        """A pass holding ``stage``'s spellings traced with ``kind`` ("joint" or "fwd"),
        from the pattern cache (entry ``cache_name``) where it has them, traced and added
        to it otherwise."""
        pm_pass = PatternMatcherPass(pass_name=f"hubcompile_{self.name}")
        name = cache_name or self._cache_name(stage, kind)
        cached = trace_cache.load(name)
        traced = self._register(stage, kind, pm_pass, cached)
        if traced:
            trace_cache.store(name, {**cached, **traced})
        return pm_pass

    def _pass_keys(self, training: bool) -> list[tuple[int, str]]:
        kinds = ("joint", "fwd") if training and self.joint else ("fwd",)
        return [(i, kind) for i in range(len(self.stages)) for kind in kinds]

    def untraced(self, training: bool) -> dict[str, list[str]]:
        """{pattern cache name: [keys]} of what ``passes(training)`` would trace now: the
        stages not registered yet that have no pattern cache file. No file is read, so
        asking costs nothing where the cache is filled; a file that lacks some of its
        stage's keys (a worker failed) has them traced at registration."""
        return {self._cache_name(i, kind): self.trace_keys(i) for i, kind in self._pass_keys(training)
                if (i, kind) not in self._passes and not trace_cache.has(self._cache_name(i, kind))}

    def _cache_name(self, stage: int, kind: str) -> str:
        return f"{self.name}-{stage}-{kind}"

    def trace_keys(self, stage: int) -> list[str]:
        """The pattern cache's key of each (spelling, dtypes) of ``stage``, in order."""
        return [_trace_key(spelling, dtypes) for spelling in self.stages[stage] for dtypes in spelling.dtypes]

    def _register(self, stage: int, kind: str, pm_pass: PatternMatcherPass, cached: dict,
                  only: set | None = None) -> dict:
        """Register ``stage``'s spellings for trace ``kind`` ("joint" or "fwd") in
        ``pm_pass``, their initial traces taken from ``cached`` where it has them; returns
        {key: traced} for those it traced. ``only``: the keys to register (a worker)."""
        trace_fn = joint_fwd_bwd if kind == "joint" else fwd_only
        traced = {}
        # joint_fwd_bwd registration does nothing under inference mode, and the trace
        # needs autograd: register outside of both.
        with torch.inference_mode(False), torch.enable_grad():
            for spelling in self.stages[stage]:
                for dtypes in spelling.dtypes:
                    key = _trace_key(spelling, dtypes)
                    if only is not None and key not in only:
                        continue
                    inputs = spelling.example_inputs(*dtypes)
                    if kind == "joint":
                        grads = spelling.grad_inputs
                        for i, t in enumerate(inputs):
                            if t.is_floating_point() and (grads is None or i in grads):
                                t.requires_grad_(True)
                    register, traced_by = trace_cache.register_replacement(
                        cached.get(key), traced, key, trace_fn, kind == "joint", spelling.search)
                    register(
                        spelling.search,
                        spelling.replace,
                        inputs,
                        traced_by,
                        pm_pass,
                        extra_check=functools.partial(self._check, spelling, kind == "joint"),
                        scalar_workaround=dict(spelling.scalars),
                        skip_duplicates=True,
                        **_pattern_name(f"{self.name}.{spelling.name}"),
                    )
        return traced

    def trace(self, cache_name: str, keys: list[str]) -> dict:
        """{key: traced} of the spellings ``keys`` of the stage and kind ``cache_name``
        names: what a worker process of ``trace_cache.trace_elsewhere`` does."""
        _, stage, kind = cache_name.rsplit("-", 2)
        return self._register(int(stage), kind, PatternMatcherPass(pass_name=f"hubcompile_{self.name}"), {}, set(keys))

    def _check(self, spelling: Spelling, training: bool, match: Match) -> bool:
        guard, chosen = None, ("reference", "reference")
        try:
            reason = spelling.check(match) if spelling.check else None
            if reason is None and self.fusible:
                reason = _launch_bound(match, self.cfg.min_elements)
            if reason is None:
                if spelling.match_requirements is not None:
                    spelling = for_match(spelling, spelling.match_requirements(match))
                reason, found = self._choose_kernels(spelling, match)
                if found is not None:
                    chosen = found
                    set_chosen_kernels(chosen)  # the replacement, traced next, reads them
            if reason is None and self.cfg.guard:
                reason, guard = self._guard(spelling, training, match, chosen)
        except Exception as e:  # noqa: BLE001 - a failing check keeps the original code
            reason = f"check failed: {type(e).__name__}: {e}"
            log.warning("hubcompile: %s %s: %s", self.name, spelling.name, reason)
        if isinstance(reason, NotThisSpelling):
            log.debug("%s: %s match is not one: %s", self.name, spelling.name, reason)
            return False
        if reason is not None:
            self.refused.append((spelling.name, reason))
            self.refused_at.append(next(filter(None, (source_line(n) for n in match.nodes)), ""))
            log.debug("%s: not replacing %s match: %s", self.name, spelling.name, reason)
            return False
        self.accepted.append((spelling.name, chosen[0]))
        self.replacements.append(Replacement(
            self.name, spelling.name, spelling.op, chosen[0], chosen[1], training,
            tuple(n.name for n in match.nodes if n.op == "call_function"),
            tuple(dict.fromkeys(filter(None, (source_line(n) for n in match.nodes)))), guard))
        return True

    def _guard(self, spelling: Spelling, training: bool, match: Match, chosen: tuple[str, str]):
        """Run the numerical guard on the chosen kernels: (the reason it failed or None,
        the guards.GuardResult)."""
        from ..guards import numerical as guards

        result = guards.check(spelling, match_values(spelling, match), chosen,
                              backward=training and self.cfg.guard_backward,
                              tolerances=self.cfg.tolerances_for(self.name))
        self.guarded.append((spelling.name, chosen[0], result))
        if result.passed:
            return None, result
        log.warning("hubcompile: %s %s: kernel %s failed its numerical guard, keeping the original code: %s",
                    self.name, spelling.name, chosen[0], result.summary())
        return f"guard failed for {chosen[0]}: {result.summary()}", result

    def _choose_kernels(self, spelling: Spelling, match: Match):
        """(reason it cannot be replaced or None, (kernel, backward kernel))."""
        from ..lowering import kernels
        from ..lowering.device import detect

        value = meta_val(match.kwargs[spelling.anchor])
        device = detect(value.device)
        overrides, trusted = self.cfg.kernel_overrides(), self.cfg.trusted_orgs
        # The graph's mode (a joint graph trains) picks a kernel mapping's entries, as
        # kernelize's mode does, and keeps Hub layers without a backward out of training.
        requirements = {**spelling.requirements, "training": self.training_graph}
        forward = kernels.choose(spelling.op, device, value.dtype, overrides, trusted, **requirements)
        if forward.spec is None:
            return f"no usable kernel for {device} {value.dtype}: " + "; ".join(forward.reasons), None
        backward = kernels.choose(spelling.backward_op, device, value.dtype, overrides, trusted, **requirements)
        # A forward-only kernel (most Hub kernels) still trains: the reference runs backward.
        return None, (forward.spec, backward.spec or "reference")

    def apply(self, graph: torch.fx.Graph, cfg) -> int:
        """Rewrite every match in ``graph`` under settings ``cfg``; returns the number replaced."""
        self.cfg = cfg
        self.training_graph = is_joint_graph(graph)
        self.accepted.clear()
        self.refused.clear()
        self.refused_at.clear()
        self.guarded.clear()
        self.replacements.clear()
        passes = self.passes(self.training_graph)
        # Under dynamic shapes: lifted float scalars (lifted_scalars.py)
        if self.training_graph:
            lifted_scalars.merge_conversions(graph)
        with lifted_scalars.retraces_without_restart(graph):
            return sum(p.apply(graph) for p in passes)


class DynamoGraphFamily:
    """A family that rewrites Dynamo's graph (before AOTAutograd) node by node instead of
    through the pattern matcher, keeping the same records for the report. A subclass
    names the calls a match ends in (``anchors``), finds the match around one (``find``:
    (match, None), (None, why it is kept), or (None, None) where it is no match at all)
    and replaces it (``replace``: None, or why it kept it)."""

    name: str
    description: str
    anchors: tuple  # functions or tensor-method names (fx_utils.calls)
    anchor_name: str  # what a refusal is recorded as (the node the match starts from)

    def __init__(self):
        self.accepted, self.refused, self.refused_at, self.guarded, self.replacements = [], [], [], [], []

    def applies(self, cfg) -> bool:
        """Whether the settings ask for this family's matches at all."""
        return True

    def find(self, node):
        raise NotImplementedError

    def replace(self, gm: torch.fx.GraphModule, match) -> str | None:
        raise NotImplementedError

    def kept(self, anchor, reason: str) -> None:
        """Record a match left as it was, and why."""
        self.refused.append((self.anchor_name, reason))
        self.refused_at.append(source_line(anchor) or "")
        log.info("hubcompile: kept a %s match: %s", self.name, reason)

    def apply(self, gm: torch.fx.GraphModule, cfg) -> int:
        """Replace every match in ``gm``; returns how many."""
        self.cfg = cfg
        for records in (self.accepted, self.refused, self.refused_at, self.guarded, self.replacements):
            records.clear()
        if not self.applies(cfg):
            return 0
        count = 0
        for anchor in [n for n in gm.graph.nodes if calls(n, *self.anchors)]:
            try:
                match, reason = self.find(anchor)
                if match is None and reason is None:
                    continue
                if reason is None:
                    reason = self.replace(gm, match)
            except Exception as e:  # noqa: BLE001 - a failing match keeps the original code
                reason = f"check failed: {type(e).__name__}: {e}"
                log.warning("hubcompile: %s: %s", self.name, reason)
            if reason is None:
                count += 1
            else:
                self.kept(anchor, reason)
        if count:
            gm.graph.lint()
            gm.recompile()
        return count


def _trace_key(spelling: Spelling, dtypes) -> str:
    return f"{spelling.name}:{','.join(map(str, dtypes))}"


def for_match(spelling: Spelling, requirements: dict) -> Spelling:
    """``spelling`` as one match needs it: with the match's requirements, which its guard's
    random inputs follow (the guard's cache is keyed on the requirements too)."""
    if not requirements:
        return spelling
    draw = spelling.random_input
    return dataclasses.replace(spelling, requirements={**spelling.requirements, **requirements},
                               random_input=functools.partial(draw, **requirements) if draw is not None else None)


def _pattern_name(name: str) -> dict:
    # register_replacement takes pattern_name from torch 2.12 on; 2.11 does not.
    return {"pattern_name": name} if "pattern_name" in inspect.signature(register_replacement).parameters else {}


# ------------------------------------------------------------- helpers for checks


def norm_eps(match: Match):
    """eps of a norm's match. torch <= 2.11 hands the check a match without the scalar
    arguments, so read it off the graph there: the ``var + eps`` under the rsqrt."""
    if "eps" in match.kwargs:
        return match.kwargs["eps"]
    for node in match.nodes:
        if node.target == torch.ops.aten.rsqrt.default:
            return node.args[0].args[1]
    raise KeyError("eps")


LAUNCH_BOUND_DEVICES = ("cuda", "xpu")


def _launch_bound(match: Match, min_elements: int) -> str | None:
    """Why ``match`` is left to Inductor as bound by its kernel's launch, or None.

    On a GPU each kernel costs a launch (measured on an H200: 9 us for one of Inductor's,
    10 us for a bundled kernel that Inductor launches, bench/results/h200/2026-12-04),
    while a bf16 tensor of 2^18 elements moves in about 0.25 us. Below that size a
    replacement can save no device time, and it costs launches: Inductor fuses the
    same code with its neighbours (the residual add, the q and k rotations, the cast).
    Decode steps are made of such matches. Under CUDA graphs too: the replay takes the
    host out, but each kernel still costs its launch on the GPU and the lost fusions
    stay lost (decode under reduce-overhead on an H100: 0.97x Inductor at batch 1, 0.98x
    at 8 with the 81 small matches of a token replaced). With symbolic sizes the size is
    unknown: there the match is replaced."""
    tensors = [meta_val(v) for v in match.kwargs.values() if isinstance(v, torch.fx.Node)]
    return launch_bound([t for t in tensors if isinstance(t, torch.Tensor)], min_elements)


def launch_bound(tensors, min_elements: int) -> str | None:
    """``_launch_bound`` on a match's input tensors (fake tensors), for families that
    match without the pattern matcher."""
    if not min_elements or not tensors:
        return None
    if tensors[0].device.type not in LAUNCH_BOUND_DEVICES or not is_static(tensors):
        return None
    largest = max(t.numel() for t in tensors)
    if largest >= min_elements:
        return None
    return (f"launch-bound: {largest} elements, under min_elements={min_elements}; "
            "Inductor fuses it with its neighbours (options={'min_elements': 0} replaces it anyway)")


def match_values(spelling: Spelling, match: Match) -> dict:
    """Each parameter of the spelling's search function -> the match's value for it: the
    tensor metadata (a fake tensor) of a node, or a Python scalar."""
    values = {}
    read = None
    for name in inspect.signature(spelling.search).parameters:
        if name in match.kwargs:
            value = match.kwargs[name]
        elif name in spelling.scalars:
            read = read if read is not None else (spelling.read_scalars(match) if spelling.read_scalars else {})
            value = read.get(name, spelling.scalars[name])
        else:
            raise KeyError(f"match has no value for {name!r}")
        values[name] = meta_val(value)
    return values


def source_line(node) -> str | None:
    """``file:line  code`` of the innermost frame in the node's stack trace."""
    trace = node.meta.get("stack_trace") if isinstance(node, torch.fx.Node) else None
    if not trace:
        return None
    lines = trace.strip().splitlines()
    for i in range(len(lines) - 1, -1, -1):
        line = lines[i].strip()
        if line.startswith("File "):
            parts = line.split('"')
            where = f"{parts[1].rsplit('/', 1)[-1]}:{line.split('line ')[1].split(',')[0]}" if len(parts) > 2 else line
            code = lines[i + 1].strip() if i + 1 < len(lines) else ""
            return f"{where}  {code}"
    return None


def same_device(*nodes) -> bool:
    devices = {meta_val(n).device for n in nodes if isinstance(meta_val(n), torch.Tensor)}
    return len(devices) <= 1
