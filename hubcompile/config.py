"""hubcompile's configuration: which pattern families run.

Three ways to set it, later ones winning:
  1. the environment: ``HUBCOMPILE_PATTERNS=rmsnorm,silu_gate`` (allowlist) and
     ``HUBCOMPILE_DISABLE=gelu_tanh_gate`` (opt-out), read at each compile;
  2. the Python API: ``hubcompile.configure(disable=["rmsnorm"])``;
  3. per compile: ``torch.compile(m, backend="hubkernels", options={"disable": [...]})``.

Everything here goes into the graph pass's cache key (``HubConfig.fingerprint``), so a
changed setting never reuses code that Inductor cached under another setting.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterable, Mapping
from typing import Any

# The names of the pattern families, in the order their passes run.
FAMILIES = ("rmsnorm", "layer_norm", "silu_gate", "gelu_tanh_gate", "causal_conv1d", "attention", "rotary",
            "linear_cross_entropy", "causal_mask")

ENV_PATTERNS = "HUBCOMPILE_PATTERNS"
ENV_DISABLE = "HUBCOMPILE_DISABLE"
ENV_TRUSTED_ORGS = "HUBCOMPILE_TRUSTED_ORGS"
ENV_GUARD = "HUBCOMPILE_GUARD"
ENV_RUNTIME_CHECKS = "HUBCOMPILE_RUNTIME_CHECKS"
ENV_RUNTIME_CHECK_EVERY = "HUBCOMPILE_RUNTIME_CHECK_EVERY"
ENV_PERF_GUARD = "HUBCOMPILE_PERF_GUARD"
ENV_INLINE_KERNELS = "HUBCOMPILE_INLINE_KERNELS"
ENV_MIN_ELEMENTS = "HUBCOMPILE_MIN_ELEMENTS"

# Option keys hubcompile itself understands; other keys of ``options=`` must be
# Inductor config names and are handed to Inductor.
OPTION_KEYS = ("patterns", "disable", "kernels", "kernel_mapping", "trusted_orgs", "guard", "guard_backward",
               "tolerances", "runtime_checks", "runtime_check_every", "perf_guard", "inline_kernels", "min_elements")


@dataclasses.dataclass(frozen=True)
class PerfGuardSetting:
    """``options={"perf_guard": "auto" | "on" | "off" | {"mode": ..., "max_slowdown": 0.03}}``."""

    mode: str = "auto"
    # A variant up to this fraction slower than the fastest is still kept when its peak
    # memory is lower (0: only within the measured noise).
    max_slowdown: float = 0.0


@dataclasses.dataclass(frozen=True)
class HubConfig:
    """The settings of one compile. Build it with :func:`resolve`."""

    # Allowlist: the families that may run (all of them by default).
    patterns: tuple[str, ...] = FAMILIES
    # Opt-out: families that never run, even when allowlisted.
    disable: tuple[str, ...] = ()
    # Per kernel group ("rmsnorm", "activation", ...), the kernel specs to try in order,
    # replacing the device's defaults (see hubcompile/lowering/kernels.py).
    kernels: tuple[tuple[str, tuple[str, ...]], ...] = ()
    # A kernels / transformers kernel mapping (hubcompile/lowering/mapping.py): its
    # entries, tried before the group's candidates above, chosen per device and mode.
    kernel_mapping: tuple = ()
    # Hub orgs whose kernels may load (the bundled repos are always trusted).
    trusted_orgs: tuple[str, ...] = ("kernels-community",)
    # Numerical guards (hubcompile/guards/numerical.py): check each match's kernel
    # against the original code before replacing; check gradients too in training.
    guard: bool = True
    guard_backward: bool = True
    # Per family ("*" for all), per dtype name: (k, floor) of the accuracy rule.
    tolerances: tuple[tuple[str, tuple[tuple[str, tuple[float, float]], ...]], ...] = ()
    # Compare the first N calls of each replaced op's kernel with its reference at run
    # time, then one call in runtime_check_every (0: none); a kernel that fails is replaced
    # by the reference for the rest of the process. None: 3 for kernels that did not come
    # with hubcompile (Hub, local, mapped layers), none for the bundled ones; 0: off.
    runtime_checks: int | None = None
    runtime_check_every: int = 1000
    # Keep a graph's replacements only where they make it faster than plain Inductor, or
    # as fast with less memory (hubcompile/guards/performance.py): "auto" (on CUDA), "on"
    # (any device) or "off"; and the slowdown a user accepts for a lower peak.
    perf_guard: PerfGuardSetting = dataclasses.field(default_factory=lambda: PerfGuardSetting())
    # On GPUs, Inductor launches the bundled Triton kernels from its own generated code
    # instead of calling each through its op (hubcompile/passes/inline.py): a call then
    # costs what one of Inductor's own kernels costs. False keeps every replacement an op.
    inline_kernels: bool = True
    # On GPUs (with or without CUDA graphs): an RMSNorm, gate or rotary match whose largest input
    # has fewer elements is left to Inductor. Such a kernel is bound by its launch (decode
    # steps: a few rows), so a replacement can save no device time, while Inductor fuses the
    # code with its neighbours into fewer launches (patterns/framework.py). 0: replace all.
    min_elements: int = 2**18

    def tolerances_for(self, family: str) -> dict:
        """{torch.dtype: (k, floor)} overrides for ``family``."""
        from .lowering.numerics import DTYPE_NAMES

        merged = {}
        for name, per_dtype in self.tolerances:
            if name in ("*", family):
                merged.update({DTYPE_NAMES[d]: kf for d, kf in per_dtype})
        return merged

    def kernel_overrides(self) -> dict[str, tuple[str, ...]]:
        from .lowering.mapping import Overrides

        return Overrides(dict(self.kernels), self.kernel_mapping)

    def enabled(self, family: str) -> bool:
        return family in self.patterns and family not in self.disable

    def enabled_families(self) -> tuple[str, ...]:
        return tuple(f for f in FAMILIES if self.enabled(f))

    def fingerprint(self) -> str:
        from .lowering.kernels import env_fingerprint

        return json.dumps(dataclasses.asdict(self), sort_keys=True) + env_fingerprint()


def _family_list(key: str, value: Any) -> tuple[str, ...]:
    """Parse a list of family names from a list/tuple/set or a comma-separated string."""
    if isinstance(value, str):
        names = [v.strip() for v in value.split(",") if v.strip()]
    elif isinstance(value, Iterable) and not isinstance(value, Mapping):
        names = list(value)
    else:
        raise ValueError(
            f"hubcompile option {key!r} must be a list of pattern names or a "
            f"comma-separated string, got {value!r}; valid names: {', '.join(FAMILIES)}"
        )
    for name in names:
        if not isinstance(name, str) or name not in FAMILIES:
            raise ValueError(
                f"unknown hubcompile pattern {name!r} in {key!r}; "
                f"valid names: {', '.join(FAMILIES)}"
            )
    # Keep the canonical order so equal settings give equal fingerprints.
    return tuple(f for f in FAMILIES if f in names)


def _kernel_map(key: str, value: Any):
    """{group: spec | [spec, ...]} -> a hashable, validated form."""
    from .lowering.kernels import GROUPS, KernelSpec

    if not isinstance(value, Mapping):
        raise ValueError(f"hubcompile option {key!r} must be a dict {{kernel group: spec or list of specs}}, "
                         f"got {value!r}; groups: {', '.join(GROUPS)}")
    result = []
    for group, specs in sorted(value.items()):
        if group not in GROUPS:
            raise ValueError(f"unknown kernel group {group!r} in {key!r}; valid groups: {', '.join(GROUPS)}")
        specs = (specs,) if isinstance(specs, str) else tuple(specs)
        for spec in specs:
            KernelSpec.parse(spec)  # raises ValueError naming the bad spec and the forms
        result.append((group, specs))
    return tuple(result)


def _kernel_mapping(key: str, value: Any):
    """A transformers KernelConfig, its kernel_mapping dict, or a kernels mapping -> entries."""
    from .lowering.mapping import parse

    return parse(value)


def _org_list(key: str, value: Any) -> tuple[str, ...]:
    orgs = [v.strip() for v in value.split(",")] if isinstance(value, str) else list(value)
    for org in orgs:
        if not isinstance(org, str) or not org or "/" in org:
            raise ValueError(f"bad org {org!r} in {key!r}: give Hub organisation names like 'kernels-community'")
    return tuple(sorted(set(orgs) | {"kernels-community"}))


def _bool(key: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("1", "true", "on", "yes", "0", "false", "off", "no"):
        return value.strip().lower() in ("1", "true", "on", "yes")
    raise ValueError(f"hubcompile option {key!r} must be True or False (or '1'/'0'), got {value!r}")


def _count(key: str, value: Any) -> int:
    try:
        n = int(value) if isinstance(value, (int, str)) and not isinstance(value, bool) else None
    except ValueError:
        n = None
    if n is None or n < 0:
        raise ValueError(f"hubcompile option {key!r} must be an integer >= 0 (0 switches it off), got {value!r}")
    return n


def _tolerances(key: str, value: Any):
    """{family or "*": {dtype name: (k, floor) or {"k": k, "floor": floor}}} -> hashable form."""
    from .lowering.numerics import DTYPE_NAMES

    if not isinstance(value, Mapping):
        raise ValueError(f"hubcompile option {key!r} must be a dict {{family: {{dtype: (k, floor)}}}}, got {value!r}")
    result = []
    for family, per_dtype in sorted(value.items()):
        if family != "*" and family not in FAMILIES:
            raise ValueError(f"unknown pattern {family!r} in {key!r}; valid: '*', {', '.join(FAMILIES)}")
        if not isinstance(per_dtype, Mapping):
            raise ValueError(f"{key}[{family!r}] must be a dict {{dtype: (k, floor)}}, got {per_dtype!r}")
        entries = []
        for dtype, tol in sorted(per_dtype.items()):
            if dtype not in DTYPE_NAMES:
                raise ValueError(f"unknown dtype {dtype!r} in {key}[{family!r}]; valid: {', '.join(DTYPE_NAMES)}")
            k, floor = (tol.get("k"), tol.get("floor")) if isinstance(tol, Mapping) else (tuple(tol) + (None, None))[:2]
            for what, number in (("k", k), ("floor", floor)):
                if isinstance(number, bool) or not isinstance(number, (int, float)) or not number >= 0:
                    raise ValueError(f"{key}[{family!r}][{dtype!r}]: {what} must be a number >= 0, got {number!r} "
                                     f"(give (k, floor), e.g. (3.0, 1e-3))")
            entries.append((dtype, (float(k), float(floor))))
        result.append((family, tuple(entries)))
    return tuple(result)


def _perf_guard(key: str, value: Any) -> PerfGuardSetting:
    if isinstance(value, PerfGuardSetting):
        return value
    if isinstance(value, Mapping):
        unknown = set(value) - {"mode", "max_slowdown"}
        if unknown:
            raise ValueError(f"hubcompile option {key!r}: unknown key(s) {', '.join(map(repr, sorted(unknown)))}; "
                             f"valid keys: 'mode', 'max_slowdown'")
        slowdown = value.get("max_slowdown", 0.0)
        if isinstance(slowdown, bool) or not isinstance(slowdown, (int, float)) or not 0 <= slowdown < 1:
            raise ValueError(f"hubcompile option {key!r}: 'max_slowdown' must be a fraction in [0, 1) (0.03: up to "
                             f"3% slower for a lower peak), got {slowdown!r}")
        return PerfGuardSetting(_perf_guard_mode(key, value.get("mode", "auto")), float(slowdown))
    return PerfGuardSetting(_perf_guard_mode(key, value))


def _perf_guard_mode(key: str, value: Any) -> str:
    from .guards.performance import CHOICES

    if isinstance(value, bool):
        return "on" if value else "off"
    if not isinstance(value, str) or value.strip().lower() not in CHOICES:
        raise ValueError(f"hubcompile option {key!r} must be one of {', '.join(CHOICES)} (or True/False, or "
                         f"{{'mode': ..., 'max_slowdown': 0.03}}), got {value!r}")
    return value.strip().lower()


_PARSERS = {"patterns": _family_list, "disable": _family_list, "kernels": _kernel_map,
            "kernel_mapping": _kernel_mapping, "trusted_orgs": _org_list,
            "guard": _bool, "guard_backward": _bool, "tolerances": _tolerances, "runtime_checks": _count,
            "runtime_check_every": _count,
            "perf_guard": _perf_guard, "inline_kernels": _bool, "min_elements": _count}

_user_settings: dict[str, Any] = {}


def configure(**settings: Any) -> None:
    """Set process-wide defaults for the keys of ``options=`` (patterns, disable,
    kernels, kernel_mapping, trusted_orgs, guard, guard_backward, tolerances,
    runtime_checks, runtime_check_every, perf_guard, inline_kernels, min_elements); a
    value of ``None`` leaves a setting as it is.

    >>> hubcompile.configure(disable=["gelu_tanh_gate"])
    >>> hubcompile.configure(kernels={"activation": "hub:kernels-community/activation@1"})
    >>> hubcompile.configure(kernel_mapping=transformers.KernelConfig(
    ...     kernel_mapping={"RMSNorm": "kernels-community/liger-kernels:LigerRMSNorm"}))
    """
    for key, value in settings.items():
        if key not in _PARSERS:
            raise ValueError(f"unknown hubcompile setting {key!r}; valid: {', '.join(OPTION_KEYS)}")
        if value is not None:
            _user_settings[key] = _PARSERS[key](key, value)


def reset() -> None:
    """Forget what :func:`configure` set."""
    _user_settings.clear()


def split_options(options: Mapping[str, Any] | None) -> tuple[dict, dict]:
    """Split ``torch.compile(options=...)`` into hubcompile's keys and Inductor's.

    Raises ValueError for a key that is neither.
    """
    import torch._inductor.config as inductor_config

    ours, inductor = {}, {}
    for key, value in (options or {}).items():
        if key in OPTION_KEYS:
            ours[key] = value
        elif key in inductor_config.get_config_copy():
            inductor[key] = value
        else:
            raise ValueError(
                f"unknown option {key!r} for backend 'hubkernels'; hubcompile's options "
                f"are {', '.join(OPTION_KEYS)}, and any torch._inductor.config name is "
                f"passed to Inductor"
            )
    return ours, inductor


def resolve(options: Mapping[str, Any] | None = None) -> HubConfig:
    """The settings in force: environment, then ``configure()``, then ``options``."""
    settings: dict[str, Any] = {}
    for key, env in (("patterns", ENV_PATTERNS), ("disable", ENV_DISABLE), ("trusted_orgs", ENV_TRUSTED_ORGS),
                     ("guard", ENV_GUARD), ("runtime_checks", ENV_RUNTIME_CHECKS),
                     ("runtime_check_every", ENV_RUNTIME_CHECK_EVERY),
                     ("perf_guard", ENV_PERF_GUARD), ("inline_kernels", ENV_INLINE_KERNELS),
                     ("min_elements", ENV_MIN_ELEMENTS)):
        if os.environ.get(env) is not None:
            settings[key] = _PARSERS[key](env, os.environ[env])
    settings.update(_user_settings)
    for key, value in (options or {}).items():
        settings[key] = _PARSERS[key](key, value)
    # A mapping's trust_remote_code lets that repo load, as kernels would let it.
    repos = {e.trusted_repo for e in settings.get("kernel_mapping", ()) if e.trusted_repo}
    if repos:
        settings["trusted_orgs"] = tuple(sorted(set(settings.get("trusted_orgs", HubConfig.trusted_orgs)) | repos))
    return HubConfig(**settings)
