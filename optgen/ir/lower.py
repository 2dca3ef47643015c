"""Spec → IR: flatten the update rule's ``if`` blocks into guards and give every name a role."""
from __future__ import annotations

import ast

import sympy

from optgen.errors import Location, SpecError
from optgen.ir.nodes import Assign, Program, Role, is_tensor_valued
from optgen.spec.expressions import MathBuilder, node_location
from optgen.spec.model import Spec
from optgen.spec.reserved import derived_names, reserved_message


def base_roles(spec: Spec) -> dict[str, Role]:
    roles: dict[str, Role] = {"param": Role.PARAM, "grad": Role.GRAD}
    for h in spec.hyperparameters.values():
        if h.is_flag:
            roles[h.name] = Role.FLAG
        else:
            roles.update({n: Role.HYPER for n in (h.names or (h.name,))})
    for s in spec.state.values():
        roles[s.name] = Role.COUNTER if s.is_scalar else Role.STATE
    return roles


def lower(spec: Spec) -> Program:
    """The spec's update rule as a flat, guarded :class:`Program` (flags still symbolic)."""
    roles = base_roles(spec)
    lowering = _Lowering(spec, roles)
    lowering.block(spec.rule.body, sympy.true)
    _check_derived_names(spec, roles, lowering.body)
    state_when = {s.name: s.when for s in spec.state.values()}
    return Program(spec=spec, roles=roles, body=tuple(lowering.body), state_when=state_when)


def _check_derived_names(spec: Spec, roles: dict[str, Role], body: list[Assign]) -> None:
    """No spec name may be a name the generated code derives from another one (Note [Reserved
    names] in optgen/spec/reserved.py): a hyperparameter ``exp_avgs`` next to a state ``exp_avg``
    would be two arguments of one name in the foreach kernel."""
    derived = {d: name for name, role in roles.items() for d in derived_names(name, role is Role.COUNTER)}
    locs = {h_name: h.loc for h in spec.hyperparameters.values() for h_name in (h.names or (h.name,))}
    locs.update({s.name: s.loc for s in spec.state.values()})
    for a in body:  # a local: its first assignment
        locs.setdefault(a.target, a.loc)
    for name in roles:
        if name in derived and name in locs:
            raise SpecError(locs[name], f"'{name}' cannot be a name here: the generated code derives it from "
                                        f"'{derived[name]}' — choose another name")


