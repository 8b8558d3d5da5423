"""The graph-diff report: what hubcompile replaced, by what, and why not.

    report = hubcompile.explain(model, input_ids)          # compiles and runs once
    print(report)                                         # text for terminals
    report.to_json(); report.html()                       # for tools / a browser

The same from a shell: ``hubcompile diff llama`` or ``hubcompile diff my_model.py:build``.

Per Dynamo graph the report has the replacements (family, spelling, the source lines of
the nodes consumed, the op and kernel, the guard's verdict), the near misses (matches
refused with their reason, families disabled by config, and places that look like a
family but matched no spelling), totals per family, and the graph before and after as
code with a unified diff.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import html
import json
import operator
import re

import torch

from . import records
from .config import FAMILIES

aten = torch.ops.aten

# Nodes that betray a family in an ATen graph. One left in the rewritten graph is a
# place the family's patterns did not replace (or its backward, in a training graph).
_TELLS = {
    # rsqrt(mean(x^2) + eps); LayerNorm's rsqrt reads var_mean instead
    "rmsnorm": lambda n: n.target == aten.rsqrt.default and _arg_chain(n, aten.add.Tensor, aten.mean.dim),
    # LayerNorm decomposes into var_mean (layer_norm matches before that: one left was kept)
    "layer_norm": lambda n: n.target == aten.var_mean.correction,
    # silu arrives decomposed: x / (1 + exp(-x)), or as x * sigmoid(x)
    "silu_gate": lambda n: (n.target == aten.sigmoid.default
                            or (n.target == aten.exp.default and _arg_chain(n, aten.neg.default))) and _gated(n),
    "gelu_tanh_gate": lambda n: n.target == aten.tanh.default and _gated(n),
    # a softmax over matmul scores (not a loss's log-softmax over logits)
    "attention": lambda n: n.target in (aten.amax.default, aten._softmax.default) and _after_bmm(n),
    "causal_conv1d": lambda n: n.target == aten.convolution.default and len(n.args) > 8 and n.args[8] != 1,
    "rotary": lambda n: n.target == aten.cat.default and any(
        getattr(a, "target", None) == aten.neg.default for a in n.args[0]),
}


def _ancestors(node, hops: int) -> set:
    """Nodes at most ``hops`` inputs upstream of ``node``."""
    seen, frontier = set(), [node]
    for _ in range(hops):
        frontier = [a for n in frontier for a in n.all_input_nodes if a not in seen]
        seen.update(frontier)
    return seen


def _descendants(node, hops: int) -> set:
    """Nodes at most ``hops`` users downstream of ``node``."""
    seen, frontier = set(), [node]
    for _ in range(hops):
        frontier = [u for n in frontier for u in n.users if u not in seen]
        seen.update(frontier)
    return seen


def _after_bmm(node, hops: int = 10) -> bool:
    return any(n.target in (aten.bmm.default, aten.baddbmm.default) for n in _ancestors(node, hops))


def _arg_chain(node, *targets) -> bool:
    """node.args[0] has targets[0], its args[0] targets[1], ..."""
    for target in targets:
        node = node.args[0] if node.args and isinstance(node.args[0], torch.fx.Node) else None
        if node is None or node.target != target:
            return False
    return True


def _near(node) -> set:
    """A node and its direct inputs (a slice of a fused projection: the node alone)."""
    if node.target in (operator.getitem, aten.slice.Tensor, aten.split.Tensor, aten.split_with_sizes.default):
        return {node}
    return {node, *node.all_input_nodes}


def _gated(node, hops: int = 5) -> bool:
    """An activation whose result is multiplied by a tensor computed apart from its own
    input (the "up" projection of a gated MLP), within a few ops."""
    ancestors = _ancestors(node, 8)
    seen, frontier = {node}, [node]
    for _ in range(hops):
        nxt = []
        for n in frontier:
            for u in n.users:
                if u.target == aten.mul.Tensor:
                    others = [a for a in u.all_input_nodes if a not in seen]
                    if others and not any(_near(o) & ancestors for o in others):
                        return True
                if u not in seen:
                    seen.add(u)
                    nxt.append(u)
        frontier = nxt
    return False


@dataclasses.dataclass(frozen=True)
class NearMiss:
    family: str
    where: str  # a node name, a spelling, or "*"
    kind: str  # refused | guard | no kernel | disabled | perf guard | not matched | failed
    reason: str
    source: str = ""


@dataclasses.dataclass
class GraphReport:
    index: int
    record: records.GraphRecord

    @property
    def replacements(self) -> list:
        return [r for family in FAMILIES for r in self.record.replacements.get(family, [])]

    @functools.cached_property
    def near_misses(self) -> list[NearMiss]:
        misses = []
        if self.record.failed:
            misses.append(NearMiss("*", "*", "failed", self.record.failed))
        defined = set(re.findall(r"^\s+(\w+) = ", self.record.code_after, flags=re.M))
        for family in FAMILIES:
            if family in self.record.dropped:
                misses.append(NearMiss(family, "*", "perf guard", "the performance guard gave this family's "
                                       f"replacements up: {self.record.dropped[family]}", ""))
                continue
            if family in self.record.disabled:
                for name, fams in self.record.tells.items():
                    if family in fams:
                        misses.append(NearMiss(family, name, "disabled", "family disabled by config (options "
                                               "patterns/disable, HUBCOMPILE_PATTERNS/HUBCOMPILE_DISABLE)",
                                               self.record.sources.get(name, "")))
                continue
            refused = self.record.refused.get(family, [])
            at = self.record.refused_at.get(family, [])
            for i, (spelling, reason) in enumerate(refused):
                kind = ("guard" if reason.startswith("guard failed") else
                        "no kernel" if reason.startswith("no usable kernel") else "refused")
                source = at[i] if i < len(at) else ""
                misses.append(NearMiss(family, spelling, kind, reason, source))
            # Tells left over that no refusal explains: no spelling matched them.
            left = [name for name, fams in self.record.tells.items() if family in fams and name in defined]
            for name in left[len(refused):]:
                misses.append(NearMiss(family, name, "not matched",
                                       self.record.tells[name].get(family) or
                                       f"looks like {family} but matched none of its spellings",
                                       self.record.sources.get(name, "")))
        return misses

    @property
    def totals(self) -> dict[str, dict[str, int]]:
        counts = {f: {"replaced": self.record.replaced.get(f, 0), "kept": 0} for f in FAMILIES}
        for miss in self.near_misses:
            if miss.family in counts:
                counts[miss.family]["kept"] += 1
        return counts

    @property
    def diff(self) -> str:
        return "\n".join(difflib.unified_diff(self.record.code_before.splitlines(),
                                              self.record.code_after.splitlines(), "before", "after", lineterm=""))

    def to_json(self) -> dict:
        return {
            "graph": self.index,
            "totals": self.totals,
            "replacements": [_replacement_json(r) for r in self.replacements],
            "near_misses": [dataclasses.asdict(m) for m in self.near_misses],
            "launches": self.record.launches,
            "launches_between_checks": self.record.launches_between_checks,
            "code_before": self.record.code_before,
            "code_after": self.record.code_after,
            "diff": self.diff,
        }

    def text(self, diff: bool = True) -> str:
        out = [f"== graph {self.index}: {self.record.total} replaced, {len(self.near_misses)} kept =="]
        if self.record.from_cache:
            out.append("(compiled code from Inductor's cache: the record is the one its compile left; the "
                       "numerical guards' results are not in it)")
        rows = [["family", "spelling", "op", "kernel", "guard", "nodes", "source"]]
        for r in self.replacements:
            rows.append([r.family, r.spelling, f"hubcompile::{r.op}" + (" +backward" if r.training else ""),
                         r.kernel, _verdict(r.guard), str(len(r.nodes)),
                         (r.sources[0] + (f" (+{len(r.sources) - 1} lines)" if len(r.sources) > 1 else ""))
                         if r.sources else "-"])
        out += ["replacements:", format_table(rows) if len(rows) > 1 else "  (none)"]
        layers = _layer_rows(self.replacements)
        if len(layers) > 1:
            out += ["hub layers (from a kernel mapping):", format_table(layers)]
        rows = [["family", "where", "kind", "reason"]]
        for m in self.near_misses:
            reason = " ".join(m.reason.split())
            rows.append([m.family, m.where + (f" ({m.source})" if m.source else ""), m.kind,
                         reason if len(reason) <= 160 else reason[:157] + "..."])
        out += ["near misses:", format_table(rows) if len(rows) > 1 else "  (none)"]
        if self.record.launches:
            out += ["launched (forward and backward graphs):", format_table(_launch_rows(self.record.launches))]
        if self.record.launches_between_checks:
            out += ["launched between runtime checks (all calls but the checked ones):",
                    format_table(_launch_rows(self.record.launches_between_checks))]
        out += ["totals:", format_table(_totals_rows(self.totals))]
        if diff:
            out += ["diff:", _indent(self.diff or "(no change)")]
        return "\n".join(out)


@dataclasses.dataclass
class Report:
    graphs: list[GraphReport]
    # What the performance guard decided for the graphs of this compile (guards/performance.py)
    perf_guard: list[str] = dataclasses.field(default_factory=list)

    @property
    def totals(self) -> dict[str, dict[str, int]]:
        totals = {f: {"replaced": 0, "kept": 0} for f in FAMILIES}
        for g in self.graphs:
            for f, c in g.totals.items():
                totals[f]["replaced"] += c["replaced"]
                totals[f]["kept"] += c["kept"]
        return totals

    def text(self, diff: bool = True) -> str:
        head = [f"hubcompile report: {len(self.graphs)} graph(s)"]
        if not self.graphs:
            head.append("no graph was compiled by hubkernels (an Inductor cache hit skips the passes: "
                        "explain() turns the caches off; was the model run?)")
        head += [f"perf guard: {line}" for line in self.perf_guard]
        return "\n\n".join(["\n".join(head), format_table(_totals_rows(self.totals)),
                              *[g.text(diff) for g in self.graphs]])

    __str__ = text

    def to_json(self) -> str:
        return json.dumps({"totals": self.totals, "perf_guard": self.perf_guard,
                           "graphs": [g.to_json() for g in self.graphs]}, indent=1)

    def html(self) -> str:
        return _html(self)


def explain(model, *args, train: bool = False, **compile_kwargs) -> Report:
    """Compile ``model`` with ``backend="hubkernels"`` (``compile_kwargs`` go to
    ``torch.compile``), run it once on ``args`` (with ``train=True`` also backward
    through the ``loss`` or the sum of the output) and report what was replaced."""
    compile_kwargs.setdefault("backend", "hubkernels")
    if compile_kwargs["backend"] != "hubkernels":
        raise ValueError(f"explain() reports on backend='hubkernels', got backend={compile_kwargs['backend']!r}")
    from .guards import performance as perf_guard

    torch._dynamo.reset()
    start, decided = len(records.RECORDS), len(perf_guard.DECISIONS)
    compiled = torch.compile(model, **compile_kwargs)
    # On an Inductor cache hit the passes do not run: turn the caches off.
    with torch._inductor.config.patch(fx_graph_cache=False), \
            torch._functorch.config.patch(enable_autograd_cache=False), torch.set_grad_enabled(train):
        out = compiled(*args)
        if train:
            loss = getattr(out, "loss", None)
            loss = loss if loss is not None else (out[0] if isinstance(out, tuple) else out).float().sum()
            loss.backward()
    return Report([GraphReport(i, r) for i, r in enumerate(records.RECORDS[start:])],
                  [d.describe() for d in perf_guard.DECISIONS[decided:]])


def survey(graph: torch.fx.Graph) -> tuple[dict[str, str], dict[str, list[str]]]:
    """Before the passes: (node name -> source line, tell node -> families it suggests)."""
    from .patterns.framework import source_line

    sources, tells = {}, {}
    for node in graph.nodes:
        line = source_line(node)
        if line:
            sources[node.name] = line
        if node.op == "call_function":
            fams = {f: _safe_why_not(f, node) for f, tell in _TELLS.items() if _safe(tell, node)}
            if fams:
                tells[node.name] = fams
    return sources, tells


def _why_not(family: str, node) -> str | None:
    """A specific reason a tell node cannot be a family's match, where one is known."""
    if family == "rmsnorm":
        from .patterns.rmsnorm import weight_after

        for user in node.users:  # the rsqrt's x * rsqrt(...)
            weight = weight_after(user) if user.target == aten.mul.Tensor else None
            if weight is not None:
                return ("an RMSNorm scaled by a weight after the norm, in a spelling none of the weighted "
                        "forms matches (the weightless forms leave a weighted norm whole)")
    if family == "attention":
        # walk back from the softmax towards the scores' matmul
        seen = _ancestors(node, 10)
        targets = {n.target for n in seen}
        if aten.tanh.default in targets:
            return ("attention with logit soft-capping (tanh(scores / cap) * cap, Gemma 2): the attention "
                    "kernels have no soft-cap, so it stays with Inductor")
        after = _descendants(node, 6)
        inputs = {a for n in after for a in n.all_input_nodes}
        near = {n.target for n in after | inputs | {a for n in inputs for a in n.all_input_nodes}}
        if {torch.ops.prims.inductor_random.default, aten.native_dropout.default, aten.bernoulli.p,
                aten.rand.default} & near:
            return "attention with dropout p > 0 (training): the pattern has no dropout, so it stays with Inductor"
    return None


