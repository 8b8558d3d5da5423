"""Traced search patterns, kept on disk between processes.

Registering a family traces each spelling once per dtype and per trace function: 36 s
for every family's training patterns on a 2-core CPU, paid again by every new process
at its first compile. Inductor ships its own fusion patterns pre-traced for the same
reason (``torch/_inductor/fx_passes/serialized_patterns``). Ours are traced on first use
and then stored under ``$HUBCOMPILE_CACHE_DIR/patterns`` (default
``~/.cache/hubcompile``; ``$HUBCOMPILE_PATTERN_CACHE_DIR`` puts them elsewhere), one file
per family stage and trace function, in a directory
named after the torch version and a hash of the pattern modules' sources, so that an
upgrade or an edit traces them again.

Only the initial trace is skipped. Inductor's ``register_replacement`` runs as it is,
with its tracer (``gen_pattern_and_search_gm``) answered from the cache: at each match it
still traces the search function again with the match's real shapes and compares, and
the duplicate check still sees the traced graph's text. A file that cannot be read,
written or unpickled only costs the tracing it would have saved.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import logging
import os
import pickle
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

import torch
from torch._inductor import pattern_matcher
from torch.fx.experimental.symbolic_shapes import statically_known_true

from ..lowering.disk_cache import cache_root, write_atomically

log = logging.getLogger(__name__)

ENV_PATTERN_CACHE = "HUBCOMPILE_PATTERN_CACHE"  # "0" turns the cache off
# Another place for the patterns than $HUBCOMPILE_CACHE_DIR/patterns: processes with
# separate guard caches can share them (test workers, a directory baked into an image).
ENV_PATTERN_CACHE_DIR = "HUBCOMPILE_PATTERN_CACHE_DIR"
# How many processes trace what the cache lacks; 0 traces in the compiling process.
ENV_TRACE_WORKERS = "HUBCOMPILE_TRACE_WORKERS"
MAX_TRACE_WORKERS = 8
# What tracing costs, in forward-only traces of a spelling (about 0.035 s each on a core of
# the 2-core CPU machine): a joint forward+backward trace 3, attention's spellings 3 times
# either; and starting a worker process, which imports torch and hubcompile (9 s there).
# Workers are started only where they save more than that.
JOINT_TRACE_COST = 3
ATTENTION_TRACE_COST = 3
WORKER_START_COST = 250


def cache_dir() -> Path:
    """This torch and these pattern sources' directory."""
    root = os.environ.get(ENV_PATTERN_CACHE_DIR) or cache_root() / "patterns"
    python = f"py{sys.version_info.major}{sys.version_info.minor}"
    return Path(root) / f"torch-{torch.__version__}-{python}-{source_digest(Path(__file__).parent)}"


