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
