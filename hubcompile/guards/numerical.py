"""Numerical guards: a replacement is used only if its kernel computes what the model's
own code computes.

For each match, before it is replaced, the guard draws fresh random inputs with the
match's real shapes (hints for symbolic sizes; whole up to WHOLE_ELEMENTS, so that a
kernel sees its real row indices and grid, cut beyond that so the check cannot run out of
memory), strides, dtypes and device, and runs three things on them:

  * the original subgraph, as the spelling writes it, in the model's dtype;
  * the replacement, which calls the chosen kernel through the hubcompile op;
  * the original subgraph in float64, every cast to a lower precision skipped.

The kernel passes when its error against float64 is within ``k`` times the original's
plus a floor (``numerics.py``), for every output and, for a training match, for every
input gradient. A failed or unrunnable check keeps the original code. Results are cached
per (kernel, shapes, strides, dtypes, device) in memory and in
``$HUBCOMPILE_CACHE_DIR/guards.json`` (default ``~/.cache/hubcompile``), so a recompile or
a second process does not pay again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import logging
import os
import threading
from pathlib import Path

import torch

from ..lowering.disk_cache import ENV_CACHE_DIR, DiskCache  # noqa: F401  (ENV_CACHE_DIR: documented here too)
from ..lowering.numerics import Comparison, KeepFloat64, compare, tolerance_for

log = logging.getLogger(__name__)

# A match whose tensor inputs hold at most this many elements in all (per device type)
# is checked whole, at its real shape: bugs of high row indices or of large grids (an
# index overflow, a tiling bug past row 4096) live where a slice does not reach. On CUDA
# the budget follows free memory instead (``fits_whole``).
WHOLE_ELEMENTS = {"cpu": 1 << 22}
WHOLE_ELEMENTS_DEVICE = 1 << 25  # accelerators whose free memory is not asked
# Share of free device memory one check may take, and what a whole check holds per input
# element: float64 copies of inputs, outputs and gradients, and the subgraph's float64
# intermediates, besides the runs in the model's dtype.
MEMORY_FRACTION = 0.25
WHOLE_BYTES_PER_ELEMENT = 64
# Larger matches (and those of spellings with guard_whole False) are checked on inputs of
# at most about this many elements, cut along their leading dimensions.
MAX_ELEMENTS = 1 << 18
# A 0-d floating input of a pattern is a lifted scalar (eps under dynamic=True).
LIFTED_SCALAR = 1e-5

# How many checks actually ran in this process (tests read it).
STATS = {"runs": 0, "memory_hits": 0, "disk_hits": 0}


@dataclasses.dataclass(frozen=True)
class GuardResult:
    passed: bool
    comparisons: tuple[Comparison, ...] = ()
    error: str | None = None  # why the check could not run (counts as failed)
    source: str = "run"  # "run", "memory" or "disk"

    def summary(self) -> str:
        if self.error:
            return f"check could not run: {self.error}"
        failed = [c for c in self.comparisons if not c.ok] or list(self.comparisons)
        return "; ".join(str(c) for c in failed)

    def to_json(self) -> dict:
        return {"passed": self.passed, "error": self.error,
                "comparisons": [dataclasses.asdict(c) for c in self.comparisons]}

    @classmethod
    def from_json(cls, data: dict, source: str) -> GuardResult:
        return cls(data["passed"], tuple(Comparison(**c) for c in data["comparisons"]), data["error"], source)


# ------------------------------------------------------------------------ the check


def check(spelling, values: dict, kernels: tuple[str, str], *, backward: bool,
          tolerances: dict | None = None) -> GuardResult:
    """Guard one match. ``values`` maps each parameter of ``spelling.search`` to the match's
    tensor metadata (a fake tensor) or a Python scalar."""
    signature = _signature(spelling, values, kernels, backward, tolerances)
    with _lock:
        cached = _memory.get(signature)
        if cached is None and (disk := _DISK.get(signature)) is not None:
            cached = _memory[signature] = GuardResult.from_json(disk, "disk")
            STATS["disk_hits"] += 1
        elif cached is not None:
            STATS["memory_hits"] += 1
            cached = dataclasses.replace(cached, source="memory")
    if cached is not None:
        return cached
    STATS["runs"] += 1
    try:
        if checks_whole(spelling, values):
            result = _run(spelling, values, kernels, backward, tolerances, shrink=False)
        else:
            try:
                result = _run(spelling, values, kernels, backward, tolerances, shrink=True)
            except Exception as e:  # noqa: BLE001 - cut inputs that do not fit together: check at full size
                log.debug("hubcompile: guard at cut sizes raised %s: %s; checking at full size",
                          type(e).__name__, e)
                result = _run(spelling, values, kernels, backward, tolerances, shrink=False)
    except Exception as e:  # noqa: BLE001 - an unrunnable check keeps the original code
        result = GuardResult(False, error=f"{type(e).__name__}: {e}"[:300])
    with _lock:
        _memory[signature] = result
        _DISK.put(signature, result.to_json())
    return result


def checks_whole(spelling, values: dict) -> bool:
    """Whether the guard runs a match at its real shape (see WHOLE_ELEMENTS)."""
    tensors = [v for v in values.values() if isinstance(v, torch.Tensor)]
    if not getattr(spelling, "guard_whole", True) or not tensors:
        return False
    return fits_whole(tensors)


def free_bytes(device: torch.device) -> int | None:
    """Memory a check may count on: free device memory and what PyTorch's allocator holds
    unused, on CUDA; None where it is not asked (CPU, other accelerators: counts apply)."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    try:
        index = device.index if device.index is not None else torch.cuda.current_device()
        free, _total = torch.cuda.mem_get_info(index)
        return free + torch.cuda.memory_reserved(index) - torch.cuda.memory_allocated(index)
    except Exception as e:  # noqa: BLE001 - an unanswered query: the counts apply
        log.debug("hubcompile: free memory of %s unknown (%s): %s", device, type(e).__name__, e)
        return None