@functools.cache
def source_digest(directory: Path) -> str:
    """A hash of the Python sources in ``directory``: the spellings and their example inputs."""
    digest = hashlib.sha256()
    for path in sorted(directory.glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def enabled() -> bool:
    # Without the tracer as a global of register_replacement there is nothing to answer.
    return (os.environ.get(ENV_PATTERN_CACHE, "1") != "0"
            and "gen_pattern_and_search_gm" in pattern_matcher.register_replacement.__code__.co_names)


class _GraphText:
    """What the duplicate check reads of a traced search graph: ``str(gm.graph)``."""

    def __init__(self, text: str):
        self.graph = text


class _Pickler(pickle.Pickler):
    """Operators by name; patterns rebuilt through their constructors, not from their
    derived state (flattened arguments, tree specs)."""

    def persistent_id(self, obj):
        if isinstance(obj, torch._ops.OpOverload):
            return ("op", obj._schema.name, obj._overloadname)
        if obj is pattern_matcher.MULTIPLE:  # compared by identity
            return ("multiple",)
        return None

    def reducer_override(self, obj):
        if isinstance(obj, pattern_matcher._TargetArgsExpr):
            if any(isinstance(fn, torch._ops.OpOverloadPacket) for fn in obj.fns):
                raise pickle.PicklingError("a pattern on an operator packet")  # its fns are expanded
            return _target_args_expr, (type(obj), obj.fns, obj.args, obj.kwargs, obj.users)
        return NotImplemented


def _target_args_expr(cls, fns, args, kwargs, users):
    return cls(fns, *args, _users=users, **kwargs)


class _Unpickler(pickle.Unpickler):
    def persistent_load(self, pid):
        if pid[0] == "multiple":
            return pattern_matcher.MULTIPLE
        _, name, overload = pid
        namespace, op = name.split("::")
        return getattr(getattr(getattr(torch.ops, namespace), op), overload or "default")


def load(name: str) -> dict:
    """{key: (pattern, graph text)} stored under ``name``; {} when there is none."""
    path = cache_dir() / f"{name}.pkl"
    if not enabled() or not path.exists():
        return {}
    try:
        with open(path, "rb") as f:
            entries = _Unpickler(f).load()
        if not isinstance(entries, dict):
            raise ValueError("not a dict")
        return entries
    except Exception as e:  # noqa: BLE001 - the patterns are traced again
        log.warning("hubcompile: ignoring unreadable pattern cache %s (%s: %s); tracing the patterns again",
                    path, type(e).__name__, e)
        return {}


def has(name: str) -> bool:
    """Whether the cache holds a file for ``name`` (without reading it)."""
    return enabled() and (cache_dir() / f"{name}.pkl").exists()


def _dumps(obj) -> bytes:
    buffer = io.BytesIO()
    _Pickler(buffer, protocol=pickle.HIGHEST_PROTOCOL).dump(obj)
    return buffer.getvalue()


def store(name: str, entries: dict) -> None:
    """Write ``entries`` under ``name`` atomically (a reader sees the old file or the new)."""
    if not enabled() or not entries:
        return
    path = cache_dir() / f"{name}.pkl"
    try:
        data = _dumps(entries)
    except Exception as e:  # noqa: BLE001
        log.debug("hubcompile: patterns %s not cached (%s: %s)", name, type(e).__name__, e)
        return
    try:
        write_atomically(path, data)
    except OSError as e:
        log.warning("hubcompile: cannot write the pattern cache %s (%s)", path, e)


def distinct_symbols(differ) -> bool:
    """``statically_known_true`` as ``register_replacement`` asks it, of ``v != a``: whether
    a symbolic size of the match is another pattern input than ``a``. At each match it
    retraces the spelling with the match's sizes, taking each distinct size as an input, and
    keeps a size only where it is known to differ from every one before it. Two independent
    sizes (batch and sequence under ``dynamic=True``) are never known to differ, so the
    second was left out, traced as a ``sym_size`` node that the model's graph does not have,
    and every spelling that reads a shape (attention, the training patterns) failed to
    match. Sizes that are different expressions are different inputs; the same expression
    is still one."""
    import sympy

    if statically_known_true(differ):
        return True
    expr = getattr(getattr(differ, "node", None), "expr", None)
    return isinstance(expr, sympy.Ne) and expr.args[0] != expr.args[1]


def _size_arithmetic(fn) -> bool:
    return getattr(fn, "__module__", None) == "_operator" or getattr(fn, "__name__", "").startswith("sym_")


def shared_sizes_pattern(*args, **kwargs):
    """Inductor's ``fx_to_pattern`` for the check at each match, where size arithmetic of
    the match's symbolic sizes (``s0 * 4``, the batch of heads a matmul is viewed to) is
    part of the traced pattern. The model's graph computes such a size once for all its
    layers, so it has more users than in one layer's trace: its user count is not checked.
    Nothing else changes: the node is not erased while it has users."""
    pattern = pattern_matcher.fx_to_pattern(*args, **kwargs)
    todo, seen = [pattern], set()
    while todo:
        p = todo.pop()
        if id(p) in seen:
            continue
        seen.add(id(p))
        if isinstance(p, pattern_matcher._TargetArgsExpr):
            if all(_size_arithmetic(fn) for fn in p.fns):
                p.users = pattern_matcher.MULTIPLE
            todo.extend([*p.args, *p.kwargs.values()])
        elif isinstance(p, pattern_matcher.MultiOutputPattern):
            todo.extend(p.outputs)
        elif isinstance(p, (list, tuple)):
            todo.extend(p)
    return pattern


# Search traces remembered per pattern: enough for the shapes of a few models.
RETRACES_KEPT = 32


def _ambient() -> tuple:
    """The thread's modes that change what a trace records."""
    autocast = tuple((device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
                     for device in ("cpu", "cuda"))
    return torch.is_grad_enabled(), torch.is_inference_mode_enabled(), autocast


def _retrace_key(args) -> tuple | None:
    """A hashable key of a match's trace arguments (fake tensors and scalars), or None
    where a size is symbolic or a value cannot be a key."""
    key = []
    for a in args:
        if isinstance(a, torch.Tensor):
            sizes = (*a.shape, *a.stride())
            if not all(type(v) is int for v in sizes):
                return None
            key.append((tuple(a.shape), a.stride(), a.dtype, a.device, a.requires_grad))
        elif isinstance(a, (bool, int, float, str, type(None), torch.dtype, torch.device)):
            key.append((type(a), a))
        else:
            return None
    return (*key, _ambient())


class RememberedTrace:
    """``trace_fn`` (``fwd_only`` or ``joint_fwd_bwd``) that remembers its traces of a
    spelling's search function by the arguments' metadata. At each match
    ``register_replacement`` traces the search function again with the match's shapes
    and checks the match against that trace; the layers of a model have the same shapes,
    so after the first layer it is the same trace (an attention joint trace takes a fifth
    of a second on a CPU core, and a model has dozens of matches). Only the search trace:
    the replacement's nodes are copied into the graph with their ``meta["val"]``, and two
    nodes sharing one fake tensor read as aliases to later passes (seen: GPT-NeoX's q and
    k rotations merged into one). Traces with symbolic sizes are not remembered."""

    def __init__(self, trace_fn, search_fn):
        self.trace_fn, self.search_fn = trace_fn, search_fn
        self.traces: dict = {}

    def __call__(self, fn, args, *rest, **kwargs):
        key = _retrace_key(args) if fn is self.search_fn else None
        if key is None:
            return self.trace_fn(fn, args, *rest, **kwargs)
        if key not in self.traces:
            if len(self.traces) >= RETRACES_KEPT:
                self.traces.pop(next(iter(self.traces)))
            self.traces[key] = self.trace_fn(fn, args, *rest, **kwargs)
        return self.traces[key]


def register_replacement(cached, traced: dict, key: str, trace_fn, joint: bool, search_fn):
    """Inductor's ``register_replacement`` whose initial trace is ``cached`` ((pattern,
    graph text) or None); what it traces instead is recorded in ``traced[key]``; and whose
    check at each match takes every distinct symbolic size as an input (``distinct_symbols``),
    lets size arithmetic have any number of users (``shared_sizes_pattern``) and traces
    ``search_fn`` once per distinct match shape (``RememberedTrace``).
    Returns the function and the ``trace_fn`` to pass it (``joint``: ``trace_fn`` traces
    forward and backward).

    A copy of the function with its own globals, not a patch of the module: Inductor's
    own patterns may be registering in another thread."""
    real = pattern_matcher.gen_pattern_and_search_gm
    remembered = RememberedTrace(trace_fn, search_fn)

    def gen_pattern_and_search_gm(*args, **kwargs):
        if cached is not None:
            pattern, text = cached
            return pattern, _GraphText(text)
        pattern, gm = real(*args, **kwargs)
        traced[key] = (pattern, str(gm.graph))
        return pattern, gm

    fn = pattern_matcher.register_replacement
    overrides = {"statically_known_true": distinct_symbols, "fx_to_pattern": shared_sizes_pattern}
    # It asks ``trace_fn is joint_fwd_bwd``: the remembering trace stands for the one it wraps.
    overrides["joint_fwd_bwd" if joint else "fwd_only"] = remembered
    if enabled():
        overrides["gen_pattern_and_search_gm"] = gen_pattern_and_search_gm
    clone = types.FunctionType(fn.__code__, {**fn.__globals__, **overrides},
                               fn.__name__, fn.__defaults__, fn.__closure__)
    clone.__kwdefaults__ = fn.__kwdefaults__
    return clone, remembered


# ------------------------------------------------------------ tracing in worker processes


def trace_cost(jobs: list[tuple[str, str]]) -> int:
    """What tracing ``jobs`` ((pattern cache name, key) pairs) costs in this process, in
    forward-only traces."""
    cost = 0
    for name, _ in jobs:
        family, _, kind = name.rsplit("-", 2)
        cost += ((JOINT_TRACE_COST if kind == "joint" else 1)
                 * (ATTENTION_TRACE_COST if family == "attention" else 1))
    return cost


def trace_workers(jobs: list[tuple[str, str]]) -> int:
    """How many worker processes should trace ``jobs``: one per spare core (the compiling
    process keeps one), at most MAX_TRACE_WORKERS (``$HUBCOMPILE_TRACE_WORKERS`` sets the
    most), and none unless they finish sooner than this process would, their start
    included: a few dozen forward traces (an inference compile) take less than importing
    torch. Fewer than two: trace in this process (a 2-core CI machine does)."""
    setting = os.environ.get(ENV_TRACE_WORKERS)
    if setting is not None:
        try:
            most = int(setting)
        except ValueError:
            raise ValueError(f"{ENV_TRACE_WORKERS}={setting!r}: expected a number of processes (0: none)") from None
    else:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        most = min(MAX_TRACE_WORKERS, cores - 1)
    count = min(most, len(jobs))
    if count < 2 or not enabled():
        return 0
    here = trace_cost(jobs)
    return count if WORKER_START_COST + here / count < here else 0


class Tracing:
    """Worker processes tracing spellings into the pattern cache, started by
    ``start_tracing``; ``finish`` waits for them and stores what they traced."""

    def __init__(self, jobs: list[tuple[str, str]], count: int):
        import hubcompile

        self.jobs, self.start, self.done = jobs, time.perf_counter(), None
        env = {**os.environ, ENV_TRACE_WORKERS: "0", "CUDA_VISIBLE_DEVICES": "", "TORCHINDUCTOR_COMPILE_THREADS": "1",
               "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(hubcompile.__file__).parents[1]),
                                                           os.environ.get("PYTHONPATH")]))}
        self.tmp = tempfile.TemporaryDirectory(prefix="hubcompile-trace-")
        self.procs = []
        for w in range(count):
            share = {}
            for name, key in jobs[w::count]:  # round robin: attention's costly joint traces spread
                share.setdefault(name, []).append(key)
            spec, out = Path(self.tmp.name) / f"{w}.json", Path(self.tmp.name) / f"{w}.pkl"
            spec.write_text(json.dumps(share))
            self.procs.append((subprocess.Popen([sys.executable, "-m", __name__, str(spec), str(out)], env=env,
                                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE), out))

    def finish(self) -> int:
        """Wait for the workers; store what they traced; how many spellings that was. Once:
        later calls return the same number."""
        if self.done is not None:
            return self.done
        results: dict[str, dict] = {}
        failures = []
        for proc, out in self.procs:
            try:
                _, err = proc.communicate(timeout=600)
                if proc.returncode:
                    raise RuntimeError(f"exit {proc.returncode}: {err.decode(errors='replace')[-300:]}")
                with open(out, "rb") as f:
                    for name, entries in _Unpickler(f).load().items():
                        results.setdefault(name, {}).update(entries)
            except Exception as e:  # noqa: BLE001 - the compile traces what is missing
                proc.kill()
                failures.append(f"{type(e).__name__}: {e}")
        self.tmp.cleanup()
        for name, entries in results.items():
            store(name, {**load(name), **entries})
        self.done = sum(len(v) for v in results.values())
        if failures:
            log.warning("hubcompile: %d of %d pattern-tracing workers failed (%s); the compile traces their %d "
                        "patterns itself", len(failures), len(self.procs), failures[0], len(self.jobs) - self.done)
        log.info("hubcompile: %d patterns traced by %d worker processes in %.1f s", self.done, len(self.procs),
                 time.perf_counter() - self.start)
        return self.done


