"""The Triton backend: one fused multi-tensor kernel per optimizer, launched once per step.

It emits a ``@triton.jit`` kernel (every flag variant merged: flags are ``tl.constexpr``
arguments) and a ``Kernel(...)`` record, ``LAUNCH``, saying what launching it takes (lists,
counters, hyperparameters, host guards).  ``LAUNCH`` is called
with the foreach backend's arguments (lists of one (device, dtype) group, hyperparameters as
keywords, plus GradScaler's ``grad_scale`` / ``found_inf``) and hands them to
:func:`optgen.runtime.triton_launch.launch`, which builds (and caches) the launch tables and
launches the kernel once for the whole group.  A kernel reads like this (Adam, abridged)::

    step = tl.load(step_ptr).to(tl.float64)            # per-tensor scalars, in float64
    step = (step.to(COUNTER_DTYPE) + 1).to(tl.float64)  # rounded as torch's float32 `step` is
    bias_correction1 = 1 - tl.exp(step * tl.log(beta1))
    ...
    for block in range(start, end, BLOCK):            # this program's chunk of its tensor
        offsets = block + tl.arange(0, BLOCK)
        in_bounds = offsets < end
        param = tl.load(param_ptr + offsets, mask=in_bounds).to(COMPUTE)
        ...
        # exp_avg = lerp(exp_avg, grad, 1 - beta1)
        exp_avg = exp_avg + one_minus_beta1 * (grad - exp_avg)
        ...
        tl.store(param_ptr + offsets, param.to(DTYPE), mask=in_bounds)

Note [Triton kernel layout]
~~~~~~~~~~~~~~~~~~~~~~~~~~~
The kernel body is printed from ``Variant.program`` (after specialize, cse and hoist_scalars), in
three sections:

1. **Scalars**, once per program, in float64: hyperparameters, the per-tensor counters (loaded
   from the tensor's own 0-dim ``step``), and every scalar statement in program order — bias
   corrections included.  Computing them in the kernel (not on the host) is what makes the step
   free of host synchronisation, so ``capturable=True`` and CUDA graphs work, and float64 keeps
   them as exact as the foreach backend's Python floats.  Scalar subexpressions of tensor
   statements (``1 - beta1``) are computed here too, and a scalar that a later scalar statement
   reassigns is snapshotted (``eta_0``) where a tensor statement reads it — so hoisting the
   scalars above the elementwise loop keeps the spec's order of effects.  Then each scalar the
   loop reads is cast once to ``COMPUTE`` (float32; float64 for float64 parameters), the
   precision torch's fused kernels compute in.
2. **Counters** are written back by the last program of each tensor to arrive (an atomic
   ``arrivals`` count per tensor, reset by that program): every program of a tensor reads the
   old ``step`` first, so one launch can both read and increment it without a race.
3. **The elementwise loop** over this program's chunk: load param, grad and each state once,
   the tensor statements in order, store param and each written state once.

Flags and guards on hyperparameters (``weight_decay != 0``) become ``tl.constexpr`` arguments,
one per flag or comparison, evaluated on the host; a statement's guard is printed over them
(``if not AMSGRAD:``, ``if DECOUPLED_WEIGHT_DECAY and WEIGHT_DECAY_NE_0:``).  Each combination
compiles once and the kernel has no runtime branch for them.  The elementwise loop's body is
printed once, inside ``for MASKED in tl.static_range(2)``: unrolled, it is the loop over whole
blocks (``in_bounds`` None: unmasked, 16-byte vector loads) and the partial last block (masked).  Guards
on per-tensor values (``if rho_t > 5``) are evaluated in the kernel and select with ``tl.where``.
A lazily created state (SGD's ``momentum_buffer = { first = "grad" }``) is allocated on the host
before the launch; a per-tensor flag in the launch tables tells the kernel to store ``first``
instead of the update (``tl.where(momentum_buffer_is_new, grad, ...)``) on that step.

Note [Triton kernel arguments]
~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
Every kernel takes the same launch tables, built and cached by optgen/runtime/triton_launch.py,
over the T tensors of one (device, dtype) group (int64 each):

- ``addresses`` [lists, T]: every tensor's address, one row per list (params, then the states);
  ``grad_addresses`` [T]: the gradients' (a table of their own: gradients come and go);
  ``counter_addresses`` [counters, T]: every 0-dim counter's;
- ``numels`` [T]: elements of each tensor; ``first_step`` [lazy states, T]: 1 where a lazily
  created state is new this step;
- ``chunk_tensors``, ``chunk_indices`` [programs]: the tensor program ``pid`` updates and which
  CHUNK of it; ``arrivals`` [T]: the programs of each tensor past their counter reads (zero
  between launches); ``num_tensors``: T.

Then the hyperparameters (float64; one that may be a tensor on the device has a ``_ptr`` twin,
read when its ``_IS_TENSOR`` constexpr says so), GradScaler's ``grad_scale`` and ``found_inf``
(nothing is written where it is non-zero), the guards, and the constexprs every kernel has:
``ALIGNED`` (every address a multiple of 16 bytes), ``DTYPE`` (param, grad and states),
``COMPUTE`` (the elementwise math: float32, float64 for float64 params), ``COUNTER_DTYPE``,
``CHUNK`` (elements per program) and ``BLOCK`` (elements per loop iteration).

What cannot be one elementwise pass — reductions over a tensor (``norm``), factored states of
another shape, intrinsics — makes :meth:`TritonBackend.unsupported` return the reason; such a
spec gets no triton module and ``optgen show`` prints the reason instead.
"""
from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field

