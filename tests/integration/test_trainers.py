"""optgen's optimizers and schedulers in training frameworks, against the same run with torch.optim:
a tiny Lightning module (a per-step LinearLR, and ReduceLROnPlateau on a monitored metric) and a
tiny Hugging Face ``Trainer`` (the same two, ReduceLROnPlateau on ``metric_for_best_model``), and
the Trainer resumed from a checkpoint equal to the uninterrupted run.

Both frameworks decide how to call a scheduler by ``isinstance`` (``step()`` or ``step(metric)``),
and Lightning rejects what is not a torch scheduler, so these runs are what tells that optgen's
classes are the types they must be.  lightning and transformers (with accelerate) are in the
``test`` extra; where they are not installed these tests skip.
"""
from __future__ import annotations

from typing import Any

import pytest
import torch

import optgen

MODULES = {"optgen": optgen, "torch": torch.optim}


def make_optimizer(module, params):
    # foreach=False on both sides: the same for-loop arithmetic, so the same floats
    return module.AdamW(params, lr=0.05, weight_decay=0.1, foreach=False)


def make_scheduler(module, optimizer, kind: str):
    if kind == "linear":
        return module.lr_scheduler.LinearLR(optimizer, start_factor=1.0, end_factor=0.2, total_iters=6)
    # Reduces unless the loss fell by 90% since the best: it does reduce, every time it is stepped.
    return module.lr_scheduler.ReduceLROnPlateau(optimizer, factor=0.5, patience=0, threshold=0.9)


def data(n: int = 16):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 6, generator=g)
    return x, x[:, :1].sin() + 0.1 * torch.randn(n, 1, generator=g)


def net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))


# optgen's schedulers compute torch's learning rates in float64 up to rounding (their recursions
# are derived, not copied: tests/schedulers/test_scheduler_parity.py); the float32 updates come out
# the same all the same.
LR_RTOL = 1e-12


def assert_same_run(mine, theirs):
    """Two runs' (parameters, learning rates, optimizer state_dict) are equal: bit for bit but
    the learning rates (LR_RTOL)."""
    (params, lrs, state), (their_params, their_lrs, their_state) = mine, theirs
    assert lrs == pytest.approx(their_lrs, rel=LR_RTOL, abs=0)
    for p, q in zip(params, their_params, strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    for group, theirs_ in zip(state["param_groups"], their_state["param_groups"], strict=True):
        assert {**group, "lr": None} == {**theirs_, "lr": None}
        assert group["lr"] == pytest.approx(theirs_["lr"], rel=LR_RTOL, abs=0)
    for index, values in state["state"].items():
        for key, value in values.items():
            torch.testing.assert_close(value, their_state["state"][index][key], rtol=0, atol=0)


# Lightning -------------------------------------------------------------------------------------


def lightning_run(module, kind: str, epochs: int = 4):
    """``epochs`` epochs of 4 batches; the parameters, the learning rate of each step and the
    optimizer's state_dict."""
    L = pytest.importorskip("lightning")
    x, y = data()
    module_base: Any = L.LightningModule  # imported at run time: a base mypy cannot see

    class Tiny(module_base):
        def __init__(self):
            super().__init__()
            self.net = net()
            self.lrs: list[float] = []

        def training_step(self, batch, batch_idx):
            inputs, targets = batch
            loss = torch.nn.functional.mse_loss(self.net(inputs), targets)
            self.log("train_loss", loss, on_step=False, on_epoch=True)
            self.lrs.append(self.trainer.optimizers[0].param_groups[0]["lr"])
            return loss

        def configure_optimizers(self):
            opt = make_optimizer(module, self.parameters())
            scheduler = make_scheduler(module, opt, kind)
            if kind == "plateau":  # stepped with the epoch's train_loss, once an epoch
                return {"optimizer": opt, "lr_scheduler": {"scheduler": scheduler, "monitor": "train_loss"}}
            return {"optimizer": opt, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    model = Tiny()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=4, shuffle=False)
    trainer = L.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, loader)
    params = [p.detach().clone() for p in model.parameters()]
    return params, model.lrs, trainer.optimizers[0].state_dict()


