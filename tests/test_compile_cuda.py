"""All distillation methods: torch.compile(fullgraph=True) equals eager; CUDA equals CPU (skipped without a GPU)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import Tensor

from kdloss.functional import (
    ab_loss,
    cc_loss,
    dist_loss,
    dkd_loss,
    fsp_loss,
    ft_loss,
    hcl_loss,
    nst_loss,
    pkt_loss,
    rkd_loss,
    sp_loss,
    vid_loss,
)


def _inputs(device: str) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(0)
    shapes = {"logits_s": (4, 5), "logits_t": (4, 5), "emb_s": (4, 3), "emb_t": (4, 6), "map_s": (2, 3, 4, 4)}
    out = {k: torch.randn(*v, generator=g).to(device) for k, v in shapes.items()}
    out["map_t"] = torch.randn(2, 3, 4, 4, generator=g).to(device)
    out["labels"] = torch.tensor([0, 4, 2, 1], device=device)
    return out


CALLS: dict[str, Callable[[dict[str, Tensor]], Tensor]] = {
    "dkd": lambda x: dkd_loss(x["logits_s"], x["logits_t"], x["labels"]),
    "dist": lambda x: dist_loss(x["logits_s"], x["logits_t"], temperature=4.0),
    "rkd": lambda x: rkd_loss(x["emb_s"], x["emb_t"]),
    "pkt": lambda x: pkt_loss(x["emb_s"], x["emb_t"]),
    "sp": lambda x: sp_loss(x["map_s"], x["map_t"]),
    "cc": lambda x: cc_loss(x["emb_s"], x["emb_t"]),
    "nst": lambda x: nst_loss(x["map_s"], x["map_t"]),
    "fsp": lambda x: fsp_loss([x["map_s"], x["map_s"]], [x["map_t"], x["map_t"]]),
    "vid": lambda x: vid_loss(x["map_s"], x["map_t"], x["map_t"].new_ones(3)),
    "ab": lambda x: ab_loss(x["map_s"], x["map_t"]),
    "ft": lambda x: ft_loss(x["map_s"], x["map_t"]),
    "hcl": lambda x: hcl_loss(x["map_s"], x["map_t"]),
}


@pytest.mark.parametrize("name", list(CALLS))
def test_compile_fullgraph_equals_eager(name: str) -> None:
    torch._dynamo.reset()
    x = _inputs("cpu")
    compiled = torch.compile(CALLS[name], fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(x), CALLS[name](x))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", list(CALLS))
def test_cuda_equals_cpu(name: str) -> None:
    torch.testing.assert_close(CALLS[name](_inputs("cuda")).cpu(), CALLS[name](_inputs("cpu")), atol=1e-5, rtol=1e-5)


def test_every_module_is_stateless_picklable_and_reprs_its_arguments() -> None:
    import pickle

    import kdloss

    modules = [
        kdloss.DKDLoss(beta=2.0),
        kdloss.DISTLoss(gamma=2.0),
        kdloss.SPLoss(),
        kdloss.CCLoss(order=3),
        kdloss.RKDLoss(angle_weight=0.0),
        kdloss.PKTLoss(reduction="sum"),
        kdloss.FSPLoss(variant="repdistiller"),
        kdloss.NSTLoss(degree=3),
        kdloss.VIDLoss(reduction="batchmean"),
        kdloss.ABLoss(margin=0.5),
        kdloss.FTLoss(p=2),
        kdloss.HCLLoss(levels=(2, 1)),
    ]
    for m in modules:
        assert m.state_dict() == {}
        assert repr(pickle.loads(pickle.dumps(m))) == repr(m)
    assert [repr(m).split("(", 1)[1] for m in modules[:2]] == [
        "alpha=1.0, beta=2.0, temperature=4.0, reduction='batchmean')",
        "beta=1.0, gamma=2.0, temperature=1.0, eps=1e-08)",
    ]