import sympy

from optgen.backends.base import KernelSignature, counter_list, plural
from optgen.backends.fused import FusedBackend
from optgen.backends.fused_plan import Names, hoist_scalars, over_arguments, plan_kernel, readable
from optgen.backends.printer import Unsupported
from optgen.backends.triton_printer import TritonPrinter
from optgen.ir.guards import implies, simplify_guard
from optgen.ir.nodes import Assign, Program, Role, is_tensor_valued

#: names the kernel skeleton (templates/triton/kernels.py.j2) defines; spec names that collide
#: with them get a trailing underscore
RESERVED = frozenset({
    "addresses", "grad_addresses", "counter_addresses", "numels", "first_step", "chunk_tensors", "chunk_indices",
    "arrivals", "num_tensors", "grad_scale", "found_inf", "pid", "tensor", "chunk", "numel",
    "applies", "arrived", "last", "start", "end", "whole_end", "block", "offsets", "in_bounds", "inv_scale",
    "MASKED", "other",
    "tl", "triton", "launch", "COMPUTE", "DTYPE", "COUNTER_DTYPE", "CHUNK", "BLOCK", "ALIGNED",
    "HAS_GRAD_SCALE", "HAS_FOUND_INF", "float", "state_keys", "LOW_STATE", "state_scales", "q8_map", "q8_first",
    "INT8_STATE", "Q8_BLOCK", "Q8_BITS", "Q8_SHIFT",
})

#: state initialisers whose tensor is shaped like the parameter (so a flat chunk covers it)
_ELEMENTWISE_STATE = ("zeros", "full", "first")


@dataclass
class Kernel:
    """One variant's kernel and what launching it takes, as pre-printed lines for the template."""

    kernel: str                                   # the @triton.jit function's name
    key: str                                      # repr of the flag values
    doc: str
    tensors: list[tuple[str, str | None]]         # (list name, when it is used, over `a`; None: always)
    counters: list[str]                           # counter list names in table order
    lazy: list[tuple[int, str, str]]              # (list index, state name, creation condition over `a`)
    hyperparameters: list[str]                    # scalar arguments (float64)
    tensor_hyperparameters: list[str]             # those that may be a 1-element tensor on the device
    guards: list[tuple[str, str]]                 # (constexpr atom, condition over `a`) evaluated on the host
    low_precision: list[int] = field(default_factory=list)  # list indices (params 0, grads 1, states 2…)
    # of the states bfloat16 state_dtype keeps in bfloat16, in key order (Note [Low-precision state in Triton])
    prologue: list[str] = field(default_factory=list)       # kernel lines before the loops
    block: list[str] = field(default_factory=list)          # one block's update (MASKED: the partial last one)


