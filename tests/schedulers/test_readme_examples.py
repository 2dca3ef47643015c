"""The README's "Schedulers and weight averaging" examples run as written (with optgen)."""
from __future__ import annotations

import re
import warnings
from pathlib import Path
from types import SimpleNamespace

import torch

README = Path(__file__).resolve().parents[2] / "README.md"


def examples() -> list[str]:
    text = README.read_text()
    section = text[text.index("## Schedulers and weight averaging"):]
    section = section[: section.index("\n## ", 3)]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def run(blocks, use_torch: bool) -> dict:
    """Runs the blocks in one namespace; with use_torch, ``optgen`` names torch's own classes."""
    torch.manual_seed(0)
    namespace: dict = {}
    if use_torch:
        namespace["optgen"] = SimpleNamespace(SGD=torch.optim.SGD, lr_scheduler=torch.optim.lr_scheduler,
                                              swa_utils=torch.optim.swa_utils)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. scheduler.step() before optimizer.step() would warn
        for block in blocks:
            if use_torch:
                block = block.replace("import optgen\n", "")
            exec(compile(block, str(README), "exec"), namespace)  # the README's own code, not a spec
    return namespace


def test_readme_examples_run_and_match_torch():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: threads only contend (this machine is shared)
    try:
        check_examples()
    finally:
        torch.set_num_threads(threads)


def check_examples():
    blocks = examples()
    assert len(blocks) == 4  # set-up, stacked schedulers, SWA + SWALR + update_bn, EMA
    ours, theirs = run(blocks, use_torch=False), run(blocks, use_torch=True)
    assert type(ours["swa_model"]).__module__ == "optgen.swa_utils"
    assert int(ours["swa_model"].n_averaged) == 9 and int(ours["ema_model"].n_averaged) == 30 * 4
    assert abs(ours["scheduler1"].get_last_lr()[0] - 0.01 * 0.9 ** 20) < 1e-15
    assert int(ours["swa_model"].module[1].num_batches_tracked) == 4  # update_bn recomputed the statistics
    assert ours["optimizer"].param_groups[0]["lr"] == theirs["optimizer"].param_groups[0]["lr"]
    for name in ("model", "swa_model", "ema_model"):
        for key, value in theirs[name].state_dict().items():
            torch.testing.assert_close(ours[name].state_dict()[key], value, rtol=1e-4, atol=1e-5, msg=key)
