"""The hubcompile ops as compiled graphs call them: without the custom-op wrapper.

A ``torch.library.custom_op`` call passes through Python layers that a compiled graph does
not need: the autograd wrapper (AOTAutograd has already split forward and backward), the
dynamo-disable wrapper and the output-aliasing check. Measured on this project's CPU
machine, they made a call of ``hubcompile::rms_norm`` 45 us slower than its body; an
8-layer Llama training step makes about 100 such calls, and on an H200 that host time
kept the GPU waiting (bench/results/h200/2026-12-01/).

So each op gets a twin ``hubcompile_direct::<op>``: the same schema, defined with
``torch.library.Library``, whose only kernel is the op's Python body (the autograd key
falls through in C++) and whose fake is the op's fake. (A twin, not an overload of the op:
``torch.library.opcheck`` tests only operators without overloads.) After AOTAutograd, a pass
(passes/direct_ops.py) points every call of a forward or backward graph at it. Numbers,
kernels and runtime checks are the op's own.
"""

from __future__ import annotations

import torch
from torch._library.custom_ops import OPDEFS

NAMESPACE = "hubcompile_direct"
_lib = torch.library.Library(NAMESPACE, "DEF")  # noqa: TOR901 - owns the twins below
# hubcompile::<op>.default -> hubcompile_direct::<op>.default
_DIRECT: dict = {}


def define_twins() -> None:
    """Define the twin of every hubcompile op not yet done. Called when the package is
    imported: a graph loaded from Inductor's cache calls the twins without this pass
    having run in the process."""
    for qualname, opdef in list(OPDEFS.items()):
        namespace, _, name = qualname.partition("::")
        default = getattr(opdef, "_opoverload", None)
        if namespace != "hubcompile" or default is None or default in _DIRECT:
            continue
        _lib.define(str(default._schema).replace(f"{qualname}(", f"{name}(", 1))
        _lib.impl(name, opdef._init_fn, "CompositeExplicitAutograd")
        torch.library.register_fake(f"{NAMESPACE}::{name}", opdef._abstract_fn, lib=_lib)
        _DIRECT[default] = getattr(torch.ops.hubcompile_direct, name).default


def twin(target):
    """The twin of a hubcompile op overload, or None."""
    return _DIRECT.get(target)