class _KernelBuilder:
    """Prints one variant's :class:`~optgen.backends.fused_plan.KernelPlan` as a :class:`Kernel`
    (see Note [Triton kernel layout])."""

    def __init__(self, program: Program, sig: KernelSignature):
        self.program = program
        self.roles = program.roles
        self.spec = program.spec
        self.check()
        self.plan = plan_kernel(program, sig)
        self.host_guards: dict[sympy.Basic, str] = {}      # condition → constexpr name
        self.names = Names(RESERVED)                       # identifiers taken in the kernel

    # -- names -------------------------------------------------------------------------------------
    def kname(self, name: str) -> str:
        """The kernel variable for an IR name."""
        return self.names.of(name)

    def printer(self, rename=None) -> TritonPrinter:
        return TritonPrinter(rename or self.kname)

    # -- checks -------------------------------------------------------------------------------------
    def check(self) -> None:
        statements = [*self.program.preamble, *self.program.body]
        for name, role in self.roles.items():
            if role is Role.STATE and any(name in a.reads() or a.target == name for a in statements):
                init = self.spec.state[name].init
                if init not in _ELEMENTWISE_STATE:
                    raise Unsupported(f"state '{name}' is not shaped like the parameter ({init}), so one "
                                      "flat chunk of the parameter does not cover it")

    # -- guards --------------------------------------------------------------------------------------
    def host_guard(self, condition: sympy.Basic) -> str | None:
        """A host condition as Python over the kernel's constexpr atoms (None for `true`): each
        flag and each hyperparameter comparison is one ``tl.constexpr`` argument, and a compound
        guard is printed over them (``not AMSGRAD``, ``DECOUPLED_WEIGHT_DECAY and WEIGHT_DECAY_NE_0``),
        which Triton folds at compile time like a single constexpr."""
        condition = simplify_guard(condition)
        if condition == sympy.true:
            return None
        return self._guard_text(condition, nested=False)

    def _guard_text(self, condition: sympy.Basic, nested: bool) -> str:
        if condition == sympy.false:
            return "False"
        if isinstance(condition, sympy.Not):
            return f"not {self._guard_text(condition.args[0], nested=True)}"
        if isinstance(condition, (sympy.And, sympy.Or)):
            op = " and " if isinstance(condition, sympy.And) else " or "
            text = op.join(self._guard_text(c, nested=True) for c in condition.args)
            return f"({text})" if nested else text
        if isinstance(condition, sympy.Rel) and condition.negated in self.host_guards:
            return f"not {self.host_guards[condition.negated]}"  # one constexpr per comparison, not two
        if condition not in self.host_guards:
            self.host_guards[condition] = self.names.fresh(readable(condition).upper() or "GUARD")
        return self.host_guards[condition]

    # -- the kernel --------------------------------------------------------------------------------
    def build(self, kernel: str, key: str, doc: str) -> Kernel:
        """``kernel``: the @triton.jit function's name; ``key``: repr of the flag values."""
        roles, plan = self.roles, self.plan
        hypers, tensor_hypers = plan.kernel_hyperparameters, plan.tensor_hyperparameters
        counters, lists = plan.counters, plan.tensors
        presence, written, read = plan.presence, plan.written, plan.read
        self.names.taken |= {self.kname(n) for n in roles} | {f"{self.kname(t)}_ptr" for t in [*lists, *counters]}
        lazy = [(lists.index(s.name), s.name, s.when) for s in plan.lazy]

        prologue: list[str] = []

        # -- hyperparameters, as float64 scalars --------------------------------------------------
        if hypers:
            prologue.append("# hyperparameters, as float64 scalars (exact in the interpreter too)")
        for h in hypers:
            k = self.kname(h)
            if h in tensor_hypers:
                prologue += [f"if {self.is_tensor_flag(h)}:",
                             f"    {k} = tl.load({k}_ptr).to(tl.float64)",
                             "else:",
                             f"    {k} = tl.full((), {k}, tl.float64)"]
            else:
                prologue.append(f"{k} = tl.full((), {k}, tl.float64)")

        # -- counters -----------------------------------------------------------------------------
        written_counters = plan.written_counters
        if counters:
            prologue.append("# counters: every program of a tensor reads them; the last to arrive writes them")
        for i, c in enumerate(counters):
            k = self.kname(c)
            offset = f"{i} * num_tensors + tensor" if i else "tensor"
            prologue += [f"{k}_ptr = tl.load(counter_addresses + {offset}).to(tl.pointer_type(COUNTER_DTYPE))",
                         f"{k} = tl.load({k}_ptr).to(tl.float64)"]
        if written_counters:
            prologue += ['arrived = tl.atomic_add(arrivals + tensor, 1, sem="acq_rel")',
                         "last = arrived == tl.maximum((numel + CHUNK - 1) // CHUNK, 1) - 1"]
        for i, (_, t, _) in enumerate(lazy):
            offset = f"{i} * num_tensors + tensor" if i else "tensor"
            prologue.append(f"{self.kname(t)}_is_new = tl.load(first_step + {offset}) != 0"
                            "  # created this step: store `first`")

        # -- scalar statements, and what the tensor statements need from them ------------------------
        # where each name holds a value: the host guards it was assigned under so far
        # (Note [A guarded assignment keeps the old value only where there is one])
        held: dict[str, sympy.Basic] = {n: sympy.true for n, r in roles.items()
                                        if r in (Role.HYPER, Role.COUNTER) or n in lists}
        cast: dict[str, sympy.Basic] = {}             # kernel scalar → host guard it exists under
        for h in hypers:
            cast[self.kname(h)] = sympy.true
        for c in counters:
            cast[self.kname(c)] = sympy.true
        scalar_lines: list[str] = []
        tensor_code: list[tuple[sympy.Basic, list[str]]] = []   # (host guard, lines) per statement
        conditions: dict[tuple, str] = {}
        versions = {n: 0 for n in roles}

        for statement in plan.statements:
            a, host, dynamic = statement.assign, statement.host, statement.per_tensor
            role = roles[a.target]
            condition = None
            if dynamic != sympy.true:
                # computed under this statement's host guard, so shared only by statements under the same one
                # (a statement under `if h0 < 0.5:` must not define what its unguarded neighbour reads)
                at = (host, dynamic, tuple(sorted((s.name, versions.get(s.name, 0)) for s in dynamic.free_symbols)))
                if at not in conditions:
                    conditions[at] = self.names.fresh(readable(dynamic).lower() or "condition")
                    scalar_lines += self._guarded(host, [f"{conditions[at]} = {self.printer()(dynamic)}"])
                condition = conditions[at]
            if not role.is_tensor:
                value = self.printer()(a.value)
                k = self.kname(a.target)
                if role is Role.COUNTER:  # held exactly as its 0-dim tensor (torch's `step`) holds it
                    value = self._counter_value(statement)
                for guard, keep in self._keeps_old_value(host, condition, held.get(a.target, sympy.false)):
                    code = f"{k} = tl.where({condition}, {value}, {k})" if keep else f"{k} = {value}"
                    scalar_lines += self._guarded(guard, [f"# {a.text}", code])
                held[a.target] = sympy.Or(held.get(a.target, sympy.false), host)
                versions[a.target] = versions.get(a.target, 0) + 1
                cast.setdefault(k, sympy.false)
                cast[k] = sympy.Or(cast[k], host)
                continue
            # A tensor statement: its scalar subexpressions become float64 scalars computed here.
            replaced, snapshot_lines = self._scalar_operands(a, host, statement.later, cast)
            scalar_lines += self._guarded(host, snapshot_lines)
            value = self.printer()(replaced["value"])
            if not is_tensor_valued(a.value, roles):
                value = f"tl.full((BLOCK,), {value}, COMPUTE)"
            k = self.kname(a.target)
            if a.first is not None:
                value = f"tl.where({k}_is_new, {self.printer()(replaced['first'])}, {value})"
            for guard, keep in self._keeps_old_value(host, condition, held.get(a.target, sympy.false)):
                code = f"{k} = tl.where({condition}, {value}, {k})" if keep else f"{k} = {value}"
                tensor_code.append((guard, [f"# {a.text}", code]))
            held[a.target] = sympy.Or(held.get(a.target, sympy.false), host)

        if scalar_lines:
            prologue += ["# scalars (float64), in the order the spec computes them", *scalar_lines]
        if written_counters:
            prologue.append("# the last program of each tensor writes its counters back (unless GradScaler skips)")
            for c in written_counters:
                k = self.kname(c)
                prologue.append(f"tl.store({k}_ptr, {k}.to(COUNTER_DTYPE), mask=last & applies)")
            prologue.append("tl.store(arrivals + tensor, 0, mask=last)")

        casts = [(k, g) for k, g in cast.items() if k in self._loop_scalars(tensor_code)]
        if casts:
            prologue.append("# the scalars the elementwise update reads, in its compute dtype")
            for guard, group in itertools.groupby(casts, key=lambda kg: kg[1]):
                prologue += self._guarded(guard, [f"{k} = {k}.to(COMPUTE)" for k, _ in group])

        # -- tensor addresses ----------------------------------------------------------------------
        prologue.append("# this program's tensors")
        aligned = []
        low = [t for t in lists if t in self.spec.state and self.spec.state[t].low_precision]
        for i, t in enumerate(t for t in lists if t != "grad"):
            k = self.kname(t)
            offset = f"{i} * num_tensors + tensor" if i else "tensor"
            pointer = [f"{k}_ptr = tl.load(addresses + {offset}).to(tl.pointer_type(DTYPE))"]
            if t in low:  # Note [Low-precision state in Triton], Note [Blockwise 8-bit state in Triton]
                pointer = ["if INT8_STATE:",
                           f"    {k}_ptr = tl.load(addresses + {offset}).to(tl.pointer_type(tl.uint8))",
                           f"    {k}_scale_ptr = tl.load(state_scales + {low.index(t)} * num_tensors + tensor)"
                           ".to(tl.pointer_type(tl.float32))",
                           "elif LOW_STATE:",
                           f"    {k}_ptr = tl.load(addresses + {offset}).to(tl.pointer_type(tl.bfloat16))",
                           f"    {k}_key = tl.load(state_keys + {low.index(t)} * num_tensors + tensor)",
                           "else:", f"    {pointer[0]}"]
            prologue += self._guarded(presence.get(t, sympy.true), pointer)
            aligned += self._guarded(presence.get(t, sympy.true), [f"{k}_ptr = tl.multiple_of({k}_ptr, 16)"])
            if t == "param":
                prologue.append("grad_ptr = tl.load(grad_addresses + tensor).to(tl.pointer_type(DTYPE))")
                aligned.append("grad_ptr = tl.multiple_of(grad_ptr, 16)")
        prologue += ["if ALIGNED:  # every tensor starts on a 16-byte boundary (checked on the host): vector loads",
                     *("    " + line for line in aligned)]

        # -- the loop body, printed once: the template runs it over whole blocks (MASKED false:
        # in_bounds and other are None, so the loads are unmasked 16-byte vectors) and then over
        # the partial last block (MASKED: in_bounds masks, other = 0.0)
        block: list[str] = []
        for t in lists:
            if t not in read:
                continue
            k = self.kname(t)
            # (a state created this step holds garbage until the store: tl.where never selects it)
            load = [f"{k} = tl.load({k}_ptr + offsets, mask=in_bounds, other=other).to(COMPUTE)"]
            if t in low:
                load = ["if INT8_STATE:", *("    " + line for line in _q8_load(k, self.signed(t))), "else:",
                        f"    {load[0]}"]
            if t == "grad":
                load += ["if HAS_GRAD_SCALE:  # GradScaler's unscale, written back as torch's fused kernels do",
                         "    grad = grad * inv_scale",
                         "    tl.store(grad_ptr + offsets, grad.to(DTYPE), mask=in_bounds)"]
            block += self._guarded(presence.get(t, sympy.true), load)
        for guard, group in itertools.groupby(tensor_code, key=lambda gl: gl[0]):
            block += self._guarded(guard, [line for _, code in group for line in code])
        for t in lists:
            if t in written and t != "grad":  # grad is read-only: reassigning it made a local copy
                k = self.kname(t)
                store = [f"tl.store({k}_ptr + offsets, {k}.to(DTYPE), mask=in_bounds)"]
                if t in low:
                    store = ["if INT8_STATE:", *("    " + line for line in _q8_store(k, self.signed(t))),
                             "elif LOW_STATE:", *("    " + line for line in _stochastic_store(k)),
                             "else:", f"    {store[0]}"]
                block += self._guarded(written[t], store)

        tensors = []
        for t in lists:
            guard = simplify_guard(presence.get(t, sympy.true))
            tensors.append((plural(t), None if guard == sympy.true else over_arguments(guard)))
        guards = [(name, over_arguments(cond) if cond != sympy.false else "False")
                  for cond, name in self.host_guards.items()]
        return Kernel(kernel=kernel, key=key, doc=doc, tensors=tensors,
                      counters=[counter_list(c) for c in counters], lazy=lazy, hyperparameters=hypers,
                      low_precision=[lists.index(t) for t in low],
                      tensor_hyperparameters=tensor_hypers, guards=guards, prologue=prologue,
                      block=block)

    # -- helpers -------------------------------------------------------------------------------------
    def signed(self, state: str) -> bool:
        """Whether an int8 state uses the signed code map (Note [Blockwise 8-bit state])."""
        return not self.spec.state[state].nonnegative

    def _counter_value(self, statement) -> str:
        """A counter's new value, rounded as torch rounds it (:attr:`Statement.rounding`): an update
        that reads the counter runs on its 0-dim tensor, in the counter's dtype (``mu_product *= mu``
        multiplies in float32); any other is computed in float64 and rounded when stored."""
        value = statement.assign.value
        if statement.rounding == "in_dtype":
            in_dtype = self.printer(lambda n: f"{self.kname(n)}.to(COUNTER_DTYPE)")(value)
            return f"({in_dtype}).to(tl.float64)"
        return f"({self.printer()(value)}).to(COUNTER_DTYPE).to(tl.float64)"

    def is_tensor_flag(self, h: str) -> str:
        return f"{h.upper()}_IS_TENSOR"

    def _guarded(self, guard: sympy.Basic, lines: list[str]) -> list[str]:
        if not lines:
            return []
        name = self.host_guard(guard)
        if name is None:
            return list(lines)
        return [f"if {name}:", *("    " + line for line in lines)]

    # Note [A guarded assignment keeps the old value only where there is one]
    # ~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
    # A statement under a per-tensor condition assigns `u = tl.where(cond, value, u)`: where the
    # condition is false `u` keeps what it held.  Each combination of host guards is its own kernel,
    # so the old `u` exists only in the kernels where an earlier assignment's host guard holds: in
    # ``if step < 3: (if h0 < 0.5: u = a else: u = b)`` the second branch (under H0_GE_0_5) read a
    # `u` that only the first (under H0_LT_0_5) assigned — UnboundLocalError (fuzz seeds 60076,
    # 60133).  So the old value is kept only under the part of the statement's host guard where
    # some earlier assignment's host guard holds; elsewhere `u` has no value to keep, and a valid
    # rule reads it only where `cond` held, so it is assigned outright.  A statement whose host
    # guard half overlaps becomes two, one under each part.

    def _keeps_old_value(self, host, condition, held) -> list[tuple[sympy.Basic, bool]]:
        """(host guard, whether to keep the old value with tl.where) for each piece a statement
        under ``host`` prints as; ``held``: where its target already has a value."""
        if condition is None or implies(host, sympy.Not(held)):
            return [(host, False)]
        if implies(host, held):
            return [(host, True)]
        return [(sympy.And(host, held), True), (sympy.And(host, sympy.Not(held)), False)]

    def _scalar_operands(self, a: Assign, host, later: frozenset[str], cast: dict):
        """Replaces each maximal scalar subexpression of a tensor statement with a float64 scalar
        computed in the scalar section; returns the new expressions and the lines computing them."""
        lines: list[str] = []
        memo: dict[sympy.Basic, sympy.Symbol] = {}

        def scalar_name(expr: sympy.Basic) -> sympy.Symbol:
            if expr in memo:
                return memo[expr]
            if expr.is_Symbol:
                name = self.names.fresh(f"{self.kname(expr.name)}_0")
            else:
                text = readable(expr)
                name = self.names.fresh(text if 0 < len(text) <= 40 else "scalar")
            lines.append(f"{name} = {self.printer()(expr)}")
            cast[name] = sympy.Or(cast.get(name, sympy.false), host)
            memo[expr] = sympy.Symbol(name, real=True)
            return memo[expr]

        def inline(e) -> bool:  # numbers, and scalars no later statement reassigns (cast once)
            return e.is_Number or e.is_Symbol and e.name not in later

        def division(e) -> bool:
            return e.is_Pow and e.exp.is_Integer and e.exp < 0 and e.base.is_Symbol

        def walk(expr: sympy.Basic) -> sympy.Basic:
            return hoist_scalars(expr, self.roles, inline=inline, division=division, hoist=scalar_name)

        out = {"value": walk(a.value)}
        if a.first is not None:
            out["first"] = walk(a.first)
        return out, lines

    def _loop_scalars(self, tensor_code) -> set[str]:
        text = "\n".join(line for _, lines in tensor_code for line in lines if not line.lstrip().startswith("#"))
        return set(re.findall(r"[A-Za-z_][A-Za-z0-9_]*", text))


