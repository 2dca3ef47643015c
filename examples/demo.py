"""Train one small model with optgen's optimizers and with torch.optim's, side by side.

Run after `optgen build`:  python examples/demo.py
Each pair starts from the same weights and sees the same batches; the losses should agree to
float32 rounding, because optgen's generated code performs torch's arithmetic in torch's order.
Then one step of a 20M-parameter model, timed: torch's fastest CPU path against optgen's fused
C kernel (compiled on first use), for optimizers torch has a fused CPU kernel for and some it has not.
"""
import time

import torch

import optgen
from optgen.runtime import c_launch

CONFIGS = [
    ("SGD", dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-4)),
    ("Adam", dict(lr=3e-3, amsgrad=True)),
    ("AdamW", dict(lr=3e-3, weight_decay=0.1)),
    ("Adagrad", dict(lr=0.05, lr_decay=1e-3)),
]


def make_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.Tanh(), torch.nn.Linear(64, 1))


def train(model, optimizer, steps=200):
    g = torch.Generator().manual_seed(1)
    target_w = torch.randn(16, 1, generator=g)
    for _ in range(steps):
        x = torch.randn(64, 16, generator=g)
        y = torch.sin(x @ target_w)
        loss = torch.nn.functional.mse_loss(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return loss.item()


def step_ms(optimizer, params, repeats=5):
    for p in params:
        p.grad = torch.full_like(p, 1e-3)
    optimizer.step()  # state, and optgen's C compile on first use
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        optimizer.step()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2] * 1e3


def timing():
    print("\none step, 20M parameters in 40 tensors (median of 5, ms):")
    print(f"{'optimizer':<9} {'torch fastest':>22} {'optgen fused C':>15}")
    for name, fused in [("Adam", True), ("SGD", True), ("NAdam", False), ("RMSprop", False), ("Rprop", False)]:
        params = [torch.zeros(500_000, requires_grad=True) for _ in range(40)]
        theirs = getattr(torch.optim, name)(params, **(dict(fused=True) if fused else dict(foreach=False)))
        label = "fused" if fused else "for-loop"
        ours = getattr(optgen, name)([p.detach().clone().requires_grad_() for p in params])
        ours.implementation = "c"  # what fused=True selects on CPU
        print(f"{name:<9} {step_ms(theirs, params):>13.1f} ({label:>8}) "
              f"{step_ms(ours, ours.param_groups[0]['params']):>15.1f}")


def main():
    print(f"{'optimizer':<9} {'optgen loss':>12} {'torch loss':>12} {'|diff|':>9}")
    for name, kwargs in CONFIGS:
        ours_model, torch_model = make_model(), make_model()
        ours = train(ours_model, getattr(optgen, name)(ours_model.parameters(), **kwargs))
        theirs = train(torch_model, getattr(torch.optim, name)(torch_model.parameters(), **kwargs))
        print(f"{name:<9} {ours:>12.6f} {theirs:>12.6f} {abs(ours - theirs):>9.1e}")
    if c_launch.available():
        timing()


if __name__ == "__main__":
    main()
