"""The performance guard: a graph keeps hubcompile's replacements, family by family, only
where they make it faster than plain Inductor, or as fast with a lower memory peak.

A replaced op is opaque to Inductor: it loses the fusions Inductor would have made around
it, and each call costs host time. An isolated timing of the matched subgraph sees
neither, so the guard times whole variants of the graph Dynamo hands over, on the inputs
of its first call (forward, and forward+backward for a training graph, the gradients taken
with ``torch.autograd.grad`` so no ``.grad`` changes). The timing waits for the first call:
inside the compile, a training graph's backward cannot run yet.

The variants and the search (at most 3 + F compiles for F families with replacements):
  1. plain Inductor (P) and all of hubcompile's families (H), compiled at the compile;
     if H beats P beyond the noise, H is kept;
  2. otherwise, for a graph of static shapes with two families or more, H without each
     family f (H-f), each compiled at the first call and timed beside P and H: a family
     whose removal makes the graph faster beyond the noise loses its place;
  3. two such families or more: H without all of them, timed beside P and the best so far.
(A graph of dynamic shapes is compiled under Dynamo's shape environment, which the first
call no longer has: it is decided between P and H only.)

Timing, as the user runs it: each variant runs a few times first (the allocator warm,
lazy compiles done), then rounds that time every variant once each, interleaved, a
sample being enough back-to-back calls to last about ``SAMPLE_MS`` (host time included:
a host-bound graph is slow for the user too). A variant's ratio is the median over the
rounds of its time over P's time in the same round (paired, so drift cancels and an
outlier round is dropped by the median); its noise is half the interquartile range of
those ratios, at least ``NOISE_FLOOR``. The peak memory of one call of each variant is
measured after the timing (CUDA; None elsewhere).

The choice: the variants within the noise (plus ``max_slowdown``, a user's price for
memory) of the fastest are acceptable; of those, the one with a lower peak than P (or
than the fastest, where P is not acceptable) by at least ``PEAK_MARGIN`` is kept;
otherwise P where it is acceptable (a tie goes to Inductor), otherwise the fastest.

Graphs that mutate their inputs (a static KV cache, an optimizer step) are timed on
copies of the mutated inputs, put back to the first call's values before every call (a
cache's length counter would otherwise run past the cache), the copying's own time
taken off; the random generators are restored after the timing, so the user's state is
what it would have been without the guard. The guard stands aside
(recorded as a decision that ``explain()`` shows) under CUDA graphs (timing would record
graphs), in distributed jobs (ranks would have to agree) and where a mutated tensor is
not an input it can copy. Any error in the guard keeps hubcompile's variant.

Decisions are cached in ``$HUBCOMPILE_CACHE_DIR/perf_guard.json`` (default
``~/.cache/hubcompile``), keyed by the device's name, the torch version, hubcompile's
settings (the guard's included), sources and kernels, the graph's code and the shapes,
strides and dtypes of its inputs. With a cached decision only the chosen variant is
compiled, and nothing is timed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from ..lowering.disk_cache import DiskCache

log = logging.getLogger(__name__)

CHOICES = ("auto", "on", "off")
WARMUP = 3  # untimed calls of each variant
SAMPLE_MS = 2.0  # a sample is enough back-to-back calls to last about this long
MAX_CALLS_PER_SAMPLE = 50
MIN_ROUNDS, MAX_ROUNDS = 7, 21
STAGE_BUDGET_S = 3.0  # rounds stop after this (once MIN_ROUNDS are done)
NOISE_FLOOR = 0.005  # timings closer than 0.5% are a tie, however quiet the machine
PEAK_MARGIN = 0.01  # a peak lower by less than 1% (or 1 MiB) is no memory win
PLAIN, HUB = "inductor", "hubkernels"


@dataclasses.dataclass
class Variant:
    """One compiled variant of a graph: plain Inductor, or hubcompile without ``dropped``."""

    name: str  # "inductor", "hubkernels" or "hubkernels-<family>[-<family>...]"
    fn: Callable
    families: tuple[str, ...] = ()  # the families with replacements in it
    dropped: tuple[str, ...] = ()  # families the guard left out
    records: list = dataclasses.field(default_factory=list)  # its GraphRecords

    @property
    def plain(self) -> bool:
        return self.name == PLAIN


@dataclasses.dataclass
class Timing:
    """One variant's steady-state timing against P's, from interleaved rounds."""

    ms: float  # median ms of one call
    ratio: float  # median over rounds of (this variant's time / P's time)
    noise: float  # half the interquartile range of those ratios (at least NOISE_FLOOR)
    peak: int | None  # bytes above what was allocated before one call, or None


@dataclasses.dataclass
class Decision:
    keep: str  # "hubkernels" or "inductor"; "aside" where the guard did not decide
    source: str  # "measured", "cache" or "aside"
    training: bool
    dropped: tuple[str, ...] = ()  # families given up, the rest kept
    speedup: float | None = None  # predicted: Inductor's time / the kept variant's time
    noise: float | None = None
    timings: dict[str, Timing] = dataclasses.field(default_factory=dict)  # of the last stage
    reason: str = ""  # why it stood aside, or what made the choice
    copied: int = 0  # mutated inputs the variants were timed on copies of

    @property
    def hubkernels_ms(self) -> float | None:
        return self.timings[HUB].ms if HUB in self.timings else None

    @property
    def inductor_ms(self) -> float | None:
        return self.timings[PLAIN].ms if PLAIN in self.timings else None

    def describe(self) -> str:
        if self.keep == "aside":
            return f"stood aside: {self.reason}"
        what = ("kept plain Inductor" if self.keep == PLAIN else
                f"kept the replacements but {', '.join(self.dropped)}" if self.dropped else "kept the replacements")
        details = [f"{'forward+backward' if self.training else 'forward'}", self.source]
        if self.speedup is not None:
            details.insert(0, f"predicted {self.speedup:.3f}x Inductor, noise {self.noise:.1%}")
        if self.timings:
            details.append("; ".join(_describe_timing(name, t) for name, t in self.timings.items()))
        if self.copied:
            details.append(f"timed on copies of the {self.copied} input(s) the graph writes")
        if self.reason:
            details.append(self.reason)
        return f"{what} ({', '.join(details)})"

    def to_dict(self) -> dict:
        return {"keep": self.keep, "source": self.source, "training": self.training, "dropped": list(self.dropped),
                "speedup": self.speedup, "noise": self.noise, "reason": self.reason, "copied": self.copied,
                "timings": {k: dataclasses.asdict(t) for k, t in self.timings.items()}}


def _describe_timing(name: str, t: Timing) -> str:
    peak = f", peak {t.peak / 2**20:.1f} MiB" if t.peak is not None else ""
    return f"{name} {t.ms:.3f} ms{peak}"


# Every decision taken in this process, in order (the explain report reads it).
DECISIONS: list[Decision] = []


# ------------------------------------------------------------------ when it applies


def why_not(setting: str, example_inputs, gm: torch.fx.GraphModule, cudagraphs: bool) -> str | None:
    """None when the guard applies to this compile, else why it stands aside."""
    if setting == "off":
        return "perf_guard is off"
    devices = {x.device.type for x in example_inputs if isinstance(x, torch.Tensor)}
    if setting == "auto" and "cuda" not in devices:
        return f"perf_guard='auto' decides on CUDA only (devices: {', '.join(sorted(devices)) or 'none'})"
    if cudagraphs:
        return "CUDA graphs are on: running the graph at compile time would record graphs"
    if torch.distributed.is_available() and torch.distributed.is_initialized() \
            and torch.distributed.get_world_size() > 1:
        # Ranks could decide differently, or one find a cached decision and run the graph
        # fewer times than another: collectives in the graph would then not pair up.
        return "a distributed job: the ranks would have to agree on each decision"
    attrs = _mutated(gm)[1]
    if attrs:
        return f"the graph mutates module state that is not an input ({', '.join(attrs[:3])}): it cannot be copied"
    return None


def stood_aside(reason: str, example_inputs) -> None:
    """Record (and log) that the guard did not decide for a graph it would have guarded.
    Where the setting itself leaves the graph out ("off", or "auto" off CUDA) only a debug
    line says so: the guard was not asked."""
    if reason == "perf_guard is off" or reason.startswith("perf_guard='auto'"):
        log.debug("hubcompile: perf guard not applied: %s", reason)
        return
    DECISIONS.append(Decision("aside", "aside", is_training(example_inputs), reason=reason))
    log.info("hubcompile: perf guard stood aside: %s", reason)


def _mutated(gm: torch.fx.GraphModule) -> tuple[list[int], list[str]]:
    """(indices of the placeholders that an in-place op, a setitem or a copy_ writes,
    names of written get_attr tensors): Dynamo's graphs keep such writes as they are."""
    placeholders = {n: i for i, n in enumerate(n for n in gm.graph.nodes if n.op == "placeholder")}
    inputs, attrs = [], []
    for node in gm.graph.nodes:
        if node.op not in ("call_function", "call_method") or not node.args:
            continue
        target = node.target
        name = target if isinstance(target, str) else getattr(target, "__name__", str(target))
        if name.startswith("_foreach_") and name.endswith("_"):  # an optimizer's lists
            written = [a for a in node.args[0]] if isinstance(node.args[0], (list, tuple)) else []
        elif (name.endswith("_") and not name.endswith("__")) or name in ("setitem", "copy_"):
            written = [node.args[0]]
        else:
            continue
        for arg in written:
            if arg in placeholders:
                inputs.append(placeholders[arg])
            elif isinstance(arg, torch.fx.Node) and arg.op == "get_attr":
                attrs.append(str(arg.target))
    return sorted(set(inputs)), attrs