def _stochastic_store(k: str) -> list[str]:
    """The store of low-precision state ``k`` under LOW_STATE: rounded stochastically to bfloat16
    with the bits of Note [Stochastic rounding of state] (printed inline: Triton's interpreter, which
    runs these kernels on CPU tensors, cannot call another @triton.jit function of another module)."""
    return [f"{k}_bits = {k}.to(tl.float32).to(tl.uint32, bitcast=True)",
            f"{k}_random = offsets.to(tl.uint32) ^ {k}_key.to(tl.uint32)  # mix32(index ^ key)",
            f"{k}_random = ({k}_random ^ ({k}_random >> 16)) * 0x21F0AAAD",
            f"{k}_random = ({k}_random ^ ({k}_random >> 15)) * 0x735A2D97",
            f"{k}_random = {k}_random ^ ({k}_random >> 15)",
            f"{k}_bits = tl.where(({k}_bits & 0x7FFFFFFF) > 0x7F800000, ({k}_bits >> 16) | 0x40,  # NaN stays NaN",
            f"                    ({k}_bits + ({k}_random & 0xFFFF)) >> 16)",
            f"tl.store({k}_ptr + offsets, {k}_bits.to(tl.uint16).to(tl.bfloat16, bitcast=True), mask=in_bounds)"]


