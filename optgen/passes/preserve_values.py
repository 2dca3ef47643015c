"""Value semantics over the op program: an alias becomes a copy where an in-place op would change
the value it names.

Note [Value semantics]
~~~~~~~~~~~~~~~~~~~~~~
A name in a rule denotes a value: after ``m_old = m`` and ``m = beta * m + (1 - beta) * grad``,
``m_old`` is still the old ``m``.  Op selection (Note [Tensor ops]) binds ``m_old`` to ``m``'s
tensor with an ``alias`` (no copy: most bindings are never followed by a write) and updates the
persistent ``m`` in place (``m.mul_(beta)``, which is what makes the generated code torch's), so
without this pass the for-loop and foreach kernels would read the *new* ``m`` through ``m_old``.

This pass is an alias analysis over the op program of one variant, after buffer reuse (the last
pass that adds in-place ops):

- every tensor input (``param``, ``grad``, each state, each counter's ``<name>_t``) is a buffer of
  its own, an op that is neither in place nor an ``alias`` creates a new one, and ``alias`` binds
  its output to the buffers of its operand;
- an in-place op writes the buffers its receiver may be bound to: every *other* name bound to one
  of them now holds a value that is gone (the receiver itself holds its new value, as the rule
  says);
- a name read after that — by an op, a scalar expression (``norm(m_old)``), a guard, or, for
  ``param`` and the states, by the caller after the step — is a *hazard*, and the ``alias`` that
  bound it becomes a ``clone``, taken before the write.  (When the name read was not bound by an
  alias — the tensor was written through an alias of it — the alias of the writer is cloned
  instead.)  One alias per round, the first in program order, then the analysis runs again:
  after ``a = m; b = a`` a clone of ``a`` is a buffer ``b`` shares, so ``b`` needs none.  Each
  round turns one alias into a clone, so the rounds end.

Bindings are conditional: a name holds a buffer *when* a guard holds (one branch of an ``if``),
and a write under a guard stales another name's binding only where the two conditions can hold
together (guards are reasoned about as in reuse_buffers, optgen.ir.guards).  Adafactor's
``var_estimate`` is ``variance`` when ``param.dim() <= 1`` and is written in place only when
``param.dim() > 1``: no copy.  The ops of a lazily created state's first step and of its later
steps are two branches under an unknown condition.  So a copy taken in one branch is cloned in
that branch only, and only where some path reads the stale value: a binding no path reads after
the write stays an alias (``optgen show`` prints each clone with the reason).

Reading a tensor in the same op that writes it is not a hazard: the in-place ops are elementwise,
and an elementwise op whose operand *is* its output reads each element before writing it
(``param.add_(p_old, alpha=-lr)`` with ``p_old`` bound to ``param``).

The C and Triton kernels read the program, not the op program: they load each element into a
register value, so a copy there is a value already.  The differentiable kernel prints every op out
of place, so it would not need the clone either, but it prints the same op program (one program,
one set of copies; the clone costs one tensor only in rules that need it).
"""
from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass

import sympy

from optgen.ir.guards import implies, simplify_guard
from optgen.ir.ops import OpProgram, Step, TensorOp

Site = tuple  # (step index, "ops" | "first_ops", op index): where an op is in the program


@dataclass(frozen=True)
class _Binding:
    """A name holds ``buffer`` when ``when`` holds; ``origin``: the alias that bound it (None: the
    name made the buffer).  ``stale``: when the buffer has been written through another name
    since (false: never), by ``written_by`` = (that name, the origin of its binding)."""

    buffer: str
    when: sympy.Basic = sympy.true
    origin: Site | None = None
    stale: sympy.Basic = sympy.false
    written_by: tuple = ()


Bindings = dict  # name → frozenset[_Binding]


def _possible(condition: sympy.Basic) -> bool:
    return condition != sympy.false and not implies(condition, sympy.false)


def _and(a: sympy.Basic, b: sympy.Basic) -> sympy.Basic:
    return simplify_guard(sympy.And(a, b))