def _safe_why_not(family: str, node) -> str | None:
    try:
        return _why_not(family, node)
    except Exception:  # noqa: BLE001 - a reason is a heuristic, never an error
        return None


def _safe(tell, node) -> bool:
    try:
        return bool(tell(node))
    except Exception:  # noqa: BLE001 - a tell is a heuristic, never an error
        return False


# ------------------------------------------------------------------------ formatting


def _verdict(guard) -> str:
    if guard is None:
        return "off"
    return "passed" if guard.passed else "failed"


def _replacement_json(r) -> dict:
    data = dataclasses.asdict(dataclasses.replace(r, guard=None))
    data["guard"] = None if r.guard is None else {"passed": r.guard.passed, "source": r.guard.source,
                                                  **r.guard.to_json()}
    for key, spec in (("layer", r.kernel), ("backward_layer", r.backward_kernel)):
        layer = _layer_of(spec)
        if layer is not None:
            data[key] = layer
    return data


def _layer_of(spec: str) -> dict | None:
    """{layer, repo, stands_for} of a Hub layer spec, None for other kernels."""
    from .lowering.kernels import KernelSpec, is_layer

    try:
        if not is_layer(spec):
            return None
        parsed = KernelSpec.parse(spec)
    except ValueError:
        return None
    return {"layer": parsed.layer, "repo": parsed.where, "stands_for": parsed.adapter}