def _numel(shape) -> int:
    n = 1
    for size in shape:
        n *= _hint(size)
    return n


def fits_whole(tensors, device: torch.device | None = None) -> bool:
    """Whether a check of all three runs at these (meta) tensors' shapes fits the budget
    on ``device`` (theirs by default): WHOLE_BYTES_PER_ELEMENT per input element within
    MEMORY_FRACTION of free memory on CUDA, WHOLE_ELEMENTS elsewhere."""
    device = device or tensors[0].device
    elements = sum(_numel(t.shape) for t in tensors)
    free = free_bytes(device)
    if free is None:
        return elements <= WHOLE_ELEMENTS.get(device.type, WHOLE_ELEMENTS_DEVICE)
    return elements * WHOLE_BYTES_PER_ELEMENT <= free * MEMORY_FRACTION


def _run(spelling, values: dict, kernels, backward: bool, tolerances, shrink: bool) -> GuardResult:
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    from ..lowering.kernels import kernels_chosen
    from ..lowering.kernels import guard_calls

    with unset_fake_temporarily(), torch.inference_mode(False), guard_calls(), kernels_chosen(kernels):
        inputs = _random_inputs(spelling, values, shrink)
        grad_names = _grad_names(spelling, inputs) if backward else []
        dtype = _main_dtype(inputs)
        tol = tolerance_for(dtype, tolerances)
        runs = {}
        for kind in ("kernel", "original", "float64"):
            args = {n: _prepare(v, kind, n in grad_names) for n, v in inputs.items()}
            with torch.enable_grad():
                if kind == "float64":
                    with KeepFloat64():
                        out = spelling.search(**args)
                else:
                    out = (spelling.replace if kind == "kernel" else spelling.search)(**args)
            runs[kind] = (args, _flat(out))

        comparisons = []
        outs = {k: v[1] for k, v in runs.items()}
        for i, (new, orig, ref) in enumerate(zip(outs["kernel"], outs["original"], outs["float64"])):
            if isinstance(ref, torch.Tensor) and ref.is_floating_point():
                what = "out" if len(outs["float64"]) == 1 else f"out[{i}]"
                if new.dtype != orig.dtype:
                    comparisons.append(Comparison(f"{what} (dtype {new.dtype} != {orig.dtype})", float("inf"), 0.0, 0.0))
                    continue
                comparisons.append(compare(what, new.detach(), orig.detach(), ref.detach(), tol))
        if grad_names:
            comparisons += _compare_grads(runs, grad_names, tol)
    return GuardResult(all(c.ok for c in comparisons), tuple(comparisons))


