"""Trainable parts of the methods in :mod:`kdloss.functional.feature` (VID, AB, FT, ReviewKD).

Like :mod:`kdloss.parts.adapters`, these modules belong to the student side: pass their parameters to
the student's optimiser, wrap them in DDP with the student and save them in its checkpoints
(:func:`kdloss.adapter_parameters` and :func:`kdloss.check_optimizer` accept them). The loss
arithmetic stays in the pure functions; these modules only compute the tensors the functions
compare. The one exception to "student side" is :class:`FTParaphraser`, which is trained on the
teacher's feature before distillation and then frozen.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdloss._validate import ShapeError, check_float, check_positive, check_positive_int

__all__ = ["ABConnector", "FTParaphraser", "FTTranslator", "ReviewKDFusion", "VIDRegressor"]


def _check_channels(**sizes: int) -> None:
    for name, value in sizes.items():
        check_positive_int(name, value)


def _check_map(name: str, x: Tensor, channels: int, owner: str) -> None:
    check_float(name, x)
    if x.ndim != 4 or x.shape[1] != channels:
        raise ShapeError(f"{owner} expects {name} of shape (B, {channels}, H, W), got {tuple(x.shape)}")


class VIDRegressor(nn.Module):
    """VID's trainable part: a 1x1-conv regressor for the mean and a learned per-channel variance.

    ``forward(student_feature)`` returns ``(pred_mean, variance)`` for
    :func:`kdloss.functional.vid_loss`: ``pred_mean`` is ``(B, out_channels, H, W)``, ``variance``
    is ``softplus(log_scale) + eps``, ``(out_channels,)``, initialised to ``init_variance``.
    The regressor is conv1x1 - ReLU - conv1x1 - ReLU - conv1x1 (the authors' CIFAR choice).

    Args:
        in_channels: the student feature's channels.
        mid_channels: the regressor's hidden channels.
        out_channels: the teacher feature's channels.
        init_variance: initial :math:`\\sigma^2` (5.0), must exceed ``eps``.
        eps: variance floor (1e-5).

    Ahn et al., *Variational Information Distillation for Knowledge Transfer*, CVPR 2019.

    Example:
        >>> import torch
        >>> reg = VIDRegressor(8, 16, 32)
        >>> mean, var = reg(torch.randn(2, 8, 4, 4))
        >>> mean.shape, var.shape, round(var[0].item(), 4)
        (torch.Size([2, 32, 4, 4]), torch.Size([32]), 5.0)
    """

    def __init__(
        self, in_channels: int, mid_channels: int, out_channels: int, *, init_variance: float = 5.0, eps: float = 1e-5
    ) -> None:
        super().__init__()
        _check_channels(in_channels=in_channels, mid_channels=mid_channels, out_channels=out_channels)
        check_positive("eps", eps)
        check_positive("init_variance", init_variance)
        if not init_variance > eps:
            raise ValueError(f"init_variance must be > eps = {eps}, got {init_variance!r}")
        self.in_channels, self.out_channels, self.eps = in_channels, out_channels, float(eps)
        self.regressor = nn.Sequential(
            nn.Conv2d(in_channels, mid_channels, 1, bias=False),
            nn.ReLU(),
            nn.Conv2d(mid_channels, mid_channels, 1, bias=False),
            nn.ReLU(),
            nn.Conv2d(mid_channels, out_channels, 1, bias=False),
        )
        raw = math.log(math.expm1(init_variance - eps))
        self.log_scale = nn.Parameter(torch.full((out_channels,), raw))

    def variance(self) -> Tensor:
        """The per-channel variance ``softplus(log_scale) + eps``, ``(out_channels,)``."""
        return F.softplus(self.log_scale) + self.eps

    def forward(self, student_feature: Tensor) -> tuple[Tensor, Tensor]:
        _check_map("student_feature", student_feature, self.in_channels, "VIDRegressor")
        return self.regressor(student_feature), self.variance()


class ABConnector(nn.Module):
    """AB's connector: conv1x1 + BatchNorm mapping the student's pre-activation to the teacher's channels.

    Its output is the ``student_preact`` of :func:`kdloss.functional.ab_loss`.

    Heo et al., *Knowledge Transfer via Distillation of Activation Boundaries Formed by Hidden
    Neurons*, AAAI 2019.

    Args:
        in_channels: the student pre-activation's channels.
        out_channels: the teacher pre-activation's channels.

    Raises:
        ValueError: if a channel count is not a positive int. ShapeError (in ``forward``): an input
            that is not ``(B, in_channels, H, W)``.

    Example:
        >>> import torch
        >>> ABConnector(8, 16)(torch.randn(2, 8, 4, 4)).shape
        torch.Size([2, 16, 4, 4])
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        _check_channels(in_channels=in_channels, out_channels=out_channels)
        self.in_channels = in_channels
        self.conv = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)

    def forward(self, student_preact: Tensor) -> Tensor:
        _check_map("student_preact", student_preact, self.in_channels, "ABConnector")
        out: Tensor = self.bn(self.conv(student_preact))
        return out


