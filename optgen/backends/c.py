"""The C backend: one fused CPU kernel per optimizer (every flag variant), compiled on first use.

Note [C kernel layout]
~~~~~~~~~~~~~~~~~~~~~~
torch's fused CPU optimizers (Adam, AdamW, SGD, Adagrad) walk each tensor once, in parallel
chunks, with vectorised math; optgen's for-loop and foreach kernels walk it once per op.  This
backend prints every elementwise spec as such a kernel, in C (PERF-NOTES: a plain C loop with
``restrict`` pointers, OpenMP over the elements and ``-O3 -march=native -fno-math-errno`` is level
with torch's fused Adam).  One function over every tensor of a (dtype) group (abridged: the
flags arrive as the bits of ``flags``, and each loop below is one version of its walk)::

    void adam_default(int64_t n, void **tensors, void **grads, void **counters,
                      const int64_t *numels, const int64_t *dims, const uint8_t *first_step,
                      const double *hyper, int counters_f64)
    {
        const double lr = hyper[0]; ...                  // hyperparameters (double)
        for (int64_t t = 0; t < n; ++t) {
            double step = load_counter(counters[t], counters_f64);
            step = round_counter(step + 1, counters_f64); // as the 0-dim float32 tensor holds it
            const double bias_correction1 = 1 - pow(beta1, step);
            ...                                           // every scalar statement, in order, double
            const scalar_t s_1 = (scalar_t)(1 - beta1);   // what the loop reads, in scalar_t
            #pragma omp parallel for if (numel >= PARALLEL_MIN)
            for (int64_t i = 0; i < numel; ++i) {
                scalar_t param = param_p[i], grad = grad_p[i], exp_avg = exp_avg_p[i];
                exp_avg = exp_avg + s_1 * (grad - exp_avg);
                ...
                param_p[i] = param; exp_avg_p[i] = exp_avg;
            }
            store_counter(counters[t], step, counters_f64);
        }
    }

Scalars are computed per tensor in ``double``, in the spec's order, as the for-loop kernel's
Python floats are: each assignment is a new C variable (``eta``, ``eta_1``), so a tensor statement
reads the value its position in the spec sees.  Every condition is a per-tensor scalar (a
hyperparameter comparison, ``rho_t > 5``), computed once before the loop, and the loop is
specialised on up to MAX_VERSIONS of them (``if (cond) { loop } else { loop }``: straight-line
loops vectorise, and a state a condition leaves absent is never touched); per-element choices
are ``where(...)`` inside an expression.  The flags are branched on the same way, and the
versions of a loop share one body, a ``static inline`` function called with the flags and
conditions as constants (Note [One loop body per walk]).  The elementwise loop loads each
tensor once, runs the tensor statements in ``scalar_t`` (the parameters' ``float`` or
``double``; ``float`` for bfloat16 and float16 storage, as torch's fused kernels compute: the
source compiles once per dtype), and stores each written tensor once.  A lazily created state is allocated before the
call and flagged in ``first_step`` (its ``first`` value is stored on that step).

A rule that reduces tensors (``norm``, ``norm_dim``, ``mean_dim``) makes several such walks,
scheduled by optgen/backends/sweeps.py (Note [Sweeps]): every per-tensor line carries a level,
walk k is emitted before the lines of level k, and the last walk is the loop above.  The tensor
is then also seen as ``(dim_b, dim_m, dim_c)`` (``dims``), walks that read a reduced-shape value
run over rows (``ir``) and columns (``ic``), and reduced-shape values live in per-tensor arrays.
What the kernels cannot express (intrinsics, sparse rows, reductions over other dimensions)
makes :meth:`CBackend.unsupported` say why, as the Triton backend does.
"""
from __future__ import annotations

import dataclasses
import itertools
import re
from collections.abc import Callable
from dataclasses import dataclass

import sympy

from optgen.backends.base import counter_list, plural, wrap
from optgen.backends.c_printer import CElementPrinter, CScalarPrinter
from optgen.backends.fused import FusedBackend
from optgen.backends.fused_plan import Names, hoist_scalars, over_arguments, plan_kernel, readable
from optgen.backends.printer import Unsupported, identifier
from optgen.backends.sweeps import BATCH, COLS, FULL, ROWS, SCALAR, Extent, Reduction, extent_of_expression
from optgen.ir.guards import first_assignments
from optgen.ir.nodes import Assign, Program, Role, tensor_reads
from optgen.passes import Compiled

#: C keywords and the kernel skeleton's names; an IR name among them gets a trailing underscore
RESERVED = frozenset({
    "auto", "break", "case", "char", "const", "continue", "default", "do", "double", "else", "enum", "extern",
    "float", "for", "goto", "if", "inline", "int", "long", "register", "restrict", "return", "short", "signed",
    "sizeof", "static", "struct", "switch", "typedef", "union", "unsigned", "void", "volatile", "while",
    "n", "t", "i", "j", "v", "ir", "ib", "im", "ic", "i0", "i1", "ic0", "ic1", "i_begin", "i_end", "numel", "ndim",
    "dim_b", "dim_m", "dim_c", "tensors", "grads", "counters", "numels", "dims", "first_step", "hyper",
    "counters_f64", "flags", "malloc", "calloc", "free", "isnan", "sum_terms", "lerp_of",
    "scalar_t", "exp", "log", "pow", "sqrt", "fabs", "fmax", "fmin", "max_nan", "min_nan", "sign_of",
    "state_keys", "lowp_t", "lowp_load", "lowp_store", "lowp_key", "q8_load", "q8_store",
    "q8_code", "q8_block", "q8_init", "q8_float", "q8_map", "q8_mid", "q8_first", "block_share", "Q8_BLOCK",
    "Q8_BLOCK_SHIFT", "Q8_BUCKET_SHIFT", "Q8_BUCKETS", "OPTGEN_WALK_BLOCKS",
})

#: per-tensor conditions a walk is specialised on (2 ** MAX_VERSIONS loops at most)
MAX_VERSIONS = 3


@dataclass
class CKernel:
    """The optimizer's C function (every flag variant) and what the host function passes it."""

    function: str                       # the C function's name
    key: str                            # repr of the flag values
    doc: str
    tensors: list[str]                  # state list names in table order (after params)
    present: list[tuple[int, str]]      # (index into params + tensors, when it is touched, over `a`): else None entries
    flags: list[str]                    # the flags, in the order of the bits of `flags`
    counters: list[str]                 # counter list names in table order
    lazy: list[tuple[int, str]]         # (index into params + tensors, creation condition over `a`)
    hyperparameters: list[str]          # in the order of `hyper`
    reduced: list[tuple[int, int]]      # (index into params + tensors, the dimension its shape keeps as 1)
    source: list[str]                   # the C function
    low_precision: list[int] = dataclasses.field(default_factory=list)  # (index into params + tensors:
    # the states bfloat16 state_dtype keeps in bfloat16, in the order of their keys: Note [Low-precision state])
    int8: bool = False  # the source has a STATE_INT8 version (Note [Blockwise 8-bit state in C])


@dataclass
class _FullStatement:
    """A statement over every element, printed once, placed in each walk that needs it."""

    order: int          # position in the spec
    level: int
    target: str
    reads: set[str]     # tensor names it reads (its target too when guarded: the old value stays)
    condition: str | None
    comment: str
    code: str
    flags: sympy.Basic = sympy.true     # the flag values it runs under (the merged program's flag part)

    @property
    def guarded(self) -> bool:
        return self.condition is not None


@dataclass
class _Accumulation:
    """A reduction of a FULL operand, accumulated during walk ``level``."""

    order: int          # position in the spec: it sums the operand's value there
    level: int
    reduction: Reduction
    value: str          # the operand for one element, printed
    condition: str | None
    reads: set[str]
    flags: sympy.Basic = sympy.true


