"""optgen.passes.merge_variants: the variants of a spec merged into one guarded function.

Note [Merged variants run their own code] is checked three ways: on the merged items themselves
(`project`), on random sequences printed as Python and run under every flag assignment, and on
every built-in spec's generated Python kernels, whose merged function, with its flag branches
resolved for one variant, must be that variant's own code statement for statement.
"""
import ast
import copy
import itertools
import random

import pytest
import sympy

from optgen.backends.differentiable import BACKEND as DIFFERENTIABLE
from optgen.backends.foreach import BACKEND as FOREACH
from optgen.backends.forloop import BACKEND as FORLOOP
from optgen.backends.python_base import item_lines, merged_lines, python_condition
from optgen.build import compile_all
from optgen.passes.merge_variants import Block, FlagSpace, MergedBlock, condition, describe, merge, project, sections

FLAGS = ("amsgrad", "maximize")
SPACE = FlagSpace(FLAGS, tuple(itertools.product((False, True), repeat=2)))


def leaf(name):
    return (f"out.append({name!r})",)


def test_shared_statements_are_kept_once_and_the_others_guarded():
    a, b, c, m = leaf("a"), leaf("b"), leaf("c"), leaf("max")
    sequences = [[a, b, c], [a, b, c], [a, m, b, c], [a, m, b, c]]  # amsgrad adds `max` after `a`
    merged = merge(SPACE, sequences)
    assert [m_.item for m_ in merged] == [a, m, b, c]
    assert [sorted(m_.on) for m_ in merged] == [[0, 1, 2, 3], [2, 3], [0, 1, 2, 3], [0, 1, 2, 3]]
    assert merged_lines(merged, SPACE.everything, SPACE) == [
        "out.append('a')", "if amsgrad:", "    out.append('max')", "out.append('b')", "out.append('c')"]


def test_disjoint_alternatives_print_as_one_if_else_chain():
    x, y, z = leaf("x"), leaf("y"), leaf("z")
    merged = merge(SPACE, [[x], [x], [y], [z]])  # (F,F), (F,T): x; (T,F): y; (T,T): z
    lines = merged_lines(merged, SPACE.everything, SPACE)
    assert lines == ["if not amsgrad:", "    out.append('x')", "elif maximize:", "    out.append('z')",
                     "else:", "    out.append('y')"]


def test_guarded_blocks_merge_as_blocks_with_flag_branches_inside():
    """`if weight_decay != 0:` of every variant is one block; what differs in it is branched."""
    head = "if weight_decay != 0:"
    sequences = [[Block(head, (leaf("grad_add"),))], [Block(head, (leaf("grad_add_"),))],
                 [Block(head, (leaf("grad_add"),))], [Block(head, (leaf("grad_add_"),))]]
    merged = merge(SPACE, sequences)
    assert len(merged) == 1 and isinstance(merged[0].item, MergedBlock)
    assert merged_lines(merged, SPACE.everything, SPACE) == [
        head, "    if maximize:", "        out.append('grad_add_')", "    else:", "        out.append('grad_add')"]


def test_else_half_of_an_if_else_stays_attached_to_its_if():
    merged = merge(SPACE, [[Block("if g:", (leaf("a"),), (leaf("b"),))], [Block("if g:", (leaf("a"),))],
                           [Block("if g:", (leaf("a"),), (leaf("b"),))], [leaf("c")]])
    assert project(merged, 1) == (Block("if g:", (leaf("a"),)),)
    assert project(merged, 3) == (leaf("c"),)


def test_conditions_use_impossible_assignments_as_dont_cares():
    """A fixed flag (AdamW's decoupled_weight_decay) never appears in a condition."""
    space = FlagSpace(("amsgrad", "decoupled_weight_decay"), ((False, True), (True, True)))
    assert condition(space, frozenset({1}), space.everything) == sympy.Symbol("amsgrad")
    assert condition(space, frozenset({0, 1}), space.everything) == sympy.true


def test_python_condition_reads_like_python_in_flag_order():
    a, m = sympy.symbols("amsgrad maximize")
    assert python_condition(m & ~a, FLAGS) == "not amsgrad and maximize"
    assert python_condition((a & m) | ~m, FLAGS) == "(amsgrad and maximize) or not maximize"


def _random_items(rng, depth=0):
    items = []
    for _ in range(rng.randint(0, 6)):
        if depth < 2 and rng.random() < 0.25:
            header = f"if h{rng.randint(0, 1)}:"
            body = tuple(_random_items(rng, depth + 1)) or (leaf("pad"),)
            orelse = tuple(_random_items(rng, depth + 1)) if rng.random() < 0.3 else ()
            items.append(Block(header, body, orelse))
        else:
            items.append(leaf(rng.choice("abcdef")))
    return items


