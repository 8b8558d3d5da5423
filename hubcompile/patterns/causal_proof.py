"""Proving an attention mask causal from how the graph builds it, for any sequence length.

``causal_mask`` used to evaluate a mask at compile time, which needs static shapes: from
the second sequence length a model sees (Dynamo's automatic dynamic), and under
``dynamic=True`` or ``mark_dynamic``, the mask stayed and SDPA ran its masked kernel. The
masks that matter are built from index arithmetic (transformers' ``sdpa_mask`` under
``torch.compile``, ``tril``/``triu`` in user code), which can be followed symbolically.

Every tensor in the mask's computation is described as a function of its own index
vector ``n`` (``n[-1]`` the key index, ``n[-2]`` the query index of the final mask):

- a *term* is ``const + sum(c_d * n[d])``: an affine function of the indices with integer
  coefficients (an ``arange`` is ``n[-1]``; a constant tensor has no coefficients). Its
  constant may be a symbolic size (an offset such as ``past_seen_tokens``);
- a *predicate* is a disjunction of conjunctions of *atoms* ``sum(c_d * n[d]) + b >= 0``
  over the integers (``kv_idx <= q_idx`` is ``n[-2] - n[-1] >= 0``);
- a *value* is a list of pieces ``(predicate, term)`` whose predicates partition the index
  space: the tensor equals ``term`` where ``predicate`` holds. A comparison splits each
  piece in two, ``where`` and ``masked_fill`` pick pieces, ``tril`` cuts along a diagonal.

At the end the set of (query, key) pairs the mask allows, a predicate, is simplified over
the box ``0 <= n[d] < size_d`` (atoms true on the whole box dropped, conjunctions false
on it dropped) and must be exactly ``n[-2] - n[-1] >= 0`` with ``#queries == #keys``. Each
step is exact: anything the rules do not cover (an operation not listed, a product of two
index-dependent values, an index in a float type that rounds, a value from a graph input,
an in-place write through a view) stops the proof with the reason, and the caller keeps
the mask or evaluates it where the shapes are static. Sizes are compared through the
compile's shape environment (``statically_known_true`` semantics: facts that hold for
every size the graph accepts, no new guards).
"""

from __future__ import annotations

import dataclasses
import math
import operator

import sympy
import torch

from ..fx_utils import meta_val

# Beyond these the proof gives up (masks built from a handful of comparisons stay far below).
MAX_CLAUSES = 64
MAX_PIECES = 16
_I64_MAX = 2**63 - 1


class Unproven(Exception):
    """Why the proof stops; ``definite`` when the mask is known not to be causal (or
    cannot be known at compile time at all), so evaluating it would not help."""

    def __init__(self, reason: str, definite: bool = False):
        super().__init__(reason)
        self.reason, self.definite = reason, definite


# ------------------------------------------------------------------ sizes and constants


class Sizes:
    """Static facts about symbolic sizes, from the compile's shape environment."""

    def __init__(self, shape_env=None):
        self.env = shape_env

    def known(self, rel) -> bool:
        """Whether the relation holds for every size the graph accepts."""
        if isinstance(rel, bool):
            return rel
        rel = sympy.sympify(rel)
        if rel is sympy.true or rel is sympy.false:
            return bool(rel)
        if self.env is None:
            return False
        try:
            return self.env._maybe_evaluate_static(rel) is sympy.true
        except Exception:  # noqa: BLE001 - unknown is not a proof
            return False

    def equal(self, a, b) -> bool:
        if _concrete(a) and _concrete(b):
            return a == b
        return self.known(sympy.Eq(sympy.sympify(a), sympy.sympify(b)))


def _expr(value):
    """A size or scalar as a Python number or a sympy expression (SymInts are unhashable)."""
    if isinstance(value, torch.SymInt):
        expr = value.node.expr
        return int(expr) if expr.is_Integer else expr
    if isinstance(value, (torch.SymFloat, torch.SymBool)):
        raise Unproven(f"a symbolic {type(value).__name__} in the mask's computation")
    return value


def _concrete(value) -> bool:
    return isinstance(value, (bool, int, float))


def _integral(value) -> bool:
    if isinstance(value, bool):
        return True
    if isinstance(value, int):
        return True
    if isinstance(value, float):
        return math.isfinite(value) and value == int(value)
    return isinstance(value, sympy.Expr) and bool(value.is_integer)


def _as_int(value):
    if isinstance(value, (bool, float)):
        return int(value)
    return value


def _norm(value):
    """Sympy numbers as Python numbers, so that constants compare and hash plainly."""
    if isinstance(value, sympy.Basic) and value.is_Number:
        return int(value) if value.is_Integer else float(value)
    return value


# ------------------------------------------------------------------ atoms and predicates


Coef = tuple  # ((negative dim, nonzero int), ...) sorted by dim


def _coef(mapping: dict) -> Coef:
    return tuple(sorted((d, c) for d, c in mapping.items() if c != 0))


@dataclasses.dataclass(frozen=True)
class Atom:
    """``sum(c * n[d] for d, c in coef) + b >= 0`` over integer indices."""

    coef: Coef
    b: object

    def negate(self) -> "Atom":
        # not (c.n + b >= 0)  <=>  c.n + b <= -1  <=>  -c.n - b - 1 >= 0
        return Atom(tuple((d, -c) for d, c in self.coef), _norm(-self.b - 1))

    def __str__(self):
        terms = []
        for d, c in self.coef:
            name = _DIM_NAMES.get(d, f"n[{d}]")
            terms.append(("-" if c < 0 else "+", f"{'' if abs(c) == 1 else abs(c)}{name}"))
        if not (_concrete(self.b) and self.b == 0) or not terms:
            neg = _concrete(self.b) and self.b < 0
            terms.append(("-" if neg else "+", str(-self.b if neg else self.b)))
        text = " ".join(f"{sign} {t}" for sign, t in terms)
        return (text[2:] if text.startswith("+") else "-" + text[2:]) + " >= 0"


# The final mask's dims: key, query, head, batch.
_DIM_NAMES = {-1: "k", -2: "q", -3: "h", -4: "b"}


