"""After AOTAutograd: every hubcompile op call that is still an op (not launched by
Inductor, passes/inline.py) goes to its twin ``hubcompile_direct::<op>``, which skips
``custom_op``'s Python wrappers that a compiled graph does not need
(lowering/direct_ops.py defines the twins)."""

from __future__ import annotations

import logging

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass

from ..lowering.direct_ops import twin
from ..records import source_hash

log = logging.getLogger(__name__)


def use_direct_ops(graph: torch.fx.Graph) -> int:
    """Point the graph's hubcompile op calls at their twins; how many."""
    done = 0
    for node in graph.nodes:
        direct = twin(node.target) if node.op == "call_function" else None
        if direct is not None:
            node.target = direct
            done += 1
    return done


class DirectOpsPass(CustomGraphPass):
    """Inductor's ``post_grad_custom_post_pass``: ``use_direct_ops`` on each graph."""

    def __call__(self, graph: torch.fx.Graph) -> None:
        try:
            use_direct_ops(graph)
        except Exception as e:  # noqa: BLE001 - the ops as they are still run
            log.warning("hubcompile: direct op calls not used (%s: %s)", type(e).__name__, e)

    def uuid(self) -> str:
        return source_hash()