# Note [Blockwise 8-bit state in Triton]
# ~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
# Under ``state_dtype="int8"`` (Note [Blockwise 8-bit state] in optgen/runtime/quantized_state.py)
# a kernel is launched with ``INT8_STATE=True``: each low-precision state is addressed as its codes
# (uint8) and its blocks' scales (``state_scales``: [low-precision states, T] addresses), and the C
# kernel's steps (Note [Blockwise 8-bit state in C]) run on the loop's block of BLOCK elements, a
# whole number of the state's blocks of Q8_BLOCK (the launcher checks): a code loads as its map
# value (``q8_map``, the unsigned then the signed map) times its block's scale; the new values,
# seen as [BLOCK // Q8_BLOCK, Q8_BLOCK], give each block its absmax (the largest bits of the
# magnitudes, NaN above infinity as in torch's amax, found by halving the rows with tl.split and
# tl.maximum: tl.max is a @triton.jit function, which the interpreter the tests run cannot call),
# are divided by it (``div_rn``: the reference's IEEE division, not the GPU's approximate one), and
# find their nearest code by the reference's bit-pattern lookup (``q8_first``: the C prelude's
# tables, built by triton_launch.q8_tables).  The lanes past a tensor's end count as zeros, and the
# scales of blocks past it are not written.  It has run in Triton's interpreter and compiles for
# sm_90 (tests/triton); no GPU has run it yet, so on CUDA ``fused=True`` picks it and the default
# stays the reference.

