"""Kernel mappings in the vocabulary of ``kernels`` and transformers, as hubcompile specs.

Users of Hub kernels already describe them as a mapping from a *layer name* (the name a
model class is decorated with, ``@use_kernel_forward_from_hub("RMSNorm")``) to a Hub
layer: an ``nn.Module`` class of a repo's ``layers`` module whose ``forward`` runs with
the original module as ``self``. Both forms are accepted as ``kernel_mapping=``:

- transformers: a ``KernelConfig(kernel_mapping=..., use_local_kernel=...)`` or its dict,
  with values ``"org/repo:Layer"`` (version 1), ``("org/repo:Layer", {"version": N |
  "revision": r, "trust_remote_code": bool})``, ``"/abs/path:Layer"`` (a local repo),
  or a dict of those per device (``{"cuda": ..., "rocm": ...}``);
- kernels: ``{name: {device: repo | {Mode: repo}}}`` with ``LayerRepository``,
  ``LocalLayerRepository`` and ``LockedLayerRepository`` values, devices as strings
  or ``kernels.Device`` (CUDA capability ranges included).

The key ``attn_implementation`` takes a repo the way transformers' ``attn_implementation=``
does ("kernels-community/flash-attn2[@revision]"); its ``flash_attn_func`` serves the
attention family (``adapters.FlashAttn``).

Each layer name maps to the kernel group of the hubcompile family computing the same
thing (``LAYER_NAMES``); an entry becomes a layer spec of ``kernels.py``
(``hub:<org>/<repo>@<N>:<Layer>#<name>``), tried before the group's other candidates.
The entry used is picked at compile time by the match's device and by mode
(``mode_order``), as ``kernelize`` picks.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

# Layer name -> (kernel group, the activation a gated match must use, or None).
LAYER_NAMES: dict[str, tuple[str, str | None]] = {
    "RMSNorm": ("rmsnorm", None),
    "LayerNorm": ("layer_norm", None),
    "rotary_pos_emb": ("rotary", None),
    "SiLU": ("activation", "silu"),
    "SiluAndMul": ("activation", "silu"),
    "GeluTanh": ("activation", "gelu_tanh"),
    "NewGELU": ("activation", "gelu_tanh"),
    "FastGELU": ("activation", "gelu_tanh"),
    "GeluTanhAndMul": ("activation", "gelu_tanh"),
    # A whole gated MLP (gate_proj/up_proj/down_proj), matched before its gate alone.
    "MLP": ("mlp", "silu"),
    "SwiGLUMLP": ("mlp", "silu"),
    "GeGLUMLP": ("mlp", "gelu_tanh"),
    "causal_conv1d_fn": ("causal_conv1d", None),
    # The LM head's loss, from the hidden states and the head's weight (liger's layer).
    "ForCausalLMLoss": ("linear_cross_entropy", None),
    # Not a layer: the value is what transformers takes as ``attn_implementation``,
    # "org/repo[@revision]", a repo exporting flash_attn_func (adapters.FlashAttn).
    "attn_implementation": ("attention", None),
}
ATTN = "attn_implementation"

log = logging.getLogger(__name__)
_WARNED: set[str] = set()  # unserved layer names already warned about in this process

# Devices a mapping may name (those of kernels); hubcompile compiles for the first five.
DEVICES = ("cuda", "rocm", "xpu", "mps", "cpu", "npu", "neuron", "tpu")
ANY_DEVICE = "*"

# Modes as kernels spells them, and the order in which a compile looks for them. hubcompile
# compiles, so it first looks where ``kernelize(mode=X | Mode.TORCH_COMPILE)`` looks, in the
# same order. A Hub layer runs inside an opaque custom op, never traced, as in eager code,
# so the entries for the eager mode ``X`` come next, before FALLBACK (kernelize's own
# order for X | TORCH_COMPILE would put FALLBACK before them and never reach them).
MODES = ("fallback", "inference", "training", "inference|torch_compile", "training|torch_compile")
_ORDER = {
    False: ("inference|torch_compile", "training|torch_compile", "inference", "training", "fallback"),
    True: ("training|torch_compile", "training", "fallback"),
}


def mode_order(training: bool) -> tuple[str, ...]:
    return _ORDER[bool(training)]


@dataclasses.dataclass(frozen=True)
class Entry:
    """One (layer name, device, mode) of a mapping."""

    name: str  # the layer name (a key of LAYER_NAMES)
    group: str
    device: str  # a DEVICES kind, or ANY_DEVICE
    min_capability: int  # CUDA/ROCm capability range (major * 10 + minor), inclusive
    max_capability: int
    mode: str  # one of MODES
    spec: str
    trusted_repo: str | None = None  # a repo its trust_remote_code lets load


_MAX_CAP = 10**6

FORMS = (
    "'org/repo:Layer'", "('org/repo:Layer', {'version': N | 'revision': r, 'trust_remote_code': bool})",
    "'/abs/path:Layer' (a local repo)", "LayerRepository(...)", "LocalLayerRepository(...)",
    "LockedLayerRepository(...)", "{device: one of those}", "{device: {Mode: repository}}",
)


def _error(what: str, value: Any, valid: str) -> ValueError:
    return ValueError(f"kernel_mapping: {what} {value!r}; {valid}")


def parse(value: Any) -> tuple[Entry, ...]:
    """A KernelConfig, its ``kernel_mapping`` dict, or a kernels mapping -> entries.
    Raises ValueError naming the bad key or value and the valid choices."""
    use_local = False
    if hasattr(value, "kernel_mapping") and not isinstance(value, Mapping):  # transformers.KernelConfig
        use_local = bool(getattr(value, "use_local_kernel", False))
        value = value.kernel_mapping
    if not isinstance(value, Mapping):
        raise _error("must be a transformers KernelConfig or a dict {layer name: repository}, got", value,
                     f"layer names: {', '.join(LAYER_NAMES)}")
    entries = []
    for name, per_device in value.items():
        served = name in LAYER_NAMES
        group = LAYER_NAMES[name][0] if served else ""
        found = []  # built for an unserved name too: a malformed value is an error either way
        if isinstance(per_device, Mapping) and not _is_mode_dict(per_device):
            for device, repos in per_device.items():
                kind, lo, hi = _device(name, device)
                found += _modes(name, group, kind, lo, hi, repos, use_local)
        else:
            found += _modes(name, group, ANY_DEVICE, 0, _MAX_CAP, per_device, use_local)
        if served:
            entries += found
        else:
            # As kernelize skips names no module uses: a KernelConfig written for
            # use_kernels=True (transformers' own names: MegaBlocksMoeMLP, ...) compiles.
            _warn_unserved(name)
    return tuple(entries)


def _warn_unserved(name: str) -> None:
    if name in _WARNED:
        return
    _WARNED.add(name)
    log.warning("hubcompile: kernel_mapping: skipping the layer name %r (no hubcompile family computes that "
                "layer); the names served are %s", name, ", ".join(LAYER_NAMES))


def _is_mode_dict(d: Mapping) -> bool:
    from kernels import Mode

    return bool(d) and all(isinstance(k, Mode) for k in d)


def _device(name: str, device: Any) -> tuple[str, int, int]:
    kind = getattr(device, "type", device)  # kernels.Device or a string
    if not isinstance(kind, str) or kind not in DEVICES:
        raise _error(f"unknown device for {name!r}:", device, f"valid devices: {', '.join(DEVICES)}")
    props = getattr(device, "properties", None)
    if props is None:
        return kind, 0, _MAX_CAP
    return kind, int(props.min_capability), int(props.max_capability)


def _mode_name(name: str, mode: Any) -> str:
    from kernels import Mode

    valid = "valid modes: Mode.FALLBACK, Mode.INFERENCE, Mode.TRAINING, each of the last two | Mode.TORCH_COMPILE"
    if not isinstance(mode, Mode):
        raise _error(f"unknown mode for {name!r}:", mode, valid)
    if mode == Mode.FALLBACK:
        return "fallback"
    base = "training" if Mode.TRAINING in mode else "inference" if Mode.INFERENCE in mode else None
    if base is None:
        raise _error(f"mode for {name!r} names neither inference nor training:", mode, valid)
    return base + ("|torch_compile" if Mode.TORCH_COMPILE in mode else "")


def _modes(name, group, kind, lo, hi, repos, use_local) -> list[Entry]:
    if isinstance(repos, Mapping):
        if not repos:
            raise _error(f"empty mode dict for {name!r}:", repos, f"give {{Mode: repository}}")
        items = [(_mode_name(name, m), r) for m, r in repos.items()]
    else:
        items = [("fallback", repos)]  # kernels' register_kernel_mapping does the same
    out = []
    for mode, repo in items:
        spec, trusted = _spec(name, repo, use_local)
        out.append(Entry(name, group, kind, lo, hi, mode, spec, trusted))
    return out


def _split_layer(name: str, text: str) -> tuple[str, str]:
    repo, sep, layer = text.rpartition(":")
    if not sep or not repo or not layer.isidentifier():
        raise _error(f"malformed repository for {name!r}:", text,
                     "give 'org/repo:Layer' or '/abs/path:Layer' (the layer is a class of the repo's layers module)")
    return repo, layer


def _spec(name: str, repo: Any, use_local: bool) -> tuple[str, str | None]:
    """A repository in any accepted form -> (layer spec, repo trusted by trust_remote_code)."""
    from kernels import LayerRepository, LocalLayerRepository, LockedLayerRepository

    if name == ATTN:
        return _attention_spec(repo, use_local)
    if isinstance(repo, LayerRepository):
        return _hub_spec(name, repo._repo_id, repo.layer_name, repo._version, repo._revision,
                         repo._trust_remote_code)
    if isinstance(repo, LocalLayerRepository):
        return f"local:{Path(repo._repo_path)}:{repo.layer_name}#{name}", None
    if isinstance(repo, LockedLayerRepository):
        return f"locked:{repo._repo_id}@{_lockfile(repo)}:{repo.layer_name}#{name}", \
            _trusted(repo._repo_id, repo._trust_remote_code)
    if isinstance(repo, str):
        path, layer = _split_layer(name, repo)
        if use_local or path.startswith(("/", ".", "~")):
            return f"local:{Path(path).expanduser()}:{layer}#{name}", None
        return _hub_spec(name, path, layer, 1, None, False)  # transformers: a bare string is version 1
    # a tuple, or a list as JSON gives it (``hubcompile diff --options``)
    if isinstance(repo, (tuple, list)) and len(repo) == 2 and isinstance(repo[0], str) \
            and isinstance(repo[1], Mapping):
        text, meta = repo
        unknown = set(meta) - {"version", "revision", "trust_remote_code"}
        if unknown:
            raise _error(f"unknown metadata key for {name!r}:", sorted(unknown)[0],
                         "valid keys: version, revision, trust_remote_code")
        version, revision, trust = meta.get("version"), meta.get("revision"), meta.get("trust_remote_code", False)
        if (version is None) == (revision is None):
            raise _error(f"metadata for {name!r} must give exactly one of version and revision, got", dict(meta),
                         "e.g. {'version': 1} or {'revision': 'main'}")
        if not isinstance(trust, bool):
            raise _error(f"trust_remote_code for {name!r} must be True or False, got", trust, "give a bool")
        path, layer = _split_layer(name, text)
        if use_local or path.startswith(("/", ".", "~")):
            return f"local:{Path(path).expanduser()}:{layer}#{name}", None
        return _hub_spec(name, path, layer, version, revision, trust)
    raise _error(f"unknown repository form for {name!r}:", repo, f"valid forms: {', '.join(FORMS)}")


def _attention_spec(text: Any, use_local: bool) -> tuple[str, None]:
    """transformers' ``attn_implementation`` syntax, "org/repo[@revision][:flash_attn_func]",
    at the version transformers loads for that repo when no revision is given."""
    form = "'org/repo[@revision]' as transformers' attn_implementation takes it, e.g. 'kernels-community/flash-attn2'"
    if not isinstance(text, str):
        raise _error(f"unknown repository form for {ATTN!r}:", text, f"give {form}")
    body, _, func = text.partition(":") if not use_local else (text, "", "")
    if func and func.strip() != "flash_attn_func":
        raise _error(f"{ATTN!r} names the function", func, "hubcompile calls flash_attn_func")
    if use_local or body.startswith(("/", ".", "~")):
        return f"local:{Path(body).expanduser()}#flash_attn", None
    repo_id, _, rev = body.strip().partition("@")
    if repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise _error(f"malformed repository for {ATTN!r}:", text, f"give {form}")
    if rev:
        return f"hub:{repo_id}@rev={rev}#flash_attn", None
    return f"hub:{repo_id}@{_attention_version(repo_id)}#flash_attn", None


def _attention_version(repo_id: str) -> int:
    try:  # the versions transformers pins for the flash-attention repos
        from transformers.integrations.hub_kernels import get_attn_kernel_version

        return int(get_attn_kernel_version(repo_id))
    except Exception:  # noqa: BLE001 - transformers absent or changed: kernels' first version
        return 1


def _hub_spec(name, repo_id, layer, version, revision, trust) -> tuple[str, str | None]:
    if "/" not in str(repo_id):
        raise _error(f"repository for {name!r} is not 'org/repo':", repo_id, "give a Hub repo id like "
                     "'kernels-community/liger-kernels'")
    if version is not None:
        if isinstance(version, bool) or not isinstance(version, int):
            raise _error(f"version for {name!r} must be an integer major version, got", version,
                         "kernels versions are integers (branch v<N>)")
        pin = str(version)
    else:
        if not isinstance(revision, str) or not revision:
            raise _error(f"revision for {name!r} must be a non-empty string, got", revision, "e.g. 'main' or a commit")
        pin = f"rev={revision}"
    return f"hub:{repo_id}@{pin}:{layer}#{name}", _trusted(repo_id, trust)


def _trusted(repo_id: str, trust) -> str | None:
    if trust is True or (isinstance(trust, (list, tuple)) and repo_id in trust):
        return repo_id
    return None


def _lockfile(repo) -> str:
    """The lockfile a LockedLayerRepository read; one found by kernels from the caller's
    project (no ``lockfile=``) is written to hubcompile's cache dir so the spec can name it."""
    if getattr(repo, "_lockfile", None) is not None:
        return str(Path(repo._lockfile))
    text = repo.kernel_locks.to_json()
    root = Path(os.environ.get("HUBCOMPILE_CACHE_DIR", Path.home() / ".cache" / "hubcompile")) / "locks"
    root.mkdir(parents=True, exist_ok=True)
    path = root / f"{hashlib.sha256(text.encode()).hexdigest()[:16]}.lock"
    if not path.exists():
        path.write_text(text)
    return str(path)


