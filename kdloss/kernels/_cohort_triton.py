# mypy: ignore-errors
"""The Triton kernel behind the fused cohort loss (:func:`kdloss.functional.cohort_kd`). Imported lazily.

One program handles one row: the student's ``C`` logits and the ``K`` teachers' ``C`` logits of
that row, read as one ``(KB, BLOCK)`` tile per column block (``KB`` = ``K`` rounded up to a power
of two), so each student block is loaded once for all ``K`` teachers. Two passes over the columns:

1. online log-sum-exp of ``s / T``, of ``s`` (cross-entropy) and of every ``t_k / T`` (a ``(KB,)``
   vector of running maxima and sums), in float32;
2. the log-probabilities (floored at -1e30 as the eager path does), every teacher's
   ``T^2 KL(p_k || q)`` (a detached extra output, for the logged parts), the cross-entropy, the
   row's weighted total and its gradient w.r.t. the student logits, written once in the
   student's dtype.
"""

from __future__ import annotations

try:
    import triton
    import triton.language as tl
except ImportError:  # kdloss works without Triton; this module is then an empty shell
    triton = None

if triton is not None:
    LOG_FLOOR = tl.constexpr(-1e30)  # kdloss.functional.kl._LOG_FLOOR

    @triton.jit
    def cohort_rows_kernel(
        S,
        TT,
        W,
        LABELS,
        TOTAL,
        KD,
        CE,
        GRAD,
        stride_sr,
        stride_tk,
        stride_tr,
        stride_gr,
        stride_kdk,
        C,
        K,
        temperature,
        ce_weight,
        ignore_index,
        WRITE_GRAD: tl.constexpr,
        KB: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        s_row = S + row * stride_sr
        g_row = GRAD + row * stride_gr
        ks = tl.arange(0, KB)
        kin = ks < K
        t_rows = TT + ks.to(tl.int64)[:, None] * stride_tk + row * stride_tr  # (KB, 1) row pointers
        cols0 = tl.arange(0, BLOCK)
        neg_inf = float("-inf")
        # the teachers' KL weights (0 for the padding k >= K)
        w = tl.load(W + ks, mask=kin, other=0.0).to(tl.float32)

        # Pass 1: streaming log-sum-exp (see _kd_triton); l_tf[k] is teacher k's mass on the classes
        # whose student log-probability is not floored (finite student logits).
        m_s = neg_inf
        l_s = 0.0
        m_c = neg_inf
        l_c = 0.0
        m_t = tl.full((KB,), neg_inf, tl.float32)
        l_t = tl.zeros((KB,), tl.float32)
        l_tf = tl.zeros((KB,), tl.float32)
        for start in range(0, C, BLOCK):
            cols = start + cols0
            inb = cols < C
            s = tl.load(s_row + cols, mask=inb, other=neg_inf).to(tl.float32)
            t = tl.load(t_rows + cols[None, :], mask=kin[:, None] & inb[None, :], other=neg_inf).to(tl.float32)
            a = s / temperature
            m_new = tl.maximum(m_s, tl.max(a, axis=0))
            m_safe = tl.where(m_new == neg_inf, 0.0, m_new)
            l_s = l_s * tl.exp(m_s - m_safe) + tl.sum(tl.exp(a - m_safe), axis=0)
            m_s = m_new
            m_new = tl.maximum(m_c, tl.max(s, axis=0))
            m_safe = tl.where(m_new == neg_inf, 0.0, m_new)
            l_c = l_c * tl.exp(m_c - m_safe) + tl.sum(tl.exp(s - m_safe), axis=0)
            m_c = m_new
            b = t / temperature
            mt_new = tl.maximum(m_t, tl.max(b, axis=1))
            mt_safe = tl.where(mt_new == neg_inf, 0.0, mt_new)
            scale = tl.exp(m_t - mt_safe)
            e = tl.exp(b - mt_safe[:, None])
            l_t = l_t * scale + tl.sum(e, axis=1)
            l_tf = l_tf * scale + tl.sum(tl.where((s > neg_inf)[None, :], e, 0.0), axis=1)
            m_t = mt_new

        lse_s = m_s + tl.log(l_s)
        lse_c = m_c + tl.log(l_c)
        t_ok = m_t > neg_inf
        lse_t = tl.where(t_ok, m_t + tl.log(tl.where(t_ok, l_t, 1.0)), 0.0)
        # d/ds_j of sum_k w_k T^2 KL(p_k || q) = T * (q_j * sum_k w_k mass_k - sum_k w_k p_kj [s_j finite])
        w_mass = tl.sum(w * tl.where(t_ok, l_tf / tl.where(t_ok, l_t, 1.0), 0.0), axis=0)
        label = tl.load(LABELS + row).to(tl.int64)
        counted = label != ignore_index

        # Pass 2: every teacher's KL, and the gradient of the row's total w.r.t. s.
        kl_acc = tl.zeros((KB, BLOCK), tl.float32)
        for start in range(0, C, BLOCK):
            cols = start + cols0
            inb = cols < C
            s = tl.load(s_row + cols, mask=inb, other=neg_inf).to(tl.float32)
            t = tl.load(t_rows + cols[None, :], mask=kin[:, None] & inb[None, :], other=neg_inf).to(tl.float32)
            log_q_raw = s / temperature - lse_s
            log_q = tl.maximum(log_q_raw, LOG_FLOOR)
            log_p = tl.maximum(t / temperature - lse_t[:, None], LOG_FLOOR)
            p = tl.exp(log_p)
            kl_acc += tl.where(kin[:, None] & inb[None, :], p * (log_p - log_q[None, :]), 0.0)
            if WRITE_GRAD:
                q = tl.exp(log_q_raw)
                p_mix = tl.sum(w[:, None] * p, axis=0)
                g = temperature * (q * w_mass - tl.where(log_q_raw >= LOG_FLOOR, p_mix, 0.0))
                g_ce = tl.exp(s - lse_c) - tl.where(cols == label, 1.0, 0.0)
                g += tl.where(counted, ce_weight * g_ce, 0.0)
                tl.store(g_row + cols, g.to(GRAD.dtype.element_ty), mask=inb)

        kd = tl.sum(kl_acc, axis=1) * (temperature * temperature)  # (KB,): T^2 KL_k, unweighted
        tl.store(KD + ks * stride_kdk + row, kd, mask=kin)
        # A label outside [0, C) (other than ignore_index) gives NaN, never a wild read.
        bad = (label < 0) | (label >= C)
        picked = tl.load(s_row + label, mask=counted & (bad == 0), other=0.0).to(tl.float32)
        ce = tl.where(counted, tl.where(bad, float("nan"), lse_c - picked), 0.0)
        tl.store(CE + row, ce)
        tl.store(TOTAL + row, tl.sum(w * kd, axis=0) + ce_weight * ce)
