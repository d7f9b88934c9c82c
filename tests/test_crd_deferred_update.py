"""CRD bank update without a copy of the banks: written in place once no graph holds them, copied otherwise.

ContrastMemory scores against the banks themselves and defers each step's in-place update until
no autograd graph saved the bank (see its docstring). These tests pin down that every order of
forward/backward a user may write gives the textbook result, and that the usual loop never
copies a bank.
"""

from __future__ import annotations

import pytest
import torch

from kdloss import ContrastMemory
from tests.test_crd import B, D, K, N, _batch, _pair


def _ptrs(crd: torch.nn.Module) -> tuple[int, int]:
    mem = crd.memory
    return mem._buffers["bank_student"].data_ptr(), mem._buffers["bank_teacher"].data_ptr()


@pytest.mark.parametrize("method", ["matmul", "gather"])
def test_usual_loop_updates_banks_in_place_and_matches_reference(method: str) -> None:
    crd, naive = _pair(method)
    ptrs = _ptrs(crd)
    for step in range(4):
        fs, ft, idx, neg = _batch(step, dup=step == 2)
        fs1 = fs.clone().requires_grad_()
        loss = crd(fs1, ft, idx, negatives=neg)
        ref = naive(fs.view(B, -1), ft, idx, neg)
        loss.backward()
        torch.testing.assert_close(loss, ref, atol=1e-5, rtol=1e-5)
        assert _ptrs(crd) == ptrs, "the usual forward/backward loop must not copy a bank"
    torch.testing.assert_close(crd.memory.bank_student, naive.memory_v1, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(crd.memory.bank_teacher, naive.memory_v2, atol=1e-6, rtol=1e-5)
    assert _ptrs(crd) == ptrs


@pytest.mark.parametrize("method", ["matmul", "gather"])
def test_two_forwards_summed_into_one_backward_match_reference(method: str) -> None:
    crd, naive = _pair(method)
    naive_fs, ours_fs, losses, refs = [], [], [], []
    for step in range(2):
        fs, ft, idx, neg = _batch(10 + step)
        a, b = fs.clone().requires_grad_(), fs.clone().view(B, -1).requires_grad_()
        losses.append(crd(a, ft, idx, negatives=neg))  # step 2 scores against step 1's update
        refs.append(naive(b, ft, idx, neg))
        ours_fs.append(a)
        naive_fs.append(b)
    (losses[0] + losses[1]).backward()
    (refs[0] + refs[1]).backward()
    for a, b in zip(ours_fs, naive_fs, strict=True):
        torch.testing.assert_close(a.grad.view(B, -1), b.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        crd.embed_student.linear.weight.grad, naive.embed_s.linear.weight.grad, atol=1e-5, rtol=1e-5
    )
    torch.testing.assert_close(crd.memory.bank_student, naive.memory_v1, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(crd.memory.bank_teacher, naive.memory_v2, atol=1e-6, rtol=1e-5)


def test_retained_graph_keeps_its_banks_after_the_next_step() -> None:
    crd, _ = _pair("matmul")
    fs, ft, idx, neg = _batch(0)
    fs1 = fs.clone().requires_grad_()
    loss = crd(fs1, ft, idx, negatives=neg)
    loss.backward(retain_graph=True)
    first = fs1.grad.clone()
    ptrs = _ptrs(crd)
    fs2, ft2, idx2, neg2 = _batch(1)
    crd(fs2.requires_grad_(), ft2, idx2, negatives=neg2)  # the retained graph still holds the banks
    assert _ptrs(crd) != ptrs, "a bank held by a live graph must be copied, not written in place"
    fs1.grad = None
    loss.backward()  # the old graph sees the banks as they were when it was built
    torch.testing.assert_close(fs1.grad, first, atol=0, rtol=0)


def test_reads_before_backward_see_the_update() -> None:
    crd, naive = _pair("matmul")
    fs, ft, idx, neg = _batch(3, dup=True)
    loss = crd(fs.clone().requires_grad_(), ft, idx, negatives=neg)
    naive(fs.view(B, -1), ft, idx, neg)
    # attribute access, state_dict of the parent, named_buffers and .to() all see step 1's rows
    torch.testing.assert_close(crd.memory.bank_student, naive.memory_v1, atol=1e-6, rtol=1e-5)
    state = crd.state_dict()
    torch.testing.assert_close(state["memory.bank_teacher"], naive.memory_v2, atol=1e-6, rtol=1e-5)
    loss.backward()  # the graph was kept alive above: the update went to a copy, backward still works
    assert torch.isfinite(loss)


@pytest.mark.parametrize("read", ["attribute", "state_dict", "named_buffers", "to"])
def test_every_read_path_sees_the_update(read: str) -> None:
    mem = ContrastMemory(N, D, n_negatives=K)
    before = mem._buffers["bank_student"].clone()
    v = torch.nn.functional.normalize(torch.randn(B, D), dim=1).requires_grad_()
    idx = torch.arange(B)
    mem(v, v, idx)
    assert mem._pending is not None  # the graph of this step holds the banks: not written yet
    if read == "attribute":
        bank = mem.bank_student
    elif read == "state_dict":
        bank = mem.state_dict()["bank_student"]
    elif read == "named_buffers":
        bank = dict(mem.named_buffers())["bank_student"]
    else:
        bank = mem.to("cpu")._buffers["bank_student"]
    assert mem._pending is None
    expected = torch.nn.functional.normalize(0.5 * before[idx] + 0.5 * v.detach(), dim=1)
    torch.testing.assert_close(bank[idx], expected, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(bank[B:], before[B:], atol=0, rtol=0)


def test_no_grad_training_step_writes_at_once() -> None:
    mem = ContrastMemory(N, D, n_negatives=K)
    ptr = mem._buffers["bank_student"].data_ptr()
    v = torch.nn.functional.normalize(torch.randn(B, D), dim=1)
    before = mem._buffers["bank_student"].clone()
    with torch.no_grad():
        mem(v, v, torch.arange(B))
    assert mem._pending is None
    assert mem._buffers["bank_student"].data_ptr() == ptr
    assert not torch.equal(mem._buffers["bank_student"][:B], before[:B])
    torch.testing.assert_close(mem._buffers["bank_student"][B:], before[B:], atol=0, rtol=0)


def test_dropped_graph_lets_the_next_step_write_in_place() -> None:
    mem = ContrastMemory(N, D, n_negatives=K)
    ptr = mem._buffers["bank_teacher"].data_ptr()
    v = torch.nn.functional.normalize(torch.randn(B, D), dim=1).requires_grad_()
    ls, lt = mem(v, v, torch.arange(B))
    del ls, lt  # the graph is gone without a backward: nothing holds the banks any more
    mem(v.detach(), v.detach(), torch.arange(B, 2 * B))
    assert mem._buffers["bank_teacher"].data_ptr() == ptr