class _Analysis:
    def __init__(self, program: OpProgram):
        self.program = program
        self.fresh = (f"#{i}" for i in itertools.count())
        self.hazards: dict[Site, tuple[str, str]] = {}  # alias site → (name written, name still read)

    def run(self) -> dict[Site, tuple[str, str]]:
        p = self.program
        inputs = [*p.tensors, *(f"{c}_t" for c in p.counters)]
        bindings: Bindings = {name: frozenset({_Binding(name)}) for name in inputs}
        for index, step in enumerate(p.steps):
            self.read(bindings, _host_reads(step), step.guard)
            if step.kind == "read":
                self.read(bindings, {f"{step.target}_t"}, step.guard)
            if step.first_ops is None:
                branches = [("ops", step.ops, step.guard)]
            else:  # the step that creates a lazy state, or a later one: an unknown we name
                first = sympy.Dummy(f"first_step_of_{step.target}")
                branches = [("first_ops", step.first_ops, _and(step.guard, first)),
                            ("ops", step.ops, _and(step.guard, sympy.Not(first)))]
            for which, ops, guard in branches:
                for k, op in enumerate(ops):
                    self.op(bindings, op, (index, which, k), guard)
        # The caller reads param, the states and the counters after the step.
        self.read(bindings, set(inputs) - {"grad"}, sympy.true)
        return self.hazards

    def read(self, bindings: Bindings, names, guard: sympy.Basic) -> None:
        for name in sorted(names):
            for b in bindings.get(name, ()):
                if not _possible(_and(guard, b.stale)):
                    continue
                writer, writer_origin = b.written_by
                if b.origin is not None:
                    self.hazards.setdefault(b.origin, (writer, name))
                elif writer_origin is not None:
                    self.hazards.setdefault(writer_origin, (writer, name))
                else:  # two names share a buffer only through an alias
                    raise AssertionError(f"preserve_values: {name} and {writer} share a buffer with no alias")

    def bind(self, bindings: Bindings, name: str, new, guard: sympy.Basic) -> None:
        """``name`` holds the ``new`` bindings when ``guard`` holds, its old ones otherwise."""
        kept = set(new)
        if guard != sympy.true:
            for b in bindings.get(name, ()):
                when = _and(b.when, sympy.Not(guard))
                if _possible(when):
                    kept.add(dataclasses.replace(b, when=when, stale=_and(b.stale, when)))
        bindings[name] = frozenset(kept)

    def op(self, bindings: Bindings, op: TensorOp, site: Site, guard: sympy.Basic) -> None:
        self.read(bindings, op.reads() | _scalar_reads(op), guard)
        if op.fn == "alias":
            new = set()
            for b in bindings.get(op.self_, ()):
                when = _and(guard, b.when)
                if _possible(when):
                    new.add(_Binding(b.buffer, when, site, _and(b.stale, when), b.written_by))
            self.bind(bindings, op.out, new, guard)
        elif op.in_place:
            for w in bindings.get(op.self_, ()):
                written = _and(guard, w.when)  # when this op writes w.buffer
                if not _possible(written):
                    continue
                for name, bs in list(bindings.items()):
                    if name == op.self_:
                        continue
                    bindings[name] = frozenset(
                        dataclasses.replace(b, stale=simplify_guard(sympy.Or(b.stale, _and(written, b.when))),
                                            written_by=b.written_by or (op.self_, w.origin))
                        if b.buffer == w.buffer and _possible(_and(written, b.when)) else b for b in bs)
            if op.out != op.self_:
                self.bind(bindings, op.out, bindings.get(op.self_, frozenset()), guard)
        else:
            self.bind(bindings, op.out, {_Binding(next(self.fresh), guard)}, guard)


def _scalar_reads(op: TensorOp) -> set[str]:
    """Tensors a scalar argument reads (``lr / norm(m_old)`` as an ``alpha=``)."""
    exprs = [a for a in op.args if not isinstance(a, str)] + [v for _, v in op.kwargs]
    return {s.name for e in exprs for s in getattr(e, "free_symbols", ())}


def _host_reads(step: Step) -> set[str]:
    names = {s.name for s in step.guard.free_symbols}
    if step.expr is not None:
        names |= {s.name for s in step.expr.free_symbols}
    return names


def preserve_values(program: OpProgram) -> OpProgram:
    """The program with every alias whose value an in-place op would change made a clone."""
    while True:
        hazards = _Analysis(program).run()
        if not hazards:
            return program
        # The first hazard only, then look again: cloning it may give later aliases of it
        # (``b = a`` after ``a = m``) a buffer of their own too.
        steps = list(program.steps)
        for (index, which, k), (written, read) in sorted(hazards.items())[:1]:
            step = steps[index]
            ops = list(getattr(step, which))
            assert ops[k].fn == "alias", ops[k]
            why = f"a copy, not an alias: {written} is updated in place below while {read} is still read"
            ops[k] = dataclasses.replace(ops[k], fn="clone", note=why)
            steps[index] = dataclasses.replace(step, **{which: tuple(ops)})
        program = dataclasses.replace(program, steps=tuple(steps))
