"""Numerical guards: a replacement is used only if its kernel computes what the model's
own code computes.

For each match, before it is replaced, the guard draws fresh random inputs with the
match's real shapes (hints for symbolic sizes), strides, dtypes and device, and runs three
things on them:

  * the original subgraph, as the spelling writes it, in the model's dtype;
  * the replacement, which calls the chosen kernel through the hubcompile op;
  * the original subgraph in float64, every cast to a lower precision skipped.

How much of the match each run sees (``reach``), so that a kernel sees its real row
indices and grid while the check stays within memory:

  * "whole": all three at the real shape, where the inputs fit the budget (a count on
    CPU, a fraction of free memory on GPUs; ``fits_whole``);
  * "rows": the kernel at the real shape, the original and float64 on blocks of rows
    from the start, the middle and the end of each row dim (``Spelling.row_dims``), the
    last dim whole; the kernel's outputs and gradients are compared on those rows. Sound
    where an output row depends on its own input rows only (the spelling says which
    dims those are); the gradient fed to the kernel is zero outside the sampled rows, so
    its weight gradients sum the sampled rows only, as the reference's do;
  * "cut": all three on inputs cut to their leading rows (about MAX_ELEMENTS), where the
    kernel cannot run at the real shape (memory) or the match has no rows.

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
# Above the whole budget, the kernel still runs at the real shape ("rows") where its
# inputs hold at most this many elements (CPU), or on CUDA take at most MEMORY_FRACTION of
# free memory at REAL_SIZE_COPIES copies of each input (the random draw, the kernel's
# copy, its gradient and an output).
REAL_SIZE_ELEMENTS = {"cpu": 1 << 26}
REAL_SIZE_ELEMENTS_DEVICE = 1 << 27
REAL_SIZE_COPIES = 4
# The reference of a sampled check ("rows") and a cut one ("cut") handles about this many
# elements of the anchor (times its row cost for attention and the logits).
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
    # What the check compared: "whole", "rows ..." (which rows, the kernel at the real
    # shape) or "cut to ..." (the inputs' leading rows).
    reach: str = ""

    def summary(self) -> str:
        if self.error:
            return f"check could not run: {self.error}"
        failed = [c for c in self.comparisons if not c.ok] or list(self.comparisons)
        where = f" [{self.reach}]" if self.reach and self.reach != "whole" else ""
        return "; ".join(str(c) for c in failed) + where

    def to_json(self) -> dict:
        return {"passed": self.passed, "error": self.error, "reach": self.reach,
                "comparisons": [dataclasses.asdict(c) for c in self.comparisons]}

    @classmethod
    def from_json(cls, data: dict, source: str) -> GuardResult:
        return cls(data["passed"], tuple(Comparison(**c) for c in data["comparisons"]), data["error"], source,
                   data.get("reach", ""))


class OutOfReach(Exception):
    """A sampled check cannot be made for this match (its rows do not map onto every input
    and output, or the reference fails on the sampled sizes): the guard cuts instead."""


# ------------------------------------------------------------------------ the check


def check(spelling, values: dict, kernels: tuple[str, str], *, backward: bool,
          tolerances: dict | None = None) -> GuardResult:
    """Guard one match. ``values`` maps each parameter of ``spelling.search`` to the match's
    tensor metadata (a fake tensor) or a Python scalar."""
    tiers = _plan(spelling, values)
    # keyed on the reach too: a check cut for want of memory is made again where it fits
    signature = _signature(spelling, values, kernels, backward, tolerances, tiers[0])
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
        result = _run_within_reach(spelling, values, kernels, backward, tolerances, tiers)
    except Exception as e:  # noqa: BLE001 - an unrunnable check keeps the original code
        result = GuardResult(False, error=f"{type(e).__name__}: {e}"[:300])
    with _lock:
        _memory[signature] = result
        _DISK.put(signature, result.to_json())
    return result


# What the guard tries after each reach, and what moves it on: running out of memory, a
# sample that cannot be made, and (as before sampling) any error of the cut inputs, which
# may not fit together where a size is shared (then the check runs at full size). An error
# of the kernel at its real shape is the kernel's: it fails the check.
_NEXT = {"whole": ("rows", "cut"), "rows": ("cut", "whole"), "cut": ("whole",)}


def _plan(spelling, values: dict) -> list[str]:
    """The reaches to try for a match, in order: the first that fits, then what follows it."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    tensors = [v for v in values.values() if isinstance(v, torch.Tensor)]
    if not tensors:
        return ["cut", "whole"]
    # called while the matcher's fake mode is on: the sizes are read off meta tensors
    with unset_fake_temporarily():
        rows = _rows_fit(spelling, values)
        if getattr(spelling, "guard_whole", True) and fits_whole(tensors):
            first = "whole"
        else:
            first = "rows" if rows else "cut"
    return [first] + [t for t in _NEXT[first] if t != "rows" or rows]