def _compare_grads(runs, grad_names, tol) -> list[Comparison]:
    outs64 = [t for t in runs["float64"][1] if isinstance(t, torch.Tensor) and t.requires_grad]
    gen = torch.Generator(device=outs64[0].device).manual_seed(_seed())
    cotangents = [torch.randn(t.shape, dtype=torch.float64, device=t.device, generator=gen) for t in outs64]
    grads = {}
    for kind, (args, outs) in runs.items():
        outs = [t for t in outs if isinstance(t, torch.Tensor) and t.requires_grad]
        cots = [c.to(t.dtype) for c, t in zip(cotangents, outs)]
        wrt = [args[n] for n in grad_names]
        with torch.enable_grad():
            grads[kind] = torch.autograd.grad(outs, wrt, cots, allow_unused=True)
    result = []
    for name, new, orig, ref in zip(grad_names, grads["kernel"], grads["original"], grads["float64"]):
        if ref is None:
            continue
        if new is None:
            result.append(Comparison(f"grad {name} (missing)", float("inf"), 0.0, 0.0))
            continue
        result.append(compare(f"grad {name}", new, orig, ref, tol))
    return result


# ------------------------------------------------------------------------ inputs


def _seed() -> int:
    return int.from_bytes(os.urandom(4), "little")


def _hint(n) -> int:
    """A concrete size for a possibly symbolic one: the size seen when it was traced."""
    if isinstance(n, int):
        return n
    hint = getattr(getattr(n, "node", None), "hint", None)
    if hint is not None:
        return int(hint)
    try:  # torch >= 2.12 names it optimization_hint
        from torch.fx.experimental.symbolic_shapes import optimization_hint

        return int(optimization_hint(n, fallback=8))
    except Exception:  # noqa: BLE001 - no hint: a small odd size still exercises the kernel
        return 7


def _random_inputs(spelling, values: dict, shrink: bool = True) -> dict:
    """Fresh random tensors like the match's (never zeros), shrunk towards MAX_ELEMENTS."""
    shapes = input_shapes(spelling, values, shrink)
    inputs = {}
    for name, v in values.items():
        if not isinstance(v, torch.Tensor):
            inputs[name] = v
            continue
        gen = torch.Generator(device=v.device).manual_seed(_seed())
        drawn = spelling.random_input(name, shapes[name], v.dtype, v.device, gen) if spelling.random_input else None
        if drawn is not None:
            inputs[name] = drawn
            continue
        inputs[name] = _dense_like(shapes[name], [_hint(s) for s in v.stride()], v.dtype, v.device, gen)
    return inputs


def input_shapes(spelling, values: dict, shrink: bool = True) -> dict[str, list[int]]:
    """The shape the check gives each tensor input: the match's, cut along batch and
    sequence when large."""
    anchor = values.get(spelling.anchor)
    cut = _shrink_map(anchor, spelling.shrink_dims) if shrink and isinstance(anchor, torch.Tensor) else {}
    feature = _hint(anchor.shape[-1]) if isinstance(anchor, torch.Tensor) and anchor.dim() else None
    shapes = {}
    for name, v in values.items():
        if isinstance(v, torch.Tensor):
            shape = [_hint(s) for s in v.shape]
            # a tensor's last dim of the feature size is the feature dim (a weight, x's hidden)
            keep_last = bool(shape) and shape[-1] == feature
            shapes[name] = [n if (keep_last and i == len(shape) - 1) else cut.get(n, n) for i, n in enumerate(shape)]
    return shapes