class _CBuilder:
    """Walks one specialised :class:`Program` into a :class:`CKernel` (Note [C kernel layout],
    Note [Sweeps] for rules that reduce tensors)."""

    def __init__(self, program: Program, signature, low_state: bool | str = False):
        self.program = program
        # printing the bfloat16 state version (True) or the int8 one ("int8"): Note [Low-precision
        # state in C], Note [Blockwise 8-bit state in C]
        self.low_state = low_state
        self.int8 = low_state == "int8"
        self.kernel = plan_kernel(program, signature)
        self.plan = self.kernel.schedule
        self.defined_at = first_assignments(a.target for a in program.body
                                            if program.roles.get(a.target) is Role.SCALAR)
        self.roles, self.extents = self.plan.roles, self.plan.extents
        self.current: dict[str, str] = {}   # IR scalar name → the C variable holding its value now
        self.level: dict[str, int] = {}     # IR name → the level of its current value
        self.names = Names(RESERVED)
        self.lines: list[tuple[int, str]] = []     # per-tensor code, each line with its level
        self.full: list[_FullStatement] = []
        self.accumulations: list[_Accumulation] = []
        self.scratch: dict[str, str] = {}   # small local tensor → its per-tensor array
        self.accumulators: dict[str, str] = {}  # lifted reduction → the variable summing it
        self.hoisted: dict[str, str] = {}
        self.functions: list[str] = []     # the walks' bodies (Note [One loop body per walk])
        self.conditions: dict[str, str] = {}  # condition text (names are versions) → its variable
        self.condition_of: dict[str, sympy.Basic] = {}  # that variable → the condition

    def cname(self, name: str) -> str:
        return self.names.of(name)

    def fresh(self, base: str) -> str:
        return self.names.fresh(base)

    def scalar(self, expr) -> str:
        printer = CScalarPrinter(lambda n: self.current.get(n, self.cname(n)),
                                 lambda e: extent_of_expression(e, self.extents))
        printer.defined_at = self.defined_at
        return printer(expr)

    def level_of(self, expr) -> int:
        return max((self.level.get(s.name, 0) for s in sympy.sympify(expr).free_symbols), default=0)

    def build(self, function: str, key: str, doc: str) -> CKernel:
        roles, kernel = self.roles, self.kernel
        hypers, counters, states = kernel.hyperparameters, kernel.counters, kernel.states
        self.lists = lists = ["param", *states]
        self.lazy_states = lazy_states = [s.name for s in kernel.lazy]
        # Note [Low-precision state] (optgen/spec/load.py): lowp_t, loaded and stored by lowp_load/lowp_store
        self.low = [t for t in states if self.program.spec.state[t].low_precision and self.extents.get(t, FULL) == FULL]
        self.function = function
        lazy = [(lists.index(s.name), s.when) for s in kernel.lazy]
        # A state that may not exist for this tensor (SGD's momentum_buffer when momentum == 0,
        # Adafactor's row_var for a vector) has a NULL address: the statements using it do not
        # run, but a walk may still load around them.
        self.optional = kernel.optional
        # hyperparameters, counters (their value on entry) and tensors keep their names; a scalar
        # statement's first assignment takes its own, a later one a numbered version
        self.names.taken |= {self.cname(n) for n, r in roles.items() if r is not Role.SCALAR}
        self.names.taken |= {f"{self.cname(t)}_p" for t in ["grad", *lists]}
        self.names.taken |= {f"{self.cname(t)}_{suffix}" for t in self.low
                             for suffix in ("key", "scale", "stage", "block_scale")}

        head = [f"const double {self.cname(h)} = hyper[{i}];" for i, h in enumerate(hypers)]
        self.flags = kernel.flags
        head += [f"const int {self.cname(f)} = (flags >> {i}) & 1;" for i, f in enumerate(self.flags)]
        for f in self.flags:
            self.current[f] = self.cname(f)
        for h in hypers:
            self.current[h] = self.cname(h)
        prologue: list[str] = ["const int64_t numel = numels[t];"]
        for i, c in enumerate(counters):
            self.current[c] = self.cname(c)
            prologue.append(f"double {self.cname(c)} = load_counter(counters[{i} * n + t], counters_f64);")
        for k, t in enumerate(lazy_states):
            prologue.append(f"const int {self.cname(t)}_is_new = first_step[{k} * n + t];")

        preamble = set(map(id, self.program.preamble))  # group-level scalars: before the tensor loop
        for item in self.plan.items:
            node = item.node
            if isinstance(node, Reduction):
                self.reduction(item)
            elif not roles[node.target].is_tensor:
                if id(node) in preamble:
                    head.extend(self.scalar_statement(node))
                else:
                    self.lines += [(item.level, x) for x in self.scalar_statement(node)]
            elif item.extent == FULL:
                self.full_statement(node, item.level)
            else:
                self.small_statement(node, item)
            if isinstance(node, Assign):
                self.level[node.target] = item.level

        pointers = ["const storage_t *restrict grad_p = (const storage_t *)grads[t];"]
        used = {n for s in self.full for n in s.reads | {s.target}} | {n for a in self.accumulations for n in a.reads}
        used |= {n for _, line in self.lines for n in lists if re.search(rf"\b{self.cname(n)}_p\b", line)}
        for i, t in enumerate(lists):
            if t in used:
                kind = "lowp_t" if t in self.low else "storage_t"
                pointers.append(f"{kind} *restrict {self.cname(t)}_p = ({kind} *)tensors[{i} * n + t];")
        if self.int8:  # each int8 state's block scales: the table's rows after the lists
            pointers += [f"float *restrict {self.cname(t)}_scale = (float *)tensors[{len(lists) + k} * n + t];"
                         for k, t in enumerate(self.low) if t in used]
        else:
            pointers += [f"const uint32_t {self.cname(t)}_key = lowp_key(t, {k});"
                         for k, t in enumerate(self.low) if t in used]
        scratch = [f"scalar_t *{array} = (scalar_t *)malloc(sizeof(scalar_t) * {_size(self.extents[name])});"
                   for name, array in self.scratch.items()]
        body: list[str] = [*prologue]
        early = self.early_stores()
        for level in range(self.plan.walks + 1):
            if level:
                here = {t for t, k in early.items() if k == level}
                statements = [self.stored_early(s) if s.target in here else s for s in self.full
                              if s.level < level and early.get(s.target, level) >= level]
                body += self.walk(statements, [a for a in self.accumulations if a.level == level], store=here,
                                  number=level)
            body += [line for lv, line in self.lines if lv == level]
        body += self.walk([s for s in self.full if s.target not in early], [],
                          store={t for t in lists if t not in early}, number=self.plan.walks + 1)
        body += [f"store_counter(counters[{i} * n + t], {self.current[c]}, counters_f64);"
                 for i, c in enumerate(counters) if self.current[c] != self.cname(c)]
        body += [f"free({array});" for array in self.scratch.values()]
        text = "\n".join(body)
        dims = [f"const int64_t {d} = dims[4 * t + {k}];" for k, d in enumerate(("ndim", "dim_b", "dim_m", "dim_c"))
                if re.search(rf"\b{d}\b", text)]
        body = [body[0], *dims, *body[1:len(prologue)], *pointers, *scratch, *body[len(prologue):]]
        # two functions per tensor, split among the threads or on one, and the kernel, which runs
        # them over the tensors (for_each_tensor, c_launch.PRELUDE: Note [Small tensors in parallel])
        lines = [*head, *body]
        # a walk storing int8 state shares its elements out in whole blocks (Note [Blockwise 8-bit state in C])
        blocks_share = ["#define OPTGEN_WALK_BLOCKS block_share(numel, Q8_BLOCK, 0), block_share(numel, Q8_BLOCK, 1)"] \
            if any("OPTGEN_WALK_BLOCKS" in line for line in lines) else []
        undefine = ["#undef OPTGEN_WALK_BLOCKS"] if blocks_share else []
        source = [*self.functions,
                  f"/* {doc}: tensor t, split among the threads */",
                  f"#define OPTGEN_WALK_REGION {_WALK_REGION}",
                  "#define OPTGEN_WALK_SHARE thread_share(numel, 0), thread_share(numel, 1)",
                  *blocks_share,
                  f"static void {function}_tensor_split(const int64_t t, OPTGEN_KERNEL_PARAMETERS)",
                  "{", *_indent(lines), "}", "#undef OPTGEN_WALK_REGION", "#undef OPTGEN_WALK_SHARE", *undefine, "",
                  f"/* {doc}: tensor t, on one thread */",
                  "#define OPTGEN_WALK_REGION", "#define OPTGEN_WALK_SHARE 0, numel",
                  *(["#define OPTGEN_WALK_BLOCKS 0, numel"] if blocks_share else []),
                  f"static void {function}_tensor(const int64_t t, OPTGEN_KERNEL_PARAMETERS)",
                  "{", *_indent(_one_thread(lines)), "}", "#undef OPTGEN_WALK_REGION", "#undef OPTGEN_WALK_SHARE",
                  *undefine, "",
                  f"/* {doc} */", f"void {function}(OPTGEN_KERNEL_PARAMETERS)",
                  "{", f"    for_each_tensor({function}_tensor, {function}_tensor_split, OPTGEN_KERNEL_ARGUMENTS);",
                  "}"]
        reduced = {lists.index(t): -1 if self.extents[t] == ROWS else -2 for t in states if self.extents[t] != FULL}
        present = [(lists.index(t), over_arguments(kernel.presence[t])) for t in states
                   if kernel.presence.get(t, sympy.true) != sympy.true]
        return CKernel(function=function, key=key, doc=doc, tensors=[plural(t) for t in states], present=present,
                       flags=list(self.flags),
                       counters=[counter_list(c) for c in counters], lazy=lazy, hyperparameters=hypers,
                       reduced=sorted(reduced.items()), source=source,
                       low_precision=[lists.index(t) for t in self.low], int8=self.int8)

    def early_stores(self) -> dict[str, int]:
        """The FULL states stored before the last walk → the walk that stores each (Note [Sweeps]):
        a state assigned once, whose old value nothing before that assignment reads, is stored by
        the first walk that computes it, and later walks load its new value instead of recomputing
        it from what it was computed from."""
        early: dict[str, int] = {}
        for t in self.lists:
            if self.low_state and t in self.low:
                continue  # Note [Low-precision state in C]
            assigns = [s for s in self.full if s.target == t]
            if len(assigns) != 1:
                continue
            a = assigns[0]
            before: list[_FullStatement | _Accumulation] = [*self.full, *self.accumulations]
            if any(t in x.reads for x in before if x.order < a.order):
                continue  # a statement a later walk recomputes would read the new value
            for k in range(a.level + 1, self.plan.walks + 1):
                live = _live([s for s in self.full if s.level < k],
                             [x for x in self.accumulations if x.level == k], ())
                if any(x is a for x in live):
                    early[t] = k
                    break
        return early

    def stored_early(self, s: _FullStatement) -> _FullStatement:
        """``s`` in the walk that stores its state early: its value rounded to the storage type,
        so that this walk's sums see the value later walks load (for 16-bit storage; the identity
        for float and double)."""
        prefix = f"{self.cname(s.target)} = "
        assert s.code.startswith(prefix) and s.code.endswith(";"), s.code
        return dataclasses.replace(s, code=f"{prefix}to_compute(from_compute({s.code[len(prefix):-1]}));")

    # -- statements ----------------------------------------------------------------------------
    def scalar_statement(self, a) -> list[str]:
        """A scalar or counter statement, in double, as a new version of its variable."""
        guard = self.scalar(a.guard) if a.guard != sympy.true else None
        value = self.scalar(a.value)
        if self.roles[a.target] is Role.COUNTER:  # held as its 0-dim tensor holds it (float32 by default)
            if a.target in {x.name for x in a.value.free_symbols}:
                # an update of the 0-dim tensor itself (mu_product *= mu) computes in its dtype
                value = self.counter_update(a.value, a.target)
            value = f"round_counter({value}, counters_f64)"
        previous = self.current.get(a.target)
        name = self.fresh(a.target)
        self.current[a.target] = name
        code = f"const double {name} = {value};" if guard is None else \
            f"const double {name} = ({guard}) ? {value} : {previous or 0};"
        return [f"/* {a.text} */", code]

    def counter_update(self, expr, counter: str) -> str:
        """An update that reads the counter, as torch computes it on the counter's 0-dim tensor
        (and the interpreter, optgen/ir/interpret.py): what does not read the counter is a host
        number in double (``(1 - beta2) * gn ** 2``); each sum or product with the counter's
        value is one op in the counter's dtype — its number operand rounded to that dtype, its
        result rounded.  Rounding every name and the result once (``round(beta2) * round(v) +
        round(gn) * round(gn) * ...``) is the same for one op of names (``step + 1``,
        ``mu_product * mu``: the form kept for those) but not for more (NovoGrad's second
        moment was an ulp of float32 off)."""
        def counter_valued(e) -> bool:
            return counter in {x.name for x in e.free_symbols}

        def rounded(text: str) -> str:
            return f"round_counter({text}, counters_f64)"

        def name(x: str) -> str:
            return rounded(self.current.get(x, self.cname(x)))

        ops = [e for e in sympy.preorder_traversal(expr) if isinstance(e, (sympy.Add, sympy.Mul)) and counter_valued(e)]
        if len(ops) <= 1 and all(a.is_Atom for e in ops for a in e.args):
            return CScalarPrinter(name)(expr)

        def walk(e) -> str:  # the value, rounded to the counter's dtype
            if not counter_valued(e):
                return rounded(self.scalar(e))
            if e.is_Symbol:
                return name(e.name)
            if isinstance(e, (sympy.Add, sympy.Mul)):
                op = " + " if isinstance(e, sympy.Add) else " * "
                total = walk(e.args[0])
                for arg in e.args[1:]:  # in the interpreter's order: args[0] op args[1] op ...
                    total = rounded(f"{total}{op}{walk(arg)}")
                return total
            # anything else (pow, functions): every name in the counter's dtype, rounded once
            return rounded(CScalarPrinter(name)(e))
        return walk(expr)

    def flag_part(self, guard) -> tuple[sympy.Basic, sympy.Basic]:
        """(the terms of ``guard`` over flags alone, the rest): a walk is specialised on the flags
        first, then on the rest (Note [C kernel layout])."""
        flags = set(self.flags)
        terms = guard.args if isinstance(guard, sympy.And) else (guard,)
        over_flags = [t for t in terms if t.free_symbols and {x.name for x in t.free_symbols} <= flags]
        return sympy.And(*over_flags), sympy.And(*(t for t in terms if t not in over_flags))

    def condition(self, guard) -> str | None:
        """The variable holding a statement's condition, computed once per tensor."""
        if guard == sympy.true:
            return None
        text = self.scalar(guard)
        if text not in self.conditions:
            self.conditions[text] = self.fresh(readable(guard) or "cond")
            self.condition_of[self.conditions[text]] = guard
            self.lines.append((self.level_of(guard), f"const int {self.conditions[text]} = {text};"))
        return self.conditions[text]

    def full_statement(self, a, level: int) -> None:
        """A statement over every element: one line of each walk that needs it; its scalar
        operands and its condition are computed before (as per-tensor lines)."""
        flags, guard = self.flag_part(a.guard)
        cond = self.condition(guard)
        reads = tensor_reads(a.value, self.roles)
        if a.first is not None:
            reads |= tensor_reads(a.first, self.roles)
        if cond is not None:  # the old value stays where the condition is false
            reads.add(a.target)
        value = self.element(a.value)
        if a.first is not None:
            value = f"{self.cname(a.target)}_is_new ? {self.element(a.first)} : {value}"
        code = f"{self.cname(a.target)} = {value};"
        self.full.append(_FullStatement(len(self.full) + len(self.accumulations), level, a.target, reads, cond,
                                        f"/* {a.text} */", code, flags))

    def small_statement(self, a, item) -> None:
        """A statement over a reduced extent (Adafactor's row_var): a short loop of its own."""
        cond = self.condition(a.guard)
        extent, target = item.extent, self.cname(a.target)
        if self.roles[a.target] is Role.TENSOR and a.target not in self.scratch:
            self.scratch[a.target] = self.fresh(f"{a.target}_s")
        reads = tensor_reads(a.value, self.roles)
        loads = [self.load(n, extent) for n in sorted(reads)]
        if a.target not in reads:
            loads.append(f"scalar_t {target};")
        store = (f"{self.scratch[a.target]}[j] = {target};" if a.target in self.scratch
                 else f"{target}_p[j] = from_compute({target});")
        loop = [*_coordinates(extent), *loads, f"{target} = {self.element(a.value)};", store]
        self.lines += [(item.level, x) for x in [f"/* {a.text} */", *_small_loop(extent, loop, cond)]]

    def reduction(self, item) -> None:
        """A lifted reduction: accumulated in a walk (FULL operand) or in a short loop."""
        r: Reduction = item.node
        if r.extent == SCALAR and r.source != FULL:
            raise Unsupported(f"{r.text}: a reduction of a reduced-shape value to a scalar")
        flags, guard = self.flag_part(r.guard) if r.source == FULL else (sympy.true, r.guard)
        cond = self.condition(guard)
        value = self.element(r.operand)
        self.level[r.name] = item.level
        reads = tensor_reads(r.operand, self.roles)
        result = self.fresh(r.name if r.extent == SCALAR else f"{r.name}_s")
        if r.extent == SCALAR:
            self.current[r.name] = result
        else:
            self.scratch[r.name] = result
        acc = self.accumulators[r.name] = self.fresh(f"acc_{r.name}")

        def finish(total: str) -> str:
            return f"sqrt({total})" if r.kind == "norm" else f"{total} / (double)({_count(r.source, r.extent)})"

        if r.extent == SCALAR:
            done = [f"const double {result} = {finish(acc)};"]
        else:
            done = [f"for (int64_t j = 0; j < {_size(r.extent)}; ++j) {result}[j] = (scalar_t)({finish(acc + '[j]')});",
                    f"free({acc});"]
        if r.source == FULL:  # accumulated by walk `level`, finished after it
            self.accumulations.append(_Accumulation(len(self.full) + len(self.accumulations), item.level, r, value,
                                                    cond, reads, flags))
            self.lines += [(item.level, x) for x in done]
            return
        # a reduction of a small value (Adafactor's mean of row_var over its rows)
        term = "v * v" if r.kind == "norm" else "v"
        loop = [*_coordinates(r.source), *(self.load(n, r.source) for n in sorted(reads)),
                f"const double v = (double)({value});", f"{acc}[{_index(r.extent, r.source)}] += {term};"]
        lines = [f"double *{acc} = (double *)calloc({_size(r.extent)}, sizeof(double));",
                 *_small_loop(r.source, loop, None), *done]
        self.lines += [(item.level, x) for x in [f"/* {r.text} */", *_guarded(lines, cond)]]

    def load(self, name: str, loop: Extent, present: bool = False, per_block: bool = False) -> str:
        """``scalar_t name = ...`` of one element of ``name`` inside a loop over ``loop``
        (``present``: known to exist here, so no test of its address; ``per_block``: an int8 state
        whose block's scale the loop read before, ``name_block_scale``)."""
        return f"scalar_t {self.cname(name)} = {self.load_value(name, loop, present, per_block)};"

    def load_value(self, name: str, loop: Extent, present: bool = False, per_block: bool = False) -> str:
        c, extent = self.cname(name), self.extents.get(name, FULL)
        index = "i" if extent == FULL else _index(extent, loop)
        if name in self.scratch:
            return f"{self.scratch[name]}[{index}]"
        if self.int8 and name in self.low:  # its code times its block's scale (Note [Blockwise 8-bit state in C])
            scale = f"{c}_block_scale" if per_block else f"{c}_scale[({index}) >> Q8_BLOCK_SHIFT]"
            value = f"q8_load({c}_p[{index}], {scale}, {int(self.signed(name))})"
        else:
            value = f"{'lowp_load' if name in self.low else 'to_compute'}({c}_p[{index}])"
        if name in self.optional and not present:
            return f"{c}_p ? {value} : 0"
        return value

    def signed(self, state: str) -> bool:
        """Whether an int8 state uses the signed code map (Note [Blockwise 8-bit state])."""
        return not self.program.spec.state[state].nonnegative

    # -- walks ---------------------------------------------------------------------------------
    # Note [One loop body per walk]
    # ~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
    # A walk has a version of its loop per combination of the flags and per-tensor conditions
    # that changes what it computes (Adam's final walk: 16), each straight-line so that it
    # vectorises.  Their bodies differ only in which statements, loads and stores run, so the
    # body is printed once, as a `static inline` function taking every flag and condition as a
    # `const int` argument, each line under the condition (over those arguments) of the versions
    # it runs in; each version calls it with constants.  Inlined, the constants fold and each
    # version is the straight-line loop it was (bit for bit the same arithmetic:
    # tests/c/test_merged_against_variants.py).  The constants must be literals inside the
    # `#pragma omp parallel` region: OpenMP outlines the region before anything is inlined, so a
    # variable set before it reaches the outlined code as a runtime value.  A plain loop over the
    # elements lives in the function too, over the elements it is passed (inside the region, its
    # thread's share, as `schedule(static)` shares them out; on one thread, all), and the
    # versions are the cases of a `switch` over the bits of their flags and conditions, one line
    # each, calling the function through a macro that opens the parallel region
    # (OPTGEN_WALK_REGION, a `_Pragma`; nothing in a tensor's one-thread function: Note [Small
    # tensors in parallel]) and passes the arguments every version passes alike; a walk that sums
    # or runs over rows keeps its loops in each version, which call the function per element.  A
    # state that exists only under a condition is loaded and stored only under it (its address
    # is NULL otherwise).  A walk with one version keeps its body inside its loop.
    def walk(self, statements: list[_FullStatement], accumulate: list[_Accumulation], store: set[str],
             number: int) -> list[str]:
        """Walk ``number`` over the tensor: the statements and accumulations in the spec's order,
        storing the tensors in ``store`` that it writes (the final walk: every one not stored
        before; Note [Sweeps]).

        It branches on the flags, then on up to MAX_VERSIONS per-tensor conditions of the
        statements it runs (``weight_decay != 0``, Adafactor's ``ndim(param) > 1``): a version of
        the loop per outcome, each straight-line, so it vectorises, and a state a condition leaves
        absent (a NULL address) is neither loaded nor stored.  Beyond MAX_VERSIONS the conditions
        stay inside the loop.  The versions share one body (Note [One loop body per walk])."""
        names = self.accumulators
        scalars = [names[a.reduction.name] for a in accumulate if a.reduction.extent == SCALAR]
        arrays = [a for a in accumulate if a.reduction.extent != SCALAR]
        out = [f"double {acc} = 0;" for acc in scalars]
        out += [f"double *{names[a.reduction.name]} = (double *)calloc({_size(a.reduction.extent)}, sizeof(double));"
                for a in arrays]
        terms = {a.reduction.name: self.fresh(f"terms_{a.reduction.name}") for a in accumulate
                 if a.reduction.extent in (SCALAR, ROWS)}

        def by_flags(k: int, values: dict):
            """The walk for the flag values fixed so far: a branch per flag whose value changes it."""
            if k == len(self.flags):
                def runs(x) -> bool:
                    return bool(x.flags.xreplace({sympy.Symbol(f): sympy.true if v else sympy.false
                                                  for f, v in values.items()}))
                return self.versions([dataclasses.replace(s, flags=sympy.true) for s in statements if runs(s)],
                                     [dataclasses.replace(a, flags=sympy.true) for a in accumulate if runs(a)],
                                     store, terms, {self.cname(f): v for f, v in values.items()})
            f = self.flags[k]
            on, off = by_flags(k + 1, {**values, f: True}), by_flags(k + 1, {**values, f: False})
            if _inline(on) == _inline(off):  # the flag changes nothing here: these versions get it as 1
                return on
            return _Branch(self.cname(f), on, off)

        tree = by_flags(0, {})
        leaves = [leaf for leaf in _leaves(tree) if leaf.body]
        if len(leaves) <= 1:
            return out + _inline(tree)
        whole = all(leaf.plain for leaf in leaves)
        name, arguments = self.body_function(leaves, number, whole)
        if whole:  # the function holds the loop too; each version starts the threads and calls it
            return out + _switch(tree, name, arguments)
        return out + _render(tree, lambda leaf: wrap(arguments(leaf), f"{name}(", "    ", ");", width=90))

    def versions(self, statements, accumulate, store: set[str], terms: dict, flags: dict):
        """One flag assignment's walk, specialised on up to MAX_VERSIONS per-tensor conditions."""
        conditions = list(dict.fromkeys(s.condition for s in _live(statements, accumulate, store)
                                        if s.condition is not None))
        if not conditions or len(conditions) > MAX_VERSIONS:
            return self.loop(statements, accumulate, store, terms, flags, {c: None for c in conditions})

        def versions(k: int, fixed: dict):
            if k == len(conditions):
                return self.loop(statements, accumulate, store, terms, flags, fixed)
            c = conditions[k]
            # no version where two opposite comparisons both hold (rho_t > 5, rho_t <= 5), nor,
            # for == and != (opposite for NaN too), where both fail
            opposite = [d for d in fixed if self.condition_of[d] == _negated(self.condition_of[c])]
            if any(fixed[d] for d in opposite):
                return versions(k + 1, {**fixed, c: False})
            if any(not fixed[d] and isinstance(self.condition_of[c], (sympy.Eq, sympy.Ne)) for d in opposite):
                return versions(k + 1, {**fixed, c: True})
            return _Branch(c, versions(k + 1, {**fixed, c: True}), versions(k + 1, {**fixed, c: False}))

        return versions(0, {})

    def loop(self, statements, accumulate, store: set[str], terms: dict, flags: dict, tested: dict) -> _Leaf:
        """The loop of one version of a walk.  ``tested``: the outcome of each condition in this
        version, None for all where the conditions are tested in the loop."""
        fixed = None if any(v is None for v in tested.values()) else tested
        if fixed is not None:
            statements = [dataclasses.replace(s, condition=None) for s in statements if fixed.get(s.condition, True)]
            accumulate = [dataclasses.replace(a, condition=None) for a in accumulate if fixed.get(a.condition, True)]
        sequence = _live(statements, accumulate, store)
        statements = [s for s in sequence if isinstance(s, _FullStatement)]
        if not sequence:
            nothing = ["/* nothing to do for this tensor */"] if fixed is not None else []
            return _Leaf(flags, tested, nothing, [], [], {})
        memory = {"param", "grad", *self.lists, *self.scratch}
        reads: list[str] = []
        loaded: set[str] = set()
        assigned: set[str] = set()
        for s in sequence:
            target = [s.target] if isinstance(s, _FullStatement) else []
            for n in sorted(s.reads | set(target)):
                if n not in reads:
                    reads.append(n)
            loaded |= {n for n in s.reads if n not in assigned and n in memory}
            if isinstance(s, _FullStatement) and not s.guarded:
                assigned.add(s.target)
        small = {n for n in reads if self.extents.get(n, FULL) != FULL}
        rows = bool(small) or any(a.reduction.extent != SCALAR for a in accumulate)
        # in a version, a state its statements touch exists (the spec's `when` guards them)
        present = fixed is not None
        # the body, each line with its place: declarations, loads, statements in order, stores
        written = [t for t in self.lists if t in store and any(s.target == t for s in statements)]
        # int8 states: each element's new value goes into a block buffer, quantized after the block;
        # such a walk runs in the states' blocks, each int8 state's scale read once per block
        # (Note [Blockwise 8-bit state in C])
        staged = [t for t in written if self.int8 and t in self.low]
        if staged and rows:
            raise Unsupported("int8 state stored by a walk over rows: its blocks of 256 elements cross the rows")
        per_block = {t for t in self.low if t in loaded} if staged else set()
        body: list[tuple[tuple, str]] = [((0,), self.cname(n)) for n in reads]
        body += [((1,), f"{self.cname(n)} = {self.load_value(n, FULL, present, n in per_block)};")
                 for n in reads if n in loaded]
        names = self.accumulators
        # Scalar and per-row sums: each element's term goes into a block buffer, summed after the
        # block in independent lanes (sum_terms: vectorises without reassociating a running sum,
        # which would keep the whole loop scalar).  Per-column sums add in place.
        blocked = [a for a in accumulate if a.reduction.extent in (SCALAR, ROWS)]
        private = {a.reduction.name: names[a.reduction.name] + ("_t" if a.reduction.extent != ROWS else "_r")
                   for a in accumulate} if rows else {a.reduction.name: names[a.reduction.name] for a in accumulate}
        position = "ic - ic0" if rows else "i - i0"
        local = {"ir": "ir", "ib": "ib", "ic": "ic"} if rows else {}   # the loop's names the body reads
        if blocked or staged:
            local["slot"] = position
        local.update({f"{self.cname(t)}_stage": f"{self.cname(t)}_stage" for t in staged})
        local.update({f"{self.cname(t)}_block_scale": f"{self.cname(t)}_block_scale" for t in per_block})
        for s in sequence:
            if isinstance(s, _FullStatement):
                body += [((2, s.order, 0), s.comment),
                         ((2, s.order, 1), s.code if s.condition is None else f"if ({s.condition}) {s.code}")]
                continue
            r = s.reduction
            value = s.value if s.condition is None else f"({s.condition} ? {s.value} : 0)"
            body.append(((2, s.order, 0), f"/* {r.text} */"))
            if r.name in terms:
                body.append(((2, s.order, 1), f"{terms[r.name]}[slot] = {value};"))
                local[terms[r.name]] = terms[r.name]
            else:
                term = f"(double)({s.value})"
                added = f"{term} * {term};" if r.kind == "norm" else f"{term};"
                code = f"{private[r.name]}[ib * dim_c + ic] += " + added
                body.append(((2, s.order, 1), code if s.condition is None else f"if ({s.condition}) {code}"))
                local[private[r.name]] = private[r.name]
        def guarded(t: str, line: str) -> str:
            return (f"if ({self.cname(t)}_p) " if t in self.optional and not present else "") + line

        body += [((3, self.lists.index(t)), guarded(t, f"{self.cname(t)}_stage[slot] = {self.cname(t)};" if t in staged
                                                    else f"{self.cname(t)}_p[i] = {self.stored(t)};"))
                 for t in written]
        # where the body function holds the loop, in blocks: each block's scales before its elements,
        # its quantization after them (_BEFORE_BLOCK, _AFTER_BLOCK)
        body += [((_BEFORE_BLOCK, self.lists.index(t)), self.block_scale(t)) for t in per_block]
        body += [((_AFTER_BLOCK, self.lists.index(t)), guarded(t, self.quantized(t))) for t in staged]
        # the body as it stands inside the loop when the walk has one version
        inner = [self.load(n, FULL, present, n in per_block) if n in loaded else f"scalar_t {self.cname(n)};"
                 for n in reads]
        inner += [line.replace("[slot]", f"[{position}]") for key, line in body if 1 < key[0] < _AFTER_BLOCK]
        count = "ic1 - ic0" if rows else "i1 - i0"
        sums = [f"{private[a.reduction.name]} += sum_terms({terms[a.reduction.name]}, {count}, "
                f"{int(a.reduction.kind == 'norm')});" for a in blocked]
        buffers = [f"scalar_t {terms[a.reduction.name]}[OPTGEN_BLOCK];" for a in blocked]
        buffers += [f"scalar_t {self.cname(t)}_stage[OPTGEN_BLOCK];" for t in staged]
        buffers += [self.block_scale(t) for t in sorted(per_block, key=self.lists.index)]
        block = "Q8_BLOCK" if staged else "OPTGEN_BLOCK"  # (Q8_BLOCK divides OPTGEN_BLOCK: the buffers hold one)
        sums += [guarded(t, self.quantized(t)) for t in staged]
        scalars = [names[a.reduction.name] for a in accumulate if a.reduction.extent == SCALAR]
        arrays = [a for a in accumulate if a.reduction.extent != SCALAR]

        def skeleton(inner: list[str]) -> list[str]:
            if not rows:
                if not blocked and not staged:
                    return ["#pragma omp parallel for if (numel >= PARALLEL_MIN) schedule(static)",
                            "for (int64_t i = 0; i < numel; ++i) {", *_indent(inner), "}"]
                # (blocks of OPTGEN_BLOCK elements: whole blocks of an int8 state's 256)
                return ["#pragma omp parallel for if (numel >= PARALLEL_MIN) schedule(static)"
                        + (f" reduction(+: {', '.join(scalars)})" if scalars else ""),
                        f"for (int64_t i0 = 0; i0 < numel; i0 += {block}) {{",
                        f"    const int64_t i1 = i0 + {block} < numel ? i0 + {block} : numel;",
                        *_indent(buffers), "    for (int64_t i = i0; i < i1; ++i) {", *_indent(inner, 2), "    }",
                        *_indent(sums), "}"]
            # a walk over rows, reading or reducing the small extents (Note [Sweeps])
            row_accs = [private[a.reduction.name] for a in arrays if a.reduction.extent == ROWS]
            col_accs = [a for a in arrays if a.reduction.extent == COLS]
            chunk = ["for (int64_t ic = ic0; ic < ic1; ++ic) {", "    const int64_t i = ir * dim_c + ic;",
                     *_indent(inner), "}"]
            loop = ["for (int64_t ir = 0; ir < dim_b * dim_m; ++ir) {",
                    "    const int64_t ib = ir / dim_m;",
                    *(f"    double {acc} = 0;" for acc in row_accs),
                    "    for (int64_t ic0 = 0; ic0 < dim_c; ic0 += OPTGEN_BLOCK) {",
                    "        const int64_t ic1 = ic0 + OPTGEN_BLOCK < dim_c ? ic0 + OPTGEN_BLOCK : dim_c;",
                    *_indent(buffers, 2), *_indent(chunk, 2), *_indent(sums, 2), "    }",
                    *(f"    {names[a.reduction.name]}[ir] = {private[a.reduction.name]};"
                      for a in arrays if a.reduction.extent == ROWS), "}"]
            region = [*(f"double {private[n]} = 0;" for n in (a.reduction.name for a in accumulate
                                                             if a.reduction.extent == SCALAR)),
                      *(f"double *{private[a.reduction.name]} = (double *)calloc(dim_b * dim_c, sizeof(double));"
                        for a in col_accs),
                      "#pragma omp for schedule(static)", *loop]
            merge = [*(f"{names[n]} += {private[n]};" for n in (a.reduction.name for a in accumulate
                                                              if a.reduction.extent == SCALAR)),
                     *(f"for (int64_t j = 0; j < dim_b * dim_c; ++j) {names[a.reduction.name]}[j] += "
                       f"{private[a.reduction.name]}[j];" for a in col_accs)]
            if merge:
                region += ["#pragma omp critical", "{", *_indent(merge), "}"]
            region += [f"free({private[a.reduction.name]});" for a in col_accs]
            return ["#pragma omp parallel if (numel >= PARALLEL_MIN)", "{", *_indent(region), "}"]

        return _Leaf(flags, tested, skeleton(inner), skeleton([_CALL]), body, local, plain=not rows and not blocked,
                     staged=bool(staged))

    def block_scale(self, t: str) -> str:
        """The scale of int8 state ``t``'s block, read once per block of Q8_BLOCK elements."""
        c = self.cname(t)
        return f"const float {c}_block_scale = {c}_scale ? {c}_scale[i0 >> Q8_BLOCK_SHIFT] : 0;"

    def quantized(self, t: str) -> str:
        """Int8 state ``t``'s new values of elements i0..i1 (its block buffer) into codes and scales."""
        c = self.cname(t)
        return f"q8_store({c}_stage, i0, i1, {c}_p, {c}_scale, {int(self.signed(t))});"

    def body_function(self, leaves: list[_Leaf], number: int,
                      whole: bool) -> tuple[str, Callable[[_Leaf], list[str]]]:
        """The body the versions of walk ``number`` share, as a ``static inline`` function of one
        element, or (``whole``) of the loop over the elements, its iterations shared among the
        threads of the caller's parallel region (added to :attr:`functions`): its name, and the
        arguments each version passes it (Note [One loop body per walk])."""
        variables = list(dict.fromkeys([*leaves[0].flags, *(c for leaf in leaves for c in leaf.tested)]))

        def outcomes(leaf: _Leaf) -> list[tuple[int, ...]]:
            """The values of ``variables`` a version is called with: its flags and conditions,
            both values of a condition it tests in the loop, 0 for one it does not read."""
            def values(v: str) -> list[int]:
                if v in leaf.flags:
                    return [int(leaf.flags[v])]
                outcome = leaf.tested.get(v, False)
                return [0, 1] if outcome is None else [int(outcome)]
            return list(itertools.product(*map(values, variables)))

        reachable = {o for leaf in leaves for o in outcomes(leaf)}
        unreachable = [list(o) for o in itertools.product((0, 1), repeat=len(variables)) if o not in reachable]
        symbols = [sympy.Symbol(v) for v in variables]
        runs: dict[tuple, set] = {}      # (place, line) → the outcomes it runs in
        for leaf in leaves:
            for line in dict.fromkeys(leaf.body):
                runs.setdefault(line, set()).update(outcomes(leaf))

        def guard(where: set) -> str | None:
            if where == reachable:
                return None
            return _c_condition(sympy.SOPform(symbols, [list(o) for o in sorted(where)], unreachable))

        places = sorted(runs, key=lambda line: line[0])  # (stable: declarations and loads as first seen)
        staged = whole and any(leaf.staged for leaf in leaves)
        around = {key: [line if key == _BEFORE_BLOCK or (when := guard(runs[place, line])) is None  # (a declaration:
                        else f"if ({when}) {line}" for place, line in places if place[0] == key]  # NULL-safe)
                  for key in (_BEFORE_BLOCK, _AFTER_BLOCK)}
        places = [(place, line) for place, line in places if place[0] not in around]
        loads: dict[str, list] = {}
        for place, line in places:
            if place == (1,):
                loads.setdefault(line.split(" = ", 1)[0], []).append((guard(runs[place, line]), line))
        lines = []
        for place, line in places:
            if place == (0,):  # a declaration, with its load when that is unconditional
                load = loads.get(line, [])
                lines.append(f"scalar_t {load[0][1]}" if len(load) == 1 and load[0][0] is None else f"scalar_t {line};")
            elif place == (1,):
                when = guard(runs[place, line])
                if len(loads[line.split(" = ", 1)[0]]) > 1 or when is not None:
                    lines.append(line if when is None else f"if ({when}) {line}")
            elif line.startswith("/*"):
                if line not in lines[-2:]:  # (a comment shared by the versions of a statement)
                    lines.append(line)
            else:
                when = guard(runs[place, line])
                lines.append(line if when is None else f"if ({when}) {line}")
        if staged:  # in blocks of an int8 state's Q8_BLOCK: their shares are whole blocks (OPTGEN_WALK_BLOCKS)
            buffers = sorted({f"scalar_t {n}[Q8_BLOCK];" for leaf in leaves for n in leaf.local
                              if n.endswith("_stage")})
            lines = ["for (int64_t i0 = i_begin; i0 < i_end; i0 += Q8_BLOCK) {",
                     "    const int64_t i1 = i0 + Q8_BLOCK < i_end ? i0 + Q8_BLOCK : i_end;",
                     *_indent(around[_BEFORE_BLOCK]), *_indent(buffers),
                     "    for (int64_t i = i0; i < i1; ++i) {", *_indent([x.replace("[slot]", "[i - i0]")
                                                                         for x in lines], 2), "    }",
                     *_indent(around[_AFTER_BLOCK]), "}"]
        used = set(re.findall(r"[A-Za-z_][A-Za-z0-9_]*", "\n".join(lines)))
        if staged:
            used -= {"i", "i0", "i1"} | {n for leaf in leaves for n in leaf.local
                                         if n.endswith(("_stage", "_block_scale"))}
        elif whole:  # over the elements the caller passes: its thread's share, or all (OPTGEN_WALK_SHARE)
            used -= {"i"}
            lines = ["for (int64_t i = i_begin; i < i_end; ++i) {", *_indent(lines), "}"]
        parameters = [(n, t) for n, t in self.parameters(leaves).items() if n in used]
        signature = [*parameters, *((("i_begin", "const int64_t"), ("i_end", "const int64_t")) if whole else ())]
        name = self.fresh(f"{self.function}_walk{number}")
        what = "the elements it is passed (its thread's share)" if whole else "one element"
        self.functions += [
            f"/* walk {number} of {self.function}, over {what}: each version of the walk calls it with its",
            "   flags and conditions as constants (Note [One loop body per walk] in optgen/backends/c.py) */",
            *wrap([f"{t} {n}" for n, t in signature], f"static inline __attribute__((always_inline)) void {name}(",
                   "        ", ")"),
            "{", *_indent(lines), "}", ""]
        locals_ = {n for leaf in leaves for n in leaf.local}

        def arguments(leaf: _Leaf) -> list[str]:
            def value(n: str) -> str:
                if n in leaf.flags:
                    return str(int(leaf.flags[n]))
                if n in variables:
                    outcome = leaf.tested.get(n, False)
                    return n if outcome is None else str(int(outcome))
                return leaf.local.get(n, "0") if n in locals_ else n
            share = "OPTGEN_WALK_BLOCKS" if staged else "OPTGEN_WALK_SHARE"
            return [*(value(n) for n, _ in parameters), *((share,) if whole else ())]
        return name, arguments

    def stored(self, t: str) -> str:
        """The value of state ``t`` as its storage holds it (rounded: Note [Low-precision state])."""
        c = self.cname(t)
        return f"lowp_store({c}, {c}_key, i)" if t in self.low else f"from_compute({c})"

    def parameters(self, leaves: list[_Leaf]) -> dict[str, str]:
        """Every name a walk's body may read → its C type, in the order of the body's parameters."""
        out = {v: "const int" for v in [*leaves[0].flags, *self.conditions.values()]}  # (first: the version)
        out.update({x: "const int64_t" for x in ("numel", "i", "ir", "ib", "ic", "slot", "dim_c")})
        out["grad_p"] = "const storage_t *restrict"
        out.update({f"{self.cname(t)}_p": ("lowp_t" if t in self.low else "storage_t") + " *restrict"
                    for t in self.lists})
        if self.int8:  # (written by q8_store where a walk's function holds its loop)
            out.update({f"{self.cname(t)}_scale": "float *restrict" for t in self.low})
            out.update({f"{self.cname(t)}_block_scale": "const float" for t in self.low})
        else:
            out.update({f"{self.cname(t)}_key": "const uint32_t" for t in self.low})
        out.update({array: "const scalar_t *restrict" for array in self.scratch.values()})
        for leaf in leaves:
            for n in leaf.local:
                out.setdefault(n, "scalar_t *restrict" if n.startswith("terms_") or n.endswith("_stage")
                               else "double *restrict")
        out.update({c: "const scalar_t" for c in self.hoisted.values()})
        out.update({f"{self.cname(t)}_is_new": "const int" for t in self.lazy_states})
        return out

    def element(self, expr) -> str:
        """``expr`` for one element, its scalar subexpressions computed before the loop as
        ``scalar_t`` constants (the value each has at this point of the spec)."""
        def inline(e) -> bool:  # (x ** 0.5 prints as a square root)
            return e.is_Integer or e in (sympy.oo, -sympy.oo, sympy.S.Half, -sympy.S.Half) \
                or not e.free_symbols and not e.is_Number

        def division(e) -> bool:
            return e.is_Pow and e.exp == -1

        def hoist(e):
            text = self.scalar(e)
            if text not in self.hoisted:
                ident = identifier(text)
                name = self.fresh(f"c_{ident}" if 0 < len(ident) <= 32 else "c_scalar")
                self.lines.append((self.level_of(e), f"const scalar_t {name} = (scalar_t)({text});"))
                self.hoisted[text] = name
            return sympy.Symbol(f"@{self.hoisted[text]}", real=True)

        def rename(n: str) -> str:
            return n[1:] if n.startswith("@") else self.cname(n)

        lifted = hoist_scalars(expr, self.roles, inline=inline, division=division, hoist=hoist)
        return CElementPrinter(rename)(lifted)



