"""L-BFGS: the algorithm a spec cannot express elementwise, as one intrinsic.

LBFGS re-evaluates the loss (a closure) several times per step, keeps a history of curvature
pairs over the *flattened* parameters and searches along a direction; none of that is an
elementwise update, so specs/optimizers/lbfgs.toml declares the hyperparameters, their
validation and ``algorithm = "lbfgs"``, and the generated class's ``step`` calls :func:`step`.

The arithmetic follows torch.optim.LBFGS (Nocedal & Wright, Algorithms 7.4 and 3.5/3.6) in the
same order, so trajectories and the state (``d``, ``t``, ``old_dirs``, ``old_stps``, ``ro``,
``H_diag``, ``prev_flat_grad``, ``prev_loss``, ``al``, ``func_evals``, ``n_iter`` on the first
parameter) are torch's and checkpoints move between the two.
"""
from __future__ import annotations

import torch


def init(optimizer) -> None:
    """Checks made once the param groups exist."""
    if len(optimizer.param_groups) != 1:
        raise ValueError("LBFGS doesn't support per-parameter options (parameter groups)")
    optimizer._params = optimizer.param_groups[0]["params"]
    optimizer._numel_cache = None


# -- the flattened parameter vector ----------------------------------------------------------------
def _numel(optimizer) -> int:
    if optimizer._numel_cache is None:
        optimizer._numel_cache = sum(2 * p.numel() if p.is_complex() else p.numel() for p in optimizer._params)
    return optimizer._numel_cache


def flat_grad(params) -> torch.Tensor:
    """Every gradient as one vector (zeros for params without one; complex as real pairs)."""
    views = []
    for p in params:
        if p.grad is None:
            view = p.new(p.numel()).zero_()
        elif p.grad.is_sparse:
            view = p.grad.to_dense().view(-1)
        else:
            view = p.grad.view(-1)
        if view.is_complex():
            view = torch.view_as_real(view).view(-1)
        views.append(view)
    return torch.cat(views, 0)


def _add_to_params(optimizer, step_size, direction: torch.Tensor) -> None:
    """params += step_size * direction, the flat direction cut back into each parameter."""
    offset = 0
    for p in optimizer._params:
        if p.is_complex():
            p = torch.view_as_real(p)
        numel = p.numel()
        p.add_(direction[offset: offset + numel].view_as(p), alpha=step_size)
        offset += numel
    if offset != _numel(optimizer):
        raise AssertionError(f"Expected offset {offset} to equal {_numel(optimizer)}")


def _evaluate_along(optimizer, closure, x, t, d):
    """Loss and flat gradient at x + t·d, leaving the parameters at x."""
    _add_to_params(optimizer, t, d)
    loss = float(closure())
    grad = flat_grad(optimizer._params)
    for p, saved in zip(optimizer._params, x, strict=True):
        p.copy_(saved)
    return loss, grad


# -- the search direction: two-loop recursion ------------------------------------------------------
def _direction(grad, old_dirs, old_stps, ro, H_diag, al) -> torch.Tensor:
    """-H·grad with H the L-BFGS inverse-Hessian approximation (Nocedal & Wright, Alg. 7.4)."""
    q = grad.neg()
    for i in range(len(old_dirs) - 1, -1, -1):
        al[i] = old_stps[i].dot(q) * ro[i]
        q.add_(old_dirs[i], alpha=-al[i])
    r = torch.mul(q, H_diag)
    for i in range(len(old_dirs)):
        be_i = old_dirs[i].dot(r) * ro[i]
        r.add_(old_stps[i], alpha=al[i] - be_i)
    return r


# -- strong-Wolfe line search ----------------------------------------------------------------------
def cubic_interpolate(x1, f1, g1, x2, f2, g2, bounds=None):
    """Minimiser of the cubic through (x1, f1, g1) and (x2, f2, g2), clipped to ``bounds``."""
    low, high = bounds if bounds is not None else ((x1, x2) if x1 <= x2 else (x2, x1))
    d1 = g1 + g2 - 3 * (f1 - f2) / (x1 - x2)
    d2_square = d1 ** 2 - g1 * g2
    if d2_square < 0:
        return (low + high) / 2.0
    d2 = d2_square.sqrt()
    if x1 <= x2:
        min_pos = x2 - (x2 - x1) * ((g2 + d2 - d1) / (g2 - g1 + 2 * d2))
    else:
        min_pos = x1 - (x1 - x2) * ((g1 + d2 - d1) / (g1 - g2 + 2 * d2))
    return min(max(min_pos, low), high)


