"""`optgen schedule NAME --steps N [key=value ...] [-o lr.png]`: see a schedule before a long run.

Runs optgen's scheduler NAME on a one-parameter SGD optimizer (momentum 0.9, so momentum-cycling
schedulers work) and prints the learning rate of every step as a terminal chart, or writes it to
a PNG.  ``--explain`` prints the spec's closed form and the chainable form optgen derived.
"""
from __future__ import annotations

import ast
import warnings

from optgen.errors import SpecError

#: schedulers that cannot run from the command line, and why
_NOT_FROM_CLI = {
    "LambdaLR": "it takes a Python callable",
    "MultiplicativeLR": "it takes a Python callable",
    "ReduceLROnPlateau": "its lr depends on the metrics passed to step()",
    "ChainedScheduler": "it wraps other schedulers",
    "SequentialLR": "it wraps other schedulers",
    "LRScheduler": "it is the base class",
}


def parse_arguments(items: list[str]) -> dict:
    """``key=value`` pairs; values are Python literals (numbers, strings, lists, None, booleans),
    read with ast.literal_eval — never evaluated — and bare words are strings (mode=triangular2)."""
    out = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.isidentifier():
            raise SpecError(None, f"argument '{item}' is not key=value (e.g. T_max=100)")
        try:
            out[key] = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            out[key] = text
    return out


def learning_rates(name: str, steps: int, lr: float, kwargs: dict) -> list[float]:
    """The lr of the first param group after construction and after each of ``steps - 1`` steps."""
    import torch

    from optgen import lr_scheduler, swa_utils

    if name in _NOT_FROM_CLI:
        raise SpecError(None, f"cannot plot {name} from the command line: {_NOT_FROM_CLI[name]}")
    cls = getattr(lr_scheduler, name, None) or (swa_utils.SWALR if name == "SWALR" else None)
    if cls is None:
        known = sorted(n for n in lr_scheduler.__all__ if n not in _NOT_FROM_CLI) + ["SWALR"]
        raise SpecError(None, f"no scheduler named '{name}'; available: {', '.join(known)}")
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr, momentum=0.9)
    try:
        scheduler = cls(optimizer, **kwargs)
    except (TypeError, ValueError, KeyError) as e:
        raise SpecError(None, f"{name}({', '.join(f'{k}={v!r}' for k, v in kwargs.items())}): {e}") from None
    values = [float(optimizer.param_groups[0]["lr"])]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(steps - 1):
            optimizer.step()
            try:
                scheduler.step()
            except ValueError as e:  # OneCycleLR past total_steps
                raise SpecError(None, f"{name}: {e}") from None
            values.append(float(optimizer.param_groups[0]["lr"]))
    return values


def explain(name: str) -> str:
    """The spec's closed form and the chainable form derived from it."""
    from optgen.schedules.build import load_schedules
    from optgen.schedules.derive import derive

    for spec in load_schedules():
        if spec.name == name:
            lines = [f"{spec.name} ({spec.path})", "closed form:"]
            lines += [f"    {d.name} = {d.text}" for d in spec.definitions] + [f"    lr = {spec.lr.text}"]
            lines.append("chainable form (derived):" if spec.chainable else
                         "chainable form (torch's get_lr is the closed form; shown for reference):")
            lines += [f"    {line}" for line in derive(spec).describe()]
            return "\n".join(lines)
    return f"{name} is torch's own (optgen/runtime/lr_scheduler.py): it has no formula to show"


def _options(name: str, rest: list[str]):
    import argparse

    parser = argparse.ArgumentParser(prog=f"optgen schedule {name}")
    parser.add_argument("arguments", nargs="*", metavar="key=value", help="constructor arguments, e.g. T_max=100")
    parser.add_argument("--steps", type=int, default=100, help="number of steps to show (default 100)")
    parser.add_argument("--lr", type=float, default=0.1, help="the optimizer's initial lr (default 0.1)")
    parser.add_argument("-o", "--output", help="write a PNG here instead of printing a chart")
    parser.add_argument("--explain", action="store_true", help="also print the closed and the derived chainable form")
    options = parser.parse_intermixed_args(rest)  # key=value before or after the options
    options.name = name
    return options


def main(args) -> int:
    from optgen.schedules.plot import ascii_chart, write_png

    args = _options(args.name, args.rest)
    if args.steps < 2:
        raise SpecError(None, "--steps must be at least 2")
    kwargs = parse_arguments(args.arguments)
    values = learning_rates(args.name, args.steps, args.lr, kwargs)
    if args.explain:
        print(explain(args.name))
        print()
    if args.output:
        write_png(args.output, values)
        print(f"wrote {args.output} ({args.steps} steps, lr {min(values):.4g} .. {max(values):.4g})")
        return 0
    shown = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
    print(ascii_chart(values, title=f"{args.name}({shown}), lr={args.lr}: {args.steps} steps"))
    return 0
