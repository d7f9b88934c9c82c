"""pytest-benchmark entries for the distillation methods, at small CPU sizes (forward + backward).

Run ``pytest benchmarks/test_bench_methods.py --benchmark-only`` to time them. In CI the suite
runs with ``--benchmark-disable``: each entry then runs once and is a quick correctness check
(finite loss and gradient, and the value on a tiny float64 input equals the paper reference in
``tests/naive/{logit,relational,feature}.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

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
from tests import naive
from tests.helpers import single_thread

B, C, D = 32, 100, 64  # batch, classes, embedding size
MAP = (8, 16, 8, 8)  # feature maps


def _rand(*shape: int, seed: int, dtype: torch.dtype = torch.float32) -> Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _labels(b: int, c: int) -> Tensor:
    return torch.randint(0, c, (b,), generator=torch.Generator().manual_seed(0))


def _vid(m: Tensor, t: Tensor) -> Tensor:
    return vid_loss(m, t, torch.full((t.shape[1],), 2.0, dtype=t.dtype))


def _vid_ref(m: Tensor, t: Tensor) -> Tensor:
    return naive.vid(m, t, torch.full((t.shape[1],), 2.0, dtype=t.dtype))


# name: (kdloss call on (student, teacher), the paper reference, student shape, teacher shape)
CASES: dict[str, tuple[Callable[..., Tensor], Callable[..., Tensor], tuple[int, ...], tuple[int, ...]]] = {
    "dkd": (
        lambda s, t: dkd_loss(s, t, _labels(s.shape[0], s.shape[1])),
        lambda s, t: naive.dkd(s, t, _labels(s.shape[0], s.shape[1]), 1.0, 8.0, 4.0),
        (B, C),
        (B, C),
    ),
    "dist": (lambda s, t: dist_loss(s, t, eps=0.0), lambda s, t: naive.dist(s, t, 1.0, 1.0, 1.0), (B, C), (B, C)),
    "rkd": (rkd_loss, lambda s, t: naive.rkd(s, t, 25.0, 50.0, "all"), (B, D), (B, 2 * D)),
    "pkt": (
        lambda s, t: pkt_loss(s, t, reduction="sum", eps=0.0),
        lambda s, t: naive.pkt(s, t, True),
        (B, D),
        (B, 2 * D),
    ),
    "sp": (sp_loss, naive.sp, MAP, (MAP[0], 32, 4, 4)),
    "cc": (cc_loss, lambda s, t: naive.cc(s, t, 0.4, 2), (B, D), (B, 2 * D)),
    "nst": (nst_loss, lambda s, t: naive.nst(s, t, 2, 0.0), MAP, (MAP[0], 32, 8, 8)),
    "fsp": (
        lambda s, t: fsp_loss([s, s.flip(1)], [t, t.flip(1)]),
        lambda s, t: naive.fsp([s, s.flip(1)], [t, t.flip(1)], "paper"),
        MAP,
        MAP,
    ),
    "vid": (_vid, _vid_ref, MAP, MAP),
    "ab": (ab_loss, lambda s, t: naive.ab(s, t, 1.0), MAP, MAP),
    "ft": (ft_loss, lambda s, t: naive.ft(s, t, 1), MAP, MAP),
    "reviewkd_hcl": (hcl_loss, lambda s, t: naive.hcl([s], [t]), MAP, MAP),
}

TINY = {2: (3, 4), 4: (2, 2, 2, 2)}

# small CPU sizes: one intra-op thread (see tests/helpers.single_thread)
_one_thread = pytest.fixture(autouse=True, scope="module")(single_thread)


@pytest.mark.parametrize("name", list(CASES))
def test_bench_method(benchmark: Any, name: str) -> None:
    fn, ref, s_shape, t_shape = CASES[name]
    s = _rand(*s_shape, seed=1).requires_grad_(True)
    t = _rand(*t_shape, seed=2)

    def step() -> Tensor:
        s.grad = None
        loss = fn(s, t)
        loss.backward()
        return loss.detach()

    loss = benchmark(step)
    assert torch.isfinite(loss)
    assert s.grad is not None
    assert torch.isfinite(s.grad).all()
    # correctness on a tiny float64 input against the paper reference
    tiny_s = TINY[len(s_shape)]
    tiny_t = (tiny_s[0], tiny_s[1] + (1 if name in ("rkd", "pkt", "cc", "sp", "nst") else 0), *tiny_s[2:])
    ts, tt = _rand(*tiny_s, seed=3, dtype=torch.float64), _rand(*tiny_t, seed=4, dtype=torch.float64)
    torch.testing.assert_close(fn(ts, tt), ref(ts, tt), atol=1e-6, rtol=1e-6)