def _shrink_map(anchor, dims) -> dict[int, int]:
    """{size: smaller size} for the anchor's ``dims`` (batch, sequence) so that it has at
    most about MAX_ELEMENTS elements. Applied to every dim of that size in every input
    (but not to a feature dim), it keeps their shapes consistent (a mask's [S, S], cos's
    S). A size the anchor also has in another (not last) dim is not cut; where sizes
    still coincide so that the cut inputs do not fit together, the check runs again
    uncut."""
    shape = [_hint(s) for s in anchor.shape]
    numel, mapping = 1, {}
    for s in shape:
        numel *= s
    # Sizes the anchor also has in another dim (conv's channels == sequence) would cut
    # that dim too; the last dim is exempt, input_shapes keeps a feature dim whole.
    others = {shape[j] for j in range(len(shape) - 1) if j not in dims}
    for i in dims:
        size = shape[i]
        if numel <= MAX_ELEMENTS or size <= 1 or size in mapping or size in others:
            continue
        new = max(1, size * MAX_ELEMENTS // numel)
        new = min(size, new | 1)  # odd sizes catch more bugs
        mapping[size] = new
        numel = numel // size * new
    return mapping


def _dense_like(shape, stride, dtype, device, gen) -> torch.Tensor:
    """A random tensor of ``shape`` whose dims are laid out in the order of ``stride``
    (a transposed view stays transposed, a broadcast dim keeps stride 0)."""
    order = sorted(range(len(shape)), key=lambda i: (-stride[i], -i))
    new_stride, step = [0] * len(shape), 1
    for i in reversed(order):
        if stride[i] == 0 and shape[i] > 1:
            continue
        new_stride[i] = step
        step *= shape[i]
    storage = step
    if dtype.is_floating_point:
        if not shape:
            return torch.full((), LIFTED_SCALAR, dtype=dtype, device=device)
        base = torch.randn(storage, dtype=dtype, device=device, generator=gen)
    elif dtype == torch.bool:
        base = torch.randint(0, 2, (storage,), device=device, generator=gen).bool()
    else:
        base = torch.randint(0, 4, (storage,), dtype=dtype, device=device, generator=gen)
    return base.as_strided(shape, new_stride)


def _grad_names(spelling, inputs) -> list[str]:
    names = list(inspect.signature(spelling.search).parameters)
    grads = spelling.grad_inputs
    return [n for i, n in enumerate(names) if isinstance(inputs.get(n), torch.Tensor)
            and inputs[n].is_floating_point() and inputs[n].dim() > 0 and (grads is None or i in grads)]


def _prepare(value, kind: str, requires_grad: bool):
    if not isinstance(value, torch.Tensor):
        return value
    t = value.detach()
    if kind == "float64" and t.is_floating_point():
        t = t.double()
    else:
        t = t.clone() if t.dim() else t
    return t.requires_grad_(requires_grad)


def _main_dtype(inputs) -> torch.dtype:
    floats = [t.dtype for t in inputs.values() if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dim()]
    # The lowest precision present sets the tolerance (bf16 activations with fp32 weights).
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        if dtype in floats:
            return dtype
    return torch.float64


def _flat(out) -> list:
    return list(out) if isinstance(out, (tuple, list)) else [out]


# ------------------------------------------------------------------------ the cache

_lock = threading.Lock()
_memory: dict[str, GuardResult] = {}
_identities: dict[str, str] = {}
_DISK = DiskCache("guards.json", "guard cache", "checks will run again")


def cache_path() -> Path:
    return _DISK.path()


def clear_cache(disk: bool = False) -> None:
    """Forget guard results (in memory; also on disk with ``disk=True``)."""
    with _lock:
        _memory.clear()
        _identities.clear()
        _DISK.clear(disk)


def kernel_identity(spec: str, fresh: bool = False) -> str:
    """What a cached result must be keyed on besides the spec: the bytes of a local or
    bundled kernel (an edited local repo must be checked again). ``fresh`` re-reads them."""
    if fresh or spec not in _identities:
        from ..lowering.kernels import BUNDLED_ROOT, KernelSpec

        parsed = KernelSpec.parse(spec) if spec != "reference" else None
        root = None
        if parsed is not None and parsed.source == "local":
            root = Path(parsed.name).expanduser()
        elif parsed is not None and parsed.source == "bundled":
            root = BUNDLED_ROOT / parsed.name
        digest = hashlib.sha256(spec.encode())
        if root is not None and root.exists():
            for path in sorted(root.rglob("*")):
                if path.is_file() and "__pycache__" not in path.parts:
                    digest.update(str(path.relative_to(root)).encode())
                    digest.update(path.read_bytes())
        _identities[spec] = digest.hexdigest()[:16]
    return _identities[spec]


def _signature(spelling, values, kernels, backward, tolerances) -> str:
    import hubcompile

    parts = {"version": hubcompile.__version__, "spelling": spelling.name, "op": spelling.op,
             "requirements": repr(sorted(getattr(spelling, "requirements", {}).items())),
             "kernels": [[k, kernel_identity(k)] for k in kernels], "backward": backward,
             "tolerances": sorted((str(d), t) for d, t in (tolerances or {}).items()), "inputs": {}}
    for name, v in sorted(values.items()):
        if isinstance(v, torch.Tensor):
            parts["inputs"][name] = [[_hint(s) for s in v.shape], [_hint(s) for s in v.stride()], str(v.dtype),
                                     v.device.type]
        else:
            parts["inputs"][name] = repr(v)
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()
