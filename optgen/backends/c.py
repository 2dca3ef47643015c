"""The C backend: one fused CPU kernel per flag variant, compiled on first use.

Note [C kernel layout]
~~~~~~~~~~~~~~~~~~~~~~
torch's fused CPU optimizers (Adam, AdamW, SGD, Adagrad) walk each tensor once, in parallel
chunks, with vectorised math; optgen's for-loop and foreach kernels walk it once per op.  This
backend prints every elementwise spec as such a kernel, in C (PERF-NOTES: a plain C loop with
``restrict`` pointers, OpenMP over the elements and ``-O3 -march=native -fno-math-errno`` is level
with torch's fused Adam).  Per variant, one function over every tensor of a (dtype) group::

    void adam_default(int64_t n, void **tensors, void **grads, void **counters,
                      const int64_t *numels, const uint8_t *first_step,
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
hyperparameter comparison, ``rho_t > 5``), computed once before the loop; per-element choices are
``where(...)`` inside an expression.  The elementwise loop loads each tensor once, runs the tensor
statements in ``scalar_t`` (the parameters' ``float`` or ``double``; ``float`` for bfloat16 and
float16 storage, as torch's fused kernels compute: the source compiles once per dtype), and
stores each written tensor once.  A lazily created state is allocated before the
call and flagged in ``first_step`` (its ``first`` value is stored on that step).

What is not one elementwise pass (reductions, factored states, intrinsics, sparse rows) makes
:meth:`CBackend.unsupported` say why, as the Triton backend does.
"""
from __future__ import annotations

from dataclasses import dataclass

import sympy

from optgen.backends.c_printer import CElementPrinter, CScalarPrinter
from optgen.backends.forloop import counter_list, plural
from optgen.backends.fused import FusedBackend
from optgen.backends.printing import PythonScalarPrinter
from optgen.backends.triton import _identifier, _is_condition
from optgen.backends.triton_printer import Unsupported
from optgen.ir.nodes import Program, Role, is_tensor_valued

#: C keywords and the kernel skeleton's names; an IR name among them gets a trailing underscore
RESERVED = frozenset({
    "auto", "break", "case", "char", "const", "continue", "default", "do", "double", "else", "enum", "extern",
    "float", "for", "goto", "if", "inline", "int", "long", "register", "restrict", "return", "short", "signed",
    "sizeof", "static", "struct", "switch", "typedef", "union", "unsigned", "void", "volatile", "while",
    "n", "t", "i", "numel", "tensors", "grads", "counters", "numels", "first_step", "hyper", "counters_f64",
    "scalar_t", "exp", "log", "pow", "sqrt", "fabs", "fmax", "fmin", "max_nan", "min_nan", "sign_of",
})

_ELEMENTWISE_STATE = ("zeros", "full", "first")


@dataclass
class CKernel:
    """One variant: its C function and what the host function passes it."""

    function: str                       # the C function's name
    key: str                            # repr of the flag values
    doc: str
    tensors: list[str]                  # state list names in table order (after params)
    counters: list[str]                 # counter list names in table order
    lazy: list[tuple[int, str]]         # (index into params + tensors, creation condition over `a`)
    hyperparameters: list[str]          # in the order of `hyper`
    source: list[str]                   # the C function


