"""Graph records that outlive a process, for compiles that Inductor answers from its cache.

On a hit of Inductor's FX graph cache or AOTAutograd's cache, hubcompile's passes do not
run (the cached code already holds their work), so they record nothing: the report would
say nothing was replaced and the performance guard would find no family to judge. Each
compile's records are therefore kept on disk (``$HUBCOMPILE_CACHE_DIR/graph_records.json``),
keyed by the graph as Dynamo gave it, its inputs and the passes' settings (the same
things Inductor's key depends on through the passes' uuid), and read back when a compile
records nothing. The numerical guards' results are not kept: a record read back says
which kernels replaced what, not how each compared with the reference.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json

import torch

from .lowering.disk_cache import DiskCache
from .records import GraphRecord

_DISK = DiskCache("graph_records.json", "graph records cache",
                  "compiles answered by Inductor's cache will report no replacements")


def key(gm: torch.fx.GraphModule, example_inputs, pass_uuid: str) -> str:
    """The key of a graph's records: its code, its inputs' shapes, strides and dtypes,
    the device and the passes' uuid (hubcompile's sources and settings)."""
    inputs = []
    for x in example_inputs:
        if isinstance(x, torch.Tensor):
            inputs.append([str(x.shape), str(x.stride()), str(x.dtype), str(x.device), bool(x.requires_grad)])
        else:
            inputs.append(repr(x))
    parts = {"graph": gm.code, "inputs": inputs, "passes": pass_uuid, "torch": torch.__version__,
             "grad": torch.is_grad_enabled()}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def store(k: str, records: list[GraphRecord]) -> None:
    _DISK.put(k, [_portable(r) for r in records])


def load(k: str) -> list[GraphRecord]:
    """The records stored under ``k``, each marked ``from_cache``; [] if none."""
    stored = _DISK.get(k)
    if not isinstance(stored, list):
        return []
    try:
        return [_record(d) for d in stored]
    except (TypeError, KeyError, ValueError):  # written by another hubcompile: as if absent
        return []


def clear(disk: bool = False) -> None:
    _DISK.clear(disk)


def _portable(record: GraphRecord) -> dict:
    bare = dataclasses.replace(record, guards={}, replacements={})
    data = dataclasses.asdict(bare)
    data["replacements"] = {family: [dataclasses.asdict(dataclasses.replace(r, guard=None)) for r in rs]
                            for family, rs in record.replacements.items()}
    return data


def _record(data: dict) -> GraphRecord:
    from .patterns.framework import Replacement

    pairs = lambda d: {k: [tuple(p) for p in v] for k, v in d.items()}  # noqa: E731 - JSON made them lists
    replacements = {family: [Replacement(**{**r, "nodes": tuple(r["nodes"]), "sources": tuple(r["sources"])})
                             for r in rs] for family, rs in data["replacements"].items()}
    return GraphRecord(**{**data, "spellings": pairs(data["spellings"]), "refused": pairs(data["refused"]),
                          "disabled": tuple(data["disabled"]), "replacements": replacements,
                          "from_cache": True})