def strong_wolfe(obj_func, x, t, d, f, g, gtd, c1=1e-4, c2=0.9, tolerance_change=1e-9, max_ls=25):
    """A step length t along d satisfying the strong Wolfe conditions (Nocedal & Wright, Alg.
    3.5 bracketing and 3.6 zoom).  Returns (loss, flat grad, t, evaluations)."""
    d_norm = d.abs().max()
    g = g.clone(memory_format=torch.contiguous_format)
    f_new, g_new = obj_func(x, t, d)
    evals = 1
    gtd_new = g_new.dot(d)
    t_prev, f_prev, g_prev, gtd_prev = 0, f, g, gtd
    done = False
    ls_iter = 0
    # Bracketing: grow t until an interval is known to contain an acceptable point.
    while ls_iter < max_ls:
        if f_new > (f + c1 * t * gtd) or (ls_iter > 1 and f_new >= f_prev):
            bracket, bracket_f = [t_prev, t], [f_prev, f_new]
            bracket_g = [g_prev, g_new.clone(memory_format=torch.contiguous_format)]
            bracket_gtd = [gtd_prev, gtd_new]
            break
        if abs(gtd_new) <= -c2 * gtd:
            bracket, bracket_f, bracket_g = [t], [f_new], [g_new]
            done = True
            break
        if gtd_new >= 0:
            bracket, bracket_f = [t_prev, t], [f_prev, f_new]
            bracket_g = [g_prev, g_new.clone(memory_format=torch.contiguous_format)]
            bracket_gtd = [gtd_prev, gtd_new]
            break
        min_step = t + 0.01 * (t - t_prev)
        max_step = t * 10
        previous_t = t
        t = cubic_interpolate(t_prev, f_prev, gtd_prev, t, f_new, gtd_new, bounds=(min_step, max_step))
        t_prev, f_prev = previous_t, f_new
        g_prev = g_new.clone(memory_format=torch.contiguous_format)
        gtd_prev = gtd_new
        f_new, g_new = obj_func(x, t, d)
        evals += 1
        gtd_new = g_new.dot(d)
        ls_iter += 1
    if ls_iter == max_ls:
        bracket, bracket_f, bracket_g = [0, t], [f, f_new], [g, g_new]
    # Zoom: shrink the bracket until the conditions hold.
    insufficient_progress = False
    low_pos, high_pos = (0, 1) if bracket_f[0] <= bracket_f[-1] else (1, 0)
    while not done and ls_iter < max_ls:
        if abs(bracket[1] - bracket[0]) * d_norm < tolerance_change:
            break
        t = cubic_interpolate(bracket[0], bracket_f[0], bracket_gtd[0], bracket[1], bracket_f[1], bracket_gtd[1])
        # Stay at least 10 % of the bracket away from its ends, unless that made no progress.
        eps = 0.1 * (max(bracket) - min(bracket))
        if min(max(bracket) - t, t - min(bracket)) < eps:
            if insufficient_progress or t >= max(bracket) or t <= min(bracket):
                t = max(bracket) - eps if abs(t - max(bracket)) < abs(t - min(bracket)) else min(bracket) + eps
                insufficient_progress = False
            else:
                insufficient_progress = True
        else:
            insufficient_progress = False
        f_new, g_new = obj_func(x, t, d)
        evals += 1
        gtd_new = g_new.dot(d)
        ls_iter += 1
        if f_new > (f + c1 * t * gtd) or f_new >= bracket_f[low_pos]:
            bracket[high_pos], bracket_f[high_pos] = t, f_new
            bracket_g[high_pos] = g_new.clone(memory_format=torch.contiguous_format)
            bracket_gtd[high_pos] = gtd_new
            low_pos, high_pos = (0, 1) if bracket_f[0] <= bracket_f[1] else (1, 0)
        else:
            if abs(gtd_new) <= -c2 * gtd:
                done = True
            elif gtd_new * (bracket[high_pos] - bracket[low_pos]) >= 0:
                bracket[high_pos], bracket_f[high_pos] = bracket[low_pos], bracket_f[low_pos]
                bracket_g[high_pos], bracket_gtd[high_pos] = bracket_g[low_pos], bracket_gtd[low_pos]
            bracket[low_pos], bracket_f[low_pos] = t, f_new
            bracket_g[low_pos] = g_new.clone(memory_format=torch.contiguous_format)
            bracket_gtd[low_pos] = gtd_new
    return bracket_f[low_pos], bracket_g[low_pos], bracket[low_pos], evals