class _CBuilder:
    """Walks one specialised :class:`Program` into a :class:`CKernel` (Note [C kernel layout])."""

    def __init__(self, program: Program, signature):
        self.program, self.sig, self.roles = program, signature, program.roles
        self.statements = [*program.preamble, *program.body]
        self.current: dict[str, str] = {}   # IR scalar name → the C variable holding its value now
        self.taken: set[str] = set()
        self.loop: list[str] = []        # statements of the elementwise loop
        self.written: set[str] = set()   # tensors the loop stores
        self.element_locals: list[str] = []
        self.loaded: set[str] = set()    # tensors whose stored value the loop reads
        self.assigned: set[str] = set()  # tensor names holding a value at this point of the loop
        self.hoisted: dict[str, str] = {}
        self.conditions: dict[str, str] = {}  # condition text (names are versions) → its variable
        for name, role in self.roles.items():
            if role is Role.STATE and any(name in a.reads() or a.target == name for a in self.statements):
                init = program.spec.state[name].init
                if init not in _ELEMENTWISE_STATE:
                    raise Unsupported(f"state '{name}' is not shaped like the parameter ({init})")

    def cname(self, name: str) -> str:
        return name + "_" if name in RESERVED else name

    def fresh(self, base: str) -> str:
        base, name, k = self.cname(base), self.cname(base), 0
        while name in self.taken:
            k += 1
            name = f"{base}_{k}"
        self.taken.add(name)
        return name

    def scalar(self, expr) -> str:
        return CScalarPrinter(lambda n: self.current.get(n, self.cname(n)))(expr)

    def build(self, function: str, key: str, doc: str) -> CKernel:
        roles = self.roles
        touched = {n for a in self.statements for n in a.reads() | {a.target}}
        hypers = [n for n, r in roles.items() if r is Role.HYPER and n in touched]
        counters = [c for c in self.sig.counters if c in touched]
        states = [t for t in self.sig.tensors if t not in ("param", "grad") and t in touched]
        lists = ["param", *states]
        lazy_states = [t for t in states if t in self.sig.lazy]
        lazy = []
        for t in lazy_states:
            when = self.program.state_when.get(t, sympy.true)
            if any(s.name == "param" for s in when.free_symbols):
                raise Unsupported(f"state '{t}' is created depending on the parameter's shape")
            # the condition over the kernel's keyword arguments `a` (hyperparameters)
            lazy.append((lists.index(t), PythonScalarPrinter(lambda h: f'a["{h}"]')(when) if when != sympy.true else "True"))
        # hyperparameters, counters (their value on entry) and tensors keep their names; a scalar
        # statement's first assignment takes its own, a later one a numbered version
        self.taken |= {self.cname(n) for n, r in roles.items() if r is not Role.SCALAR}
        self.taken |= {f"{self.cname(t)}_p" for t in ["grad", *lists]}

        head = [f"const double {self.cname(h)} = hyper[{i}];" for i, h in enumerate(hypers)]
        for h in hypers:
            self.current[h] = self.cname(h)
        per_tensor: list[str] = ["const int64_t numel = numels[t];"]
        for i, c in enumerate(counters):
            self.current[c] = self.cname(c)
            per_tensor.append(f"double {self.cname(c)} = load_counter(counters[{i} * n + t], counters_f64);")
        for k, t in enumerate(lazy_states):
            per_tensor.append(f"const int {self.cname(t)}_is_new = first_step[{k} * n + t];")

        preamble = set(map(id, self.program.preamble))  # group-level scalars: before the tensor loop
        for a in self.statements:
            if roles[a.target].is_tensor:
                self.tensor_statement(a, lists, per_tensor)
            else:
                (head if id(a) in preamble else per_tensor).extend(self.scalar_statement(a))

        # A state that may not exist under these hyperparameters (SGD's momentum_buffer when
        # momentum == 0) has a NULL address: the statements using it do not run, but the loop
        # still loads and stores around them.
        optional = {t for t in states if self.program.state_when.get(t, sympy.true) != sympy.true}
        pointers = ["const storage_t *restrict grad_p = (const storage_t *)grads[t];"]
        for i, t in enumerate(lists):
            if t in self.loaded or t in self.written:
                pointers.append(f"storage_t *restrict {self.cname(t)}_p = (storage_t *)tensors[{i} * n + t];")

        def load(n: str) -> str:
            c = self.cname(n)
            if n not in self.loaded:
                return f"scalar_t {c};"
            if n in optional:
                return f"scalar_t {c} = {c}_p ? to_compute({c}_p[i]) : 0;"
            return f"scalar_t {c} = to_compute({c}_p[i]);"

        loads = [load(n) for n in self.element_locals]
        stores = [(f"if ({self.cname(t)}_p) " if t in optional else "") + f"{self.cname(t)}_p[i] = from_compute({self.cname(t)});"
                  for t in lists if t in self.written]
        tail = [f"store_counter(counters[{i} * n + t], {self.current[c]}, counters_f64);"
                for i, c in enumerate(counters) if self.current[c] != self.cname(c)]
        body = [*per_tensor, *pointers, "#pragma omp parallel for if (numel >= PARALLEL_MIN) schedule(static)",
                "for (int64_t i = 0; i < numel; ++i) {", *("    " + x for x in [*loads, *self.loop, *stores]), "}", *tail]
        source = [f"void {function}(int64_t n, void **tensors, void **grads, void **counters, const int64_t *numels,",
                  "        const uint8_t *first_step, const double *hyper, int counters_f64)",
                  "{", *("    " + x for x in head), "    for (int64_t t = 0; t < n; ++t) {",
                  *("        " + x if not x.startswith("#") else x for x in body), "    }", "}"]
        return CKernel(function=function, key=key, doc=doc, tensors=[plural(t) for t in states],
                       counters=[counter_list(c) for c in counters], lazy=lazy, hyperparameters=hypers,
                       source=source)

    def scalar_statement(self, a) -> list[str]:
        """A scalar or counter statement, in double, as a new version of its variable."""
        guard = self.scalar(a.guard) if a.guard != sympy.true else None
        value = self.scalar(a.value)
        if self.roles[a.target] is Role.COUNTER:  # held as its 0-dim tensor holds it (float32 by default)
            if a.target in {x.name for x in a.value.free_symbols}:
                # an update of the 0-dim tensor itself (mu_product *= mu) computes in its dtype
                value = CScalarPrinter(lambda x: f"round_counter({self.current.get(x, self.cname(x))}, "
                                                 "counters_f64)")(a.value)
            value = f"round_counter({value}, counters_f64)"
        previous = self.current.get(a.target)
        name = self.fresh(a.target)
        self.current[a.target] = name
        code = f"const double {name} = {value};" if guard is None else \
            f"const double {name} = ({guard}) ? {value} : {previous or 0};"
        return [f"/* {a.text} */", code]

    def tensor_statement(self, a, lists: list[str], per_tensor: list[str]) -> None:
        """A tensor statement: one line of the loop; its scalar operands and its condition are
        computed before the loop (per_tensor)."""
        guard = self.scalar(a.guard) if a.guard != sympy.true else None
        reads = {n for n in a.reads() if self.roles[n].is_tensor}
        if guard is not None:  # the old value stays where the condition is false
            reads.add(a.target)
        self.element_locals += [n for n in sorted(reads | {a.target}) if n not in self.element_locals]
        self.loaded |= {n for n in reads if n in ("param", "grad", *lists) and n not in self.assigned}
        if guard is not None and guard not in self.conditions:
            self.conditions[guard] = self.fresh("cond")
            per_tensor.append(f"const int {self.conditions[guard]} = {guard};")
        if guard is None:
            self.assigned.add(a.target)
        value = self.element(a.value, per_tensor)
        if a.first is not None:
            value = f"{self.cname(a.target)}_is_new ? {self.element(a.first, per_tensor)} : {value}"
        code = f"{self.cname(a.target)} = {value};"
        self.loop += [f"/* {a.text} */", code if guard is None else f"if ({self.conditions[guard]}) {code}"]
        if a.target in lists:
            self.written.add(a.target)

    def element(self, expr, per_tensor: list[str]) -> str:
        """``expr`` for one element, its scalar subexpressions computed before the loop as
        ``scalar_t`` constants (the value each has at this point of the spec)."""
        def walk(e):
            if e.is_Integer or e in (sympy.oo, -sympy.oo, sympy.S.Half, -sympy.S.Half) \
                    or not e.free_symbols and not e.is_Number:
                return e  # (x ** 0.5 prints as a square root)
            scalar = not is_tensor_valued(e, self.roles) and not _is_condition(e)
            if scalar and e.is_Pow and e.exp == -1:
                return sympy.Pow(walk(e.base), -1, evaluate=False)  # x / scalar stays a division
            if scalar or e.is_Number:
                text = self.scalar(e)
                if text not in self.hoisted:
                    ident = _identifier(text)
                    name = self.fresh(f"c_{ident}" if 0 < len(ident) <= 32 else "c_scalar")
                    per_tensor.append(f"const scalar_t {name} = (scalar_t)({text});")
                    self.hoisted[text] = name
                return sympy.Symbol(f"@{self.hoisted[text]}", real=True)
            if not e.args:
                return e
            return e.func(*(walk(x) for x in e.args), evaluate=False) \
                if isinstance(e, (sympy.Add, sympy.Mul, sympy.Pow)) else e.func(*(walk(x) for x in e.args))

        def rename(n: str) -> str:
            return n[1:] if n.startswith("@") else self.cname(n)

        return CElementPrinter(rename)(walk(sympy.sympify(expr)))


class CBackend(FusedBackend):
    """generated/<spec>_c.py: the C source of fused CPU kernels (Note [C kernel layout])."""

    name = "c"
    builder = _CBuilder


BACKEND = CBackend()
