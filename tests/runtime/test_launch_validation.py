"""Every tensor a native kernel (C; Triton, here in its interpreter) addresses is checked before a
launch, and a launch plan is never reused for a tensor laid out differently (Note [Plan keys] in
optgen/runtime/native.py, Note [Missing state]).  Cases that crashed (segfault, heap corruption)
run in a subprocess, so a crash fails the test."""
import json
import subprocess
import sys
import warnings

import pytest
import torch

import optgen
from optgen.runtime import c_launch

pytestmark = pytest.mark.skipif(not c_launch.available(), reason="no C compiler")

#: constructor kwargs that make every state exist (SGD's momentum buffer, Adam's max_exp_avg_sq)
KWARGS = {"SGD": dict(lr=0.1, momentum=0.9), "Adam": dict(amsgrad=True), "AdamW": dict(amsgrad=True)}
C_OPTIMIZERS = sorted(name for name, cls in optgen.OPTIMIZERS.items() if "c" in getattr(cls, "_kernels", {}))
TRITON_OPTIMIZERS = sorted(name for name, cls in optgen.OPTIMIZERS.items() if "triton" in getattr(cls, "_kernels", {}))


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


#: the native implementations: the Triton kernels run in Triton's interpreter on CPU tensors
NATIVE = ["c", pytest.param("triton", marks=pytest.mark.skipif(not _triton_available(), reason="no triton"))]

# One subprocess for every optimizer: for each state key of a stepped optimizer, a fresh one
# loads the state dict without it (a partial checkpoint) and steps with implementation="c";
# torch.optim's class, where there is one, steps the same checkpoint.  Prints one JSON line per case.
PARTIAL = r"""
import json, sys, torch, optgen
names, kwargs, implementation = json.loads(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3]

def outcome(make, sd, params):
    opt = make()
    before = [p.detach().clone() for p in params]
    state_before = {}
    for p in params:
        p.grad = torch.ones_like(p)
    try:
        opt.load_state_dict(sd)  # torch's ASGD reads state["eta"] here already
        state_before = {(i, k): v.clone() for i, s in enumerate(opt.state.values()) for k, v in s.items()
                        if isinstance(v, torch.Tensor)}
        opt.step()
        error = None
    except Exception as e:
        error = [type(e).__name__, str(e)]
    unchanged = all(torch.equal(b, p) for b, p in zip(before, params)) and all(
        torch.equal(state_before[i, k], v) for i, s in enumerate(opt.state.values()) for k, v in s.items()
        if (i, k) in state_before)
    return error, unchanged

for name in names:
    cls = optgen.OPTIMIZERS[name]
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(4, 5)), torch.nn.Parameter(torch.randn(3))]
    opt = cls(params, **kwargs.get(name, {}))
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    full = opt.state_dict()
    for key in sorted({k for s in full["state"].values() for k in s}):
        for index in full["state"]:
            if key not in full["state"][index]:
                continue
            sd = {"state": {i: {k: v for k, v in s.items() if (i, k) != (index, key)}
                            for i, s in full["state"].items()}, "param_groups": full["param_groups"]}
            def ours():
                o = cls(params, **kwargs.get(name, {}))
                o.implementation = implementation
                return o
            result = {"name": name, "key": key, "index": index, "ours": outcome(ours, sd, params),
                      "emptied": not sd["state"][index]}
            torch_cls = getattr(torch.optim, name, None)
            if torch_cls is not None:
                result["torch"] = outcome(lambda: torch_cls(params, **kwargs.get(name, {})), sd, params)
            print(json.dumps(result), flush=True)
"""