# -- one optimizer step ----------------------------------------------------------------------------
@torch.no_grad()
def step(optimizer, closure):
    """Up to ``max_iter`` L-BFGS iterations, each a direction from the history and a step along
    it (fixed ``lr``, or a strong-Wolfe line search).  Returns the closure's first loss."""
    if len(optimizer.param_groups) != 1:
        raise AssertionError(f"Expected exactly one param_group, but got {len(optimizer.param_groups)}")
    closure = torch.enable_grad()(closure)
    group = optimizer.param_groups[0]
    # A Tensor lr stays a tensor, as torch's LBFGS keeps it (``_to_scalar``: a 1-element one
    # squeezed to 0-dim, a view): the step length ``t = lr`` is then that tensor, stored as the
    # state ``t`` and read by the next step's ``s = d * t`` — so a lr filled in place between steps
    # is seen there too, as in torch.
    lr = group["lr"]
    if isinstance(lr, torch.Tensor) and lr.dim() != 0:
        lr = lr.squeeze()
    max_iter, max_eval = group["max_iter"], group["max_eval"]
    tolerance_grad, tolerance_change = group["tolerance_grad"], group["tolerance_change"]
    line_search_fn, history_size = group["line_search_fn"], group["history_size"]

    state = optimizer.state[optimizer._params[0]]  # LBFGS keeps its whole state on the first param
    state.setdefault("func_evals", 0)
    state.setdefault("n_iter", 0)

    orig_loss = closure()
    loss = float(orig_loss)
    current_evals = 1
    state["func_evals"] += 1
    grad = flat_grad(optimizer._params)
    if grad.abs().max() <= tolerance_grad:  # already optimal
        return orig_loss

    d, t = state.get("d"), state.get("t")
    old_dirs, old_stps, ro = state.get("old_dirs"), state.get("old_stps"), state.get("ro")
    H_diag, prev_flat_grad, prev_loss = state.get("H_diag"), state.get("prev_flat_grad"), state.get("prev_loss")

    n_iter = 0
    while n_iter < max_iter:
        n_iter += 1
        state["n_iter"] += 1
        if state["n_iter"] == 1:
            d = grad.neg()
            old_dirs, old_stps, ro = [], [], []
            H_diag = 1
        else:
            # Curvature pair from the last step; kept only if it keeps H positive definite.
            y = grad.sub(prev_flat_grad)
            s = d.mul(t)
            ys = y.dot(s)
            if ys > 1e-10:
                if len(old_dirs) == history_size:
                    old_dirs.pop(0)
                    old_stps.pop(0)
                    ro.pop(0)
                old_dirs.append(y)
                old_stps.append(s)
                ro.append(1.0 / ys)
                H_diag = ys / y.dot(y)
            if "al" not in state:
                state["al"] = [None] * history_size
            d = _direction(grad, old_dirs, old_stps, ro, H_diag, state["al"])

        if prev_flat_grad is None:
            prev_flat_grad = grad.clone(memory_format=torch.contiguous_format)
        else:
            prev_flat_grad.copy_(grad)
        prev_loss = loss

        # Step length: the first ever step is scaled by the gradient's size.
        # (min of a float and a 0-dim tensor, as torch's LBFGS computes it: the same rounding)
        t = min(1.0, 1.0 / grad.abs().sum()) * lr if state["n_iter"] == 1 else lr
        gtd = grad.dot(d)
        if gtd > -tolerance_change:  # not a descent direction any more
            break

        evals = 0
        if line_search_fn is not None:
            if line_search_fn != "strong_wolfe":
                raise RuntimeError("only 'strong_wolfe' is supported")
            x_init = [p.clone(memory_format=torch.contiguous_format) for p in optimizer._params]

            def along(x, t, d):
                return _evaluate_along(optimizer, closure, x, t, d)

            loss, grad, t, evals = strong_wolfe(along, x_init, t, d, loss, grad, gtd, max_ls=max_eval - current_evals)
            _add_to_params(optimizer, t, d)
            optimal = grad.abs().max() <= tolerance_grad
        else:
            _add_to_params(optimizer, t, d)
            optimal = False
            if n_iter != max_iter:
                # Re-evaluate unless this was the last iteration (the caller will).
                with torch.enable_grad():
                    loss = closure()
                loss = float(loss)
                grad = flat_grad(optimizer._params)
                optimal = grad.abs().max() <= tolerance_grad
                evals = 1
        current_evals += evals
        state["func_evals"] += evals

        if n_iter == max_iter or current_evals >= max_eval or optimal:
            break
        if d.mul(t).abs().max() <= tolerance_change:  # the step barely moved the parameters
            break
        if abs(loss - prev_loss) < tolerance_change:  # nor the loss
            break

    state.update(d=d, t=t, old_dirs=old_dirs, old_stps=old_stps, ro=ro, H_diag=H_diag,
                 prev_flat_grad=prev_flat_grad, prev_loss=prev_loss)
    return orig_loss