#: where a version's loop calls its walk's body (Note [One loop body per walk])
_CALL = "@body@"
#: the places of a body's lines that run once per block of an int8 state, before and after its
#: elements (Note [Blockwise 8-bit state in C])
_BEFORE_BLOCK, _AFTER_BLOCK = -1, 4


@dataclass
class _Leaf:
    """One version of a walk's loop."""

    flags: dict[str, bool]              # each flag's C name → its value in this version
    tested: dict[str, bool | None]      # each condition it runs under → its outcome (None: tested in the loop)
    text: list[str]                     # the loop, its body inside it
    skeleton: list[str]                 # the loop, _CALL where its body goes
    body: list[tuple[tuple, str]]       # (place, line): declared names, loads, statements, stores
    local: dict[str, str]               # the loop's names the body reads → their value here
    plain: bool = False                 # a plain loop over the elements (no sums, no rows)
    staged: bool = False                # it stores int8 state, in blocks (Note [Blockwise 8-bit state in C])


@dataclass
class _Branch:
    """``if (condition) { on } else { off }`` between versions of a walk."""

    condition: str
    on: _Branch | _Leaf
    off: _Branch | _Leaf


def _negated(condition):
    """The opposite comparison (``x <= 5`` for ``x > 5``); None for anything else."""
    return condition.negated if isinstance(condition, sympy.core.relational.Relational) else None


