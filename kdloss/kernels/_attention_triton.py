# mypy: ignore-errors
"""The Triton kernels behind the fused attention-transfer loss (:func:`kdloss.functional.attention_loss`).

Imported lazily. Both kernels run one program per sample and loop over up to :data:`MAX_PAIRS`
feature pairs inside the program, so a call over 3 pairs is one forward and one backward launch.
Feature maps are read through their ``(B, C, H, W)`` strides (contiguous, ``channels_last`` or any
view) as ``(CB, HWB)`` tiles: ``HWB`` covers all ``H * W`` positions of the widest pair, ``CB``
channels per step. Only ``p = 2`` is fused.

Forward, per pair: ``Q = mean_c f^2`` for student and teacher (each map read once), the
L2-normalised maps ``a = Q / max(||Q||, eps)``, and ``mean_i (a_s - a_t)^2``; the program writes
``beta *`` the sum over pairs, and keeps ``a_s``, ``a_t`` and ``||Q_s||`` for the backward.

Backward, per pair: ``g = dL * beta * 2 (a_s - a_t) / HW``, the normaliser's Jacobian
``dQ = (g - a_s (a_s . g)) / ||Q_s||`` (``g / eps`` below ``eps``, as ``F.normalize``), and
``df = dQ * 2 f / C``, written once in the student's dtype (the student map is read once more).
"""

from __future__ import annotations

try:
    import triton
    import triton.language as tl
except ImportError:  # kdloss works without Triton; this module is then an empty shell
    triton = None

MAX_PAIRS = 4