def _run_within_reach(spelling, values, kernels, backward, tolerances, tiers: list[str]) -> GuardResult:
    for i, tier in enumerate(tiers):
        try:
            return _run(spelling, values, kernels, backward, tolerances, tier)
        except Exception as e:
            out_of_memory = isinstance(e, torch.OutOfMemoryError)
            moves_on = out_of_memory or tier == "cut" or (tier == "rows" and isinstance(e, OutOfReach))
            if i == len(tiers) - 1 or not moves_on:
                raise
            if out_of_memory and torch.cuda.is_available():
                torch.cuda.empty_cache()
            log.debug("hubcompile: guard of %s (%s) raised %s: %s; trying %s", spelling.name, tier,
                      type(e).__name__, e, tiers[i + 1])
    raise AssertionError("unreachable")


def reach(spelling, values: dict) -> str:
    """How the guard checks a match: "whole", "rows" (the kernel at the real shape, sampled
    rows compared) or "cut" (see the module's docstring)."""
    return _plan(spelling, values)[0]


def checks_whole(spelling, values: dict) -> bool:
    """Whether the guard runs all of a match at its real shape (see WHOLE_ELEMENTS)."""
    return reach(spelling, values) == "whole"


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


def fits_real_size(tensors) -> bool:
    """Whether the kernel can run at these (meta) tensors' real shapes within the budget."""
    device = tensors[0].device
    free = free_bytes(device)
    if free is None:
        elements = sum(_numel(t.shape) for t in tensors)
        return elements <= REAL_SIZE_ELEMENTS.get(device.type, REAL_SIZE_ELEMENTS_DEVICE)
    held = sum(_numel(t.shape) * t.element_size() for t in tensors) * REAL_SIZE_COPIES
    return held <= free * MEMORY_FRACTION


def _rows_fit(spelling, values: dict) -> bool:
    """Whether a sampled check can be made: the match has rows that map onto every input,
    the kernel fits at the real shape, and the reference's inputs cost no more than a cut
    check's, input by input (weights stay whole in both; keys stay whole in a sample
    only), or fit the whole budget."""
    tensors = {n: v for n, v in values.items() if isinstance(v, torch.Tensor)}
    if not tensors or not fits_real_size(list(tensors.values())):
        return False
    try:
        rows = Rows(spelling, values)
    except OutOfReach as e:
        log.debug("hubcompile: guard of %s cannot sample rows: %s", spelling.name, e)
        return False
    sampled = {n: torch.empty(rows.sampled_shape(n, v), dtype=v.dtype, device="meta") for n, v in tensors.items()}
    cut = input_shapes(spelling, values)
    if all(t.numel() <= max(_numel(cut[n]), MAX_ELEMENTS) for n, t in sampled.items()):
        return True
    return fits_whole(list(sampled.values()), next(iter(tensors.values())).device)