def _leaves(tree) -> list[_Leaf]:
    return _leaves(tree.on) + _leaves(tree.off) if isinstance(tree, _Branch) else [tree]


def _inline(tree) -> list[str]:
    """The versions with their bodies inside their loops."""
    if isinstance(tree, _Leaf):
        return tree.text
    return [f"if ({tree.condition}) {{", *_indent(_inline(tree.on)), "} else {", *_indent(_inline(tree.off)), "}"]


def _render(tree, call: Callable[[_Leaf], list[str]]) -> list[str]:
    """The versions, each loop calling the walk's body."""
    if isinstance(tree, _Branch):
        return [f"if ({tree.condition}) {{", *_indent(_render(tree.on, call)), "} else {",
                *_indent(_render(tree.off, call)), "}"]
    out = []
    for line in tree.skeleton if tree.body else tree.text:
        if _CALL in line:
            indent = line[:line.index(_CALL)]
            out += [indent + x for x in call(tree)]
        else:
            out.append(line)
    return out


def _switch(tree, name: str, arguments: Callable[[_Leaf], list[str]]) -> list[str]:
    """The versions of a walk whose body holds its loop, chosen by a ``switch`` over the flags and
    conditions the tree branches on (their bits, in the order it first tests them): one line per
    version, calling the body through a macro that opens the parallel region and passes what every
    version passes alike, so the constants are literals inside the region."""
    variables: list[str] = []

    def collect(t) -> None:
        if isinstance(t, _Branch):
            assert t.condition.isidentifier(), t.condition  # (a flag or a condition's variable: 0 or 1)
            if t.condition not in variables:
                variables.append(t.condition)
            collect(t.on)
            collect(t.off)
    collect(tree)
    cases: list[tuple[list[int], _Leaf]] = []

    def visit(t, fixed: dict[str, int]) -> None:
        if isinstance(t, _Branch):
            visit(t.on, {**fixed, t.condition: 1})
            visit(t.off, {**fixed, t.condition: 0})
            return
        free = [v for v in variables if v not in fixed]   # (not tested on this path: any value)
        values = [{**fixed, **dict(zip(free, bits, strict=True))}
                  for bits in itertools.product((0, 1), repeat=len(free))]
        cases.append((sorted(sum(v[x] << (len(variables) - 1 - k) for k, x in enumerate(variables)) for v in values),
                      t))
    visit(tree, {})
    calls = {id(leaf): arguments(leaf) for _, leaf in cases if leaf.body}
    first = next(iter(calls.values()))
    shared = min(k for k in range(len(first) + 1) if all(a[k:] == first[k:] for a in calls.values()))
    assert shared > 0, "versions of a walk that pass the same constants"
    macro = name.upper()
    head = wrap([*first[shared:]], f"#define {macro}(...) OPTGEN_WALK_REGION "
                 f"{name}(__VA_ARGS__, ", "    ", ")", width=100)
    lines = ["/* each version passes its flags and conditions as literals inside its parallel region */",
             *(line + " \\" for line in head[:-1]), head[-1]]
    selector = " | ".join(f"({x} << {len(variables) - 1 - k})" if k < len(variables) - 1 else x
                          for k, x in enumerate(variables))
    lines += wrap([selector], "switch (", "    ", ") {", width=100)
    for values, leaf in sorted(cases, key=lambda c: c[0]):
        labels = " ".join(f"case {v}:" for v in values)
        call = f" {macro}({', '.join(calls[id(leaf)][:shared])});" if leaf.body else ""
        lines.append(f"{labels}{call} break;")
    return [*lines, "}", f"#undef {macro}"]


