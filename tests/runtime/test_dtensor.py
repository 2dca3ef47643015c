"""Tensor subclasses and the native kernels (Note [Tensor subclasses] in optgen/runtime/subclasses.py):
FSDP2's DTensors run the C kernel on their local shards and match torch's fused optimizers; what a
shard cannot be updated alone runs the for-loop with one warning.  Each distributed case runs in
fresh interpreters (a C kernel handed a DTensor's address used to segfault)."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

import optgen
from optgen.runtime import c_launch

pytestmark = pytest.mark.skipif(not c_launch.available(), reason="no C compiler")


def _gloo() -> None:
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")


def run(code: str, tmp_path, timeout: int = 300) -> str:
    script = tmp_path / "case.py"  # a file, not -c: multiprocessing's spawn re-imports __main__
    script.write_text(textwrap.dedent(code))
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                            timeout=timeout, env={**os.environ, "OPTGEN_CACHE_DIR": str(tmp_path / "cache")})
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


# Two ranks, so each local shard is a part of the tensor (7 rows shard 4 + 3, 3 rows 2 + 1), and
# a kernel that used the global size or the DTensor's own address would be wrong or crash.
FSDP2 = """
    import copy, os, warnings, torch, torch.distributed as dist, torch.multiprocessing as mp

    def worker(rank, world, store):
        # A file store, not a TCP port: no port to race for on a busy machine
        dist.init_process_group("gloo", init_method=f"file://{{store}}", rank=rank, world_size=world)
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        from torch.distributed.tensor import DTensor
        import optgen
        from optgen.runtime import c_launch
        launches = []
        launch = c_launch.launch
        c_launch.launch = lambda *a, **k: (launches.append(len(k["grads"])), launch(*a, **k))[1]
        mesh = init_device_mesh("cpu", (world,))
        torch.manual_seed(0)
        base = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3))
        data = [torch.randn(4, 5) for _ in range(3)]

        def train(make):
            model = copy.deepcopy(base)
            for layer in model:
                if isinstance(layer, torch.nn.Linear):
                    fully_shard(layer, mesh=mesh)
            fully_shard(model, mesh=mesh)
            opt = make(model.parameters())
            for x in data:
                model(x[rank::world]).square().sum().backward()
                opt.step()
                opt.zero_grad()
            return model, opt

        # torch's fused SGD has no DTensor sharding rule: its for-loop is the reference there
        for name, kw, theirs in [("AdamW", dict(lr=0.1, weight_decay=0.1, amsgrad=True), dict(fused=True)),
                                 ("SGD", dict(lr=0.1, momentum=0.9, nesterov=True), dict(foreach=False))]:
            reference, _ = train(lambda ps: getattr(torch.optim, name)(ps, **theirs, **kw))
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # no fallback warning: the kernel runs on the shards
                launches.clear()
                model, opt = train(lambda ps: getattr(optgen, name)(ps, fused=True, **kw))
            assert launches == [4, 4, 4], (name, launches)  # one C launch per step, all 4 shards
            for p, e in zip(model.parameters(), reference.parameters()):
                torch.testing.assert_close(p.full_tensor(), e.full_tensor(), msg=name)
                for key, value in opt.state[p].items():  # momentum_buffer is made by the kernel
                    if value.dim():
                        assert type(value) is DTensor and value.placements == p.placements, (name, key)
                        assert value.to_local().shape == p.to_local().shape, (name, key)
            getattr(torch.optim, name)(reference.parameters(), **kw).load_state_dict(opt.state_dict())
        # Both ranks leave together: a rank that tears its gloo group down while the other still
        # runs makes the other's gloo threads abort ("terminate called without an active exception")
        dist.barrier()
        dist.destroy_process_group()

    if __name__ == "__main__":
        mp.spawn(worker, args=(2, {store!r}), nprocs=2)
        print("ok")
"""


def test_fsdp2_fused_matches_torch_fused_on_two_ranks(tmp_path):
    _gloo()
    assert "ok" in run(FSDP2.format(store=str(tmp_path / "store")), tmp_path)


# One process: what does not run on the local shard falls back to the for-loop, said once, and
# computes what the for-loop computes.
FALLBACKS = """
    import warnings, torch, torch.distributed as dist, optgen
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import distribute_tensor, Replicate, Shard
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    mesh = init_device_mesh("cpu", (1,))
    torch.manual_seed(0)
    start = [torch.randn(6, 5), torch.randn(7)]
    grads = [[torch.randn_like(t) for t in start] for _ in range(3)]

    def train(make, grad_placement=Shard(0)):
        params = [torch.nn.Parameter(distribute_tensor(t.clone(), mesh, [Shard(0)])) for t in start]
        opt = make(params)
        for gs in grads:
            for p, g in zip(params, gs):
                p.grad = distribute_tensor(g, mesh, [grad_placement])
            opt.step()
        return [p.full_tensor() for p in params]

    def forced(cls, implementation, **kw):
        def make(ps):
            opt = cls(ps, **kw)
            opt.implementation = implementation
            return opt
        return make

    cases = {
        # Lamb reads norm(param): a shard's norm is not the tensor's
        "norm": (optgen.Lamb, {}, Shard(0), "reads whole tensors"),
        # gradients sharded unlike their parameters
        "placement": (optgen.Adam, dict(lr=0.1), Replicate(), "not sharded like the parameters"),
    }
    for case, (cls, kw, placement, cause) in cases.items():
        expected = train(forced(cls, "forloop", **kw), placement)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            first = train(forced(cls, "c", **kw), placement)
            again = train(forced(cls, "c", **kw), placement)
        for got in (first, again):
            for g, e in zip(got, expected):
                torch.testing.assert_close(g, e, rtol=0, atol=0, msg=case)
        messages = [str(w.message) for w in caught]
        assert len(messages) == 1 and cause in messages[0], (case, messages)
    dist.destroy_process_group()
    print("ok")
"""


def test_dtensors_a_shard_cannot_update_alone_run_the_for_loop(tmp_path):
    _gloo()
    assert "ok" in run(FALLBACKS, tmp_path)


def test_other_tensor_subclasses_run_the_for_loop_with_one_warning():
    import warnings

    import torch

    class Tagged(torch.Tensor):  # a subclass the runtime knows nothing about
        pass

    def train(implementation, wrap):
        p = torch.nn.Parameter(wrap(torch.linspace(-1, 1, 12)))
        opt = optgen.Adam([p], lr=0.1)
        opt.implementation = implementation
        for k in range(3):
            p.grad = wrap(torch.full((12,), 0.5 - k))
            opt.step()
        return p.detach().as_subclass(torch.Tensor)

    expected = train("forloop", lambda t: t)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = train("c", lambda t: t.as_subclass(Tagged))
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    messages = [str(w.message) for w in caught if "tensor subclass (Tagged)" in str(w.message)]
    assert len(messages) == 1, [str(w.message) for w in caught]


def test_which_specs_run_on_local_shards():
    # Decided by the compiler (optgen.ir.nodes.elementwise): the expected set is written from the
    # update rules — Lamb reads norm(param), Adafactor keeps reduced-shape state and reads
    # norm/numel, Muon orthogonalises the whole matrix.
    from optgen.generated import OPTIMIZERS

    from optgen.runtime.generated import GeneratedOptimizer

    reads_whole_tensors = {"Lamb", "Adafactor", "Muon"}
    generated = {name: cls for name, cls in OPTIMIZERS.items() if issubclass(cls, GeneratedOptimizer)}
    assert len(generated) >= 16  # every optimizer but the closure-driven LBFGS
    assert {name for name, cls in generated.items() if not cls._elementwise} == reads_whole_tensors