def mutated_inputs(gm: torch.fx.GraphModule) -> list[int]:
    return _mutated(gm)[0]


def signature(gm: torch.fx.GraphModule, example_inputs, pass_key: str) -> str:
    inputs = []
    for x in example_inputs:
        if isinstance(x, torch.Tensor):
            inputs.append([list(map(int, x.shape)), list(map(int, x.stride())), str(x.dtype), x.device.type,
                           bool(x.requires_grad)])
        else:
            inputs.append(repr(x))
    device = next((x.device for x in example_inputs if isinstance(x, torch.Tensor)), torch.device("cpu"))
    parts = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else device.type,
             "torch": torch.__version__, "pass": pass_key, "graph": gm.code, "inputs": inputs,
             "grad": torch.is_grad_enabled()}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def is_training(example_inputs) -> bool:
    return torch.is_grad_enabled() and any(isinstance(x, torch.Tensor) and x.requires_grad for x in example_inputs)


def is_static(example_inputs) -> bool:
    """Whether the graph's inputs have concrete shapes (a variant can then be compiled
    outside Dynamo's compile)."""
    from torch.fx.experimental.symbolic_shapes import free_symbols

    return not any(isinstance(x, torch.SymInt | torch.SymFloat) or
                   (isinstance(x, torch.Tensor) and free_symbols(x)) for x in example_inputs)


