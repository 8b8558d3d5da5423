"""Kernel resolution: which kernel runs a hubcompile op on a device, loaded through
Hugging Face's ``kernels`` library.

A kernel is named by a spec string, which is also what the rewritten graph carries as
the op's ``kernel`` argument (so the graph says what runs, and a cached graph reloads it):

  reference                            the eager reference implementation
  bundled:<name>                       a repo shipped in hubcompile/lowering/bundled
  hub:<org>/<repo>@<N>[#adapter]       a Hub repo at integer version N (branch vN)
  hub:<org>/<repo>@rev=<rev>[#adapter] ... at a revision
  local:<path>[#adapter]               a local repo (kernels.get_local_kernel)
  locked:<org>/<repo>@<lockfile>[#adapter]  a repo pinned by a kernels lockfile

Each non-bundled form may name a Hub *layer* of the repo (an ``nn.Module`` class in its
``layers`` module) before the adapter, and then the adapter names the layer name it
stands for, in the vocabulary of ``kernels``/transformers mappings (``layers.py``):

  hub:<org>/<repo>@<N>:<Layer>#<name>       e.g. hub:kernels-community/liger-kernels@3:LigerRMSNorm#RMSNorm
  local:<path>:<Layer>#<name>
  locked:<org>/<repo>@<lockfile>:<Layer>#<name>

Kernel mappings (``kernel_mapping=``, ``mapping.py``) are turned into these specs.

Hub repos load with ``kernels.get_kernel``, which honours ``LOCAL_KERNELS`` and
``HF_HUB_OFFLINE``. Only orgs on the trusted list load (default: kernels-community).
The adapter translates a repo's calling convention into the bundled repos' API
(``adapters.py``). Any failure to load or a missing function means "try the next
candidate"; the compile-time resolution keeps the original subgraph when none is left,
with one warning naming the repo and the reason.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import functools
import logging
import os
import re
import warnings
from pathlib import Path

import torch

from . import adapters
from .device import DeviceInfo, detect

log = logging.getLogger(__name__)

BUNDLED_ROOT = Path(__file__).parent / "bundled"
# Kernel groups (the unit of configuration) and the bundled repo serving each.
GROUPS = {"rmsnorm": "rmsnorm", "layer_norm": "layer-norm", "activation": "activation", "rotary": "rotary",
          "causal_conv1d": "causal-conv1d", "attention": "attention", "linear_cross_entropy": "linear-cross-entropy"}
# Groups only a kernel mapping's layers serve, with no default: a whole MLP is replaced for
# a Hub layer only (otherwise its gate is, by the activation families).
MAPPING_ONLY = ("mlp",)
DEFAULT_TRUSTED_ORGS = ("kernels-community",)
HUB_TIMEOUT_S = 60.0

# hubcompile op -> (kernel group, function of the bundled API that runs it)
OPS = {
    "rms_norm": ("rmsnorm", "rms_norm_forward"),
    "add_rms_norm": ("rmsnorm", "rms_norm_forward"),
    "rms_norm_backward": ("rmsnorm", "rms_norm_backward"),
    "layer_norm": ("layer_norm", "layer_norm_forward"),
    "add_layer_norm": ("layer_norm", "layer_norm_forward"),
    "layer_norm_backward": ("layer_norm", "layer_norm_backward"),
    "gated_activation": ("activation", "gated_act_forward"),
    "gated_activation_backward": ("activation", "gated_act_backward"),
    "gated_activation_fused": ("activation", "gated_act_fused_forward"),
    "gated_activation_fused_backward": ("activation", "gated_act_fused_backward"),
    "gated_mlp": ("mlp", "gated_mlp_forward"),
    "gated_mlp_backward": ("mlp", "gated_mlp_backward"),
    "rotary": ("rotary", "rotary_forward"),
    "rotary_backward": ("rotary", "rotary_backward"),
    "causal_conv1d": ("causal_conv1d", "causal_conv1d_forward"),
    "causal_conv1d_backward": ("causal_conv1d", "causal_conv1d_backward"),
    "attention": ("attention", "attention_forward"),
    "attention_backward": ("attention", "attention_backward"),
    "linear_cross_entropy": ("linear_cross_entropy", "linear_cross_entropy_forward"),
    "linear_cross_entropy_logits": ("linear_cross_entropy", "linear_cross_entropy_logits_forward"),
    "linear_cross_entropy_logits_backward": ("linear_cross_entropy", "linear_cross_entropy_logits_backward"),
    "linear_cross_entropy_logits_grads": ("linear_cross_entropy", "linear_cross_entropy_logits_grads_forward"),
}

SPEC_FORMS = (
    "reference", "bundled:<name>", "hub:<org>/<repo>@<N>[#adapter]", "hub:<org>/<repo>@rev=<rev>[#adapter]",
    "local:<path>[#adapter]", "locked:<org>/<repo>@<lockfile>[#adapter]",
    "hub:<org>/<repo>@<N>:<Layer>#<layer name>", "local:<path>:<Layer>#<layer name>",
    "locked:<org>/<repo>@<lockfile>:<Layer>#<layer name>",
)
_LAYER_SUFFIX = re.compile(r"(.+):([A-Za-z_]\w*)")


def default_specs(group: str, device: DeviceInfo) -> list[str]:
    """The default candidates: the bundled repo (Triton on GPUs, torch on CPU); MPS has
    no bundled build and runs the reference."""
    if group in MAPPING_ONLY:
        return []
    if device.kind == "mps":
        return ["reference"]
    return [f"bundled:{GROUPS[group]}"]


@dataclasses.dataclass(frozen=True)
class KernelSpec:
    source: str  # reference | bundled | hub | local | locked
    name: str = ""  # bundled name, repo id, or path
    version: int | None = None
    revision: str | None = None
    lockfile: str | None = None
    adapter: str = "native"
    layer: str | None = None  # a class of the repo's ``layers`` module, called as kernelize calls it

    @property
    def org(self) -> str | None:
        return self.name.split("/")[0] if self.source in ("hub", "locked") else None

    @property
    def where(self) -> str:
        """The repo as a person names it: ``org/repo`` (with its pin) or the local path."""
        if self.source == "hub":
            return f"{self.name}@{self.version if self.version is not None else 'rev=' + str(self.revision)}"
        if self.source == "locked":
            return f"{self.name} (locked by {self.lockfile})"
        return self.name if self.source != "reference" else "reference"

    @classmethod
    def parse(cls, text: str) -> "KernelSpec":
        if not isinstance(text, str):
            raise ValueError(f"kernel spec must be a string, got {text!r}; forms: {', '.join(SPEC_FORMS)}")
        body, _, adapter = text.partition("#")
        if adapter and adapter not in adapters.ADAPTERS and adapter not in adapters.LAYER_ADAPTERS:
            raise ValueError(f"unknown adapter {adapter!r} in {text!r}; valid adapters: {', '.join(adapters.ADAPTERS)}"
                             f"; for a layer, the layer names: {', '.join(adapters.LAYER_ADAPTERS)}")
        source, _, rest = body.partition(":")
        if adapter in adapters.LAYER_ADAPTERS or (source in ("hub", "local", "locked") and _LAYER_SUFFIX.fullmatch(rest)):
            return cls._parse_layer(text, source, rest, adapter)
        if body == "reference":
            return cls("reference")
        if source == "bundled" and rest in GROUPS.values():
            return cls("bundled", rest)
        if source == "bundled":
            raise ValueError(f"unknown bundled repo {rest!r}; valid: {', '.join(GROUPS.values())}")
        if source == "local" and rest:
            return cls("local", rest, adapter=adapter or "native")
        if source in ("hub", "locked"):
            m = re.fullmatch(r"([\w.-]+/[\w.-]+)@(.+)", rest)
            if m:
                repo, pin = m.groups()
                adapter = adapter or adapters.default_adapter(repo)
                if source == "locked":
                    return cls("locked", repo, lockfile=pin, adapter=adapter)
                if pin.isdigit():
                    return cls("hub", repo, version=int(pin), adapter=adapter)
                if pin.startswith("rev=") and len(pin) > 4:
                    return cls("hub", repo, revision=pin[4:], adapter=adapter)
        raise ValueError(f"malformed kernel spec {text!r}; valid forms: {', '.join(SPEC_FORMS)} "
                         "(Hub repos must be pinned by an integer version or a revision)")

    @classmethod
    def _parse_layer(cls, text: str, source: str, rest: str, adapter: str) -> "KernelSpec":
        m = _LAYER_SUFFIX.fullmatch(rest) if source in ("hub", "local", "locked") else None
        if m is None:
            raise ValueError(f"malformed layer spec {text!r}: a layer is named after its repo, as in "
                             f"{', '.join(f for f in SPEC_FORMS if '<Layer>' in f)}")
        if adapter not in adapters.LAYER_ADAPTERS:
            raise ValueError(f"layer spec {text!r} must say which layer it stands for with '#<layer name>'; "
                             f"valid layer names: {', '.join(adapters.LAYER_ADAPTERS)}")
        repo_part, layer = m.groups()
        if source == "local":
            return cls("local", repo_part, adapter=adapter, layer=layer)
        try:  # the repo and its pin, checked as for functions
            base = cls.parse(f"{source}:{repo_part}#native")
        except ValueError:
            raise ValueError(f"malformed layer spec {text!r}; valid forms: "
                             f"{', '.join(f for f in SPEC_FORMS if '<Layer>' in f)} "
                             "(Hub repos must be pinned by an integer version or a revision)") from None
        return dataclasses.replace(base, adapter=adapter, layer=layer)


@functools.lru_cache(maxsize=256)
def is_layer(spec: str) -> bool:
    """Whether ``spec`` names a Hub layer (``...:<Layer>#<name>``)."""
    return spec != "reference" and KernelSpec.parse(spec).layer is not None


class KernelUnavailable(Exception):
    """A kernel could not be used; the message says why."""


# (spec text, device kind) -> adapter, or the KernelUnavailable it raised.
_loaded: dict[tuple[str, str], object] = {}
_warned: set[tuple[str, str]] = set()


def _warn_once(spec: str, reason: str) -> None:
    if (spec, reason) not in _warned:
        _warned.add((spec, reason))
        log.warning("hubcompile: kernel %s is not used: %s", spec, reason)


def _call_with_timeout(fn, *args, **kwargs):
    """Hub calls can wait on the network; bound them (a hang becomes a fallback)."""
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    try:
        return pool.submit(fn, *args, **kwargs).result(timeout=HUB_TIMEOUT_S)
    except concurrent.futures.TimeoutError:
        raise KernelUnavailable(f"no answer from the Hub within {HUB_TIMEOUT_S:.0f} s (set HF_HUB_OFFLINE=1 "
                                "and pre-fill the cache on machines without network)") from None
    finally:
        pool.shutdown(wait=False)


def _import(spec: KernelSpec, device: DeviceInfo):
    import kernels

    if spec.source == "bundled":
        variant = "torch-cpu" if device.kind == "cpu" else "torch-cuda"
        if device.kind == "mps":
            raise KernelUnavailable("the bundled repos have no build for mps")
        return kernels.get_local_kernel(BUNDLED_ROOT / spec.name / "build" / variant)
    if spec.source == "local":
        return kernels.get_local_kernel(Path(spec.name).expanduser())
    if spec.source == "locked":
        return kernels.load_kernel(spec.name, lockfile=Path(spec.lockfile))
    return _call_with_timeout(kernels.get_kernel, spec.name, version=spec.version, revision=spec.revision,
                              trust_remote_code=[spec.name])


def load(spec_text: str, device: DeviceInfo, trusted_orgs=DEFAULT_TRUSTED_ORGS):
    """The adapter for a spec on a device, loading it on first use. Raises KernelUnavailable.

    ``trusted_orgs=None`` skips the trust check: a spec inside a compiled graph was
    checked when that graph was compiled, possibly with orgs its options added."""
    spec = KernelSpec.parse(spec_text)
    if trusted_orgs is not None and spec.org is not None and spec.org not in trusted_orgs \
            and spec.name not in trusted_orgs:  # a repo id there: trusted by a mapping's trust_remote_code
        raise KernelUnavailable(f"org {spec.org!r} is not trusted (trusted: {', '.join(trusted_orgs)}); "
                                f"add it with options={{'trusted_orgs': [{spec.org!r}]}} if you trust its code")
    key = (spec_text, device.kind)
    if key not in _loaded:
        try:
            module = _import(spec, device)
            _loaded[key] = (adapters.ADAPTERS[spec.adapter](module) if spec.layer is None
                            else adapters.layer_adapter(spec.adapter, module, spec.layer, spec.where))
        except KernelUnavailable as e:
            _loaded[key] = e
        except Exception as e:  # noqa: BLE001 - any import/load error means "not usable"
            _loaded[key] = KernelUnavailable(f"{type(e).__name__}: {e}".strip()[:500])
    result = _loaded[key]
    if isinstance(result, KernelUnavailable):
        raise result
    return result


def bundled_module(spec, device: torch.device):
    """The loaded module of a bundled kernel spec on ``device`` (for what it declares about
    its functions), or None for any other spec or one that does not load."""
    if not isinstance(spec, str) or not spec.startswith("bundled:"):
        return None
    try:
        return load(spec, detect(device), trusted_orgs=None)
    except KernelUnavailable:
        return None


@dataclasses.dataclass(frozen=True)
class Choice:
    spec: str | None  # None: nothing usable, keep the original subgraph
    reasons: tuple[str, ...] = ()  # why earlier candidates were passed over


def choose(op: str, device: DeviceInfo, dtype: torch.dtype, overrides=None, trusted_orgs=DEFAULT_TRUSTED_ORGS,
           **requirements) -> Choice:
    """The first candidate for ``op`` that loads and supports this device and dtype.

    ``training`` (a requirement; default: whether grad mode is on) says whether the
    compiled graph trains: it picks a kernel mapping's entries by mode, and a Hub layer
    without a backward is not used in training."""
    group, fn = OPS[op]
    training = requirements.pop("training", None)
    training = torch.is_grad_enabled() if training is None else training
    mapped = (overrides.mapped(group, device, training, requirements.get("activation"))
              if hasattr(overrides, "mapped") else ())
    candidates = tuple(dict.fromkeys(
        (*mapped, *((overrides or {}).get(group) or default_specs(group, device)))))
    reasons = []
    for spec in candidates:
        if spec == "reference":
            return Choice(spec, tuple(reasons))
        try:
            adapter = load(spec, device, trusted_orgs)
            why_not = adapter.unsupported(fn, device, dtype, training=training, **requirements)
        except KernelUnavailable as e:
            why_not = str(e)
        if why_not is None:
            return Choice(spec, tuple(reasons))
        _warn_once(spec, why_not)
        reasons.append(f"{spec}: {why_not}")
    return Choice(None, tuple(reasons))


def call(spec: str, fn: str, *args, reference, contiguous: bool = True, **kwargs):
    """Run ``fn`` of the kernel ``spec`` on ``args`` (the first is a tensor on the target
    device), or ``reference(*args, **kwargs)`` (the same computation in eager PyTorch)
    instead: for "reference", for a kernel that cannot be loaded, and, for the rest of the
    process, for a kernel that raised at call time or failed a runtime check (with a
    warning). Outputs are made contiguous, as the ops' fake implementations promise,
    unless ``contiguous=False``: ops whose results follow an input's layout (layout.py)
    place them themselves, and a copy here would be undone by another there."""
    finish = _as_contiguous if contiguous else _as_is
    key = (spec, fn, args[0].device)
    impl = _FALLBACK if spec == "reference" else _impls.get(key)
    if impl is None:  # first call for this kernel, function and device: resolve once
        impl = _impls[key] = _resolve_impl(spec, fn, args[0].device)
    if _runtime_checks["tracing"]:
        # inline.py traces the kernel into Inductor's graph: the kernel itself, no fallback
        if impl is _FALLBACK:
            raise KernelUnavailable(f"kernel {spec} {fn} runs its reference in this process")
        return finish(impl(*args, **kwargs))
    if _runtime_checks["guarding"]:
        # The numerical guard's own calls: it must see the kernel, or its error, never the
        # reference in its place (that would pass, and leave the kernel off for good).
        if impl is _FALLBACK and spec != "reference":
            raise RuntimeError(f"kernel {spec} {fn} already fell back to its reference in this process")
        return finish((reference if impl is _FALLBACK else impl)(*args, **kwargs))
    if impl is _FALLBACK:
        return finish(reference(*args, **kwargs))
    try:
        out = impl(*args, **kwargs)
    except Exception as e:  # noqa: BLE001 - a kernel failing at call time must not kill the run
        _fell_back(key)
        warnings.warn(f"hubcompile: kernel {spec} {fn} raised {type(e).__name__}: {e}; "
                      "running the reference implementation for the rest of this process", stacklevel=2)
        return finish(reference(*args, **kwargs))
    if not _runtime_checks["paused"] and _check_due(spec, key, args[0]):
        failure = _runtime_check(out, reference, args, kwargs)
        if failure is not None:
            _fell_back(key)
            warnings.warn(f"hubcompile: kernel {spec} {fn} failed its runtime check ({failure}); running the "
                          "reference implementation for the rest of this process", stacklevel=2)
            return finish(reference(*args, **kwargs))
    return finish(out)


# Runtime checks (options ``runtime_checks`` and ``runtime_check_every``): the first ``n``
# calls of each (kernel, function, device) are compared with the reference, then one call
# in ``every``, counted per size class (a power of two of the first input's elements: a
# kernel right on short prompts can be wrong on long ones). ``n`` None is the default:
# DEFAULT_RUNTIME_CHECKS for kernels that did not come with hubcompile (a guard's random
# inputs miss bugs of one call in three, or of rows past a slice), none for the bundled
# ones (tested here). ``calls`` counts per class.
DEFAULT_RUNTIME_CHECKS = 3
DEFAULT_RUNTIME_CHECK_EVERY = 1000
_runtime_checks: dict = {"n": None, "every": DEFAULT_RUNTIME_CHECK_EVERY, "calls": {}, "paused": False,
                         "guarding": False, "tracing": False, "unchecked": False, "sample": 0, "fallbacks": 0}
_capture_skips_logged: set = set()
# (kernel, function, device) -> the last sample (``request_sample``) it was checked in
_sampled: dict = {}


def _check_due(spec: str, key, first: torch.Tensor) -> bool:
    """Whether this call of ``key`` (its first tensor argument ``first``) is one the
    runtime checks compare with the reference."""
    n = runtime_checks_for(spec)
    if n == 0:
        return False
    if _capturing():
        # A check synchronises and runs the reference: neither may be recorded into a CUDA
        # graph. Skipped calls are not counted: the calls after capture are still checked.
        if key not in _capture_skips_logged:
            _capture_skips_logged.add(key)
            log.info("hubcompile: runtime checks of kernel %s %s skipped while a CUDA graph is captured",
                     key[0], key[1])
        return False
    size_class = (*key, first.numel().bit_length())
    count = _runtime_checks["calls"][size_class] = _runtime_checks["calls"].get(size_class, 0) + 1
    every = _runtime_checks["every"]
    if count <= n or bool(every and (count - n) % every == 0):
        return True
    if _sampled.get(key, 0) < _runtime_checks["sample"]:  # its first call since a sample was asked
        _sampled[key] = _runtime_checks["sample"]
        return True
    return False


def request_sample() -> None:
    """Check the next call of every kernel function (forward now, backward later): a
    graph call that runs the checked code between the fast ones
    (guards/runtime_checks.py)."""
    _runtime_checks["sample"] += 1


def fallbacks() -> int:
    """How many kernel functions fell back to their reference in this process so far."""
    return _runtime_checks["fallbacks"]


def _fell_back(key) -> None:
    _impls[key] = _FALLBACK
    _runtime_checks["fallbacks"] += 1


def runtime_checks_for(spec: str) -> int:
    """How many first calls of ``spec``'s functions the runtime checks compare (0: none,
    and none while the code run between checks is compiled)."""
    if _runtime_checks["unchecked"]:
        return 0
    n = _runtime_checks["n"]
    if n is None:
        return 0 if spec.startswith("bundled:") or spec == "reference" else DEFAULT_RUNTIME_CHECKS
    return n


def _capturing() -> bool:
    # torch.cuda.is_current_stream_capturing raises on builds without CUDA
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


@contextlib.contextmanager
def _calls(**flags):
    """Kernel calls made with ``flags`` of ``_runtime_checks`` set, restored after."""
    saved = {k: _runtime_checks[k] for k in flags}
    _runtime_checks.update(flags)
    try:
        yield
    finally:
        _runtime_checks.update(saved)


def guard_calls():
    """The compile-time guard's own kernel calls: not the model's, so the runtime checks
    do not count them, and a kernel that raises raises (no fallback to the reference)."""
    return _calls(paused=True, guarding=True)


def checks_every_kernel() -> bool:
    """Whether the settings ask every kernel, the bundled ones too, to be checked
    (``runtime_checks`` set above 0), outside the compile of the code run between checks."""
    return bool(_runtime_checks["n"]) and not _runtime_checks["unchecked"]


def compiling_unchecked():
    """A compile of the code that runs between runtime checks: no kernel counts as
    runtime-checked, so every traceable one is launched by Inductor."""
    return _calls(unchecked=True)


def compiling_unchecked_now() -> bool:
    """Whether the code run between runtime checks is being compiled (a cache key's part)."""
    return _runtime_checks["unchecked"]


def tracing_calls():
    """Calls traced into Inductor's graph (inline.py): the kernel or an error, never the
    reference, and no runtime checks (the traced code runs on every step)."""
    return _calls(tracing=True)


def set_runtime_checks(n: int | None, every: int = DEFAULT_RUNTIME_CHECK_EVERY) -> None:
    """Check the first ``n`` calls of every kernel function against its reference (0: off;
    None: the default, DEFAULT_RUNTIME_CHECKS for non-bundled kernels), then one call in
    ``every`` (0: none). The backend sets them from the options of each compile; ``n``
    only ever grows (one compile's checks are not switched off by another's default)."""
    current = _runtime_checks["n"]
    if n is not None and (current is None or n > current):
        _runtime_checks["n"] = n
        _runtime_checks["calls"] = {}
    _runtime_checks["every"] = every


def _runtime_check(out, reference, args, kwargs) -> str | None:
    """Compare one kernel call with the reference in the same dtype and in float64."""
    from .numerics import KeepFloat64, compare, tolerance_for

    def double(v):
        return v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v

    with torch.no_grad():
        original = reference(*args, **kwargs)
        with KeepFloat64():
            ref64 = reference(*map(double, args), **{k: double(v) for k, v in kwargs.items()})
    outs, originals, refs = (list(o) if isinstance(o, (tuple, list)) else [o] for o in (out, original, ref64))
    for i, (new, orig, ref) in enumerate(zip(outs, originals, refs)):
        if isinstance(orig, torch.Tensor) and orig.is_floating_point() and orig.numel():
            result = compare(f"output {i}", new, orig, ref, tolerance_for(orig.dtype))
            if not result.ok:
                return str(result)
    return None


def _as_contiguous(out):
    if isinstance(out, (tuple, list)):
        return tuple(_as_contiguous(t) for t in out)
    return out.contiguous() if isinstance(out, torch.Tensor) else out


def _as_is(out):
    return tuple(out) if isinstance(out, list) else out


def _resolve_impl(spec: str, fn: str, device: torch.device):
    try:
        return getattr(load(spec, detect(device), trusted_orgs=None), fn)
    except (KernelUnavailable, AttributeError) as e:
        _warn_once(spec, f"{e}; running the reference implementation")
        return _FALLBACK


_FALLBACK = object()
# (spec, function, device) -> the callable that runs it, or _FALLBACK. The ops run on every
# model step, so the resolution behind a call is done once.
_impls: dict = {}


# The kernels chosen for the match being replaced: the replacement functions read them
# (the matcher calls the check, then traces the replacement, for each match in turn).
_chosen: tuple[str, str] = ("reference", "reference")


def chosen_kernels() -> tuple[str, str]:
    """(kernel, backward_kernel) specs for the replacement being traced."""
    return _chosen


def set_chosen_kernels(kernels: tuple[str, str]) -> None:
    """The kernels of the match whose replacement is traced next (the matcher calls a
    match's check, where they are chosen, then traces its replacement)."""
    global _chosen
    _chosen = tuple(kernels)


@contextlib.contextmanager
def kernels_chosen(kernels: tuple[str, str]):
    """Run replacement functions with these kernels (the numerical guard)."""
    global _chosen
    saved, _chosen = _chosen, tuple(kernels)
    try:
        yield
    finally:
        _chosen = saved


def env_fingerprint() -> str:
    """Environment that changes what resolves: part of the pass's cache key."""
    return "|".join(f"{k}={os.environ.get(k, '')}" for k in ("LOCAL_KERNELS", "HF_HUB_OFFLINE"))


def clear_cache() -> None:
    """Forget loaded kernels, failures and warnings (tests; after changing LOCAL_KERNELS)."""
    _loaded.clear()
    _warned.clear()
    _impls.clear()
    _capture_skips_logged.clear()
    _sampled.clear()
    _runtime_checks.update(n=None, every=DEFAULT_RUNTIME_CHECK_EVERY, calls={}, paused=False, unchecked=False,
                           sample=0, fallbacks=0)


def write_lockfile(path: str | os.PathLike, repos: dict[str, int | str]) -> Path:
    """Pin Hub kernels for reproducible builds: writes a ``kernels`` lockfile mapping each
    repo (``{"kernels-community/activation": 1}``, an integer version or a revision) to
    the commit it resolves to now. Resolves from the local cache when HF_HUB_OFFLINE=1.
    Load pinned kernels with specs ``locked:<repo>@<lockfile>``."""
    from huggingface_hub import constants
    from kernels._rust import KernelDependency, KernelLock, KernelLocks, KernelVersion
    from kernels._versions import resolve_kernel_version

    locks = {}
    for repo, pin in repos.items():
        version = KernelVersion.Version(pin) if isinstance(pin, int) else KernelVersion.Revision(pin)
        dep = KernelDependency(repo_id=repo, version=version)
        locks[dep] = KernelLock(commit=resolve_kernel_version(dep, local_files_only=constants.HF_HUB_OFFLINE))
    path = Path(path)
    path.write_text(KernelLocks(locks=locks).to_json())
    return path