def _c_condition(condition, nested: bool = False) -> str:
    """A condition over the body's ``const int`` arguments, in C."""
    if condition in (sympy.true, sympy.false):
        return "1" if condition == sympy.true else "0"
    if isinstance(condition, sympy.Symbol):
        return condition.name
    if isinstance(condition, sympy.Not):
        return "!" + _c_condition(condition.args[0], True)
    op = " && " if isinstance(condition, sympy.And) else " || "
    text = op.join(_c_condition(a, True) for a in condition.args)
    return f"({text})" if nested else text


#: what opens a versioned walk's parallel region where a tensor is split among the threads: the
#: macro each version calls opens OPTGEN_WALK_REGION and passes the walk's function the elements
#: OPTGEN_WALK_SHARE (its thread's share), both defined for each of a tensor's two functions
_WALK_REGION = '_Pragma("omp parallel if (numel >= PARALLEL_MIN)")'


def _one_thread(lines: list[str]) -> list[str]:
    """A tensor's lines without their OpenMP constructs, for a tensor under PARALLEL_MIN elements
    (Note [Small tensors in parallel]): each walk's ``omp parallel if (numel >= PARALLEL_MIN)`` is
    false there, but opening even a false region costs ~0.2 µs, ~0.5 µs nested in for_each_tensor's
    own, more than a 100-element tensor's arithmetic.  A region of one thread runs its body as
    written, and its ``critical`` merges and ``reduction`` clauses add each sum to 0 before the
    total: the same bits.  (Nothing it calls shares work among a team: inside for_each_tensor's
    region an orphaned ``omp for`` would split one thread's tensor with the others.)"""
    return [x for x in lines if not x.startswith("#pragma omp")]


