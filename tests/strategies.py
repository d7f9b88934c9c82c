"""Hypothesis strategies shared by every loss test: logits, feature maps, temperatures, options.

Tensors are drawn from a seed and a few structural choices (shape, scale, offset, peaked rows)
rather than element by element: that keeps each example cheap (properties run in well under a
second) while hypothesis still explores the shapes and scales that matter, and shrinks to the
smallest shape and the simplest scale on failure.

Example::

    from hypothesis import given
    from tests.strategies import PROPERTY_SETTINGS, logit_pairs, temperatures

    @PROPERTY_SETTINGS
    @given(pair=logit_pairs(), temperature=temperatures())
    def test_something(pair, temperature): ...
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from torch import Tensor

__all__ = [
    "PROPERTY_SETTINGS",
    "LogitPair",
    "betas",
    "directions",
    "feature_maps",
    "feature_pairs",
    "logit_pairs",
    "logit_shapes",
    "logits",
    "reductions",
    "row_masks",
    "seeds",
    "temperatures",
]

PROPERTY_SETTINGS = settings(
    max_examples=int(os.environ.get("KDLOSS_TEST_EXAMPLES", "40")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
"""The settings every property test uses: 40 examples (``KDLOSS_TEST_EXAMPLES`` raises it for a
deeper run), no deadline (CPU time is shared in CI)."""

seeds = st.integers(min_value=0, max_value=2**31 - 1)
"""Seeds for the tensors' random generator."""

SCALES: tuple[float, ...] = (0.0, 0.01, 0.3, 1.0, 3.0, 10.0)
"""Logit scales: 0 (uniform distributions), nearly uniform, typical, peaked."""


def reductions() -> st.SearchStrategy[str]:
    """Each value of :data:`kdloss.Reduction`."""
    return st.sampled_from(("none", "mean", "batchmean", "sum"))


def directions() -> st.SearchStrategy[str]:
    """Each KL direction of :func:`kdloss.functional.soft_kl`."""
    return st.sampled_from(("forward", "reverse", "jsd"))


def temperatures(min_value: float = 0.25, max_value: float = 20.0) -> st.SearchStrategy[float]:
    """Softening temperatures ``T > 0``: the usual ones (1, 2, 4, 8) and anything in the range."""
    return st.one_of(
        st.sampled_from([t for t in (1.0, 2.0, 4.0, 8.0) if min_value <= t <= max_value]),
        st.floats(min_value=min_value, max_value=max_value, allow_nan=False, allow_infinity=False),
    )


def betas() -> st.SearchStrategy[float]:
    """JSD mixture weights in the open interval (0, 1), away from the ends."""
    return st.one_of(st.just(0.5), st.floats(min_value=0.05, max_value=0.95))


def logit_shapes(
    *, min_batch: int = 1, max_batch: int = 6, max_len: int = 5, min_classes: int = 1, max_classes: int = 12
) -> st.SearchStrategy[tuple[int, ...]]:
    """``(B, C)`` or ``(B, L, C)`` shapes."""
    b = st.integers(min_batch, max_batch)
    c = st.integers(min_classes, max_classes)
    return st.one_of(st.tuples(b, c), st.tuples(b, st.integers(1, max_len), c))


@st.composite
def logits(
    draw: st.DrawFn,
    shape: tuple[int, ...] | st.SearchStrategy[tuple[int, ...]] | None = None,
    *,
    dtype: torch.dtype = torch.float64,
    scales: tuple[float, ...] = SCALES,
) -> Tensor:
    """One logits tensor: ``scale * N(0, 1) + offset``, some rows optionally peaked on one class."""
    if shape is None:
        shape = logit_shapes()
    if not isinstance(shape, tuple):
        shape = draw(shape)
    g = torch.Generator().manual_seed(draw(seeds))
    scale = draw(st.sampled_from(scales))
    offset = draw(st.sampled_from((0.0, 0.0, -5.0, 7.5)))
    x = torch.randn(shape, generator=g, dtype=torch.float64) * scale + offset
    if draw(st.booleans()) and x.numel():
        # Peaked rows: one class far above the others, as a confident teacher produces.
        peak = torch.randint(0, shape[-1], shape[:-1], generator=g)
        x = x + 8.0 * torch.nn.functional.one_hot(peak, shape[-1]).to(x.dtype) * (scale > 0)
    return x.to(dtype)


@dataclass(frozen=True)
class LogitPair:
    """A student/teacher pair of logits of one shape."""

    student: Tensor
    teacher: Tensor

    @property
    def rows(self) -> int:
        """Number of rows (samples, or positions of a sequence)."""
        return math.prod(self.student.shape[:-1])


@st.composite
def logit_pairs(
    draw: st.DrawFn,
    shapes: st.SearchStrategy[tuple[int, ...]] | None = None,
    *,
    dtype: torch.dtype = torch.float64,
    scales: tuple[float, ...] = SCALES,
) -> LogitPair:
    """Student and teacher logits of the same shape, drawn independently."""
    shape = draw(shapes if shapes is not None else logit_shapes())
    return LogitPair(draw(logits(shape, dtype=dtype, scales=scales)), draw(logits(shape, dtype=dtype, scales=scales)))


@st.composite
def row_masks(draw: st.DrawFn, rows_shape: tuple[int, ...], *, allow_empty: bool = True) -> Tensor:
    """A boolean mask over the rows (the logits' shape without ``C``); at least one True unless allowed."""
    g = torch.Generator().manual_seed(draw(seeds))
    p = draw(st.sampled_from((0.3, 0.7, 1.0)))
    m = torch.rand(rows_shape, generator=g) < p
    if not allow_empty and m.numel() and not bool(m.any()):
        m.view(-1)[0] = True
    return m


@st.composite
def feature_maps(
    draw: st.DrawFn,
    *,
    batch: int | None = None,
    channels: int | None = None,
    size: tuple[int, int] | None = None,
    dtype: torch.dtype = torch.float64,
) -> Tensor:
    """A ``(B, C, H, W)`` feature map: ``scale * N(0, 1)``, optionally ReLU'd like a real activation."""
    b = batch if batch is not None else draw(st.integers(1, 4))
    c = channels if channels is not None else draw(st.integers(1, 6))
    h, w = size if size is not None else (draw(st.integers(1, 6)), draw(st.integers(1, 6)))
    g = torch.Generator().manual_seed(draw(seeds))
    x = torch.randn(b, c, h, w, generator=g, dtype=torch.float64) * draw(st.sampled_from((0.1, 1.0, 5.0)))
    if draw(st.booleans()):
        x = x.relu()
    return x.to(dtype)


@st.composite
def feature_pairs(
    draw: st.DrawFn, *, same_channels: bool = True, dtype: torch.dtype = torch.float64
) -> tuple[Tensor, Tensor]:
    """Student and teacher feature maps with the same batch and spatial size (channels may differ)."""
    b, h, w = draw(st.integers(1, 4)), draw(st.integers(1, 5)), draw(st.integers(1, 5))
    cs = draw(st.integers(1, 6))
    ct = cs if same_channels else draw(st.integers(1, 6))
    s = draw(feature_maps(batch=b, channels=cs, size=(h, w), dtype=dtype))
    t = draw(feature_maps(batch=b, channels=ct, size=(h, w), dtype=dtype))
    return s, t