def _conv_bn(cin: int, cout: int, transpose: bool = False, batch_norm: bool = True) -> list[nn.Module]:
    conv: nn.Module = nn.ConvTranspose2d(cin, cout, 3, padding=1) if transpose else nn.Conv2d(cin, cout, 3, padding=1)
    return [conv, nn.BatchNorm2d(cout), nn.LeakyReLU(0.1)] if batch_norm else [conv, nn.LeakyReLU(0.1)]


class FTParaphraser(nn.Module):
    """FT's paraphraser: a 3x3-conv auto-encoder on the teacher's last feature map.

    ``forward(teacher_feature)`` returns ``(factor, reconstruction)``. Train it first to
    reconstruct the teacher's feature (e.g. ``F.mse_loss(reconstruction, teacher_feature)``),
    then freeze it and use ``factor`` as the teacher factor of :func:`kdloss.functional.ft_loss`.
    ``factor_channels = round(rate * in_channels)`` (the paper's paraphrase rate, 0.5;
    RepDistiller truncates, ``int(rate * in_channels)``, which differs for odd products).

    Encoder: three conv3x3 layers (``C -> C -> K -> K``), decoder: three transposed conv3x3 layers
    (``K -> K -> C -> C``), each followed by BatchNorm (``batch_norm=True``, the default) and
    LeakyReLU(0.1). RepDistiller's ``Paraphraser`` has no BatchNorm by default
    (``use_bn=False``): ``batch_norm=False`` builds that one (its ``Translator`` keeps BatchNorm,
    as :class:`FTTranslator`).

    Kim, Park & Kwak, *Paraphrasing Complex Network: Network Compression via Factor Transfer*,
    NeurIPS 2018.

    Args:
        in_channels: the teacher feature's channels.
        rate: the paraphrase rate, ``factor_channels / in_channels`` (> 0; 0.5 in the paper).
        batch_norm: put a BatchNorm after every convolution (``True``) or not (``False``,
            RepDistiller's default).

    Raises:
        ValueError: if ``in_channels`` is not a positive int or ``rate`` not a finite number > 0.
        TypeError: if ``rate`` is not a number or ``batch_norm`` not a bool. ShapeError (in
            ``forward``): an input that is not ``(B, in_channels, H, W)``.

    Example:
        >>> import torch
        >>> para = FTParaphraser(16)
        >>> factor, recon = para(torch.randn(2, 16, 4, 4))
        >>> factor.shape, recon.shape
        (torch.Size([2, 8, 4, 4]), torch.Size([2, 16, 4, 4]))
        >>> any(isinstance(m, torch.nn.BatchNorm2d) for m in FTParaphraser(16, batch_norm=False).modules())
        False
    """

    def __init__(self, in_channels: int, *, rate: float = 0.5, batch_norm: bool = True) -> None:
        super().__init__()
        _check_channels(in_channels=in_channels)
        check_positive("rate", rate)
        if not isinstance(batch_norm, bool):
            raise TypeError(f"batch_norm must be a bool, got {type(batch_norm).__name__}")
        self.in_channels = in_channels
        self.batch_norm = batch_norm
        self.factor_channels = max(1, round(rate * in_channels))
        c, k, bn = in_channels, self.factor_channels, batch_norm
        self.encoder = nn.Sequential(*_conv_bn(c, c, False, bn), *_conv_bn(c, k, False, bn), *_conv_bn(k, k, False, bn))
        self.decoder = nn.Sequential(*_conv_bn(k, k, True, bn), *_conv_bn(k, c, True, bn), *_conv_bn(c, c, True, bn))

    def forward(self, teacher_feature: Tensor) -> tuple[Tensor, Tensor]:
        _check_map("teacher_feature", teacher_feature, self.in_channels, "FTParaphraser")
        factor = self.encoder(teacher_feature)
        return factor, self.decoder(factor)

    def extra_repr(self) -> str:
        return f"in_channels={self.in_channels}, factor_channels={self.factor_channels}, batch_norm={self.batch_norm}"


