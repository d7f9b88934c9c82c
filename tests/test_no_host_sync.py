"""No loss function reads a tensor's value on the host (a hidden device synchronisation per step).

Tensors on the ``meta`` device have shapes and dtypes but no data: every operation a loss runs on
the GPU also runs on them, except reading a value back (``.item()``, ``int(t)``, ``bool(t)``),
which raises. So a loss that runs on meta tensors is free of host synchronisations, and this runs
on the CPU-only CI.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import Tensor

import kdloss.functional as KF
from kdloss import LossParts


def _z(*shape: int) -> Tensor:
    return torch.zeros(*shape, device="meta")


def _labels() -> Tensor:
    return torch.zeros(4, dtype=torch.long, device="meta")


CASES: dict[str, Callable[[], object]] = {
    "soft_kl": lambda: KF.soft_kl(_z(4, 5), _z(4, 5), mask=torch.ones(4, dtype=torch.bool, device="meta")),
    "kd_ce_loss": lambda: KF.kd_ce_loss(_z(4, 5), _z(4, 5), _labels()),
    "dkd_loss": lambda: KF.dkd_loss(_z(4, 5), _z(4, 5), _labels()),
    "dist_loss": lambda: KF.dist_loss(_z(4, 5), _z(4, 5)),
    "hint_loss": lambda: KF.hint_loss(_z(4, 5), _z(4, 5)),
    "cosine_hidden_loss": lambda: KF.cosine_hidden_loss(_z(4, 5), _z(4, 5)),
    "attention_loss": lambda: KF.attention_loss(_z(4, 3, 2, 2), _z(4, 3, 2, 2)),
    "sp_loss": lambda: KF.sp_loss(_z(4, 5), _z(4, 5)),
    "cc_loss": lambda: KF.cc_loss(_z(4, 5), _z(4, 5)),
    "pkt_loss": lambda: KF.pkt_loss(_z(4, 5), _z(4, 5)),
    "rkd_loss": lambda: KF.rkd_loss(_z(4, 5), _z(4, 5)),
    "nst_loss": lambda: KF.nst_loss(_z(4, 3, 2, 2), _z(4, 3, 2, 2)),
    "fsp_loss": lambda: KF.fsp_loss([_z(4, 3, 2, 2)] * 2, [_z(4, 3, 2, 2)] * 2),
    "ft_loss": lambda: KF.ft_loss(_z(4, 3, 2, 2), _z(4, 3, 2, 2)),
    "ab_loss": lambda: KF.ab_loss(_z(4, 3, 2, 2), _z(4, 3, 2, 2)),
    "hcl_loss": lambda: KF.hcl_loss([_z(4, 3, 4, 4)], [_z(4, 3, 4, 4)]),
    "vid_loss": lambda: KF.vid_loss(_z(4, 3, 2, 2), _z(4, 3, 2, 2), _z(3)),
    "cohort_kd": lambda: KF.cohort_kd(_z(4, 5), _z(2, 4, 5), _labels()),
    "paired_head_kd": lambda: KF.paired_head_kd(_z(2, 4, 5), _z(2, 4, 5), _labels()),
    "tofd_loss": lambda: KF.tofd_loss(_z(2, 4, 5), _z(2, 4, 5), _labels(), [_z(4, 3)] * 2, [_z(4, 3)] * 2),
    "tofd_authors_loss": lambda: KF.tofd_authors_loss(
        _z(2, 4, 5), _z(2, 4, 5), _labels(), [_z(4, 3)] * 2, [_z(4, 6)] * 2, [_z(6, 3)] * 2, temperature=2.0
    ),
    "self_distillation_loss": lambda: KF.self_distillation_loss(_z(2, 4, 5), _z(4, 5), _labels()),
    "orthogonality_penalty": lambda: KF.orthogonality_penalty(_z(3, 3)),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_loss_runs_on_meta_tensors(name: str) -> None:
    """Fails with 'cannot be called on meta tensors' where a loss reads a value on the host."""
    out = CASES[name]()
    total = out.total if isinstance(out, LossParts) else out
    assert isinstance(total, Tensor)
    assert total.device.type == "meta"


def test_dkd_loss_still_checks_labels_on_cpu() -> None:
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 5\)"):
        KF.dkd_loss(torch.zeros(2, 5), torch.zeros(2, 5), torch.tensor([0, 5]))


def _zg(*shape: int) -> Tensor:
    return torch.zeros(*shape, device="meta", requires_grad=True)


# forward + backward: the analytic backwards (and what they read) must not read values either
GRAD_CASES: dict[str, Callable[[Tensor], object]] = {
    "soft_kl": lambda s: KF.soft_kl(s, _z(4, 5), temperature=2.0),
    "soft_kl reverse, masked": lambda s: KF.soft_kl(
        s, _z(4, 5), direction="reverse", mask=torch.ones(4, dtype=torch.bool, device="meta")
    ),
    "soft_kl jsd, none": lambda s: KF.soft_kl(s, _z(4, 5), direction="jsd", reduction="none").sum(),
    "kd_ce_loss": lambda s: KF.kd_ce_loss(s, _z(4, 5), _labels(), alpha=0.5, temperature=2.0),
    "dkd_loss": lambda s: KF.dkd_loss(s, _z(4, 5), _labels()),
    "dist_loss": lambda s: KF.dist_loss(s, _z(4, 5)),
}
MAP_CASES: dict[str, Callable[[Tensor], object]] = {
    "attention_loss": lambda f: KF.attention_loss(f, _z(4, 3, 2, 2)),
    "ft_loss repdistiller": lambda f: KF.ft_loss(f, _z(4, 3, 2, 2), variant="repdistiller"),
    "ab_loss": lambda f: KF.ab_loss(f, _z(4, 3, 2, 2)),
    "vid_loss": lambda f: KF.vid_loss(f, _z(4, 3, 2, 2), _zg(3)),
    "hint_loss": lambda f: KF.hint_loss(f, _z(4, 3, 2, 2)),
    "nst_loss": lambda f: KF.nst_loss(f, _z(4, 3, 2, 2)),
    "sp_loss": lambda f: KF.sp_loss(f, _z(4, 3, 2, 2)),
    "hcl_loss": lambda f: KF.hcl_loss([f], [_z(4, 3, 2, 2)]),
}


@pytest.mark.parametrize("name", sorted(GRAD_CASES))
def test_logit_loss_and_gradient_run_on_meta_tensors(name: str) -> None:
    s = _zg(4, 5)
    out = GRAD_CASES[name](s)
    assert isinstance(out, Tensor)
    (g,) = torch.autograd.grad(out, s)
    assert g.device.type == "meta"
    assert g.shape == s.shape


@pytest.mark.parametrize("name", sorted(MAP_CASES))
def test_feature_loss_and_gradient_run_on_meta_tensors(name: str) -> None:
    f = _zg(4, 3, 2, 2)
    out = MAP_CASES[name](f)
    assert isinstance(out, Tensor)
    (g,) = torch.autograd.grad(out, f)
    assert g.device.type == "meta"
    assert g.shape == f.shape


def test_crd_step_runs_on_meta_tensors() -> None:
    """One training step without validation: scoring, Z, NCE, backward and the bank update read nothing."""
    from kdloss import CRDLoss

    crd = CRDLoss(6, 5, 32, feat_dim=4, n_negatives=8, validate=False).to("meta")
    fs = _zg(3, 6)
    loss = crd(fs, _z(3, 5), torch.zeros(3, dtype=torch.long, device="meta"))
    loss.backward()
    crd(_zg(3, 6), _z(3, 5), torch.zeros(3, dtype=torch.long, device="meta"))  # flushes the first update
    assert fs.grad is not None
    assert fs.grad.device.type == "meta"
