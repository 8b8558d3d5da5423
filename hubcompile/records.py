"""What hubcompile did to each graph, and the hash of its own sources: the ground floor
that the backend, the passes and the report all read."""

from __future__ import annotations

import dataclasses
import hashlib
import re
from pathlib import Path

import torch


@dataclasses.dataclass
class GraphRecord:
    """What hubcompile did to one graph handed to Inductor."""

    replaced: dict[str, int]  # family -> number of matches replaced
    spellings: dict[str, list[tuple[str, str]]]  # family -> (spelling, kernel) of each replacement
    refused: dict[str, list[tuple[str, str]]]  # family -> (spelling, reason)
    disabled: tuple[str, ...]  # families that did not run
    refused_at: dict[str, list[str]] = dataclasses.field(default_factory=dict)  # source line per refusal
    # family -> (spelling, kernel, guards.GuardResult) of each numerical guard consulted
    guards: dict[str, list] = dataclasses.field(default_factory=dict)
    # family -> framework.Replacement of each match replaced
    replacements: dict[str, list] = dataclasses.field(default_factory=dict)
    # Before the passes: node -> source line, and nodes that suggest a family (explain.py)
    sources: dict[str, str] = dataclasses.field(default_factory=dict)
    tells: dict[str, dict[str, str | None]] = dataclasses.field(default_factory=dict)  # node -> {family: why not}
    code_before: str = ""  # the graph as Python code, before and after the passes
    code_after: str = ""
    # op -> {how it is launched: calls}: "Inductor" (its generated code launches the
    # kernel, passes/inline.py) or "op: <why it stayed an op>", over forward and backward
    launches: dict[str, dict[str, int]] = dataclasses.field(default_factory=dict)
    # The same for the code run between runtime checks, where a second compile made it
    # (guards/runtime_checks.py); empty otherwise
    launches_between_checks: dict[str, dict[str, int]] = dataclasses.field(default_factory=dict)
    # family -> why the performance guard gave its replacements up (guards/performance.py)
    dropped: dict[str, str] = dataclasses.field(default_factory=dict)
    # Read back from disk: Inductor answered this compile from its cache, so the passes
    # did not run (cached_records.py); the numerical guards' results are not in it.
    from_cache: bool = False
    # Why hubcompile's compile of this graph failed, Inductor compiling it alone (backend.py)
    failed: str = ""

    @property
    def total(self) -> int:
        return sum(self.replaced.values())


# Every graph rewritten in this process, in order. ``hubcompile.reports()`` reads it.
RECORDS: list[GraphRecord] = []


def source_hash() -> str:
    """Hash of hubcompile's sources: a code change must miss Inductor's caches."""
    root = Path(__file__).parent
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def graph_code(graph: torch.fx.Graph) -> str:
    """The graph as Python, without fx's ``;  x = None`` memory-freeing suffixes."""
    src = graph.python_code(root_module="self").src.strip()
    return "\n".join(re.sub(r";\s+[\w\s=,]+= None$", "", line) for line in src.splitlines())
