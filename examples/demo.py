"""Train one small model with optgen's optimizers and with torch.optim's, side by side.

Run after `optgen build`:  python examples/demo.py
Each pair starts from the same weights and sees the same batches; the losses should agree to
float32 rounding, because optgen's generated code performs torch's arithmetic in torch's order.
"""
import torch

import optgen

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


def main():
    print(f"{'optimizer':<9} {'optgen loss':>12} {'torch loss':>12} {'|diff|':>9}")
    for name, kwargs in CONFIGS:
        ours_model, torch_model = make_model(), make_model()
        ours = train(ours_model, getattr(optgen, name)(ours_model.parameters(), **kwargs))
        theirs = train(torch_model, getattr(torch.optim, name)(torch_model.parameters(), **kwargs))
        print(f"{name:<9} {ours:>12.6f} {theirs:>12.6f} {abs(ours - theirs):>9.1e}")


if __name__ == "__main__":
    main()
