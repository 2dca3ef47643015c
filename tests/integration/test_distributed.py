"""optgen optimizers under torch.distributed, each against the same run with torch.optim: DDP,
ZeroRedundancyOptimizer (consolidated and loaded into fresh optimizers), FSDP2 ``fully_shard`` with
the for-loop, foreach and fused C implementations, and DCP save / load / resume.

Two gloo ranks on CPU, spawned once for the whole module (starting interpreters and a process group
costs more than every case together): the script below runs each case on both ranks and writes
what happened per case and rank; one test per case reads it.  docs/integrations.md shows the same
set-ups as user code.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from optgen.runtime import c_launch
from tests.registry import TOLERANCES

# The cases, in the order the script runs them.
CASES = ["ddp", "zero", "zero_consolidated_into_fresh", "fsdp2", "dcp_resume"]

SCRIPT = r'''
import copy, datetime, json, os, sys, tempfile, traceback, warnings
import torch, torch.distributed as dist, torch.multiprocessing as mp

WORLD = 2
# Which implementation of torch's runs each of optgen's: the same arithmetic, so the same numbers.
TORCH_FLAGS = {"forloop": dict(foreach=False), "foreach": dict(foreach=True), "c": dict(fused=True)}


def optgen_opt(name, params, implementation, **kw):
    # The flags torch takes pick the same implementation in optgen (foreach=None would too:
    # the for-loop on CPU), so both optimizers have the same param_groups.
    import optgen
    return getattr(optgen, name)(params, **TORCH_FLAGS[implementation], **kw)


def torch_opt(name, params, implementation, **kw):
    return getattr(torch.optim, name)(params, **TORCH_FLAGS[implementation], **kw)


def same(a, b, msg, implementation="forloop"):
    # torch's for-loop and foreach do the same arithmetic as optgen's: the same floats.  optgen's C
    # kernel and torch's fused one round differently in the last place (the float32 tolerance of
    # tests/registry.py, passed in by the test).
    tolerance = FUSED_TOLERANCE if implementation == "c" else dict(rtol=0, atol=0)
    torch.testing.assert_close(a, b, **tolerance, msg=lambda m: f"{msg}: {m}")


def same_states(mine, theirs, msg, implementation="forloop"):
    """Two optimizers' state_dict()s: the same layout and the same values."""
    mine, theirs = mine.state_dict(), theirs.state_dict()
    assert mine["param_groups"] == theirs["param_groups"], (msg, mine["param_groups"], theirs["param_groups"])
    assert mine["state"].keys() == theirs["state"].keys(), msg
    for index, state in mine["state"].items():
        assert state.keys() == theirs["state"][index].keys(), (msg, index)
        for key, value in state.items():
            other = theirs["state"][index][key]
            if hasattr(value, "full_tensor"):
                value, other = value.full_tensor(), other.full_tensor()
            same(value, other, f"{msg}: state[{index}][{key!r}]", implementation)


def base_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3))


def batches(steps, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(4, 5, generator=g) for _ in range(steps)]


def train(model, opt, data, rank):
    for x in data:
        model(x[rank::WORLD]).square().sum().backward()  # each rank its own half of the batch
        opt.step()
        opt.zero_grad()


def case_ddp(rank, tmp):
    from torch.nn.parallel import DistributedDataParallel as DDP
    kw = dict(lr=0.05, weight_decay=0.1, amsgrad=True)
    for implementation in TORCH_FLAGS:
        runs = []
        for make in (optgen_opt, torch_opt):
            model = DDP(base_model())
            opt = make("AdamW", model.parameters(), implementation, **kw)
            train(model, opt, batches(3), rank)
            runs.append((model, opt))
        (mine, my_opt), (theirs, their_opt) = runs
        for p, q in zip(mine.parameters(), theirs.parameters()):
            same(p, q, f"ddp {implementation}", implementation)
        same_states(my_opt, their_opt, f"ddp {implementation}", implementation)