@pytest.mark.parametrize("implementation", NATIVE)
def test_partial_checkpoint_is_torchs_key_error_for_every_native_optimizer(implementation):
    names = C_OPTIMIZERS if implementation == "c" else TRITON_OPTIMIZERS
    run = subprocess.run([sys.executable, "-c", PARTIAL, json.dumps(names), json.dumps(KWARGS), implementation],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    results = [json.loads(line) for line in run.stdout.splitlines()]
    assert {r["name"] for r in results} == set(names)
    lazy = {name: set(optgen.OPTIMIZERS[name]._lazy_state) for name in names}
    for r in results:
        error, unchanged = r["ours"]
        case = f"{r['name']} without state[{r['index']}][{r['key']!r}]"
        if "torch" in r and (r["torch"][0] is None or r["torch"][0][0] == "KeyError"):
            # torch's exception, word for word (SGD's lazily created momentum buffer: no error)
            assert error == r["torch"][0], case
        elif "torch" in r:
            # torch's Adafactor reads state.get(key) and fails later, in its own words
            # (AssertionError "row_var and col_var should be defined..."): ours names the key
            assert r["torch"][0] is not None and error == ["KeyError", repr(r["key"])], (case, r["torch"])
        elif r["key"] in lazy[r["name"]] or r["emptied"]:  # an empty state starts afresh, as in torch
            assert error is None, case
        else:
            assert error == ["KeyError", repr(r["key"])], case
        if error is not None:
            assert unchanged, f"{case}: a refused step modified parameters or state"


def test_partial_checkpoint_adam_fused_matches_torch():
    code = r"""
import torch, optgen
for mod in (torch.optim, optgen):
    w = torch.nn.Parameter(torch.randn(4, 4))
    opt = mod.Adam([w], fused=True)
    w.grad = torch.randn(4, 4)
    opt.step()
    sd = opt.state_dict()
    del sd["state"][0]["exp_avg_sq"]
    opt = mod.Adam([w], fused=True)
    opt.load_state_dict(sd)
    before = w.detach().clone()
    try:
        opt.step()
    except KeyError as e:
        print(mod.__name__, repr(e), torch.equal(before, w))
"""
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.split("\n")[:2] == ["torch.optim KeyError('exp_avg_sq') True",
                                          "optgen KeyError('exp_avg_sq') True"]


def test_none_state_is_a_type_error_not_a_crash():
    code = r"""
import torch, optgen
w = torch.nn.Parameter(torch.randn(4, 4))
opt = optgen.Adam([w], fused=True)
w.grad = torch.randn(4, 4)
opt.step()
opt.state[w]["exp_avg_sq"] = None
before = w.detach().clone()
try:
    opt.step()
except TypeError as e:
    print("TypeError", torch.equal(before, w))
"""
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip() == "TypeError True"


def _adam_pair(implementation):
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(4, 4))
    ref = torch.nn.Parameter(w.detach().clone())
    ours = optgen.Adam([w], lr=0.1)
    ours.implementation = implementation
    return w, ours, ref, optgen.Adam([ref], lr=0.1, foreach=False)