if triton is not None:

    @triton.jit
    def _energy(F, sb, sc, sh, sw, b, C, W, HW, CB: tl.constexpr, HWB: tl.constexpr):
        """``(HWB,)`` float32 channel mean of ``f^2`` of sample ``b`` (0 past ``HW``)."""
        hw = tl.arange(0, HWB)
        inb = hw < HW
        off = b * sb + (hw // W).to(tl.int64) * sh + (hw % W).to(tl.int64) * sw
        cs = tl.arange(0, CB)
        acc = tl.zeros((CB, HWB), tl.float32)
        for c0 in range(0, C, CB):
            c = c0 + cs
            m = (c < C)[:, None] & inb[None, :]
            x = tl.load(F + off[None, :] + c.to(tl.int64)[:, None] * sc, mask=m, other=0.0).to(tl.float32)
            acc += x * x
        return tl.sum(acc, axis=0) / C

    @triton.jit
    def _pair_fwd(
        S, ssb, ssc, ssh, ssw, Cs,
        T, tsb, tsc, tsh, tsw, Ct,
        W, HW, AS, AT, NORM, j, b, B, eps,
        CB: tl.constexpr, HWB: tl.constexpr, SAVE: tl.constexpr,
    ):  # fmt: skip
        hw = tl.arange(0, HWB)
        inb = hw < HW
        qs = _energy(S, ssb, ssc, ssh, ssw, b, Cs, W, HW, CB, HWB)
        qt = _energy(T, tsb, tsc, tsh, tsw, b, Ct, W, HW, CB, HWB)
        ns = tl.sqrt(tl.sum(qs * qs, axis=0))
        nt = tl.sqrt(tl.sum(qt * qt, axis=0))
        a_s = qs / tl.maximum(ns, eps)
        a_t = qt / tl.maximum(nt, eps)
        d = tl.where(inb, a_s - a_t, 0.0)
        if SAVE:
            row = (j * B + b).to(tl.int64)
            tl.store(AS + row * HWB + hw, a_s, mask=inb)
            tl.store(AT + row * HWB + hw, a_t, mask=inb)
            tl.store(NORM + row, ns)
        return tl.sum(d * d, axis=0) / HW

    @triton.jit
    def attention_fwd_kernel(
        S0, ss0b, ss0c, ss0h, ss0w, Cs0, T0, ts0b, ts0c, ts0h, ts0w, Ct0, W0, HW0,
        S1, ss1b, ss1c, ss1h, ss1w, Cs1, T1, ts1b, ts1c, ts1h, ts1w, Ct1, W1, HW1,
        S2, ss2b, ss2c, ss2h, ss2w, Cs2, T2, ts2b, ts2c, ts2h, ts2w, Ct2, W2, HW2,
        S3, ss3b, ss3c, ss3h, ss3w, Cs3, T3, ts3b, ts3c, ts3h, ts3w, Ct3, W3, HW3,
        LOSS, AS, AT, NORM, B, beta, eps,
        NPAIRS: tl.constexpr, CB: tl.constexpr, HWB: tl.constexpr, SAVE: tl.constexpr,
    ):  # fmt: skip
        b = tl.program_id(0).to(tl.int64)
        total = _pair_fwd(
            S0, ss0b, ss0c, ss0h, ss0w, Cs0, T0, ts0b, ts0c, ts0h, ts0w, Ct0, W0, HW0,
            AS, AT, NORM, 0, b, B, eps, CB, HWB, SAVE,
        )  # fmt: skip
        if NPAIRS > 1:
            total += _pair_fwd(
                S1, ss1b, ss1c, ss1h, ss1w, Cs1, T1, ts1b, ts1c, ts1h, ts1w, Ct1, W1, HW1,
                AS, AT, NORM, 1, b, B, eps, CB, HWB, SAVE,
            )  # fmt: skip
        if NPAIRS > 2:
            total += _pair_fwd(
                S2, ss2b, ss2c, ss2h, ss2w, Cs2, T2, ts2b, ts2c, ts2h, ts2w, Ct2, W2, HW2,
                AS, AT, NORM, 2, b, B, eps, CB, HWB, SAVE,
            )  # fmt: skip
        if NPAIRS > 3:
            total += _pair_fwd(
                S3, ss3b, ss3c, ss3h, ss3w, Cs3, T3, ts3b, ts3c, ts3h, ts3w, Ct3, W3, HW3,
                AS, AT, NORM, 3, b, B, eps, CB, HWB, SAVE,
            )  # fmt: skip
        tl.store(LOSS + b, beta * total)

    @triton.jit
    def _pair_bwd(
        S, ssb, ssc, ssh, ssw, Cs, G, gsb, gsc, gsh, gsw,
        W, HW, AS, AT, NORM, j, b, B, go, eps,
        CB: tl.constexpr, HWB: tl.constexpr,
    ):  # fmt: skip
        hw = tl.arange(0, HWB)
        inb = hw < HW
        row = (j * B + b).to(tl.int64)
        a_s = tl.load(AS + row * HWB + hw, mask=inb, other=0.0)
        a_t = tl.load(AT + row * HWB + hw, mask=inb, other=0.0)
        ns = tl.load(NORM + row)
        g = go * 2.0 * (a_s - a_t) / HW
        dot = tl.sum(a_s * g, axis=0)
        big = ns > eps
        dq = tl.where(big, (g - a_s * dot) / tl.where(big, ns, 1.0), g / eps)
        scale = dq * (2.0 / Cs)
        h = (hw // W).to(tl.int64)
        w = (hw % W).to(tl.int64)
        off_s = b * ssb + h * ssh + w * ssw
        off_g = b * gsb + h * gsh + w * gsw
        cs = tl.arange(0, CB)
        for c0 in range(0, Cs, CB):
            c = (c0 + cs).to(tl.int64)
            m = (c < Cs)[:, None] & inb[None, :]
            x = tl.load(S + off_s[None, :] + c[:, None] * ssc, mask=m, other=0.0).to(tl.float32)
            gx = scale[None, :] * x
            tl.store(G + off_g[None, :] + c[:, None] * gsc, gx.to(G.dtype.element_ty), mask=m)

    @triton.jit
    def attention_bwd_kernel(
        S0, ss0b, ss0c, ss0h, ss0w, Cs0, G0, gs0b, gs0c, gs0h, gs0w, W0, HW0,
        S1, ss1b, ss1c, ss1h, ss1w, Cs1, G1, gs1b, gs1c, gs1h, gs1w, W1, HW1,
        S2, ss2b, ss2c, ss2h, ss2w, Cs2, G2, gs2b, gs2c, gs2h, gs2w, W2, HW2,
        S3, ss3b, ss3c, ss3h, ss3w, Cs3, G3, gs3b, gs3c, gs3h, gs3w, W3, HW3,
        GRAD_OUT, AS, AT, NORM, B, beta, eps,
        NPAIRS: tl.constexpr, CB: tl.constexpr, HWB: tl.constexpr,
    ):  # fmt: skip
        b = tl.program_id(0).to(tl.int64)
        go = tl.load(GRAD_OUT + b).to(tl.float32) * beta
        _pair_bwd(
            S0, ss0b, ss0c, ss0h, ss0w, Cs0, G0, gs0b, gs0c, gs0h, gs0w, W0, HW0,
            AS, AT, NORM, 0, b, B, go, eps, CB, HWB,
        )  # fmt: skip
        if NPAIRS > 1:
            _pair_bwd(
                S1, ss1b, ss1c, ss1h, ss1w, Cs1, G1, gs1b, gs1c, gs1h, gs1w, W1, HW1,
                AS, AT, NORM, 1, b, B, go, eps, CB, HWB,
            )  # fmt: skip
        if NPAIRS > 2:
            _pair_bwd(
                S2, ss2b, ss2c, ss2h, ss2w, Cs2, G2, gs2b, gs2c, gs2h, gs2w, W2, HW2,
                AS, AT, NORM, 2, b, B, go, eps, CB, HWB,
            )  # fmt: skip
        if NPAIRS > 3:
            _pair_bwd(
                S3, ss3b, ss3c, ss3h, ss3w, Cs3, G3, gs3b, gs3c, gs3h, gs3w, W3, HW3,
                AS, AT, NORM, 3, b, B, go, eps, CB, HWB,
            )  # fmt: skip