@pytest.mark.parametrize("kind", ["linear", "plateau"])
def test_lightning_with_optgen_equals_torch_optim(kind):
    mine = lightning_run(optgen, kind)
    theirs = lightning_run(torch.optim, kind)
    assert_same_run(mine, theirs)
    lrs = mine[1]
    if kind == "linear":  # stepped after each of the 16 steps: at its end factor from the 7th on
        assert lrs == pytest.approx([0.05 * (1 - 0.8 * min(s, 6) / 6) for s in range(16)], rel=LR_RTOL)
    else:  # stepped with train_loss after each epoch of 4 steps: the first sets the best, then halves
        assert lrs == [0.05 / 2 ** max(0, s // 4 - 1) for s in range(16)]


# Hugging Face Trainer ---------------------------------------------------------------------------


class _Pairs(torch.utils.data.Dataset):
    """(x, y) rows as the dicts the Trainer's default collator stacks."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "labels": self.y[i]}


class _Regression(torch.nn.Module):
    """A plain module with the Trainer's contract: keyword inputs in, a dict with "loss" out (the
    Trainer evaluates the loss when the inputs have "labels")."""

    def __init__(self):
        super().__init__()
        self.net = net()

    def forward(self, x, labels):
        out = self.net(x)
        return {"loss": torch.nn.functional.mse_loss(out, labels), "logits": out}


def hf_run(module, kind: str, output_dir, max_steps: int = 12, resume: str | None = None, save_steps: int = 0):
    """``max_steps`` steps of batch 4 over 16 rows, shuffled by the Trainer's seed (evaluated every
    4 steps for the plateau scheduler); the parameters, the learning rate after each step and the
    optimizer's state_dict."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    x, y = data()
    model = _Regression()
    opt = make_optimizer(module, model.parameters())
    scheduler = make_scheduler(module, opt, kind)
    lrs: list[float] = []

    callback_base: Any = transformers.TrainerCallback  # imported at run time: a base mypy cannot see

    class RecordLR(callback_base):
        def on_step_end(self, args, state, control, **kwargs):
            lrs.append(opt.param_groups[0]["lr"])

    evaluate = dict(eval_strategy="steps", eval_steps=4, metric_for_best_model="loss") if kind == "plateau" else {}
    args = transformers.TrainingArguments(
        output_dir=str(output_dir), max_steps=max_steps, per_device_train_batch_size=4, per_device_eval_batch_size=16,
        use_cpu=True, report_to="none", disable_tqdm=True, logging_strategy="no", seed=0,
        save_strategy="steps" if save_steps else "no", save_steps=save_steps or 500, **evaluate)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=_Pairs(x, y),
                                   eval_dataset=_Pairs(x, y) if kind == "plateau" else None,
                                   optimizers=(opt, scheduler), callbacks=[RecordLR()])
    trainer.train(resume_from_checkpoint=resume)
    params = [p.detach().clone() for p in model.parameters()]
    return params, lrs, opt.state_dict()


@pytest.mark.parametrize("kind", ["linear", "plateau"])
def test_hf_trainer_with_optgen_equals_torch_optim(kind, tmp_path):
    mine = hf_run(optgen, kind, tmp_path / "optgen")
    theirs = hf_run(torch.optim, kind, tmp_path / "torch")
    assert_same_run(mine, theirs)
    lrs = mine[1]
    assert len(lrs) == 12
    if kind == "linear":
        assert lrs == pytest.approx([0.05 * (1 - 0.8 * min(s, 6) / 6) for s in range(1, 13)], rel=1e-12)
    else:  # stepped with eval_loss after steps 4 (the best so far) and 8 (halved), and 12
        assert lrs == [0.05] * 8 + [0.025] * 4


@pytest.mark.parametrize("kind", ["linear", "plateau"])
def test_hf_trainer_resumes_optgen_from_a_checkpoint(kind, tmp_path):
    uninterrupted = hf_run(optgen, kind, tmp_path / "full", save_steps=6)
    checkpoint = tmp_path / "full" / "checkpoint-6"
    assert (checkpoint / "optimizer.pt").exists() and (checkpoint / "scheduler.pt").exists()
    params, lrs, state = hf_run(optgen, kind, tmp_path / "resumed", resume=str(checkpoint))
    # The resumed run records steps 7..12, and ends where the uninterrupted run does, bit for bit
    assert_same_run((params, lrs, state), (uninterrupted[0], uninterrupted[1][6:], uninterrupted[2]))
    assert lrs == uninterrupted[1][6:]
