"""CRD under DDP: 2 CPU processes (gloo), banks identical on every rank and equal to one process on the whole batch."""

from __future__ import annotations

import inspect
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from kdloss import ContrastMemory, CRDLoss

# DDP's per-forward buffer broadcast is not needed (the banks are kept identical); the argument's
# name changed in recent torch versions.
_NO_BUFFER_SYNC = (
    {"forward_sync_buffers": False}
    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters
    else {"broadcast_buffers": False}
)

WORLD, B, N, S_DIM, T_DIM, D, K, STEPS = 2, 4, 40, 12, 10, 8, 16, 3


def _make_crd() -> CRDLoss:
    torch.manual_seed(0)
    return CRDLoss(S_DIM, T_DIM, N, feat_dim=D, n_negatives=K)


def _global_batch(step: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(100 + step)
    fs = torch.randn(WORLD * B, S_DIM, generator=g)
    ft = torch.randn(WORLD * B, T_DIM, generator=g)
    idx = torch.randperm(N, generator=g)[: WORLD * B]
    idx[B] = idx[0]  # the same sample on both ranks (DistributedSampler pads this way): last (rank 1) wins
    neg = torch.randint(0, N, (WORLD * B, K), generator=g)
    emb = torch.nn.functional.normalize(torch.randn(2, WORLD * B, D, generator=g), dim=2)
    return fs, ft, idx, neg, emb


def _run(crd: torch.nn.Module, mem: ContrastMemory, rank: int | None) -> None:
    """STEPS training steps of CRD (explicit negatives, then sampled ones) and of a bare memory."""
    opt = torch.optim.SGD(crd.parameters(), lr=0.5)
    rows = slice(None) if rank is None else slice(rank * B, (rank + 1) * B)
    for step in range(STEPS):
        fs, ft, idx, neg, emb = _global_batch(step)
        # the last step samples its negatives (per rank): the banks do not depend on them
        negatives = neg[rows] if step < STEPS - 1 else None
        loss = crd(fs[rows], ft[rows], idx[rows], negatives=negatives)
        opt.zero_grad()
        loss.backward()
        opt.step()
        mem(emb[0, rows], emb[1, rows], idx[rows], neg[rows])


def _worker(rank: int, store_path: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    store = dist.FileStore(store_path, WORLD)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=WORLD)
    try:
        crd = _make_crd()
        # the banks are identical on every rank, so DDP's buffer broadcast is not needed
        ddp = DistributedDataParallel(crd, **_NO_BUFFER_SYNC)
        mem = ContrastMemory(N, D, n_negatives=K, generator=torch.Generator().manual_seed(1))
        torch.manual_seed(1000 + rank)  # different negatives per rank in the sampled step
        _run(ddp, mem, rank)
        torch.save({"crd": crd.state_dict(), "mem": mem.state_dict()}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_process_banks_are_identical_and_match_single_process(tmp_path: Path) -> None:
    mp.spawn(_worker, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=WORLD, join=True)
    r0 = torch.load(tmp_path / "rank0.pt")
    r1 = torch.load(tmp_path / "rank1.pt")
    for part in ("crd", "mem"):
        for key, value in r0[part].items():
            assert torch.equal(value, r1[part][key]), f"{part}.{key} differs between ranks"

    crd = _make_crd()
    mem = ContrastMemory(N, D, n_negatives=K, generator=torch.Generator().manual_seed(1))
    _run(crd, mem, None)
    # the bare memory got the same embeddings: bit-identical to the single process run
    for key in ("bank_student", "bank_teacher"):
        assert torch.equal(mem.state_dict()[key], r0["mem"][key]), f"mem.{key} differs from the single-process run"
    # Z: the mean over ranks of each rank's mean, equal to the global mean up to summation order
    torch.testing.assert_close(mem.normalizers, r0["mem"]["normalizers"], rtol=1e-6, atol=0)
    # through CRD the embeddings come from heads trained with DDP-averaged gradients (equal to the
    # single-process gradients up to rounding while the negatives are the same, i.e. before the last
    # step, whose update the last bank update does not see yet): equal to rounding
    single = crd.state_dict()
    for key in ("memory.bank_student", "memory.bank_teacher", "memory.normalizers"):
        torch.testing.assert_close(r0["crd"][key], single[key], rtol=1e-5, atol=1e-6)
    assert not torch.equal(single["memory.bank_student"], _make_crd().memory.bank_student)  # the run did update
