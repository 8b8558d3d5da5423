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
FAMILIES = ("rmsnorm", "silu_gate", "gelu_tanh_gate")

ENV_PATTERNS = "HUBCOMPILE_PATTERNS"
ENV_DISABLE = "HUBCOMPILE_DISABLE"

# Option keys hubcompile itself understands; other keys of ``options=`` must be
# Inductor config names and are handed to Inductor.
OPTION_KEYS = ("patterns", "disable")


@dataclasses.dataclass(frozen=True)
class HubConfig:
    """The settings of one compile. Build it with :func:`resolve`."""

    # Allowlist: the families that may run (all of them by default).
    patterns: tuple[str, ...] = FAMILIES
    # Opt-out: families that never run, even when allowlisted.
    disable: tuple[str, ...] = ()

    def enabled(self, family: str) -> bool:
        return family in self.patterns and family not in self.disable

    def enabled_families(self) -> tuple[str, ...]:
        return tuple(f for f in FAMILIES if self.enabled(f))

    def fingerprint(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)


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


_user_settings: dict[str, tuple[str, ...]] = {}


def configure(*, patterns: Any = None, disable: Any = None) -> None:
    """Set process-wide defaults; ``None`` leaves a setting as it is.

    >>> hubcompile.configure(disable=["gelu_tanh_gate"])
    """
    if patterns is not None:
        _user_settings["patterns"] = _family_list("patterns", patterns)
    if disable is not None:
        _user_settings["disable"] = _family_list("disable", disable)


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
    settings: dict[str, tuple[str, ...]] = {}
    for key, env in (("patterns", ENV_PATTERNS), ("disable", ENV_DISABLE)):
        if os.environ.get(env) is not None:
            settings[key] = _family_list(env, os.environ[env])
    settings.update(_user_settings)
    for key, value in (options or {}).items():
        settings[key] = _family_list(key, value)
    return HubConfig(**settings)