def _q8_load(k: str, signed: bool) -> list[str]:
    """State ``k``'s values under INT8_STATE: codes times their block's scale."""
    table = "256" if signed else f"tl.where({k}_scale < 0, 256, 0)"
    return [f"{k}_scale = tl.load({k}_scale_ptr + offsets // Q8_BLOCK, mask=in_bounds, other=other)",
            f"{k} = tl.load(q8_map + {table} + tl.load({k}_ptr + offsets, mask=in_bounds, other=other).to(tl.int32))",
            f"{k} = ({k} * tl.abs({k}_scale)).to(COMPUTE)"]


def _block_max(target: str, value: str) -> list[str]:
    """``target`` = the largest of each row of ``value`` ([blocks, Q8_BLOCK] int32), by halving the
    rows: tl.max is a @triton.jit function of Triton's standard library, which its interpreter
    cannot call where the kernel is interpreted without TRITON_INTERPRET=1 (the tests' CPU path)."""
    return [f"{target} = {value}",
            "for _ in tl.static_range(Q8_BITS):",
            f"    {target}_a, {target}_b = tl.split(tl.reshape({target}, "
            f"({target}.shape[0], {target}.shape[1] // 2, 2)))",
            f"    {target} = tl.maximum({target}_a, {target}_b)",
            f"{target} = tl.reshape({target}, (BLOCK // Q8_BLOCK,))"]