# ------------------------------------------------------------------------ running


def _flat_tensors(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in _flat_tensors(o)]
    return []


def run_once(fn, inputs, training: bool, restore: Callable[[], None] | None = None) -> None:
    if restore is not None:
        restore()
    out = fn(*inputs)
    if training:
        outs = [o for o in _flat_tensors(out) if o.requires_grad]
        # A scalar output is the loss: a training step differentiates only it, and a
        # gradient for the other outputs (the logits beside it) would time other work.
        outs = [o for o in outs if o.numel() == 1] or outs
        wanted = [x for x in inputs if isinstance(x, torch.Tensor) and x.requires_grad]
        if outs and wanted:
            # autograd.grad, not backward: the parameters' .grad must not change
            torch.autograd.grad(outs, wanted, [torch.ones_like(o) for o in outs], allow_unused=True)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def sample_ms(variant: Variant, inputs, training: bool, calls: int,
              restore: Callable[[], None] | None = None) -> float:
    """Wall ms per call of ``calls`` back-to-back calls, each after ``restore`` (tests
    replace this)."""
    device = _device(inputs)
    _sync(device)
    begin = time.perf_counter()
    for _ in range(calls):
        run_once(variant.fn, inputs, training, restore)
    _sync(device)
    return (time.perf_counter() - begin) * 1e3 / calls