def make_atom(coef: dict, b) -> "Atom | bool":
    """The atom ``coef . n + b >= 0``, normalised (coefficients divided by their gcd), or
    a bool where it has no index in it and its truth is plain."""
    coef = {d: c for d, c in coef.items() if c != 0}
    if not all(isinstance(c, int) for c in coef.values()) or not _integral(b):
        raise Unproven("a comparison that is not between integers (a fractional index or offset)")
    b = _norm(_as_int(b))
    if not coef:
        if _concrete(b):
            return b >= 0
        return Atom((), b)
    g = math.gcd(*coef.values())
    if g > 1:
        if not _concrete(b):
            raise Unproven("a comparison with a scaled index and a symbolic offset")
        coef = {d: c // g for d, c in coef.items()}
        b = b // g  # c.n >= -b/g  <=>  c.n >= ceil(-b/g)  <=>  c.n + floor(b/g) >= 0
    return Atom(_coef(coef), b)


# A predicate is a frozenset of clauses (disjunction), a clause a frozenset of atoms
# (conjunction). TRUE has one empty clause, FALSE none.
TRUE = frozenset({frozenset()})
FALSE = frozenset()


def _pred(atom) -> frozenset:
    if atom is True:
        return TRUE
    if atom is False:
        return FALSE
    return frozenset({frozenset({atom})})


def _check_size(pred):
    if len(pred) > MAX_CLAUSES:
        raise Unproven("the mask's predicate grows too large to follow")
    return pred


def p_and(a: frozenset, b: frozenset) -> frozenset:
    return _check_size(frozenset(x | y for x in a for y in b))


def p_or(a: frozenset, b: frozenset) -> frozenset:
    return _check_size(a | b)


def p_not(a: frozenset) -> frozenset:
    out = TRUE
    for clause in a:
        alternatives = FALSE
        for atom in clause:
            alternatives = p_or(alternatives, _pred(atom.negate()))
        out = p_and(out, alternatives)
    return out


# ------------------------------------------------------------------ terms and values


@dataclasses.dataclass(frozen=True)
class Term:
    """``const + sum(c * n[d])``; a bool tensor's terms are constants True/False."""

    coef: Coef
    const: object

    @property
    def constant(self) -> bool:
        return not self.coef


def _term_add(a: Term, b: Term, sign: int = 1) -> Term:
    coef = dict(a.coef)
    for d, c in b.coef:
        coef[d] = coef.get(d, 0) + sign * c
    if isinstance(a.const, bool) or isinstance(b.const, bool):
        raise Unproven("arithmetic on a bool tensor")
    return Term(_coef(coef), _norm(a.const + sign * b.const))


def _term_scale(t: Term, k) -> Term:
    if isinstance(k, bool) or isinstance(t.const, bool):
        raise Unproven("arithmetic on a bool tensor")
    if t.coef and not isinstance(k, int):
        raise Unproven("an index scaled by a non-integer")
    return Term(_coef({d: c * k for d, c in t.coef}), _norm(t.const * k))


Value = tuple  # ((pred, Term), ...): the predicates partition the index space


def const_value(c) -> Value:
    return ((TRUE, Term((), c)),)


def _merge(pieces) -> Value:
    """Pieces with the same term become one; pieces that cannot hold are dropped."""
    by_term: dict = {}
    for pred, term in pieces:
        if pred == FALSE:
            continue
        key = (term.coef, type(term.const), term.const)
        by_term[key] = (p_or(by_term[key][0], pred), term) if key in by_term else (pred, term)
    if len(by_term) > MAX_PIECES:
        raise Unproven("the mask has too many distinct pieces to follow")
    return tuple(by_term.values())


def combine(a: Value, b: Value, fn) -> Value:
    """``fn(term, term) -> Value`` over every pair of pieces (broadcast elementwise)."""
    out = []
    for pa, ta in a:
        for pb, tb in b:
            both = p_and(pa, pb)
            if both == FALSE:
                continue
            out.extend((p_and(both, p), t) for p, t in fn(ta, tb))
    return _merge(out)


def compare(op: str, a: Term, b: Term) -> Value:
    """The bool value of ``a <op> b``."""
    if a.constant and b.constant and _concrete(a.const) and _concrete(b.const):
        return const_value(bool(_PY_COMPARE[op](a.const, b.const)))
    if isinstance(a.const, bool) or isinstance(b.const, bool):
        a, b = _bool_to_int(a), _bool_to_int(b)
    diff = _term_add(b, a, -1)  # b - a
    coef = dict(diff.coef)
    neg = {d: -c for d, c in coef.items()}
    if op == "le":  # b - a >= 0
        pred = _pred(make_atom(coef, diff.const))
    elif op == "ge":  # a - b >= 0
        pred = _pred(make_atom(neg, -diff.const))
    elif op == "lt":  # b - a - 1 >= 0
        pred = _pred(make_atom(coef, diff.const - 1))
    elif op == "gt":  # a - b - 1 >= 0
        pred = _pred(make_atom(neg, -diff.const - 1))
    elif op == "eq":
        pred = p_and(_pred(make_atom(coef, diff.const)), _pred(make_atom(neg, -diff.const)))
    elif op == "ne":
        pred = p_or(_pred(make_atom(coef, diff.const - 1)), _pred(make_atom(neg, -diff.const - 1)))
    else:
        raise AssertionError(op)
    return _merge([(pred, Term((), True)), (p_not(pred), Term((), False))])


_PY_COMPARE = {"le": operator.le, "lt": operator.lt, "ge": operator.ge, "gt": operator.gt,
               "eq": operator.eq, "ne": operator.ne}


def _bool_to_int(t: Term) -> Term:
    return Term(t.coef, int(t.const)) if isinstance(t.const, bool) else t


def truth(v: Value) -> frozenset:
    """Where a bool value is True."""
    out = FALSE
    for pred, term in v:
        if not (term.constant and isinstance(term.const, bool)):
            raise Unproven("a bool tensor with a non-bool piece")
        if term.const:
            out = p_or(out, pred)
    return out


def from_truth(pred: frozenset) -> Value:
    return _merge([(pred, Term((), True)), (p_not(pred), Term((), False))])


def substitute(v: Value, mapping: dict) -> Value:
    """Re-index ``v``: each old dim ``d`` becomes ``offset + scale * n'[new]`` (``new`` None:
    the index is the constant ``offset``). Every dim with a coefficient must be mapped."""

    def linear(coef: Coef, const):
        out: dict = {}
        for d, c in coef:
            if d not in mapping:
                raise Unproven("an index the reshaping does not account for")
            new, offset, scale = mapping[d]
            const = const + c * offset
            if new is not None and scale:
                out[new] = out.get(new, 0) + c * scale
        return out, const

    def atom(a: Atom):
        coef, b = linear(a.coef, a.b)
        return make_atom(coef, b)

    def pred(p):
        out = FALSE
        for clause in p:
            c = TRUE
            for a in clause:
                c = p_and(c, _pred(atom(a)))
            out = p_or(out, c)
        return out

    pieces = []
    for p, t in v:
        if isinstance(t.const, bool):
            pieces.append((pred(p), t))
        else:
            coef, const = linear(t.coef, t.const)
            pieces.append((pred(p), Term(_coef(coef), _norm(const))))
    return _merge(pieces)


def _dims_in(v: Value) -> set:
    dims = set()
    for p, t in v:
        dims.update(d for d, _ in t.coef)
        for clause in p:
            for a in clause:
                dims.update(d for d, _ in a.coef)
    return dims


# ------------------------------------------------------------------ the final check


def causal_reason(v: Value, shape, dtype, domain, sizes: Sizes) -> str | None:
    """None when the mask value ``v`` (shape ``shape``) lets query i see exactly keys 0..i
    over ``domain`` = (batch, heads, queries, keys), else why not."""
    batch, heads, q_len, kv_len = domain
    if not sizes.equal(q_len, kv_len):
        return f"{q_len} queries over {kv_len} keys (SDPA's causal mode aligns them top-left)"
    if len(shape) > 4:
        return f"a {len(shape)}-D mask"
    full = (batch, heads, q_len, kv_len)
    bounds = {}
    for d in range(-len(shape), 0):
        if sizes.equal(shape[d], 1):
            continue
        if not sizes.equal(shape[d], full[d]):
            return f"mask shape {tuple(shape)} does not broadcast to {full}"
        bounds[d] = full[d]
    if dtype == torch.bool:
        allowed = truth(v)
    elif dtype.is_floating_point:
        allowed = FALSE
        lowest = float(torch.finfo(dtype).min)
        for pred, term in v:
            if not term.constant or not _concrete(term.const):
                return "an additive mask with values other than 0 and -inf (a bias, not a mask)"
            if term.const == 0:
                allowed = p_or(allowed, pred)
            elif not (term.const == float("-inf") or term.const == lowest):
                return "an additive mask with values other than 0 and -inf (a bias, not a mask)"
    else:
        return f"a {dtype} mask"
    clauses = _on_box(allowed, bounds, sizes)
    causal = Atom(((-2, 1), (-1, -1)), 0)
    if len(clauses) == 1 and len(clauses[0]) == 1:
        (atom,) = clauses[0]
        if atom.coef == causal.coef and sizes.equal(atom.b, 0):
            return None
    return "not proven causal: a query sees the keys where " + _describe(clauses)


def _on_box(pred: frozenset, bounds: dict, sizes: Sizes) -> list:
    """The clauses of ``pred`` over the box ``0 <= n[d] < bounds[d]`` (dims not in
    ``bounds`` are 0): atoms true on the whole box dropped, clauses with an atom false on
    all of it dropped, atoms implied by a stronger one in the same clause dropped."""
    out = []
    for clause in pred:
        kept, dead = [], False
        for a in clause:
            coef = {d: c for d, c in a.coef if d in bounds}
            low = a.b + sum(c * (bounds[d] - 1) for d, c in coef.items() if c < 0)
            high = a.b + sum(c * (bounds[d] - 1) for d, c in coef.items() if c > 0)
            if sizes.known(sympy.sympify(low) >= 0):
                continue
            if sizes.known(sympy.sympify(high) < 0):
                dead = True
                break
            kept.append(Atom(_coef(coef), a.b))
        if dead:
            continue
        strongest: list = []
        for a in kept:  # of c.n + b1 >= 0 and c.n + b2 >= 0, the smaller b implies the other
            if any(o.coef == a.coef and sizes.known(sympy.sympify(o.b) <= a.b) for o in strongest):
                continue
            strongest = [o for o in strongest if not (o.coef == a.coef and sizes.known(sympy.sympify(a.b) <= o.b))]
            strongest.append(a)
        # c.n + b1 >= 0 and -c.n + b2 >= 0 hold together only where -b1 <= c.n <= b2
        if any(o.coef == tuple((d, -c) for d, c in a.coef) and sizes.known(sympy.sympify(a.b) + o.b < 0)
               for a in strongest for o in strongest):
            continue
        out.append(frozenset(strongest))
    # (A) or (A and B) is (A)
    return [c for c in out if not any(o < c for o in out)]


def _describe(clauses: list) -> str:
    if not clauses:
        return "never (everything is masked)"
    parts = sorted("(" + " and ".join(sorted(map(str, c))) + ")" if c else "always" for c in clauses)
    text = " or ".join(parts)
    return text if len(text) < 300 else text[:297] + "..."


# ------------------------------------------------------------------ following the graph


@dataclasses.dataclass
class Traced:
    """What the proof knows of a node: its value, shape and dtype (None for scalars)."""

    value: Value
    shape: tuple = ()
    dtype: object = None


def dependencies(mask: torch.fx.Node, reader: torch.fx.Node, order: dict | None = None) -> list[torch.fx.Node]:
    """The nodes that make the value ``reader`` reads from ``mask``, in graph order: the
    mask's ancestors, and the in-place writes to any of them that come before ``reader``
    (with what they read). Dynamo's graph keeps ``x.masked_fill_(...)`` as a node that
    only uses ``x``: the later readers of ``x`` read the written value. A write through a
    view of one of them is not followed: raises Unproven. ``order``: each node's position
    in the graph, where the caller has it."""
    order = order if order is not None else {n: i for i, n in enumerate(mask.graph.nodes)}
    limit = order[reader]
    seen, todo = set(), [mask]
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        if _is_scalar(meta_val(n)):
            continue  # a size: its value is in its metadata, whatever tensor it was read from
        todo.extend(n.all_input_nodes)
        writes = [u for u in n.users if order[u] < limit and writes_to(u) is n]
        for user in n.users:
            if order[user] >= limit or user in seen:
                continue
            if writes_to(user) is n:
                todo.append(user)
            elif _writes_among(user, n):
                raise Unproven(f"{n.name} is written in place by {user.name}", definite=True)
            elif _may_alias(user, n):
                if _written(user, limit, order):
                    raise Unproven(f"the mask is written through a view ({user.name})", definite=True)
                if any(order[user] < order[w] for w in writes):
                    # a view taken before the write would read the new values
                    raise Unproven(f"{n.name} is written in place while {user.name}, taken before, may share its "
                                   "memory", definite=True)
    return sorted(seen, key=order.__getitem__)


def _is_scalar(value) -> bool:
    return isinstance(value, (bool, int, float, torch.SymInt))


def writes_to(node: torch.fx.Node):
    """The node ``node`` writes in place, or None."""
    if node.op not in ("call_function", "call_method"):
        return None
    if "out" in node.kwargs:
        return node.kwargs["out"]
    name = _name(node)
    if getattr(node.target, "__module__", None) in ("_operator", "operator"):
        inplace = name in _PY_INPLACE or name == "setitem"  # and_, or_ are not in place
    else:
        inplace = name.endswith("_") and not name.endswith("__")
    if inplace and node.args and isinstance(node.args[0], torch.fx.Node):
        return node.args[0]
    return None


def _writes_among(node: torch.fx.Node, target: torch.fx.Node) -> bool:
    """An in-place op on a list of tensors (``_foreach_add_``) that holds ``target``."""
    first = node.args[0] if node.args else None
    return (node.op in ("call_function", "call_method") and _name(node).endswith("_")
            and isinstance(first, (list, tuple)) and target in first)


_PY_INPLACE = {"iadd": "add", "isub": "sub", "imul": "mul", "iand": "and_", "ior": "or_", "ixor": "xor"}


def _may_alias(user: torch.fx.Node, node: torch.fx.Node) -> bool:
    """Whether ``user``'s result may share ``node``'s memory (anything not known to
    allocate)."""
    if user.op not in ("call_function", "call_method") or writes_to(user) is not None:
        return False
    return _name(user) not in _FRESH


def _written(node: torch.fx.Node, limit: int, order: dict) -> bool:
    """Whether ``node`` or a view of it is written in place before position ``limit``."""
    todo, seen = [node], set()
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        for user in n.users:
            if order[user] >= limit:
                continue
            if writes_to(user) is n:
                return True
            if _may_alias(user, n):
                todo.append(user)
    return False


def _name(node: torch.fx.Node) -> str:
    target = node.target
    if node.op == "call_method":
        return target
    if isinstance(target, torch._ops.OpOverload):
        return target.overloadpacket.__name__
    if isinstance(target, torch._ops.OpOverloadPacket):
        return target.__name__
    return getattr(target, "__name__", str(target))


def _is_torch_callable(node: torch.fx.Node) -> bool:
    """Only torch's own functions, operators and tensor methods are read by name."""
    if node.op == "call_method":
        return True
    target = node.target
    if isinstance(target, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        return True
    module = getattr(target, "__module__", None) or ""
    return module in ("_operator", "operator") or module.startswith("torch")


class Prover:
    """Follows the nodes ``dependencies`` lists, in graph order."""

    def __init__(self, sizes: Sizes):
        self.sizes = sizes

    def run(self, nodes: list[torch.fx.Node]) -> dict:
        env: dict = {}
        for node in nodes:
            target = writes_to(node)
            traced = self.node(node, env)
            env[node] = traced
            if target is not None:
                env[target] = traced  # later readers of the written tensor see the new value
        return env

    # -------------------------------------------------------- one node

    def node(self, node: torch.fx.Node, env: dict) -> Traced:
        val = meta_val(node)
        if not isinstance(val, torch.Tensor):
            if _is_scalar(val):
                return Traced(const_value(_expr(val)))
            raise Unproven(f"{node.name} has no tensor metadata")
        if node.op == "placeholder":
            what = ("a Python float Dynamo made an input, whose value may change between calls" if val.dim() == 0
                    else "a padding mask?")
            raise Unproven(f"the mask is computed from the graph input {node.name} ({what})", definite=True)
        if node.op == "get_attr":
            raise Unproven(f"the mask is computed from the module attribute {node.target}", definite=True)
        if node.op not in ("call_function", "call_method") or not _is_torch_callable(node):
            raise Unproven(f"the proof does not cover {node.op} {node.target}")
        if "functorch" in str(node.target):
            raise Unproven("the mask is built under vmap")
        name = _name(node)
        written = writes_to(node)
        if written is not None:
            if "out" in node.kwargs or name == "setitem":
                raise Unproven(f"the proof does not cover the in-place {name} ({node.name})")
            name = _PY_INPLACE.get(name, name[:-1])
        handler = _HANDLERS.get(name)
        if handler is None:
            raise Unproven(f"the proof does not cover {name} ({node.name})")
        shape = tuple(_expr(s) for s in val.shape)
        value = handler(self, node, env, shape, name)
        value = self.cast(value, val.dtype, node)
        value = self.squash_units(value, shape)
        return Traced(value, shape, val.dtype)

    def get(self, env: dict, arg) -> Traced:
        """A node's traced value, or a Python scalar as a constant."""
        if isinstance(arg, torch.fx.Node):
            return env[arg]
        if isinstance(arg, (bool, int, float)):
            return Traced(const_value(arg))
        raise Unproven(f"an argument of type {type(arg).__name__}")

    def scalar(self, env: dict, arg):
        """A Python or symbolic scalar argument (a size, an offset, a fill value)."""
        if isinstance(arg, torch.fx.Node):
            traced = env[arg]
            if len(traced.value) != 1 or not traced.value[0][1].constant or traced.value[0][0] != TRUE:
                raise Unproven(f"{arg.name} is not a constant")
            return traced.value[0][1].const
        if isinstance(arg, (bool, int, float)):
            return arg
        raise Unproven(f"an argument of type {type(arg).__name__}")

    # -------------------------------------------------------- normal forms

    def cast(self, v: Value, dtype, node) -> Value:
        """``v`` as ``dtype`` holds it: bool pieces for bool, exact integers for integral
        types, constants rounded to a float type (an index in a float type only where it
        is exact: float64)."""
        if dtype == torch.bool:
            out = []
            for pred, term in v:
                if isinstance(term.const, bool) and term.constant:
                    out.append((pred, term))
                elif term.constant and _concrete(term.const):
                    out.append((pred, Term((), bool(term.const))))
                else:
                    for p, t in compare("ne", _bool_to_int(term), Term((), 0)):
                        out.append((p_and(pred, p), t))
            return _merge(out)
        if not dtype.is_floating_point and not dtype.is_complex:
            info = torch.iinfo(dtype)
            out = []
            for pred, term in v:
                term = _bool_to_int(term)
                if isinstance(term.const, float):
                    if not term.constant or not math.isfinite(term.const):
                        raise Unproven(f"a float converted to {dtype} ({node.name})")
                    term = Term((), int(term.const))  # truncates toward zero, as torch does
                if not term.constant and dtype != torch.int64:
                    raise Unproven(f"an index held in {dtype}, which may wrap around ({node.name})")
                if term.constant and _concrete(term.const) and not info.min <= term.const <= info.max:
                    raise Unproven(f"a constant out of the range of {dtype} ({node.name})")
                out.append((pred, term))
            return _merge(out)
        if dtype.is_complex:
            raise Unproven(f"a complex mask ({node.name})")
        out = []
        for pred, term in v:
            term = Term(term.coef, float(term.const)) if isinstance(term.const, bool) else term
            if not term.constant and dtype != torch.float64:
                raise Unproven(f"an index held in {dtype}, which rounds large indices ({node.name})")
            if term.constant:
                if not _concrete(term.const):
                    raise Unproven(f"a symbolic value held in {dtype} ({node.name})")
                term = Term((), _round(float(term.const), dtype))
            out.append((pred, term))
        return _merge(out)

    def squash_units(self, v: Value, shape) -> Value:
        """Dims of size 1 have the index 0 only: their coefficients go, so broadcasting
        right-aligned values is exact."""
        units = {d for d in range(-len(shape), 0) if self.sizes.equal(shape[d], 1)}
        dims = _dims_in(v)
        if not dims & units:
            if any(d < -len(shape) for d in dims):
                raise Unproven("an index outside the tensor's dims")
            return v
        return substitute(v, {d: (None, 0, 0) if d in units else (d, 0, 1) for d in dims})


def _round(value: float, dtype) -> float:
    from torch.utils._python_dispatch import _disable_current_modes

    with _disable_current_modes():
        return torch.tensor(value, dtype=torch.float64).to(dtype).item()


# ------------------------------------------------------------------ handlers


def _arg(node, i, name, default=None):
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


def _neg_dim(dim, rank: int) -> int:
    """``dim`` counted from the right (-1 the last), as the values index their dims."""
    if not isinstance(dim, int) or isinstance(dim, bool):
        raise Unproven("a dim argument that is not an int")
    if not -rank <= dim < rank:
        raise Unproven("a dim out of range (or of a 0-d tensor)")
    return dim - rank if dim >= 0 else dim


def h_arange(p, node, env, shape, name):
    if name == "iota":
        start, step = p.scalar(env, node.kwargs.get("start", 0)), p.scalar(env, node.kwargs.get("step", 1))
    else:
        nums = [a for a in node.args if not isinstance(a, (torch.dtype, torch.device, torch.layout))]
        start = node.kwargs.get("start", 0)
        step = node.kwargs.get("step", 1)
        if len(nums) >= 2:
            start = nums[0]
        if len(nums) >= 3:
            step = nums[2]
        start, step = p.scalar(env, start), p.scalar(env, step)
    if not isinstance(step, int) or isinstance(step, bool) or step == 0:
        raise Unproven("an arange whose step is not a constant integer")
    if not _integral(start):
        raise Unproven("an arange from a fractional start")
    return ((TRUE, Term(_coef({-1: step}), _as_int(start))),)


def h_full(p, node, env, shape, name):
    if name in ("ones", "ones_like", "new_ones"):
        return const_value(1)
    if name in ("zeros", "zeros_like", "new_zeros", "zero"):
        return const_value(0)
    if name == "full":
        return const_value(p.scalar(env, _arg(node, 1, "fill_value")))
    if name == "full_like":
        return const_value(p.scalar(env, _arg(node, 1, "fill_value")))
    if name == "new_full":  # new_full(self, size, fill_value)
        return const_value(p.scalar(env, _arg(node, 2, "fill_value")))
    if name == "fill":  # fill(self, value), fill_ in place
        return const_value(p.scalar(env, _arg(node, 1, "value")))
    if name == "scalar_tensor":
        return const_value(p.scalar(env, _arg(node, 0, "s")))
    if name == "tensor":
        data = _arg(node, 0, "data")
        if isinstance(data, torch.fx.Node) or not isinstance(data, (bool, int, float)):
            raise Unproven("torch.tensor of something other than a Python number")
        return const_value(data)
    raise AssertionError(name)


def h_same(p, node, env, shape, name):
    """Ops that keep every value where it is: copies, casts, broadcasts, layout changes."""
    return env[node.args[0]].value


def h_copy(p, node, env, shape, name):
    """copy_(dst, src): dst takes src's values, broadcast and cast."""
    return p.get(env, _arg(node, 1, "src")).value


def h_view(p, node, env, shape, name):
    """A reshape that only adds or removes dims of size 1."""
    src = env[node.args[0]]
    old = [d for d in range(-len(src.shape), 0) if not p.sizes.equal(src.shape[d], 1)]
    new = [d for d in range(-len(shape), 0) if not p.sizes.equal(shape[d], 1)]
    if len(old) != len(new) or not all(p.sizes.equal(src.shape[a], shape[b]) for a, b in zip(old, new)):
        raise Unproven(f"a reshape from {tuple(src.shape)} to {tuple(shape)} that merges or splits dims")
    return substitute(src.value, {a: (b, 0, 1) for a, b in zip(old, new)})


def h_unsqueeze(p, node, env, shape, name):
    src = env[node.args[0]]
    at = _neg_dim(_arg(node, 1, "dim"), len(shape)) + len(shape)  # position in the output
    rank = len(src.shape)
    return substitute(src.value, {d: (d - 1 if d + rank < at else d, 0, 1) for d in range(-rank, 0)})


def h_squeeze(p, node, env, shape, name):
    src = env[node.args[0]]
    rank = len(src.shape)
    dims = _arg(node, 1, "dim")
    if dims is None:
        dropped = {d for d in range(-rank, 0) if p.sizes.equal(src.shape[d], 1)}
    else:
        dims = dims if isinstance(dims, (list, tuple)) else [dims]
        dropped = {_neg_dim(d, rank) for d in dims if p.sizes.equal(src.shape[_neg_dim(d, rank)], 1)}
    mapping, out = {}, -1
    for d in range(-1, -rank - 1, -1):
        if d in dropped:
            mapping[d] = (None, 0, 0)
        else:
            mapping[d] = (out, 0, 1)
            out -= 1
    return substitute(src.value, mapping)


def h_permute(p, node, env, shape, name):
    src = env[node.args[0]]
    rank = len(src.shape)
    if name == "permute":
        dims = node.args[1] if len(node.args) == 2 and isinstance(node.args[1], (list, tuple)) else node.args[1:]
        dims = dims or node.kwargs.get("dims")
        perm = [_neg_dim(d, rank) for d in dims]
    elif name in ("transpose", "swapaxes", "swapdims"):
        a, b = _neg_dim(_arg(node, 1, "dim0"), rank), _neg_dim(_arg(node, 2, "dim1"), rank)
        perm = list(range(-rank, 0))
        perm[a + rank], perm[b + rank] = b, a
    else:  # t
        perm = list(range(-rank, 0))[::-1] if rank == 2 else list(range(-rank, 0))
    # output dim i reads input dim perm[i]
    return substitute(src.value, {old: (i - rank, 0, 1) for i, old in enumerate(perm)})


def h_slice(p, node, env, shape, name):
    """ATen's slice.Tensor(self, dim, start, end, step)."""
    src = env[node.args[0]]
    rank = len(src.shape)
    dim = _neg_dim(_arg(node, 1, "dim", 0), rank)
    start = _slice_start(p, env, _arg(node, 2, "start"), src.shape[dim])
    step = p.scalar(env, _arg(node, 4, "step", 1))
    if not isinstance(step, int) or step <= 0:
        raise Unproven("a slice whose step is not a positive integer")
    mapping = {d: (d, 0, 1) for d in range(-rank, 0)}
    mapping[dim] = (dim, start, step)
    return substitute(src.value, mapping)


def _slice_start(p, env, start, size):
    start = 0 if start is None else p.scalar(env, start)
    if _concrete(start) and start < 0:
        start = size + start
        if not p.sizes.known(sympy.sympify(start) >= 0):
            raise Unproven("a slice from a negative start that may fall before the first element")
    elif not _concrete(start) and not p.sizes.known(sympy.sympify(start) >= 0):
        raise Unproven("a slice from a symbolic start")
    return start


def h_select(p, node, env, shape, name):
    src = env[node.args[0]]
    rank = len(src.shape)
    dim = _neg_dim(_arg(node, 1, "dim"), rank)
    index = p.scalar(env, _arg(node, 2, "index"))
    if _concrete(index) and index < 0:
        index = src.shape[dim] + index
    mapping = {}
    for d in range(-rank, 0):
        mapping[d] = (None, index, 0) if d == dim else (d + 1 if d < dim else d, 0, 1)
    return substitute(src.value, mapping)


def h_getitem(p, node, env, shape, name):
    """Dynamo's ``x[...]``: None, slices, ints, Ellipsis; tensor indices only into a
    constant tensor."""
    src = env[node.args[0]]
    index = node.args[1] if isinstance(node.args[1], tuple) else (node.args[1],)
    if any(isinstance(i, torch.fx.Node) and isinstance(meta_val(i), torch.Tensor) for i in index) or any(
            isinstance(i, (list, torch.Tensor)) for i in index):
        return _gather(src)
    rank = len(src.shape)
    consumed = sum(1 for i in index if i is not None and i is not Ellipsis)
    expanded = []
    for i in index:
        if i is Ellipsis:
            expanded.extend([slice(None)] * (rank - consumed))
        else:
            expanded.append(i)
    expanded.extend([slice(None)] * (rank - sum(1 for i in expanded if i is not None)))
    mapping, pos_in, pos_out = {}, 0, 0
    out_rank = len(shape)
    for i in expanded:
        if i is None:
            pos_out += 1
            continue
        d = pos_in - rank
        if isinstance(i, slice):
            start = _slice_start(p, env, i.start, src.shape[d])
            step = 1 if i.step is None else p.scalar(env, i.step)
            if not isinstance(step, int) or step <= 0:
                raise Unproven("a slice whose step is not a positive integer")
            mapping[d] = (pos_out - out_rank, start, step)
            pos_out += 1
        else:
            if isinstance(i, bool):
                raise Unproven("indexing with a Python bool")
            value = p.scalar(env, i)
            if _concrete(value) and value < 0:
                value = src.shape[d] + value
            mapping[d] = (None, value, 0)
        pos_in += 1
    return substitute(src.value, mapping)


def h_index(p, node, env, shape, name):
    """ATen's index.Tensor: a gather, followed only into a constant tensor."""
    return _gather(env[node.args[0]])


def _gather(src: Traced) -> Value:
    if len(src.value) == 1 and src.value[0][0] == TRUE and src.value[0][1].constant:
        return src.value  # every element is the same: so is every element gathered
    raise Unproven("a gather (tensor indices) from a tensor that is not constant")


def h_binary(p, node, env, shape, name):
    name = {"__and__": "and_", "__or__": "or_", "__xor__": "xor"}.get(name, name)
    a, b = _operands(p, node, env)
    alpha = p.scalar(env, node.kwargs.get("alpha", 1))
    if name in ("add", "sub", "rsub"):
        if alpha != 1:
            b = Traced(_merge([(pred, _term_scale(_bool_to_int(t), alpha)) for pred, t in b.value]), b.shape, b.dtype)
        if name == "rsub":
            a, b = b, a
        sign = 1 if name == "add" else -1
        return combine(a.value, b.value, lambda x, y: ((TRUE, _term_add(_bool_to_int(x), _bool_to_int(y), sign)),))
    if name == "mul":
        def mul(x, y):
            if isinstance(x.const, bool) and isinstance(y.const, bool):
                return ((TRUE, Term((), x.const and y.const)),)
            x, y = _bool_to_int(x), _bool_to_int(y)
            if y.constant and _concrete(y.const):
                return ((TRUE, _term_scale(x, y.const)),)
            if x.constant and _concrete(x.const):
                return ((TRUE, _term_scale(y, x.const)),)
            raise Unproven("a product of two values that depend on the indices")
        return combine(a.value, b.value, mul)
    if not name.startswith("logical") and a.dtype is not None and a.dtype != torch.bool:
        raise Unproven(f"a bitwise {name} of integers")  # & | ^ are logical on bools only
    if name in ("and_", "bitwise_and", "logical_and"):
        return from_truth(p_and(truth(_as_bool(a.value)), truth(_as_bool(b.value))))
    if name in ("or_", "bitwise_or", "logical_or"):
        return from_truth(p_or(truth(_as_bool(a.value)), truth(_as_bool(b.value))))
    if name in ("xor", "bitwise_xor", "logical_xor"):
        x, y = truth(_as_bool(a.value)), truth(_as_bool(b.value))
        return from_truth(p_or(p_and(x, p_not(y)), p_and(p_not(x), y)))
    raise AssertionError(name)


def _operands(p, node, env) -> tuple[Traced, Traced]:
    """The two operands of a binary op, cast to the dtype torch computes it in (a Python
    float compared with a float32 tensor is rounded to float32 first)."""
    args = [node.args[0], node.args[1] if len(node.args) > 1 else node.kwargs["other"]]
    metas = []
    for a in args:
        m = meta_val(a) if isinstance(a, torch.fx.Node) else a
        metas.append(int(m.node.hint or 2) if isinstance(m, torch.SymInt) else m)
    if not all(isinstance(m, (torch.Tensor, bool, int, float)) for m in metas):
        raise Unproven(f"operands of {node.name} without metadata")
    if isinstance(metas[0], torch.Tensor):
        dtype = torch.result_type(metas[0], metas[1])
    elif isinstance(metas[1], torch.Tensor):
        dtype = torch.result_type(metas[1], metas[0])
    else:
        dtype = None  # two scalars: Python arithmetic
    out = []
    for a in args:
        traced = p.get(env, a)
        if dtype is not None:
            traced = Traced(p.cast(traced.value, dtype, node), traced.shape, dtype)
        out.append(traced)
    return out[0], out[1]


def _as_bool(v: Value) -> Value:
    out = []
    for pred, term in v:
        if isinstance(term.const, bool) and term.constant:
            out.append((pred, term))
        elif term.constant and _concrete(term.const):
            out.append((pred, Term((), bool(term.const))))
        else:
            out.extend((p_and(pred, q), t) for q, t in compare("ne", term, Term((), 0)))
    return _merge(out)


def h_compare(p, node, env, shape, name):
    name = name.strip("_")
    a, b = _operands(p, node, env)
    return combine(a.value, b.value, lambda x, y: compare(name, x, y))


def h_unary(p, node, env, shape, name):
    src = env[node.args[0]]
    if name == "neg":
        return combine(src.value, const_value(0), lambda x, _: ((TRUE, _term_scale(_bool_to_int(x), -1)),))
    # invert, bitwise_not, logical_not: on bools, negation (on integers ~x is not handled)
    if name in ("invert", "bitwise_not") and src.dtype != torch.bool:
        raise Unproven("a bitwise not of an integer tensor")
    return from_truth(p_not(truth(_as_bool(src.value))))


def h_where(p, node, env, shape, name):
    if len(node.args) != 3:
        raise Unproven("where with other than (condition, input, other)")
    cond = truth(_as_bool(p.get(env, node.args[0]).value))
    x, y = p.get(env, node.args[1]), p.get(env, node.args[2])
    return _select(cond, x.value, y.value)


def _select(cond: frozenset, x: Value, y: Value) -> Value:
    other = p_not(cond)
    return _merge([(p_and(cond, px), tx) for px, tx in x] + [(p_and(other, py), ty) for py, ty in y])


def h_masked_fill(p, node, env, shape, name):
    src = env[node.args[0]]
    cond = truth(_as_bool(p.get(env, _arg(node, 1, "mask")).value))
    fill = p.get(env, _arg(node, 2, "value"))
    return _select(cond, fill.value, src.value)


def h_tri(p, node, env, shape, name):
    """tril keeps key <= query + k, triu keeps key >= query + k; the rest is 0."""
    src = env[node.args[0]]
    if len(src.shape) < 2:
        raise Unproven("tril/triu of a tensor with fewer than 2 dims")
    k = p.scalar(env, _arg(node, 1, "diagonal", 0))
    if name == "tril":  # q - k_idx + diag >= 0
        keep = _pred(make_atom({-2: 1, -1: -1}, k))
    else:  # k_idx - q - diag >= 0
        keep = _pred(make_atom({-2: -1, -1: 1}, -k))
    zero = const_value(False if src.dtype == torch.bool else 0)
    return _select(keep, src.value, zero)


def h_cumsum(p, node, env, shape, name):
    """The running sum of a constant c along a dim is c * (n + 1)."""
    src = env[node.args[0]]
    dim = _neg_dim(_arg(node, 1, "dim"), len(src.shape))
    if not (len(src.value) == 1 and src.value[0][0] == TRUE and src.value[0][1].constant):
        raise Unproven("a cumulative sum of a tensor that is not constant")
    c = _bool_to_int(src.value[0][1]).const
    if not _integral(c):
        raise Unproven("a cumulative sum of a fractional constant")
    c = _as_int(c)
    return ((TRUE, Term(_coef({dim: c}), c)),)


def _line(src: Traced, dim: int):
    """(term) of a single-piece affine tensor, or None."""
    if len(src.value) == 1 and src.value[0][0] == TRUE and not isinstance(src.value[0][1].const, bool):
        return src.value[0][1]
    return None


def _without(term: Term, dim: int) -> Term:
    return Term(tuple((d, c) for d, c in term.coef if d != dim), term.const)


def h_diff(p, node, env, shape, name):
    """torch.diff(x, n=1, dim, prepend) of an affine x: its slope along dim, where the
    prepended column continues the line."""
    src = env[node.args[0]]
    if _arg(node, 1, "n", 1) != 1 or node.kwargs.get("append") is not None:
        raise Unproven("a diff with n != 1 or an appended tensor")
    dim = _neg_dim(_arg(node, 2, "dim", -1), len(src.shape))
    line = _line(src, dim)
    if line is None:
        raise Unproven("a diff of a tensor that is not affine in its indices")
    slope = dict(line.coef).get(dim, 0)
    prepend = _arg(node, 3, "prepend")
    if prepend is not None:
        before = _line(env[prepend], dim)
        expected = _without(Term(line.coef, line.const - slope), dim)
        if before is None or not _same_term(p, _without(before, dim), expected):
            raise Unproven("a diff whose prepended values do not continue the line")
    return const_value(slope)


def _same_term(p, a: Term, b: Term) -> bool:
    return a.coef == b.coef and p.sizes.equal(a.const, b.const)


def h_cat(p, node, env, shape, name):
    """Tensors joined along a dim that continue one affine line (ATen's form of diff's
    prepend)."""
    parts = [env[t] for t in _arg(node, 0, "tensors")]
    rank = len(shape)
    dim = _neg_dim(_arg(node, 1, "dim", 0), rank)
    lines = [_line(t, dim) for t in parts]
    if any(line is None for line in lines) or any(len(t.shape) != rank for t in parts):
        raise Unproven("a concatenation of tensors that are not affine in their indices")
    slopes = {dict(line.coef).get(dim, 0) for line, t in zip(lines, parts) if not p.sizes.equal(t.shape[dim], 1)}
    if len(slopes) > 1:
        raise Unproven("a concatenation of lines with different slopes")
    if slopes:
        slope = slopes.pop()
    elif len(parts) == 2:
        slope = lines[1].const - lines[0].const
        if not isinstance(slope, int):
            raise Unproven("a concatenation whose slope is not a constant integer")
    else:
        raise Unproven("a concatenation of single elements")
    base = _without(lines[0], dim)
    offset = 0
    for line, t in zip(lines, parts):
        if not _same_term(p, _without(line, dim), Term(base.coef, base.const + slope * offset)):
            raise Unproven("a concatenation of tensors that do not continue one line")
        offset = offset + t.shape[dim]
    return ((TRUE, Term(_coef({**dict(base.coef), dim: slope}), base.const)),)


_HANDLERS = {}
for _names, _fn in [
    (("arange", "iota"), h_arange),
    (("full", "ones", "zeros", "ones_like", "zeros_like", "full_like", "new_ones", "new_zeros", "new_full",
      "scalar_tensor", "tensor", "fill", "zero"), h_full),
    (("expand", "expand_as", "broadcast_to", "contiguous", "clone", "detach", "alias", "lift_fresh_copy", "to",
      "type", "type_as", "float", "double", "half", "bfloat16", "long", "int", "short", "bool", "_to_copy",
      "convert_element_type", "_assert_tensor_metadata"), h_same),
    (("copy",), h_copy),
    (("view", "reshape", "_unsafe_view", "view_as", "reshape_as", "flatten"), h_view),
    (("unsqueeze",), h_unsqueeze),
    (("squeeze",), h_squeeze),
    (("permute", "transpose", "swapaxes", "swapdims", "t"), h_permute),
    (("slice",), h_slice),
    (("select",), h_select),
    (("getitem",), h_getitem),
    (("index",), h_index),
    (("add", "sub", "rsub", "mul", "and_", "or_", "xor", "bitwise_and", "bitwise_or", "bitwise_xor",
      "logical_and", "logical_or", "logical_xor", "__and__", "__or__", "__xor__"), h_binary),
    (("le", "lt", "ge", "gt", "eq", "ne", "__le__", "__lt__", "__ge__", "__gt__", "__eq__", "__ne__"), h_compare),
    (("neg", "invert", "bitwise_not", "logical_not"), h_unary),
    (("where",), h_where),
    (("masked_fill",), h_masked_fill),
    (("tril", "triu"), h_tri),
    (("cumsum",), h_cumsum),
    (("diff",), h_diff),
    (("cat", "concat", "concatenate"), h_cat),
]:
    for _n in _names:
        _HANDLERS[_n] = _fn

# Ops whose result never shares its input's memory (for following in-place writes).
_FRESH = {n for n, fn in _HANDLERS.items()
          if fn in (h_arange, h_full, h_binary, h_compare, h_unary, h_where, h_masked_fill, h_tri, h_cumsum, h_diff,
                    h_cat, h_index)} | {"clone", "_to_copy", "convert_element_type", "lift_fresh_copy"}


# ------------------------------------------------------------------ entry point


def shape_env_of(*values):
    for v in values:
        mode = getattr(v, "fake_mode", None)
        if mode is not None and mode.shape_env is not None:
            return mode.shape_env
    return None


def prove(mask: torch.fx.Node, reader: torch.fx.Node, q, k, nodes: list | None = None) -> None:
    """Returns when the value ``reader`` reads from ``mask`` provably lets query i see
    exactly keys 0..i for the query and key tensors ``q``, ``k`` (fake tensors, [B, H, S,
    D]), whatever their symbolic sizes; else raises Unproven with why not. ``nodes``:
    ``dependencies(mask, reader)``, where the caller has them."""
    val = meta_val(mask)
    if not isinstance(val, torch.Tensor):
        raise Unproven("the mask has no tensor metadata")
    sizes = Sizes(shape_env_of(val, q, k))
    nodes = nodes if nodes is not None else dependencies(mask, reader)
    env = Prover(sizes).run(nodes)
    traced = env[mask]
    b = _expr(q.shape[0]) if q.dim() >= 4 else 1
    domain = (b, _expr(q.shape[-3]) if q.dim() >= 3 else 1, _expr(q.shape[-2]), _expr(k.shape[-2]))
    why = causal_reason(traced.value, traced.shape, traced.dtype, domain, sizes)
    if why is not None:
        # Only the shapes are decisive; the predicate's form may be causal in another
        # spelling, which evaluating (static shapes) can still find.
        raise Unproven(why, definite="queries over" in why)