def _indent(lines, depth: int = 1) -> list[str]:
    """Lines one level deeper (a pragma stays in the first column, where C wants it)."""
    return [x if x.startswith("#") else "    " * depth + x for x in lines]


def _live(statements, accumulate, stored) -> list:
    """The statements and accumulations a walk needs, in the spec's order: every accumulation,
    and the statements whose values reach one of them or a stored tensor."""
    needed = set(stored)
    sequence: list = []
    for s in sorted([*statements, *accumulate], key=lambda x: x.order, reverse=True):
        if isinstance(s, _Accumulation):
            needed |= s.reads
        elif s.target in needed:
            if not s.guarded:
                needed.discard(s.target)
            needed |= s.reads
        else:
            continue
        sequence.insert(0, s)
    return sequence


def _small_loop(extent: Extent, loop: list[str], cond: str | None) -> list[str]:
    return _guarded([f"for (int64_t j = 0; j < {_size(extent)}; ++j) {{", *_indent(loop), "}"], cond)


def _guarded(lines: list[str], cond: str | None) -> list[str]:
    """``lines``, run only where the per-tensor condition ``cond`` holds (None: always)."""
    return lines if cond is None else [f"if ({cond}) {{", *_indent(lines), "}"]


def _size(extent: Extent) -> str:
    """The number of elements of an extent of the current tensor."""
    return {FULL: "numel", ROWS: "dim_b * dim_m", COLS: "dim_b * dim_c", BATCH: "dim_b", SCALAR: "1"}[extent]


