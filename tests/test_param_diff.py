"""The owner of a parameter's diff (``caffe_compat.blob.ParamDiff``): a lent diff is never written
through, a handed-out view keeps its storage, one owner per parameter."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from caffe_compat.blob import CaffeParameter, ParamBlob, ParamDiff, data_generation, diff_owner, values_watched


def _param(values=(1.0, 2.0, 3.0)) -> torch.nn.Parameter:
    p = torch.nn.Parameter(torch.tensor(values))
    p.grad = torch.zeros(3)
    return p


def test_one_owner_per_parameter():
    p, q = _param(), _param()
    assert diff_owner(p) is diff_owner(p)
    assert diff_owner(p) is not diff_owner(q)
    assert diff_owner(p).param is p


@pytest.mark.parametrize(
    "write",
    [
        lambda o: o.own().add_(1.0),
        lambda o: o.writable().add_(1.0),
        lambda o: o.accumulate(torch.ones(3)),
        lambda o: (o.prepare_accumulation(cleared=False), o.param.grad.add_(1.0)),
    ],
    ids=["own", "writable", "accumulate", "autograd"],
)
def test_a_lent_diff_is_copied_before_a_write(write):
    p = _param()
    history = torch.tensor([5.0, 6.0, 7.0])
    owner = diff_owner(p)
    owner.lend(history)
    assert p.grad is history  # lent, not copied
    write(owner)
    assert p.grad is not history
    assert torch.equal(history, torch.tensor([5.0, 6.0, 7.0]))
    assert torch.equal(p.grad, history + 1.0)


def test_a_lent_diff_is_copied_before_a_view_is_handed_out():
    p = _param()
    history = torch.tensor([5.0, 6.0, 7.0])
    diff_owner(p).lend(history)
    view = ParamBlob(p).diff
    view[...] = 0.0
    assert torch.equal(history, torch.tensor([5.0, 6.0, 7.0]))
    assert torch.equal(p.grad, torch.zeros(3))


def test_a_handed_out_view_keeps_its_storage():
    """After ``ParamBlob.diff`` the view is the diff: a loan is copied into it, a clear zeroes it,
    autograd adds into it even after a clear."""
    p = _param()
    owner = diff_owner(p)
    view = ParamBlob(p).diff
    assert owner.exported
    owner.lend(torch.tensor([5.0, 6.0, 7.0]))
    np.testing.assert_array_equal(view, [5.0, 6.0, 7.0])
    assert owner.clear() is False
    np.testing.assert_array_equal(view, [0.0, 0.0, 0.0])
    owner.prepare_accumulation(cleared=True)
    assert p.grad is not None  # kept for autograd to add into
    owner.accumulate(torch.ones(3))
    np.testing.assert_array_equal(view, [1.0, 1.0, 1.0])


def test_clear_drops_a_diff_no_view_holds_and_autograd_hands_its_tensor_over():
    p = _param()
    owner = diff_owner(p)
    owner.lend(torch.ones(3))
    assert owner.clear() is True and p.grad is None
    owner.prepare_accumulation(cleared=True)
    assert p.grad is None
    g = torch.full((3,), 4.0)
    owner.accumulate(g, take=True)
    assert p.grad is g  # handed over, not added to zeros
    h = torch.ones(3)
    owner.accumulate(h)  # a diff exists now: added into
    assert p.grad is g and torch.equal(g, torch.full((3,), 5.0)) and torch.equal(h, torch.ones(3))


def test_a_diff_set_by_anyone_else_ends_the_loan():
    p = _param()
    history = torch.tensor([5.0, 6.0, 7.0])
    diff_owner(p).lend(history)
    mine = torch.ones(3)
    p.grad = mine  # a direct write, e.g. a user's
    assert diff_owner(p).own() is mine  # not replaced by a copy of the history
    diff_owner(p).lend(history)
    diff_owner(p).replace(None)
    assert diff_owner(p).writable() is not history
    assert torch.equal(p.grad, torch.zeros(3))


def test_a_parameter_with_an_owner_pickles_and_gets_a_fresh_owner():
    p = _param()
    diff_owner(p).lend(torch.ones(3))
    ParamBlob(p).diff  # noqa: B018 - exported
    back = pickle.loads(pickle.dumps(p))
    assert torch.equal(back.detach(), p.detach())
    owner = diff_owner(back)
    assert owner.param is back and not owner.exported
    assert isinstance(owner, ParamDiff)


def test_a_caffe_parameter_counts_data_reads_and_pickles_as_one():
    p = CaffeParameter(torch.arange(3.0))
    assert data_generation(p) == 0 and not values_watched(p)
    p.data.mul_(2)  # a temporary: counted, not alive
    assert data_generation(p) == 1 and not values_watched(p)
    kept = p.data
    assert data_generation(p) == 2 and values_watched(p)
    del kept
    assert not values_watched(p)
    back = pickle.loads(pickle.dumps(p))
    assert type(back) is CaffeParameter and torch.equal(back.detach(), p.detach())
    assert data_generation(back) == 0
    back.data.add_(1)
    assert data_generation(back) == 1