class _Lowering:
    def __init__(self, spec: Spec, roles: dict[str, Role]):
        self.spec = spec
        self.roles = roles
        self.body: list[Assign] = []

    @property
    def choices(self) -> dict[str, tuple[str, ...]]:
        return {h.name: h.choices for h in self.spec.hyperparameters.values() if h.choices}

    def loc(self, node: ast.AST) -> Location:
        return node_location(self.spec.rule_loc, node)

    def names(self) -> dict[str, str]:
        return {name: role.value for name, role in self.roles.items()}

    def block(self, statements: list[ast.stmt], guard: sympy.Basic) -> None:
        for stmt in statements:
            if isinstance(stmt, ast.If):
                cond = MathBuilder(self.spec.rule_loc, self.names(), "a condition", self.choices).condition(stmt.test)
                self._check_host_condition(cond, stmt.test)
                self.block(stmt.body, sympy.And(guard, cond))
                if stmt.orelse:
                    self.block(stmt.orelse, sympy.And(guard, sympy.Not(cond)))
            elif isinstance(stmt, (ast.Assign, ast.AugAssign)):
                self.assign(stmt, guard)
            elif isinstance(stmt, ast.Pass):
                continue
            else:
                raise SpecError(self.loc(stmt), f"'{ast.unparse(stmt).splitlines()[0]}' is not allowed in an "
                                                "update rule: write assignments 'name = expression' and "
                                                "'if condition:' blocks")

    def _check_host_condition(self, cond: sympy.Basic, node: ast.AST) -> None:
        # Host conditions only: flags and hyperparameters (one branch per param group), counters
        # and scalars (one branch per tensor, like RAdam's rectification) — never tensors.
        if is_tensor_valued(cond, self.roles):
            s = next(s for s in cond.free_symbols if self.roles[s.name].is_tensor)
            raise SpecError(self.loc(node), f"'if' may only test flags, hyperparameters and scalars, not "
                                            f"'{s.name}' (a {self.roles[s.name].value}); for a per-element "
                                            "choice use where(condition, a, b)")

    def assign(self, stmt: ast.Assign | ast.AugAssign, guard: sympy.Basic) -> None:
        if isinstance(stmt, ast.Assign):
            if len(stmt.targets) != 1 or not isinstance(stmt.targets[0], ast.Name):
                raise SpecError(self.loc(stmt), "assign to exactly one plain name, e.g. 'exp_avg = ...'")
            target, value_node = stmt.targets[0].id, stmt.value
        else:
            if not isinstance(stmt.target, ast.Name):
                raise SpecError(self.loc(stmt), "assign to exactly one plain name")
            target = stmt.target.id
            value_node = ast.BinOp(left=ast.Name(id=target, ctx=ast.Load()), op=stmt.op, right=stmt.value)
            ast.copy_location(value_node, stmt.value)
            ast.copy_location(value_node.left, stmt.target)
        builder = MathBuilder(self.spec.rule_loc, self.names(), "an update rule")
        value = builder.math(value_node)
        role = self.roles.get(target)
        if role is None and (message := reserved_message(target, "local")):
            raise SpecError(self.loc(stmt.targets[0] if isinstance(stmt, ast.Assign) else stmt.target), message)
        if role in (Role.FLAG, Role.HYPER):
            raise SpecError(self.loc(stmt.targets[0] if isinstance(stmt, ast.Assign) else stmt.target),
                            f"cannot assign to '{target}': it is a {role.value}, fixed during a step; "
                            "assign to a new name instead")
        value_is_tensor = is_tensor_valued(value, self.roles)
        if role is None:  # a new local: a tensor if its expression reads one as written (Note [Local types])
            written_tensor = value_is_tensor or _reads_tensor_as_written(value_node, self.roles)
            self.roles[target] = Role.TENSOR if written_tensor else Role.SCALAR
        elif role in (Role.SCALAR, Role.COUNTER) and value_is_tensor:
            raise SpecError(self.loc(stmt), f"'{target}' is a scalar ({role.value}) but this value is a tensor")
        state = self.spec.state.get(target)
        first = None
        if state is not None and state.init == "first" and not any(a.target == target for a in self.body):
            first = state.init_value
        self.body.append(Assign(target, value, guard, self.loc(stmt), ast.unparse(stmt), first,
                                tuple(builder.products)))


# Note [Local types]
# ~~~~~~~~~~~~~~~~~~
# A local's kind (tensor or host scalar) is decided by its first assignment, from the expression
# as the spec writes it: `t = grad - grad` is a tensor of zeros even though sympy folds its value
# to 0.  Deciding from the folded value made `t` a scalar, then `u = abs(t) + 1` one too, and a
# later `else: u = grad` was rejected as a tensor assigned to a scalar.  A tensor local whose
# value is a number becomes a full tensor of it (optgen/passes/select_ops.py).  Reads inside the
# functions that give one number per tensor (norm, numel, ndim, size, machine_eps) do not count.
_PER_TENSOR_SCALARS = {"norm", "numel", "ndim", "size", "machine_eps"}


def _reads_tensor_as_written(node: ast.AST, roles) -> bool:
    stack = [node]
    while stack:
        n = stack.pop()
        if isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id in _PER_TENSOR_SCALARS:
            continue
        if isinstance(n, ast.Name) and roles.get(n.id) is not None and roles[n.id].is_tensor:
            return True
        stack.extend(ast.iter_child_nodes(n))
    return False