def _count(source: Extent, result: Extent) -> str:
    """How many elements of ``source`` reduce into one of ``result``."""
    if source == FULL and result == SCALAR:
        return "numel"
    dropped = [d for d, kept, now in (("dim_b", source.b, result.b), ("dim_m", source.m, result.m),
                                      ("dim_c", source.c, result.c)) if kept and not now]
    return " * ".join(dropped) or "1"


def _coordinates(loop: Extent) -> list[str]:
    """The (ib, im, ic) position of element j of a loop over ``loop`` (a small extent)."""
    if loop == ROWS:
        return ["const int64_t ib = j / dim_m, im = j % dim_m;", "(void)ib; (void)im;"]
    if loop == COLS:
        return ["const int64_t ib = j / dim_c, ic = j % dim_c;", "(void)ib; (void)ic;"]
    if loop == BATCH:
        return ["const int64_t ib = j;", "(void)ib;"]
    raise Unsupported(f"a loop over a {loop} extent")


def _index(extent: Extent, loop: Extent) -> str:
    """Where the element of an ``extent`` value for the current position of a loop over ``loop`` is."""
    if extent == loop:
        return "j"
    if loop == FULL:  # inside a walk over rows (ir, ic; ib = ir / dim_m)
        return {ROWS: "ir", COLS: "ib * dim_c + ic", BATCH: "ib"}[extent]
    return {ROWS: "ib * dim_m + im", COLS: "ib * dim_c + ic", BATCH: "ib"}[extent]