def zero_run(optimizer_class, steps, rank, load=None):
    from torch.distributed.optim import ZeroRedundancyOptimizer
    from torch.nn.parallel import DistributedDataParallel as DDP
    model = DDP(base_model())
    opt = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=optimizer_class, lr=0.05, momentum=0.9,
                                  nesterov=True, weight_decay=0.01)
    data = batches(5)
    if load is not None:  # resume: the model and the consolidated optimizer state after the first steps
        model.module.load_state_dict(load["model"])
        opt.load_state_dict(load["opt"])
        data = data[steps:]
    else:
        data = data[:steps]
    train(model, opt, data, rank)
    return model, opt


def consolidated(opt):
    """ZeroRedundancyOptimizer's whole state, gathered on rank 0 (every rank takes part)."""
    opt.consolidate_state_dict(to=0)
    return opt.state_dict() if dist.get_rank() == 0 else None


def case_zero(rank, tmp):
    import optgen
    mine, my_opt = zero_run(optgen.SGD, 3, rank)
    theirs, their_opt = zero_run(torch.optim.SGD, 3, rank)
    for p, q in zip(mine.parameters(), theirs.parameters()):
        same(p, q, "zero parameters")
    my_state, their_state = consolidated(my_opt), consolidated(their_opt)
    if rank == 0:
        assert my_state["param_groups"] == their_state["param_groups"]
        assert my_state["state"].keys() == their_state["state"].keys() == set(range(4))
        for index, state in my_state["state"].items():
            same(state["momentum_buffer"], their_state["state"][index]["momentum_buffer"], f"zero state {index}")


def case_zero_consolidated_into_fresh(rank, tmp):
    """The consolidated state resumes a fresh ZeroRedundancyOptimizer (every rank) and a plain
    optimizer (one process) exactly where the uninterrupted run goes."""
    import optgen
    path = os.path.join(tmp, "zero.pt")
    model, opt = zero_run(optgen.SGD, 2, rank)
    state = consolidated(opt)
    if rank == 0:
        torch.save({"model": model.module.state_dict(), "opt": state}, path)
    dist.barrier()
    uninterrupted, _ = zero_run(optgen.SGD, 5, rank)
    resumed, _ = zero_run(optgen.SGD, 2, rank, load=torch.load(path, weights_only=True))
    for p, q in zip(resumed.parameters(), uninterrupted.parameters()):
        same(p, q, "zero resumed")
    # One process, the whole batch: a plain optgen.SGD and a torch.optim.SGD from the same state.
    runs = []
    for cls in (optgen.SGD, torch.optim.SGD):
        saved = torch.load(path, weights_only=True)  # a fresh copy each: loading it into ZeRO changed it
        model = base_model()
        model.load_state_dict(saved["model"])
        plain = cls(model.parameters(), lr=1.0)
        plain.load_state_dict(saved["opt"])
        for x in batches(5)[2:]:
            model(x).square().sum().div(WORLD).backward()  # DDP averages the ranks' gradients
            plain.step()
            plain.zero_grad()
        runs.append((model, plain))
    (mine, my_plain), (theirs, their_plain) = runs
    for p, q in zip(mine.parameters(), theirs.parameters()):
        same(p, q, "zero state in a plain optimizer")
    same_states(my_plain, their_plain, "zero state in a plain optimizer")


def sharded_model(mesh):
    from torch.distributed.fsdp import fully_shard
    model = base_model()
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def case_fsdp2(rank, tmp):
    from torch.distributed.device_mesh import init_device_mesh
    mesh = init_device_mesh("cpu", (WORLD,))
    kw = dict(lr=0.05, weight_decay=0.1)
    for implementation in TORCH_FLAGS:
        runs = []
        for make in (optgen_opt, torch_opt):
            model = sharded_model(mesh)
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # no fallback: every implementation steps the shards
                opt = make("AdamW", model.parameters(), implementation, **kw)
                train(model, opt, batches(3), rank)
            runs.append((model, opt))
        (mine, my_opt), (theirs, their_opt) = runs
        for p, q in zip(mine.parameters(), theirs.parameters()):
            same(p.full_tensor(), q.full_tensor(), f"fsdp2 {implementation}", implementation)
        same_states(my_opt, their_opt, f"fsdp2 {implementation}", implementation)