def restore_ms(restore: Callable[[], None], inputs, calls: int) -> float:
    """Wall ms of one ``restore`` alone, timed as sample_ms times a call."""
    device = _device(inputs)
    _sync(device)
    begin = time.perf_counter()
    for _ in range(calls):
        restore()
    _sync(device)
    return (time.perf_counter() - begin) * 1e3 / calls


def peak_bytes(variant: Variant, inputs, training: bool, restore: Callable[[], None] | None = None) -> int | None:
    """Bytes allocated at the peak of one call above what was allocated before it; None
    off CUDA (tests replace this)."""
    device = _device(inputs)
    if device.type != "cuda":
        return None
    if restore is not None:
        restore()
    _sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    run_once(variant.fn, inputs, training)
    _sync(device)
    return torch.cuda.max_memory_allocated(device) - before


def _device(inputs) -> torch.device:
    return next((x.device for x in inputs if isinstance(x, torch.Tensor)), torch.device("cpu"))


def time_variants(variants: list[Variant], inputs, training: bool,
                  restore: Callable[[], None] | None = None) -> dict[str, Timing]:
    """Interleaved steady-state timing of ``variants`` (the first is P). ``restore``
    puts the inputs a graph writes back as they were at the first call, before every
    call: a graph that advances a counter in place (a static KV cache's length) would
    otherwise be timed at positions the user never reaches, and index out of bounds.
    Its own time is measured in each round and taken off every sample."""
    extra = {"restore": restore} if restore is not None else {}
    for v in variants:
        for _ in range(WARMUP):
            run_once(v.fn, inputs, training, restore)
    # Each variant's own number of calls per sample: a slow one is not run 50 times.
    calls = {v.name: max(1, min(MAX_CALLS_PER_SAMPLE,
                                math.ceil(SAMPLE_MS / max(sample_ms(v, inputs, training, 1, **extra), 1e-3))))
             for v in variants}
    samples: dict[str, list[float]] = {v.name: [] for v in variants}
    begin = time.perf_counter()
    for r in range(MAX_ROUNDS):
        if r >= MIN_ROUNDS and time.perf_counter() - begin > STAGE_BUDGET_S:
            break
        overhead = restore_ms(restore, inputs, max(calls.values())) if restore is not None else 0.0
        # rotate the order: no variant always runs first (after another's frees)
        for v in variants[r % len(variants):] + variants[:r % len(variants)]:
            ms = sample_ms(v, inputs, training, calls[v.name], **extra) - overhead
            samples[v.name].append(max(ms, 1e-6))
    plain = samples[variants[0].name]
    timings = {}
    for v in variants:
        ratios = [s / p for s, p in zip(samples[v.name], plain)]
        q1, _, q3 = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else (ratios[0],) * 3
        noise = 0.0 if v is variants[0] else max(NOISE_FLOOR, (q3 - q1) / 2)
        timings[v.name] = Timing(statistics.median(samples[v.name]), statistics.median(ratios), noise, None)
    for v in variants:
        timings[v.name].peak = peak_bytes(v, inputs, training, **extra)
    return timings


def pick(timings: dict[str, Timing], max_slowdown: float = 0.0) -> tuple[str, str]:
    """(the variant to keep, why), by the rule in the module's docstring."""
    fastest = min(timings, key=lambda n: timings[n].ratio)
    best = timings[fastest]

    def acceptable(t: Timing) -> bool:
        return t.ratio <= best.ratio * (1 + max(t.noise, best.noise)) + max_slowdown

    ok = [n for n, t in timings.items() if acceptable(t)]
    reference = PLAIN if PLAIN in ok else fastest
    ref_peak = timings[reference].peak
    peaks = [n for n in ok if timings[n].peak is not None and ref_peak is not None]
    if peaks:
        lowest = min(peaks, key=lambda n: timings[n].peak)
        margin = max(PEAK_MARGIN * ref_peak, 2**20)
        if timings[lowest].peak < ref_peak - margin:
            return lowest, (f"{lowest} within the noise of the fastest, with a lower peak "
                            f"({timings[lowest].peak / 2**20:.1f} MiB against {ref_peak / 2**20:.1f})")
    if reference == PLAIN:
        return PLAIN, "" if fastest == PLAIN else f"{fastest} is not faster beyond the noise"
    return fastest, ""