# --------------------------------------------------------------- choosing entries


def candidates(entries, group: str, device, training: bool, activation: str | None = None) -> tuple[str, ...]:
    """The specs of ``entries`` for a match of ``group`` on ``device`` (a DeviceInfo), in
    the order to try: the device's own entries (for CUDA/ROCm, those of the smallest
    capability range holding the device's, as kernels picks), else the any-device ones;
    then by mode (``mode_order``)."""
    mine = [e for e in entries if e.group == group
            and (activation is None or LAYER_NAMES[e.name][1] in (None, activation))]
    cap = device.capability[0] * 10 + device.capability[1] if getattr(device, "capability", None) else None
    exact = [e for e in mine if e.device == device.kind
             and (cap is None or e.min_capability <= cap <= e.max_capability)]
    if exact:
        narrowest = min(e.max_capability - e.min_capability for e in exact)
        chosen = [e for e in exact if e.max_capability - e.min_capability == narrowest]
    else:
        chosen = [e for e in mine if e.device == ANY_DEVICE]
    by_mode = {}
    for e in chosen:
        by_mode.setdefault(e.mode, []).append(e.spec)
    return tuple(dict.fromkeys(s for m in mode_order(training) for s in by_mode.get(m, ())))


class Overrides(dict):
    """{group: specs} of the ``kernels`` option, plus a mapping's entries chosen per match."""

    def __init__(self, kernels: dict, entries: tuple = ()):
        super().__init__(kernels)
        self.entries = tuple(e if isinstance(e, Entry) else Entry(*e) for e in entries)

    def mapped(self, group: str, device, training: bool, activation: str | None = None) -> tuple[str, ...]:
        return candidates(self.entries, group, device, training, activation) if self.entries else ()
