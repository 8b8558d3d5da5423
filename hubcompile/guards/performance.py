"""The performance guard: keep hubcompile's replacements in a graph only where the graph
runs faster with them than Inductor runs it alone.

A replaced op is opaque to Inductor: it loses the fusions Inductor would have made around
it (a residual add, a cast), and each call costs host time. An isolated timing of the
matched subgraph cannot see either, so the guard decides on the whole graph Dynamo hands
over: it compiles it twice, with hubcompile's passes and with plain Inductor, runs each on
the inputs of the graph's first call (forward, and forward+backward for a training graph, where
the gradients are taken with ``torch.autograd.grad`` so no ``.grad`` changes), and keeps
the faster. A tie goes to Inductor. (The timing waits for the first call: inside the
compile, a training graph's backward cannot run yet.)

The decision is cached in ``$HUBCOMPILE_CACHE_DIR/perf_guard.json`` (default
``~/.cache/hubcompile``), keyed by the device's name, the torch version, hubcompile's
settings, sources and kernels (the pass's cache key), the graph's code and the shapes,
strides and dtypes of its inputs. With a cached decision only the chosen variant is
compiled, so the guard costs one extra compile and a few runs the first time a graph is
seen, and nothing after.

``perf_guard``: "auto" (the default: on for graphs on CUDA), "on" (any device) or "off".
The guard stands aside (with one debug log line) where running the graph more often
could change state or hang: a graph that mutates its inputs, CUDA graphs
(reduce-overhead), a distributed job. Any error in the guard keeps hubcompile's variant,
as without it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import statistics
import time
from pathlib import Path

import torch

from ..lowering.disk_cache import DiskCache

log = logging.getLogger(__name__)

CHOICES = ("auto", "on", "off")
# Timing: warm-up runs, then a fixed number of timed runs (the median is kept).
WARMUP = 3
RUNS = 10


@dataclasses.dataclass
class Decision:
    keep: str  # "hubkernels" or "inductor"
    hubkernels_ms: float | None
    inductor_ms: float | None
    source: str  # "measured" or "cache"
    training: bool

    def describe(self) -> str:
        times = ""
        if self.hubkernels_ms is not None:
            times = f" (hubkernels {self.hubkernels_ms:.3f} ms, Inductor {self.inductor_ms:.3f} ms"
            times += f", {'forward+backward' if self.training else 'forward'}, {self.source})"
        return f"kept {'the replacements' if self.keep == 'hubkernels' else 'plain Inductor'}{times}"


# Every decision taken in this process, in order (the explain report reads it).
DECISIONS: list[Decision] = []


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
    mutated = _mutated_inputs(gm)
    if mutated:
        return f"the graph mutates its inputs ({', '.join(mutated[:3])}): running it twice would change state"
    return None


def _mutated_inputs(gm: torch.fx.GraphModule) -> list[str]:
    """Placeholders that an in-place op or a setitem writes (Dynamo's graphs keep them)."""
    placeholders = {n for n in gm.graph.nodes if n.op == "placeholder"}
    names = []
    for node in gm.graph.nodes:
        target = node.target
        name = target if isinstance(target, str) else getattr(target, "__name__", str(target))
        inplace = (name.endswith("_") and not name.endswith("__")) or name in ("setitem", "copy_")
        if node.op in ("call_function", "call_method") and inplace and node.args and node.args[0] in placeholders:
            names.append(node.args[0].name)
    return names


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


def _flat_tensors(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in _flat_tensors(o)]
    return []


def _run_once(fn, example_inputs, training: bool) -> None:
    out = fn(*example_inputs)
    if training:
        outs = [o for o in _flat_tensors(out) if o.requires_grad]
        # A scalar output is the loss: a training step differentiates only it, and a
        # gradient for the other outputs (the logits beside it) would time other work.
        outs = [o for o in outs if o.numel() == 1] or outs
        wanted = [x for x in example_inputs if isinstance(x, torch.Tensor) and x.requires_grad]
        if outs and wanted:
            # autograd.grad, not backward: the parameters' .grad must not change
            torch.autograd.grad(outs, wanted, [torch.ones_like(o) for o in outs], allow_unused=True)


def measure(fn, example_inputs, training: bool) -> float:
    """Median ms of one call (and backward in training), CUDA events on CUDA."""
    device = next((x.device for x in example_inputs if isinstance(x, torch.Tensor)), torch.device("cpu"))
    cuda = device.type == "cuda"
    for _ in range(WARMUP):
        _run_once(fn, example_inputs, training)
    times = []
    for _ in range(RUNS):
        if cuda:
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            _run_once(fn, example_inputs, training)
            end.record()
            end.synchronize()
            times.append(begin.elapsed_time(end))
        else:
            begin = time.perf_counter()
            _run_once(fn, example_inputs, training)
            times.append((time.perf_counter() - begin) * 1e3)
    return statistics.median(times)


def choose(signature_key: str, example_inputs, compile_hub, compile_plain):
    """The compiled callable to use. ``compile_hub()`` gives (callable, number of
    replacements); ``compile_plain()`` a callable. A cached decision compiles one
    variant; a graph with nothing replaced compiles one and is not timed. Otherwise both
    are compiled now and timed at the first call (outside the compile, where a training
    graph's backward can run), which then keeps the faster."""
    training = is_training(example_inputs)
    cached = _DISK.get(signature_key)
    if cached in ("hubkernels", "inductor"):
        decision = Decision(cached, None, None, "cache", training)
        DECISIONS.append(decision)
        log.info("hubcompile: perf guard %s", decision.describe())
        return compile_hub()[0] if cached == "hubkernels" else compile_plain()
    hub, replaced = compile_hub()
    if not replaced:
        return hub
    return _DecideAtFirstCall(signature_key, hub, compile_plain(), replaced)


class _DecideAtFirstCall:
    """Runs both variants on the first call's inputs, keeps the faster for every call."""

    def __init__(self, key: str, hub, plain, replaced: int):
        self.key, self.hub, self.plain, self.replaced = key, hub, plain, replaced
        self.chosen = None

    def __call__(self, *args):
        if self.chosen is None:
            self.chosen = self._decide(list(args))
        return self.chosen(*args)

    def _decide(self, inputs):
        training = is_training(inputs)
        # The timing runs build their own autograd graphs: detached inputs keep their
        # backward from reaching (and freeing) the graph of the code that produced the
        # inputs, which the caller's own backward still needs.
        inputs = [x.detach().requires_grad_(x.requires_grad) if isinstance(x, torch.Tensor) else x for x in inputs]
        try:
            hub_ms = measure(self.hub, inputs, training)
            plain_ms = measure(self.plain, inputs, training)
        except Exception as e:  # noqa: BLE001 - the guard never breaks a run
            log.warning("hubcompile: the performance guard could not time this graph (%s: %s); keeping the "
                        "replacements", type(e).__name__, e)
            return self.hub
        keep = "hubkernels" if hub_ms < plain_ms else "inductor"
        decision = Decision(keep, hub_ms, plain_ms, "measured", training)
        DECISIONS.append(decision)
        _DISK.put(self.key, keep)
        log.info("hubcompile: perf guard %s", decision.describe())
        if keep == "inductor":
            log.warning("hubcompile: %d replacement(s) made this graph slower than plain Inductor (%.3f vs %.3f "
                        "ms); using Inductor's code for it (perf_guard='off' keeps them)", self.replaced, hub_ms,
                        plain_ms)
        chosen = self.hub if keep == "hubkernels" else self.plain
        self.hub = self.plain = None
        return chosen


# ------------------------------------------------------------------------ the cache

_DISK = DiskCache("perf_guard.json", "perf guard cache", "graphs will be timed again")


def cache_path() -> Path:
    return _DISK.path()


def clear_cache(disk: bool = False) -> None:
    """Forget the decisions read from disk and this process's list (the file too with ``disk=True``)."""
    DECISIONS.clear()
    _DISK.clear(disk)