def _run(lines, env):
    out: list = []
    exec("\n".join(lines), {**env, "out": out})
    return out


@pytest.mark.parametrize("seed", range(200))
def test_random_variants_run_their_own_code(seed):
    """Random sequences (shared and distinct statements, nested blocks with else halves) for three
    flags with one impossible combination: the merged sequence projects back onto each variant,
    and printed as Python, run under each flag assignment and guard value, does what the
    variant's own code does."""
    rng = random.Random(seed)
    flags = ("f0", "f1", "f2")
    assignments = tuple(a for a in itertools.product((False, True), repeat=3) if a != (True, True, False))
    space = FlagSpace(flags, assignments)
    base = _random_items(rng)
    sequences = []
    for _ in assignments:  # variants that mostly share code, as a spec's do
        items = [i for i in base if rng.random() < 0.8]
        for _ in range(rng.randint(0, 2)):
            items.insert(rng.randint(0, len(items)), leaf(rng.choice("uvw")))
        sequences.append(items)
    merged = merge(space, sequences)
    lines = merged_lines(merged, space.everything, space)
    for v, assignment in enumerate(assignments):
        assert project(merged, v) == tuple(sequences[v])
        for h0, h1 in itertools.product((False, True), repeat=2):
            env = {**dict(zip(flags, assignment, strict=True)), "h0": h0, "h1": h1}
            assert _run(lines, env) == _run(item_lines(sequences[v]), env), (assignment, "\n".join(lines))


def test_merge_refuses_a_wrong_number_of_sequences():
    with pytest.raises(ValueError):
        merge(SPACE, [[leaf("a")]])


def test_sections_never_reorder_statements_of_one_variant():
    """Chains reorder arms only when their variants are disjoint."""
    a, b = leaf("a"), leaf("b")
    merged = merge(SPACE, [[a, b], [b, a], [a, b], [b, a]])  # maximize swaps the two
    for v in range(4):
        assert project(merged, v) == ((a, b) if v % 2 == 0 else (b, a))
    for section in sections(merged, SPACE.everything, SPACE):
        ons = [frozenset().union(*(m.on for m in arm.items)) for arm in section.arms]
        assert all(not (x & y) for x, y in itertools.combinations(ons, 2))


# -- the generated Python kernels ------------------------------------------------------------------
COMPILED = [c for c in compile_all() if not c.spec.algorithm]
BACKENDS = [FORLOOP, FOREACH, DIFFERENTIABLE]
CASES = [(c, b) for c in COMPILED for b in BACKENDS if getattr(b, "unsupported", lambda c: None)(c) is None]


def _specialize(statements, flags: dict):
    """The statements with every `if` over flags alone replaced by the branch the flags take."""
    out = []
    for node in statements:
        if isinstance(node, ast.If) and {n.id for n in ast.walk(node.test) if isinstance(n, ast.Name)} <= set(flags) \
                and all(isinstance(n, (ast.BoolOp, ast.UnaryOp, ast.Name, ast.And, ast.Or, ast.Not, ast.Load))
                        for n in ast.walk(node.test)):
            taken = eval(compile(ast.Expression(node.test), "<flags>", "eval"), {}, dict(flags))
            out += _specialize(node.body if taken else node.orelse, flags)
            continue
        for field in ("body", "orelse"):
            if isinstance(getattr(node, field, None), list):
                setattr(node, field, _specialize(getattr(node, field), flags))
        out.append(node)
    return out


@pytest.mark.parametrize("case", CASES, ids=[f"{c.spec.name}-{b.name}" for c, b in CASES])
def test_generated_function_runs_each_variants_own_code(case):
    compiled, backend = case
    module = ast.parse(backend.render(compiled))
    function = next(n for n in module.body if isinstance(n, ast.FunctionDef))
    assert len([n for n in module.body if isinstance(n, ast.FunctionDef)]) == 1
    assert "VARIANTS" not in {t.id for n in module.body if isinstance(n, ast.Assign) for t in n.targets
                              if isinstance(t, ast.Name)}
    space, variants = backend.variant_items(compiled)
    for assignment, items in zip(space.assignments, variants, strict=True):
        flags = dict(zip(space.flags, assignment, strict=True))
        ours = ast.Module(_specialize(copy.deepcopy(function.body[1:]), flags), [])  # [0]: the docstring
        theirs = ast.parse("\n".join(item_lines(items)))
        assert ast.dump(ours) == ast.dump(theirs), (compiled.spec.name, backend.name, flags)


def test_describe_prints_the_merged_ir():
    adam = next(c for c in COMPILED if c.spec.name == "Adam")
    text = describe(adam)
    assert text.splitlines()[0] == ("# Adam: every variant of the flags (amsgrad, maximize, decoupled_weight_decay) "
                                    "in one program")
    assert "if amsgrad:" in text and "if maximize:" in text