def start_tracing(todo: dict[str, list[str]]) -> Tracing | None:
    """Start tracing the spellings ``todo`` ({pattern cache name: [keys]}, of any families)
    in worker processes, side by side, where that is sooner than tracing them here
    (``trace_workers``); None where it is not. Tracing is pure Python under the GIL, one
    core however many the machine has, and a first training compile traces hundreds of
    patterns (attention's alone take seconds on a GPU host's core)."""
    jobs = [(name, key) for name, keys in todo.items() for key in keys]
    count = trace_workers(jobs)
    return Tracing(jobs, count) if count else None


def trace_elsewhere(todo: dict[str, list[str]]) -> int:
    """``start_tracing`` and wait for it: how many spellings the workers traced into the
    pattern cache. What no worker traced is left to the compile."""
    tracing = start_tracing(todo)
    return tracing.finish() if tracing else 0


def _worker(spec_path: str, out_path: str) -> None:
    from . import families

    by_name = {f.name: f for f in families()}
    results = {name: by_name[name.rsplit("-", 2)[0]].trace(name, keys)
               for name, keys in json.loads(Path(spec_path).read_text()).items()}
    write_atomically(Path(out_path), _dumps(results))


if __name__ == "__main__":
    # Through the package's module, not this __main__ copy: the pickles name its functions.
    from hubcompile.patterns import trace_cache

    trace_cache._worker(*sys.argv[1:3])