def _run(spelling, values: dict, kernels, backward: bool, tolerances, tier: str) -> GuardResult:
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    from ..lowering.kernels import kernels_chosen
    from ..lowering.kernels import guard_calls

    with unset_fake_temporarily(), torch.inference_mode(False), guard_calls(), kernels_chosen(kernels):
        inputs = _random_inputs(spelling, values, shrink=tier == "cut")
        rows = Rows(spelling, values) if tier == "rows" else None
        sampled = inputs
        if rows is not None:
            if spelling.drop_rows is not None:
                inputs = spelling.drop_rows(inputs, rows.keep(inputs[spelling.anchor].device))
            sampled = {n: rows.take_input(n, v, values[n]) for n, v in inputs.items()}
        grad_names = _grad_names(spelling, inputs) if backward else []
        dtype = _main_dtype(inputs)
        tol = tolerance_for(dtype, tolerances)
        runs = {}
        # The references first: on a sample, their errors are the sample's (OutOfReach).
        for kind in ("original", "float64", "kernel"):
            args = {n: _prepare(v, kind, n in grad_names) for n, v in (inputs if kind == "kernel" else sampled).items()}
            try:
                with torch.enable_grad():
                    if kind == "float64":
                        with KeepFloat64():
                            out = spelling.search(**args)
                    else:
                        out = (spelling.replace if kind == "kernel" else spelling.search)(**args)
            except Exception as e:
                if rows is not None and kind != "kernel" and not isinstance(e, torch.OutOfMemoryError):
                    raise OutOfReach(f"the {kind} subgraph on the sampled rows raised {type(e).__name__}: {e}") from e
                raise
            runs[kind] = (args, _flat(out))

        comparisons = []
        outs = {k: v[1] for k, v in runs.items()}
        for i, (new, orig, ref) in enumerate(zip(outs["kernel"], outs["original"], outs["float64"])):
            if isinstance(ref, torch.Tensor) and ref.is_floating_point():
                what = "out" if len(outs["float64"]) == 1 else f"out[{i}]"
                if new.dtype != orig.dtype:
                    comparisons.append(Comparison(f"{what} (dtype {new.dtype} != {orig.dtype})", float("inf"), 0.0, 0.0))
                    continue
                if rows is not None:
                    new = rows.take_output(new)
                comparisons.append(compare(what, new.detach(), orig.detach(), ref.detach(), tol))
        if grad_names:
            comparisons += _compare_grads(runs, grad_names, tol, rows)
    if tier == "whole":
        where = "whole"
    elif rows is not None:
        where = rows.describe()
    else:
        where = "cut to " + ", ".join(f"{n} {list(v.shape)}" for n, v in inputs.items()
                                      if isinstance(v, torch.Tensor) and v.dim())
    return GuardResult(all(c.ok for c in comparisons), tuple(comparisons), reach=where)


def _compare_grads(runs, grad_names, tol, rows=None) -> list[Comparison]:
    outs64 = [t for t in runs["float64"][1] if isinstance(t, torch.Tensor) and t.requires_grad]
    gen = torch.Generator(device=outs64[0].device).manual_seed(_seed())
    cotangents = [torch.randn(t.shape, dtype=torch.float64, device=t.device, generator=gen) for t in outs64]
    grads = {}
    for kind, (args, outs) in runs.items():
        outs = [t for t in outs if isinstance(t, torch.Tensor) and t.requires_grad]
        cots = [c.to(t.dtype) for c, t in zip(cotangents, outs)]
        if rows is not None and kind == "kernel":
            # zero outside the sampled rows: the kernel's gradients are then the sample's
            cots = [rows.widen_output(c, t) for c, t in zip(cots, outs)]
        wrt = [args[n] for n in grad_names]
        with torch.enable_grad():
            grads[kind] = torch.autograd.grad(outs, wrt, cots, allow_unused=True)
        if rows is not None and kind == "kernel":
            grads[kind] = [None if g is None else rows.take_input(n, g) for n, g in zip(grad_names, grads[kind])]
    result = []
    for name, new, orig, ref in zip(grad_names, grads["kernel"], grads["original"], grads["float64"]):
        if ref is None:
            continue
        if new is None:
            result.append(Comparison(f"grad {name} (missing)", float("inf"), 0.0, 0.0))
            continue
        result.append(compare(f"grad {name}", new, orig, ref, tol))
    return result


# ------------------------------------------------------------------------ sampled rows


