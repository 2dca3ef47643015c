"""SparseAdam against torch.optim.SparseAdam on embeddings with sparse gradients."""
import copy

import pytest
import torch

import optgen


def embeddings(dtype):
    torch.manual_seed(0)
    first = torch.nn.Embedding(30, 4, sparse=True).to(dtype)
    second = torch.nn.Embedding(30, 4, sparse=True).to(dtype)
    second.load_state_dict(first.state_dict())
    return first, second


def train(pairs, steps, start=0):
    for k in range(start, start + steps):
        # repeated indices: the gradient must be coalesced before the update
        idx = torch.randint(0, 30, (8,), generator=torch.Generator().manual_seed(k))
        for emb, opt in pairs:
            opt.zero_grad()
            (emb(idx) ** 2).sum().backward()
            opt.step()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("implementation", ["forloop", "foreach"])
@pytest.mark.parametrize("kwargs", [{}, dict(lr=0.01, betas=(0.8, 0.99), eps=1e-6, maximize=True)], ids=str)
def test_matches_torch_exactly(kwargs, implementation, dtype):
    ours_emb, torch_emb = embeddings(dtype)
    ours = optgen.SparseAdam(ours_emb.parameters(), **kwargs)
    ours.implementation = implementation
    theirs = torch.optim.SparseAdam(torch_emb.parameters(), **kwargs)
    train([(ours_emb, ours), (torch_emb, theirs)], 25)
    p, q = ours_emb.weight, torch_emb.weight
    torch.testing.assert_close(p, q, rtol=0, atol=0)
    assert ours.state[p]["step"] == theirs.state[q]["step"] == 25 and type(ours.state[p]["step"]) is int
    for key in ("exp_avg", "exp_avg_sq"):
        torch.testing.assert_close(ours.state[p][key], theirs.state[q][key], rtol=0, atol=0)
    assert ours.state_dict()["param_groups"] == theirs.state_dict()["param_groups"]


def test_checkpoint_round_trip_with_torch():
    ours_emb, torch_emb = embeddings(torch.float64)
    theirs = torch.optim.SparseAdam(torch_emb.parameters(), lr=0.01)
    train([(torch_emb, theirs)], 5)
    ours_emb.load_state_dict(torch_emb.state_dict())
    ours = optgen.SparseAdam(ours_emb.parameters(), lr=0.01)
    ours.load_state_dict(copy.deepcopy(theirs.state_dict()))
    train([(ours_emb, ours), (torch_emb, theirs)], 5, start=5)
    torch.testing.assert_close(ours_emb.weight, torch_emb.weight, rtol=0, atol=0)


@pytest.mark.parametrize("kwargs", [dict(lr=0.0), dict(eps=0.0), dict(betas=(1.0, 0.9)), dict(betas=(0.9, -1.0))],
                         ids=str)
def test_constructor_errors_match_torch(kwargs):
    def error(cls):
        try:
            cls([torch.zeros(2, requires_grad=True)], **kwargs)
        except Exception as e:  # noqa: BLE001
            return type(e), str(e)
    assert error(torch.optim.SparseAdam) is not None
    assert error(optgen.SparseAdam) == error(torch.optim.SparseAdam)


def test_dense_gradient_error_matches_torch():
    for cls in (optgen.SparseAdam, torch.optim.SparseAdam):
        p = torch.zeros(3, requires_grad=True)
        p.grad = torch.ones(3)
        message = "^SparseAdam does not support dense gradients, please consider Adam instead$"
        with pytest.raises(RuntimeError, match=message):
            cls([p]).step()