# -------------------------------------------------------------------- the decision


def choose(signature_key: str, example_inputs, compile_variant, max_slowdown: float = 0.0,
           mutated: list[int] = ()):
    """The compiled callable to use. ``compile_variant(dropped)`` compiles hubcompile
    without the families in ``dropped`` (a Variant), ``compile_variant(None)`` plain
    Inductor. A cached decision compiles one variant; a graph with nothing replaced is
    not timed. Otherwise P and H are compiled now and decided at the first call."""
    training = is_training(example_inputs)
    cached = _DISK.get(signature_key)
    if isinstance(cached, str):  # written by an older hubcompile
        cached = {"keep": cached, "dropped": []}
    if isinstance(cached, dict) and cached.get("keep") in (HUB, PLAIN):
        dropped = tuple(cached.get("dropped", ()))
        decision = Decision(cached["keep"], "cache", training, dropped, cached.get("speedup"), cached.get("noise"))
        DECISIONS.append(decision)
        log.info("hubcompile: perf guard %s", decision.describe())
        if cached["keep"] == PLAIN:
            return compile_variant(None).fn
        variant = compile_variant(dropped)
        _publish(variant)
        return variant.fn
    hub = compile_variant(())
    if not hub.families:
        _publish(hub)
        return hub.fn
    return _DecideAtFirstCall(signature_key, hub, compile_variant(None), compile_variant, example_inputs,
                              max_slowdown, list(mutated))


def _publish(variant: Variant, hub: Variant | None = None) -> None:
    """The kept variant's records join RECORDS, naming the families the guard dropped.
    Plain Inductor kept: hubcompile's records, every family in them dropped."""
    from ..records import RECORDS

    if variant.plain:
        if hub is None:
            return
        for record in hub.records:
            record.dropped.update({f: "plain Inductor was as fast or faster" for f, n in record.replaced.items() if n})
            record.replaced = {f: 0 for f in record.replaced}
            record.replacements, record.spellings = {}, {}
            RECORDS.append(record)
        return
    for record in variant.records:
        record.dropped.update({f: "the graph was faster without it" for f in variant.dropped})
        RECORDS.append(record)