def case_dcp_resume(rank, tmp):
    """FSDP2 with the fused kernels: 2 steps, DCP save, a fresh model and optimizer, DCP load, 2
    more steps == 4 uninterrupted steps; saved by optgen or by torch.optim, resumed by either."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    mesh = init_device_mesh("cpu", (WORLD,))
    kw = dict(lr=0.05, weight_decay=0.1)
    data = batches(4)

    def fresh(make):
        model = sharded_model(mesh)
        return model, make("AdamW", model.parameters(), "c", **kw)

    uninterrupted = {}
    for make in (optgen_opt, torch_opt):
        uninterrupted[make.__name__] = fresh(make)
        train(*uninterrupted[make.__name__], data, rank)

    for saver in (optgen_opt, torch_opt):
        checkpoint = os.path.join(tmp, "dcp-" + saver.__name__)
        model, opt = fresh(saver)
        train(model, opt, data[:2], rank)
        model_sd, opt_sd = get_state_dict(model, opt)
        dcp.save({"model": model_sd, "optim": opt_sd}, checkpoint_id=checkpoint)
        for make in (optgen_opt, torch_opt):
            model, opt = fresh(make)
            model_sd, opt_sd = get_state_dict(model, opt)
            state = {"model": model_sd, "optim": opt_sd}
            dcp.load(state, checkpoint_id=checkpoint)
            set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
            train(model, opt, data[2:], rank)
            for name, (target, target_opt) in uninterrupted.items():
                # Every step by the same kernel: the same floats; else the two fused kernels' rounding
                implementation = "forloop" if saver.__name__ == make.__name__ == name else "c"
                what = f"dcp saved by {saver.__name__}, resumed by {make.__name__}, vs {name}"
                for p, q in zip(model.parameters(), target.parameters()):
                    same(p.full_tensor(), q.full_tensor(), what, implementation)
                same_states(opt, target_opt, what, implementation)


def worker(rank, store, tmp, cases, fused_tolerance):
    global FUSED_TOLERANCE  # spawn imports this file afresh in each rank: not as __main__
    FUSED_TOLERANCE = fused_tolerance
    # A file store, not a TCP port: no port to race for on a busy machine.  The timeout turns a rank
    # left waiting in a collective by the other's failure into an error, not a hang; it is generous
    # because on a loaded machine one rank may spend over a minute compiling the C kernels on their
    # first use (a fresh cache) while the other waits (60 s aborted a rank once, under load).
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=300))
    results = {}
    for case in cases:
        try:
            globals()["case_" + case](rank, tmp)
            results[case] = "ok"
        except Exception:
            results[case] = traceback.format_exc()
        dist.barrier()
    with open(os.path.join(tmp, f"results-{rank}.json"), "w") as f:
        json.dump(results, f)
    # Both ranks leave together (the barrier above): a rank that tears its gloo group down while
    # the other still runs makes the other's gloo threads abort.
    dist.destroy_process_group()


if __name__ == "__main__":
    tmp, cases, tolerance = sys.argv[1], sys.argv[2].split(","), json.loads(sys.argv[3])
    mp.spawn(worker, args=(os.path.join(tmp, "store"), tmp, cases, tolerance), nprocs=WORLD)
'''


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict[str, dict[int, str]]:
    """Every case's outcome per rank: "ok" or the traceback."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    if not c_launch.available():
        pytest.skip("no C compiler (the fused cases need one)")
    tmp = tmp_path_factory.mktemp("distributed")
    script = tmp / "cases.py"  # a file, not -c: multiprocessing's spawn re-imports __main__
    script.write_text(textwrap.dedent(SCRIPT))
    tolerance = json.dumps(TOLERANCES[torch.float32])
    run = subprocess.run([sys.executable, str(script), str(tmp), ",".join(CASES), tolerance], capture_output=True,
                         text=True, timeout=600, env={**os.environ, "OPTGEN_CACHE_DIR": str(tmp / "cache")})
    assert run.returncode == 0, run.stdout + run.stderr
    per_rank = [json.loads((tmp / f"results-{rank}.json").read_text()) for rank in range(2)]
    return {case: {rank: per_rank[rank][case] for rank in range(2)} for case in CASES}


@pytest.mark.parametrize("case", CASES)
def test_distributed_case_matches_torch_optim(results, case):
    failures = {rank: outcome for rank, outcome in results[case].items() if outcome != "ok"}
    assert not failures, "\n".join(f"rank {rank}:\n{outcome}" for rank, outcome in failures.items())