def _q8_store(k: str, signed: bool) -> list[str]:
    """The store of state ``k`` under INT8_STATE: each block's absmax and each element's nearest code."""
    out = [f"{k}_x = {k}.to(tl.float32)",
           "if MASKED:  # (the lanes past the end count as zeros)",
           f"    {k}_x = tl.where(in_bounds, {k}_x, 0.0)",
           f"{k}_x = tl.reshape({k}_x, (BLOCK // Q8_BLOCK, Q8_BLOCK))",
           *_block_max(f"{k}_largest", f"tl.abs({k}_x).to(tl.int32, bitcast=True)"),
           f"{k}_largest = {k}_largest.to(tl.float32, bitcast=True)",
           f"{k}_y = tl.math.div_rn({k}_x, tl.where({k}_largest > 0, {k}_largest, 1.0)[:, None])"]
    if signed:
        out.append(f"{k}_map = 1")
    else:  # a block holding a negative value uses the signed map, its scale stored negated
        out += [*_block_max(f"{k}_negative", f"({k}_x < 0).to(tl.int32)"),
                f"{k}_map = {k}_negative[:, None]",
                f"{k}_largest = tl.where({k}_negative > 0, -{k}_largest, {k}_largest)"]
    out += [f"{k}_bits = {k}_y.to(tl.uint32, bitcast=True)",
            f"{k}_magnitude = {k}_bits & 0x7FFFFFFF",
            f"{k}_sign = (({k}_bits >> 31) & ({k}_magnitude <= 0x7F800000)).to(tl.int32)  # (NaN: positive)",
            f"{k}_bucket = (tl.minimum({k}_magnitude, 0x3F800000) >> Q8_SHIFT).to(tl.int32)  # (magnitudes to 1)",
            f"{k}_code = tl.load(q8_first + ({k}_map + 2 * {k}_sign) * ((0x3F800000 >> Q8_SHIFT) + 1) + {k}_bucket)",
            f"{k}_code += ({k}_y > tl.load(q8_map + 512 + {k}_map * 256 + {k}_code)).to(tl.int32)",
            f"tl.store({k}_ptr + offsets, tl.reshape({k}_code, (BLOCK,)).to(tl.uint8), mask=in_bounds)",
            f"{k}_blocks = block // Q8_BLOCK + tl.arange(0, BLOCK // Q8_BLOCK)",
            f"tl.store({k}_scale_ptr + {k}_blocks, {k}_largest, mask={k}_blocks * Q8_BLOCK < end if MASKED else None)"]
    return out


class TritonBackend(FusedBackend):
    """generated/<spec>_triton.py: fused multi-tensor kernels (see Note [Triton kernel layout])."""

    name = "triton"
    device_scalars = True
    builder = _KernelBuilder
    #: the optimizer class names the module as a string and imports it on first use, so that
    #: ``import optgen`` never imports triton
    lazy = True

    def kernel_name(self, base: str) -> str:
        return f"_{base}_kernel"


BACKEND = TritonBackend()