class Rows:
    """The rows a sampled check compares: for each row dim of the anchor, blocks at the
    start, the middle and the end of its real extent (all of it when small), as many as
    MAX_ELEMENTS of reference work allow, at least one row at each place. Maps each input,
    output and gradient onto those rows; raises OutOfReach where one does not map."""

    def __init__(self, spelling, values: dict):
        anchor = values.get(spelling.anchor)
        if not isinstance(anchor, torch.Tensor) or anchor.dim() < 2:
            raise OutOfReach("no anchor with rows")
        last = anchor.dim() - 1
        dims = spelling.row_dims if spelling.row_dims is not None else spelling.shrink_dims
        self.extents = {d % anchor.dim(): _hint(anchor.shape[d]) for d in dims if d % anchor.dim() != last}
        if not self.extents:
            raise OutOfReach("no row dims")
        self.anchor_rank = anchor.dim()
        self.has_drop_rows = spelling.drop_rows is not None
        self.inputs = {name: self._input_dims(spelling, name, v) for name, v in values.items()
                       if isinstance(v, torch.Tensor)}
        shapes = {n: [_hint(s) for s in v.shape] for n, v in values.items() if isinstance(v, torch.Tensor)}
        if spelling.row_cost is not None:
            cost = spelling.row_cost(shapes)
        else:
            cost = _numel([s for d, s in enumerate(shapes[spelling.anchor]) if d not in self.extents])
        self.picks = _pick_rows(self.extents, max(1, MAX_ELEMENTS // max(1, cost)))

    def _input_dims(self, spelling, name, v) -> dict[int, int]:
        """{dim of input ``name``: the anchor's row dim it follows} (a dim of size 1
        broadcasts over the rows and is left alone)."""
        if name == spelling.anchor:
            pairs = {d: d for d in self.extents}
        elif name in spelling.input_rows:
            pairs = {i % v.dim(): d for i, d in spelling.input_rows[name].items() if d in self.extents}
        else:  # broadcasts against the anchor, aligned from the right
            offset = self.anchor_rank - v.dim()
            if offset < 0:
                raise OutOfReach(f"{name} has more dims than {spelling.anchor}")
            pairs = {d - offset: d for d in self.extents if d >= offset}
        dims = {}
        for i, d in pairs.items():
            size = _hint(v.shape[i])
            if size == self.extents[d]:
                dims[i] = d
            elif size != 1:
                raise OutOfReach(f"{name}'s dim {i} ({size}) neither follows nor broadcasts over "
                                 f"the rows of dim {d} ({self.extents[d]})")
        return dims

    def sampled_shape(self, name, v) -> list[int]:
        shape = [_hint(s) for s in v.shape]
        for i, d in self.inputs[name].items():
            shape[i] = len(self.picks[d])
        return shape

    def _take(self, t, dims) -> torch.Tensor:
        for i, d in dims.items():
            t = t.index_select(i, torch.tensor(self.picks[d], device=t.device))
        return t

    def take_input(self, name, t, like=None):
        """Input (or gradient of input) ``name``'s sampled rows; in the layout of ``like``
        (the match's tensor) where given."""
        if not isinstance(t, torch.Tensor) or name not in self.inputs:
            return t
        taken = self._take(t, self.inputs[name])
        return _relaid(taken, [_hint(s) for s in like.stride()]) if like is not None and taken.dim() else taken

    def output_dims(self, t) -> dict[int, int]:
        """{dim: row dim} of an output of the kernel at the real shape: its leading dims
        follow the anchor's; {} for an output reduced over the rows (a loss), which only a
        spelling that drops the unsampled rows can compare."""
        dims = {d: d for d, n in self.extents.items() if t.dim() > d and t.shape[d] == n}
        if len(dims) == len(self.extents):
            return dims
        if dims or not self.has_drop_rows:
            raise OutOfReach(f"an output of shape {list(t.shape)} does not follow the rows {self.extents}")
        return {}

    def take_output(self, t) -> torch.Tensor:
        return self._take(t, self.output_dims(t))

    def widen_output(self, sampled, full) -> torch.Tensor:
        """A tensor like the kernel's output ``full``, holding ``sampled`` at the sampled
        rows and zero elsewhere (a cotangent)."""
        dims = self.output_dims(full)
        if not dims:
            return sampled
        mask = self._mask(full.dim(), dims, full.device)
        return torch.zeros(full.shape, dtype=sampled.dtype, device=full.device).masked_scatter_(mask, sampled)

    def keep(self, device) -> torch.Tensor:
        """True at the sampled rows: a bool tensor broadcastable to the anchor."""
        return self._mask(self.anchor_rank, {d: d for d in self.extents}, device)

    def _mask(self, rank, dims, device) -> torch.Tensor:
        mask = torch.ones([1] * rank, dtype=torch.bool, device=device)
        for i, d in dims.items():
            along = torch.zeros(self.extents[d], dtype=torch.bool, device=device)
            along[torch.tensor(self.picks[d], device=device)] = True
            mask = mask & along.view([-1 if j == i else 1 for j in range(rank)])
        return mask

    def describe(self) -> str:
        parts = []
        for d, picks in self.picks.items():
            if len(picks) == self.extents[d]:
                parts.append(f"dim {d}: all {self.extents[d]}")
                continue
            runs, start = [], None
            for j, r in enumerate(picks):
                start = r if start is None else start
                if j + 1 == len(picks) or picks[j + 1] != r + 1:
                    runs.append(f"{start}-{r}" if r > start else f"{r}")
                    start = None
            parts.append(f"dim {d}: rows {', '.join(runs)} of {self.extents[d]}")
        return "sampled rows (" + "; ".join(parts) + "), the kernel at the real shape"


def _pick_rows(extents: dict[int, int], rows: int) -> dict[int, list[int]]:
    """Sorted row indices per dim, their counts multiplying to about ``rows``: the smaller
    extents first, each at least 3 rows (start, middle, end) or all of it."""
    picks, left = {}, rows
    order = sorted(extents, key=lambda d: extents[d])
    for k, d in enumerate(order):
        n = extents[d]
        m = min(n, max(3, int(left ** (1.0 / (len(order) - k)) + 1e-9)))
        left = max(1, left // m)
        picks[d] = _blocks(n, m)
    return {d: picks[d] for d in sorted(picks)}


def _blocks(n: int, m: int) -> list[int]:
    """At most ``m`` (>= 3) of ``range(n)``, sorted, in three blocks: at the start, around
    the middle, at the end."""
    if m >= n:
        return list(range(n))
    size = max(1, m // 3)
    return sorted({r for s in (0, (n - size) // 2, n - size) for r in range(s, s + size)})


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


def _relaid(t: torch.Tensor, stride) -> torch.Tensor:
    """``t``'s values laid out in the order of ``stride`` (a match's strides), as
    _dense_like lays out a draw; a broadcast dim (stride 0) stays broadcast."""
    broadcast = [i for i, s in enumerate(stride) if s == 0 and t.shape[i] > 1]
    source = t
    for i in broadcast:  # equal along it: one slice holds every value
        source = source.narrow(i, 0, 1)
    order = sorted(range(t.dim()), key=lambda i: (-stride[i], -i))
    out = source.permute(order).contiguous().permute([order.index(i) for i in range(t.dim())])
    return out.expand(t.shape)


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


def _signature(spelling, values, kernels, backward, tolerances, planned: str) -> str:
    import hubcompile

    parts = {"version": hubcompile.__version__, "spelling": spelling.name, "op": spelling.op,
             "requirements": repr(sorted(getattr(spelling, "requirements", {}).items())),
             "kernels": [[k, kernel_identity(k)] for k in kernels], "backward": backward,
             "tolerances": sorted((str(d), t) for d, t in (tolerances or {}).items()), "reach": planned,
             "inputs": {}}
    for name, v in sorted(values.items()):
        if isinstance(v, torch.Tensor):
            parts["inputs"][name] = [[_hint(s) for s in v.shape], [_hint(s) for s in v.stride()], str(v.dtype),
                                     v.device.type]
        else:
            parts["inputs"][name] = repr(v)
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()