def _layer_rows(replacements) -> list[list[str]]:
    """One row per Hub layer a graph's replacements call: the layer, its repo, the layer
    name it stands for, and the matches it runs forward and backward."""
    counts: dict[tuple, list[int]] = {}
    for r in replacements:
        for i, spec in enumerate((r.kernel, r.backward_kernel if r.training else None)):
            layer = _layer_of(spec) if spec else None
            if layer is not None:
                counts.setdefault((layer["layer"], layer["stands_for"], layer["repo"]), [0, 0])[i] += 1
    return [["layer", "stands for", "repo", "forward", "backward"]] + [
        [layer, name, repo, str(f), str(b)] for (layer, name, repo), (f, b) in counts.items()]


def _launch_rows(launches: dict) -> list[list[str]]:
    """op | calls whose kernel Inductor launches from its own code | calls left as ops, and why."""
    rows = [["op", "by Inductor", "as op", "why an op"]]
    for op, ways in sorted(launches.items()):
        ops = {how.removeprefix("op: "): n for how, n in ways.items() if how != "Inductor"}
        rows.append([f"hubcompile::{op}", str(ways.get("Inductor", 0)), str(sum(ops.values())),
                     "; ".join(ops) or "-"])
    return rows


def _totals_rows(totals: dict) -> list[list[str]]:
    return [["family", "replaced", "kept"]] + [[f, str(c["replaced"]), str(c["kept"])] for f, c in totals.items()]