@pytest.mark.parametrize("implementation", NATIVE)
def test_regrad_viewed_at_same_address_steps_like_the_for_loop(implementation):
    w, ours, ref, loop = _adam_pair(implementation)
    buf = torch.arange(16, dtype=torch.float32) / 7 - 1
    for view in (lambda: buf.view(4, 4), lambda: buf.view(4, 4).t(), lambda: buf.view(4, 4)):
        w.grad, ref.grad = view(), view().clone()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the transposed step falls back to the for-loop
            ours.step()
        loop.step()
        # the C kernel and the for-loop differ by an ulp (contracted multiply-adds); a gradient
        # read in the wrong order moves elements by about lr = 0.1
        torch.testing.assert_close(w, ref, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("implementation", NATIVE)
def test_transposed_gradient_warns_and_steps_like_the_for_loop(implementation):
    w, ours, ref, loop = _adam_pair(implementation)
    g = torch.randn(4, 4)
    w.grad, ref.grad = g.t(), g.t().contiguous()
    with pytest.warns(UserWarning, match="not contiguous; this group steps with the for-loop kernel") as record:
        ours.step()
    assert record[0].filename == __file__  # the warning points at the caller's step(), not at torch
    loop.step()
    torch.testing.assert_close(w, ref, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("implementation", NATIVE)
def test_non_contiguous_state_from_a_checkpoint_steps_like_the_for_loop(implementation):
    w, ours, ref, loop = _adam_pair(implementation)
    for _ in range(2):
        w.grad = ref.grad = torch.randn(4, 4)
        ours.step()
        loop.step()
    for opt, p in ((ours, w), (loop, ref)):  # a transposed view that survived torch.save
        opt.state[p]["exp_avg"] = opt.state[p]["exp_avg"].t().contiguous().t()
    for _ in range(2):
        w.grad = ref.grad = torch.randn(4, 4)
        with pytest.warns(UserWarning, match="not contiguous"):
            ours.step()
        loop.step()
    torch.testing.assert_close(w, ref, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(ours.state[w]["exp_avg"], loop.state[ref]["exp_avg"], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("implementation", NATIVE)
def test_smaller_state_at_the_same_address_is_checked_again(implementation):
    w, ours, _, _ = _adam_pair(implementation)
    buf = torch.zeros(16)
    w.grad = torch.randn(4, 4)
    ours.step()
    ours.state[w]["exp_avg"] = buf.view(4, 4)
    ours.step()  # plan for buf.view(4, 4)
    ours.state[w]["exp_avg"] = buf[:3]  # same address, 3 elements
    before = w.detach().clone()
    with pytest.raises(RuntimeError, match=r"the state( 1)? of parameter 0 is torch.float32 \(3,\)"):
        ours.step()
    assert torch.equal(before, w)


SHRUNK_STORAGE = """
import os, torch, optgen
from optgen.runtime import step_guard
if os.environ["OPTGEN_STEP_GUARD"] != "python" and step_guard.native(wait=True) is None:
    print("no native guard:", step_guard.unavailable())
g = torch.Generator().manual_seed(0)
p = torch.randn(4000, generator=g).requires_grad_()
opt = optgen.Adam([p], lr=1e-2)  # float32 state, the C kernel (the cached step, after the first)
p.grad = torch.randn(4000, generator=g)
opt.step()
state = opt.state[p]["exp_avg"]
address = state.data_ptr()
state.untyped_storage().resize_(0)
state.untyped_storage().resize_(15000)  # (glibc hands back the freed chunk: the same address)
print("same address:", state.data_ptr() == address, flush=True)
try:
    opt.step()
    print("stepped")
except RuntimeError as e:
    print("error:", e)
"""


@pytest.mark.skipif(not c_launch.available(), reason="needs a C compiler")
@pytest.mark.parametrize("guard", ["native", "python"])
def test_a_state_storage_shrunk_in_place_at_the_same_address_is_an_error_not_a_heap_overflow(guard):
    """A state's storage freed and allocated again smaller in place: the allocator may hand back its
    address.  The Python guard of the cached step compared the state's address, shape and dtype,
    not its storage, and the native guard's fall-back, the checked path, reused a plan keyed on the
    same: the kernel wrote 16000 bytes into 15000 (heap corruption; the process died later).  Both
    see the storage now: an error.  (torch.optim.Adam itself crashes the process here.)"""
    import os

    env = {**os.environ, "OPTGEN_STEP_GUARD": "python" if guard == "python" else ""}
    result = subprocess.run([sys.executable, "-c", SHRUNK_STORAGE], capture_output=True, text=True, timeout=120,
                            env=env)
    if "same address: False" in result.stdout:
        pytest.skip("the allocator put the smaller storage elsewhere (the plan was checked again anyway)")
    if "no native guard" in result.stdout:
        pytest.skip(result.stdout)
    assert result.returncode == 0, (result.returncode, result.stderr[-2000:])
    assert "lies outside its storage" in result.stdout, result.stdout