class _DecideAtFirstCall:
    """Times the variants on the first call's inputs, keeps the chosen one for every call."""

    def __init__(self, key: str, hub: Variant, plain: Variant, compile_variant, example_inputs,
                 max_slowdown: float, mutated: list[int]):
        self.key, self.hub, self.plain, self.compile_variant = key, hub, plain, compile_variant
        self.static = is_static(example_inputs)
        self.max_slowdown = max_slowdown
        self.mutated = mutated  # indices of the inputs the graph writes
        self.chosen = None

    def __call__(self, *args):
        if self.chosen is None:
            self.chosen = self._decide(list(args))
        return self.chosen(*args)

    def _decide(self, args):
        training = is_training(args)
        # The timing runs build their own autograd graphs: detached inputs keep their
        # backward from reaching (and freeing) the graph of the code that produced the
        # inputs, which the caller's own backward still needs. Mutated inputs are copies.
        inputs = [_scratch(x) if i in self.mutated else
                  x.detach().requires_grad_(x.requires_grad) if isinstance(x, torch.Tensor) else x
                  for i, x in enumerate(args)]
        versions = {i: x._version for i, x in enumerate(args) if isinstance(x, torch.Tensor) and i not in self.mutated}
        restore = _restorer([(inputs[i], args[i]) for i in self.mutated if isinstance(args[i], torch.Tensor)])
        rng = _rng_state(inputs)
        try:
            decision, chosen = self._search(inputs, training, restore)
        except Exception as e:  # noqa: BLE001 - the guard never breaks a run
            log.warning("hubcompile: the performance guard could not time this graph (%s: %s); keeping the "
                        "replacements", type(e).__name__, e)
            _publish(self.hub)
            return self.hub.fn
        finally:
            _set_rng_state(rng)
        changed = [i for i, v in versions.items() if args[i]._version != v]
        if changed:
            log.warning("hubcompile: the performance guard's runs wrote input(s) %s of a graph that did not look "
                        "like it mutates them; set perf_guard='off' if its state matters", changed)
        DECISIONS.append(decision)
        _DISK.put(self.key, decision.to_dict() | {"timings": {}})
        log.info("hubcompile: perf guard %s", decision.describe())
        if decision.keep == PLAIN:
            log.warning("hubcompile: the replacements did not make this graph faster than plain Inductor (%s); "
                        "using Inductor's code for it (perf_guard='off' keeps them)", decision.describe())
        elif decision.dropped:
            log.warning("hubcompile: %s made this graph slower; using Inductor's code for them (%s)",
                        ", ".join(decision.dropped), decision.describe())
        _publish(chosen, self.hub)
        self.hub = self.plain = self.compile_variant = None
        return chosen.fn

    def _search(self, inputs, training: bool, restore) -> tuple[Decision, Variant]:
        variants = {PLAIN: self.plain, HUB: self.hub}
        timings = time_variants([self.plain, self.hub], inputs, training, restore)
        reason = ""
        clear_win = timings[HUB].ratio < 1 - timings[HUB].noise
        families = self.hub.families
        if not clear_win and len(families) >= 2:
            if not self.static:
                reason = "dynamic shapes: decided between Inductor and all the replacements only"
            else:
                # stage 2: H without each family
                for family in families:
                    v = self.compile_variant((family,))
                    variants[v.name] = v
                timings = time_variants(list(variants.values()), inputs, training, restore)
                hub = timings[HUB]
                helping = [f for f in families
                           if timings[f"{HUB}-{f}"].ratio < hub.ratio * (1 - max(hub.noise, timings[f"{HUB}-{f}"].noise))]
                if len(helping) >= 2:  # stage 3: without all of them
                    combined = self.compile_variant(tuple(helping))
                    best = min((n for n in timings if n != PLAIN), key=lambda n: timings[n].ratio)
                    variants = {PLAIN: self.plain, best: variants[best], combined.name: combined}
                    timings = time_variants(list(variants.values()), inputs, training, restore)
        name, why = pick(timings, self.max_slowdown)
        chosen = variants[name]
        t = timings[name]
        keep = PLAIN if chosen.plain else HUB
        decision = Decision(keep, "measured", training, chosen.dropped, 1 / t.ratio, max(t.noise, NOISE_FLOOR),
                            timings, "; ".join(r for r in (why, reason) if r), len(self.mutated))
        return decision, chosen


def _scratch(x):
    """A copy with the same strides, for a graph to write instead of the user's tensor."""
    if not isinstance(x, torch.Tensor):
        return x
    copy = torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device=x.device)
    with torch.no_grad():
        copy.copy_(x)
    return copy.requires_grad_(x.requires_grad)


def _restorer(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> Callable[[], None] | None:
    """Copies each (scratch, original) pair's original back into its scratch copy; None
    when the graph writes no input."""
    if not pairs:
        return None

    def restore() -> None:
        with torch.no_grad():
            for scratch, original in pairs:
                scratch.copy_(original)

    return restore


def _rng_state(inputs):
    cuda = [d for d in {x.device for x in inputs if isinstance(x, torch.Tensor)} if d.type == "cuda"]
    return torch.random.get_rng_state(), {d: torch.cuda.get_rng_state(d) for d in cuda}


def _set_rng_state(state) -> None:
    cpu, cuda = state
    torch.random.set_rng_state(cpu)
    for device, s in cuda.items():
        torch.cuda.set_rng_state(s, device)


# ------------------------------------------------------------------------ the cache

_DISK = DiskCache("perf_guard.json", "perf guard cache", "graphs will be timed again")


def cache_path() -> Path:
    return _DISK.path()


def clear_cache(disk: bool = False) -> None:
    """Forget the decisions read from disk and this process's list (the file too with ``disk=True``)."""
    DECISIONS.clear()
    _DISK.clear(disk)