class FTTranslator(nn.Module):
    """FT's translator: three 3x3 conv-BN-LeakyReLU layers from the student's feature to a factor.

    Its output is the ``student_factor`` of :func:`kdloss.functional.ft_loss`; ``factor_channels``
    must equal the paraphraser's.

    Args:
        in_channels: the student feature's channels.
        factor_channels: the factor's channels (the paraphraser's ``factor_channels``).

    Raises:
        ValueError: if a channel count is not a positive int. ShapeError (in ``forward``): an input
            that is not ``(B, in_channels, H, W)``.

    Example:
        >>> import torch
        >>> FTTranslator(8, 4)(torch.randn(2, 8, 4, 4)).shape
        torch.Size([2, 4, 4, 4])
    """

    def __init__(self, in_channels: int, factor_channels: int) -> None:
        super().__init__()
        _check_channels(in_channels=in_channels, factor_channels=factor_channels)
        self.in_channels = in_channels
        c, k = in_channels, factor_channels
        self.encoder = nn.Sequential(*_conv_bn(c, c), *_conv_bn(c, k), *_conv_bn(k, k))

    def forward(self, student_feature: Tensor) -> Tensor:
        _check_map("student_feature", student_feature, self.in_channels, "FTTranslator")
        out: Tensor = self.encoder(student_feature)
        return out


class _ABF(nn.Module):
    """One attention-based fusion step of ReviewKD."""

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int, fuse: bool) -> None:
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(in_channels, mid_channels, 1, bias=False), nn.BatchNorm2d(mid_channels))
        self.conv2 = nn.Sequential(
            nn.Conv2d(mid_channels, out_channels, 3, padding=1, bias=False), nn.BatchNorm2d(out_channels)
        )
        self.att_conv = nn.Sequential(nn.Conv2d(2 * mid_channels, 2, 1), nn.Sigmoid()) if fuse else None

    def forward(self, x: Tensor, residual: Tensor | None) -> tuple[Tensor, Tensor]:
        x = self.conv1(x)
        if self.att_conv is not None and residual is not None:
            residual = F.interpolate(residual, size=x.shape[-2:], mode="nearest")
            z = self.att_conv(torch.cat([x, residual], dim=1))
            x = x * z[:, :1] + residual * z[:, 1:]
        return self.conv2(x), x


class ReviewKDFusion(nn.Module):
    """ReviewKD's trainable part: attention-based fusion (ABF) of the student's stage features.

    ``forward(student_features)`` takes the student's stage maps, shallow to deep, and returns one
    fused map per stage with the teacher's channel counts (``out_channels``) and the student's
    spatial sizes, to compare with the teacher's maps through :func:`kdloss.functional.hcl_loss`.
    Going from the deepest stage to the shallowest, each stage's 1x1-reduced feature is fused with
    the (nearest-upsampled) running residual by a learned 2-way spatial attention, then a 3x3
    conv maps it to the teacher's channels.

    Args:
        in_channels: the student's stage channels, shallow to deep.
        out_channels: the teacher's stage channels, as many.
        mid_channels: the fusion width, a hyper-parameter of the method.

    Chen, Liu, Zhao & Jia, *Distilling Knowledge via Knowledge Review*, CVPR 2021.

    Example:
        >>> import torch
        >>> fusion = ReviewKDFusion([8, 16], [32, 64], mid_channels=16)
        >>> outs = fusion([torch.randn(2, 8, 8, 8), torch.randn(2, 16, 4, 4)])
        >>> outs[0].shape, outs[1].shape
        (torch.Size([2, 32, 8, 8]), torch.Size([2, 64, 4, 4]))
    """

    def __init__(self, in_channels: Sequence[int], out_channels: Sequence[int], *, mid_channels: int) -> None:
        super().__init__()
        ins, outs = list(in_channels), list(out_channels)
        if not ins or len(ins) != len(outs):
            raise ValueError(
                f"in_channels and out_channels must be non-empty and equally long, got {len(ins)} and {len(outs)}"
            )
        for i, (ci, co) in enumerate(zip(ins, outs)):
            _check_channels(**{f"in_channels[{i}]": ci, f"out_channels[{i}]": co})
        _check_channels(mid_channels=mid_channels)
        self.in_channels = ins
        last = len(ins) - 1
        self.abfs = nn.ModuleList(
            _ABF(ci, mid_channels, co, fuse=i < last) for i, (ci, co) in enumerate(zip(ins, outs))
        )

    def forward(self, student_features: Sequence[Tensor]) -> list[Tensor]:
        feats = list(student_features)
        if len(feats) != len(self.in_channels):
            raise ValueError(f"ReviewKDFusion expects {len(self.in_channels)} stage maps, got {len(feats)}")
        for i, (f, c) in enumerate(zip(feats, self.in_channels)):
            _check_map(f"student_features[{i}]", f, c, "ReviewKDFusion")
        results: list[Tensor] = []
        residual: Tensor | None = None
        for i in range(len(feats) - 1, -1, -1):
            out, residual = self.abfs[i](feats[i], residual)
            results.insert(0, out)
        return results