class CBackend(FusedBackend):
    """generated/<spec>_c.py: the C source of fused CPU kernels (Note [C kernel layout]).

    Note [Low-precision state in C]
    ~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
    Under ``state_dtype=torch.bfloat16`` the library is compiled with ``STATE_BF16``: a state the
    spec marks ``low_precision`` is a ``lowp_t`` (bfloat16) array, loaded with ``lowp_load`` and
    stored with ``lowp_store`` (stochastic rounding, the bits of Note [Stochastic rounding of
    state] in optgen/runtime/low_precision.py); otherwise those are the storage type and
    ``to_compute`` / ``from_compute``, so one source serves both.  One thing differs: a state
    stored early (Note [Sweeps]) would be read back rounded by the later walks, where the for-loop
    reference reads the float32 value it computed — so the bfloat16 version stores no
    low-precision state early (the later walk recomputes it), and where that changes the walks
    (Lamb, Adafactor) the source holds both versions, ``#if STATE_BF16 … #else … #endif``.

    Note [Blockwise 8-bit state in C]
    ~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
    Under ``state_dtype="int8"`` (Note [Blockwise 8-bit state] in optgen/runtime/quantized_state.py)
    the library is compiled with ``STATE_INT8``, from a third version of the source, which
    dequantizes, updates and requantizes in one pass over memory:

    - a low-precision state is a ``uint8_t`` array of codes, and its blocks' scales a ``float``
      array (``X_scale``: the address table's rows after the lists); an element loads as
      ``q8_load``: its code's value times its block's scale;
    - the walk that stores the state (the last: as for bfloat16 none is stored early) runs in
      the state's blocks of Q8_BLOCK (256) elements: each block's scales are read once before its
      elements (``X_block_scale``: a scale read per element is a gather GCC cannot prove free of
      aliasing with the parameter's store, and the loop stayed scalar), each element's new value
      goes into a block buffer on the stack, and ``q8_store`` quantizes the buffer after the block
      (its absmax, then each element's nearest code: the bit-pattern lookup of
      quantized_state._lookup, its tables built when the library loads).  The buffer stays in
      L1: one read and one write of the codes per step.  Where the walk's function holds its loop
      (Note [One loop body per walk]) the blocks are in it, and the threads' shares are whole
      blocks (``OPTGEN_WALK_BLOCKS``, block_share); a walk that also sums runs its versions'
      loops in blocks of Q8_BLOCK itself.
    - A walk over rows (Adafactor's factored update) cannot store an int8 state (a block of 256
      crosses its rows): such a spec has no int8 version, and its int8 state runs on the reference.

    The quantization is the reference's to the bit (same absmax, same division, same nearest
    code), so the C kernel's int8 state equals the for-loop kernel's where its float32 arithmetic
    does (SGD, Lion), and is one code off in a rare element where an ulp of it differs (Adam's
    denominator)."""

    name = "c"
    unusable_expression = "LIBRARY.unusable"
    bind_expression = "LAUNCH.bind"
    builder = _CBuilder

    def kernel(self, compiled: Compiled, **options):
        plain = super().kernel(compiled, **options)
        versions = [("STATE_BF16", super().kernel(compiled, low_state=True))]
        int8 = False
        if plain.low_precision:
            try:
                versions.insert(0, ("STATE_INT8", super().kernel(compiled, low_state="int8")))
                int8 = True
            except Unsupported:  # (a walk over rows stores the state: the reference runs int8 state)
                pass
        versions = [(define, kernel) for define, kernel in versions if kernel.source != plain.source]
        for _, kernel in versions:
            assert dataclasses.replace(kernel, source=[], int8=False) == dataclasses.replace(plain, source=[]), \
                compiled.spec.name
        source = list(plain.source)
        if versions:
            source = []
            for k, (define, kernel) in enumerate(versions):
                source += [f"#{'if' if k == 0 else 'elif'} {define}", *kernel.source]
            source += ["#else", *plain.source, "#endif"]
        return dataclasses.replace(plain, source=source, int8=int8)

    def kernel_name(self, base: str) -> str:
        return f"{base}_step"


def source_version(source: str, define: str | None = None) -> str:
    """The part of a generated SOURCE compiled with ``define`` (``"STATE_BF16"``, ``"STATE_INT8"``)
    or, None, with neither (Note [Low-precision state in C]): a source without versions is all of it."""
    lines = source.split("\n")
    if "#else" not in lines:
        return source
    sections: dict[str | None, list[str]] = {}
    current: str | None = None
    for line in lines:
        if line.startswith(("#if STATE_", "#elif STATE_")):
            current = line.split()[1]
        elif line == "#else":
            current = None
        elif line != "#endif":
            sections.setdefault(current, []).append(line)
    return "\n".join(sections.get(define, sections[None]))


BACKEND = CBackend()