def format_table(rows: list[list[str]], indent: str = "  ") -> str:
    """Rows of strings as aligned columns, a rule under the header row."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [indent + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, indent + "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _indent(text: str) -> str:
    return "\n".join("  " + line for line in text.splitlines())


_CSS = """
body{font:14px system-ui,sans-serif;margin:1.5em;color:#222}
table{border-collapse:collapse;margin:.5em 0 1em}td,th{border:1px solid #ccc;padding:2px 8px;text-align:left}
.cols{display:flex;gap:1em}.col{flex:1;min-width:0}
pre{font:12px ui-monospace,monospace;background:#f7f7f7;padding:.5em;overflow-x:auto}
.consumed{background:#ffd7d7}.replaced{background:#c8f7c5;font-weight:bold}
"""


def _code_html(code: str, highlight, cls: str) -> str:
    lines = []
    for line in code.splitlines():
        esc = html.escape(line)
        lines.append(f'<span class="{cls}">{esc}</span>' if highlight(line) else esc)
    return "<pre>" + "\n".join(lines) + "</pre>"


def _html_table(rows: list[list[str]]) -> str:
    if len(rows) == 1:
        return "<p>(none)</p>"
    head = "".join(f"<th>{html.escape(c)}</th>" for c in rows[0])
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows[1:])
    return f"<table><tr>{head}</tr>{body}</table>"


def _html(report: Report) -> str:
    parts = [f"<h1>hubcompile report: {len(report.graphs)} graph(s)</h1>",
             _html_table(_totals_rows(report.totals))]
    for g in report.graphs:
        consumed = {n for r in g.replacements for n in r.nodes}

        def was_consumed(line, consumed=consumed):
            m = re.match(r"\s+(\w+) = ", line)
            return bool(m and m.group(1) in consumed)

        parts.append(f"<h2>graph {g.index}: {g.record.total} replaced</h2>")
        parts.append("<h3>replacements</h3>" + _html_table([["family", "spelling", "op", "kernel", "guard", "source"]] + [
            [r.family, r.spelling, f"hubcompile::{r.op}", r.kernel, _verdict(r.guard), "; ".join(r.sources) or "-"]
            for r in g.replacements]))
        layers = _layer_rows(g.replacements)
        if len(layers) > 1:
            parts.append("<h3>hub layers (from a kernel mapping)</h3>" + _html_table(layers))
        parts.append("<h3>near misses</h3>" + _html_table([["family", "where", "kind", "reason"]] + [
            [m.family, m.where, m.kind, m.reason] for m in g.near_misses]))
        parts.append('<div class="cols"><div class="col" id="before"><h3>before</h3>'
                     + _code_html(g.record.code_before, was_consumed, "consumed")
                     + '</div><div class="col" id="after"><h3>after</h3>'
                     + _code_html(g.record.code_after, lambda line: "torch.ops.hubcompile." in line, "replaced")
                     + "</div></div>")
    return ("<!doctype html><html><head><meta charset='utf-8'><title>hubcompile report</title>"
            f"<style>{_CSS}</style></head><body>{''.join(parts)}</body></html>")


# ------------------------------------------------------------------------ the CLI

# Small sizes for a transformers config of any model type: set where the config has the
# attribute. Per-type extras keep each architecture's constraints.
_SMALL = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, max_position_embeddings=128, n_embd=64, n_layer=2, n_head=4,
              n_inner=128, n_positions=128, state_size=8, conv_kernel=4, expand=2, pad_token_id=0,
              bos_token_id=1, eos_token_id=2)
_EXTRA = {"gptj": {"rotary_dim": 8}, "gpt_neox": {"rotary_pct": 0.5},
          "mamba2": {"num_heads": 8, "head_dim": 16, "n_groups": 1, "chunk_size": 8}}


def tiny_transformers_model(model_type: str, dtype: torch.dtype = torch.float32):
    """A causal LM of ``model_type`` with a small config and random weights (no download)."""
    import transformers

    try:
        config = transformers.AutoConfig.for_model(model_type)
    except ValueError as e:
        raise ValueError(f"unknown transformers model type {model_type!r}; give one such as llama, mistral, "
                         f"qwen2, qwen3, gemma, phi3, gpt_neox, gptj, mamba, mamba2 ({e})") from None
    for key, value in {**_SMALL, **_EXTRA.get(model_type, {})}.items():
        if hasattr(config, key):
            setattr(config, key, value)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config).to(dtype)


def _load_target(target: str, dtype: torch.dtype):
    """(model, args) from ``file.py:callable`` (returning them) or a transformers model type."""
    if ":" in target and target.split(":", 1)[0].endswith(".py"):
        import importlib.util
        from pathlib import Path

        path, name = target.split(":", 1)
        if not Path(path).is_file():
            raise ValueError(f"no such file {path!r} in {target!r}")
        spec = importlib.util.spec_from_file_location("_hubcompile_target", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        if not callable(getattr(module, name, None)):
            raise ValueError(f"{path} has no callable {name!r}; it must return (model, inputs)")
        model, inputs = getattr(module, name)()
        return model, tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)
    model = tiny_transformers_model(target, dtype)
    ids = torch.randint(3, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    return model, (ids,)


def main(argv=None) -> int:
    import argparse
    import sys

    parser = argparse.ArgumentParser(
        prog="hubcompile diff", description="Compile a model with backend='hubkernels' and show what was "
        "replaced, by what, and why not.")
    parser.add_argument("target", help="file.py:callable returning (model, inputs), or a transformers model "
                        "type (llama, qwen3, gpt_neox, mamba2, ...) built small with random weights")
    parser.add_argument("--format", choices=("text", "json", "html"), default="text")
    parser.add_argument("-o", "--output", help="write the report here instead of stdout")
    parser.add_argument("--train", action="store_true", help="compile a training step (forward + backward)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    parser.add_argument("--no-diff", action="store_true", help="text format: leave out the code diff")
    parser.add_argument("--options", default="{}", help="JSON of torch.compile options=, e.g. "
                        "'{\"disable\": [\"attention\"]}'")
    args = parser.parse_args(argv)
    try:
        options = json.loads(args.options)
        model, inputs = _load_target(args.target, getattr(torch, args.dtype))
    except (ValueError, json.JSONDecodeError) as e:
        print(f"hubcompile diff: {e}", file=sys.stderr)
        return 2
    model.train(args.train)
    def lm_loss(ids):  # a transformers LM trains on its own loss
        return model(ids, labels=ids)

    target = lm_loss if args.train and hasattr(model, "config") else model
    report = explain(target, *inputs, train=args.train, options=options or None)
    text = {"text": lambda: report.text(diff=not args.no_diff), "json": report.to_json, "html": report.html}[
        args.format]()
    if args.output:
        with open(args.output, "w") as f:
            f.write(text)
        print(f"hubcompile diff: wrote {args.format} report to {args.output}")
    else:
        print(text)
    return 0
