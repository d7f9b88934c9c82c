# mypy: ignore-errors
"""The Triton kernel behind the fused soft-KL (+ cross-entropy) loss. Imported lazily.

One program handles one row of ``C`` logits in two passes over the columns:

1. online (streaming) log-sum-exp of ``s / T`` and ``t / T`` (and of ``s`` for the CE term), with
   the running maximum rescaling the running sums, all in float32;
2. with the row's log-partition functions known, the log-probabilities (floored at -1e30 exactly
   as the eager path does), the row's loss and its gradient w.r.t. the student logits, written
   once in the student's dtype.

So the logits are read twice and the gradient written once; nothing of size ``C`` is kept.

With ``REDUCE`` (``"sum"``, ``"mean"``, ``"batchmean"``) the same launch also reduces: each
program stores its row's loss and validity, then takes a ticket from a counter with one atomic
add; the program that draws the last ticket sums all rows in index order (so the result does
not depend on which program finishes last), writes the reduced loss and ``1 / denominator`` (for
the backward pass) and resets the counter to 0 for the next launch. One launch in all, no host
synchronisation, and the same bits on every run.
"""

from __future__ import annotations

try:
    import triton
    import triton.language as tl
except ImportError:  # kdloss works without Triton; this module is then an empty shell
    triton = None

if triton is not None:
    # The eager path's floor on log-probabilities (kdloss.functional.kl._LOG_FLOOR); a Triton global
    # must be a tl.constexpr.
    LOG_FLOOR = tl.constexpr(-1e30)

    @triton.jit
    def kd_rows_kernel(
        S,
        TT,
        LABELS,
        MASK,
        LOSS,
        VALID,
        GRAD,
        stride_sr,
        stride_sc,
        stride_tr,
        stride_tc,
        stride_gr,
        C,
        temperature,
        kl_weight,
        grad_kl_weight,
        ce_weight,
        ignore_index,
        OUT,
        SCALE,
        COUNTER,
        n_rows,
        denom_per_row,
        HAS_MASK: tl.constexpr,
        HAS_LABELS: tl.constexpr,
        HAS_CE: tl.constexpr,
        WRITE_GRAD: tl.constexpr,
        BLOCK: tl.constexpr,
        REDUCE: tl.constexpr,
        RBLOCK: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        s_row = S + row * stride_sr
        t_row = TT + row * stride_tr
        g_row = GRAD + row * stride_gr
        cols0 = tl.arange(0, BLOCK)
        neg_inf = float("-inf")

        # Pass 1: streaming log-sum-exp. m_* are running maxima (-inf until a finite value is seen),
        # l_* running sums of exp(x - m_*); l_tf sums the teacher's mass over the classes whose student
        # log-probability is not floored (finite student logits), which the exact gradient needs.
        m_s = neg_inf
        l_s = 0.0
        m_t = neg_inf
        l_t = 0.0
        l_tf = 0.0
        m_c = neg_inf
        l_c = 0.0
        for start in range(0, C, BLOCK):
            cols = start + cols0
            inb = cols < C
            s = tl.load(s_row + cols * stride_sc, mask=inb, other=neg_inf).to(tl.float32)
            t = tl.load(t_row + cols * stride_tc, mask=inb, other=neg_inf).to(tl.float32)
            a = s / temperature
            b = t / temperature
            m_new = tl.maximum(m_s, tl.max(a, axis=0))
            m_safe = tl.where(m_new == neg_inf, 0.0, m_new)
            l_s = l_s * tl.exp(m_s - m_safe) + tl.sum(tl.exp(a - m_safe), axis=0)
            m_s = m_new
            m_new = tl.maximum(m_t, tl.max(b, axis=0))
            m_safe = tl.where(m_new == neg_inf, 0.0, m_new)
            scale = tl.exp(m_t - m_safe)
            e = tl.exp(b - m_safe)
            l_t = l_t * scale + tl.sum(e, axis=0)
            l_tf = l_tf * scale + tl.sum(tl.where(s > neg_inf, e, 0.0), axis=0)
            m_t = m_new
            if HAS_CE:
                m_new = tl.maximum(m_c, tl.max(s, axis=0))
                m_safe = tl.where(m_new == neg_inf, 0.0, m_new)
                l_c = l_c * tl.exp(m_c - m_safe) + tl.sum(tl.exp(s - m_safe), axis=0)
                m_c = m_new

        valid = (m_s > neg_inf) & (m_t > neg_inf)
        if HAS_MASK:
            valid = valid & (tl.load(MASK + row) != 0)
        label = 0
        if HAS_LABELS:
            label = tl.load(LABELS + row).to(tl.int64)
            valid = valid & (label != ignore_index)
        # Rows that do not count get harmless constants (no log(0), no NaN) and are zeroed below.
        lse_s = tl.where(valid, m_s + tl.log(tl.where(valid, l_s, 1.0)), 0.0)
        lse_t = tl.where(valid, m_t + tl.log(tl.where(valid, l_t, 1.0)), 0.0)
        teacher_mass = tl.where(valid, l_tf / tl.where(valid, l_t, 1.0), 0.0)
        lse_c = 0.0
        if HAS_CE:
            lse_c = tl.where(valid, m_c + tl.log(tl.where(valid, l_c, 1.0)), 0.0)

        # Pass 2: the row's KL, and the gradient of  kl_weight * KL (+ ce_weight * CE)  w.r.t. s.
        # d/ds_j of T^2 * sum_c p_c (log p_c - log q_c) is T * (q_j * teacher_mass - p_j [s_j finite]).
        kl_acc = tl.zeros((BLOCK,), tl.float32)
        for start in range(0, C, BLOCK):
            cols = start + cols0
            inb = cols < C
            s = tl.load(s_row + cols * stride_sc, mask=inb, other=neg_inf).to(tl.float32)
            t = tl.load(t_row + cols * stride_tc, mask=inb, other=neg_inf).to(tl.float32)
            log_q_raw = s / temperature - lse_s
            log_q = tl.maximum(log_q_raw, LOG_FLOOR)
            log_p = tl.maximum(t / temperature - lse_t, LOG_FLOOR)
            p = tl.exp(log_p)
            q = tl.exp(log_q_raw)
            kl_acc += tl.where(inb, p * (log_p - log_q), 0.0)
            if WRITE_GRAD:
                g = grad_kl_weight * (q * teacher_mass - tl.where(log_q_raw >= LOG_FLOOR, p, 0.0))
                if HAS_CE:
                    g += ce_weight * (tl.exp(s - lse_c) - tl.where(cols == label, 1.0, 0.0))
                g = tl.where(valid, g, 0.0)
                tl.store(g_row + cols, g.to(GRAD.dtype.element_ty), mask=inb)

        loss = kl_weight * tl.sum(kl_acc, axis=0)
        if HAS_CE:
            # A label outside [0, C) (other than ignore_index) makes the row's loss NaN, never a wild read.
            bad = (label < 0) | (label >= C)
            picked = tl.load(s_row + label * stride_sc, mask=valid & (bad == 0), other=0.0).to(tl.float32)
            loss += ce_weight * tl.where(bad, float("nan"), lse_c - picked)
        loss = tl.where(valid, loss, 0.0)
        tl.store(LOSS + row, loss)
        tl.store(VALID + row, valid)

        # REDUCE: 0 none, 1 sum, 2 divide by (rows that count) * denom_per_row (mean / batchmean).
        if REDUCE != 0:
            tl.debug_barrier()  # this program's stores come before its ticket (release below)
            ticket = tl.atomic_add(COUNTER, 1, sem="acq_rel")
            if ticket == n_rows - 1:  # every other row is stored: reduce them all, in index order
                acc = tl.zeros((RBLOCK,), tl.float32)
                cnt = tl.zeros((RBLOCK,), tl.int32)
                for start in range(0, n_rows, RBLOCK):
                    r = start + tl.arange(0, RBLOCK)
                    inr = r < n_rows
                    acc += tl.load(LOSS + r, mask=inr, other=0.0, volatile=True)
                    cnt += tl.load(VALID + r, mask=inr, other=0, volatile=True).to(tl.int32)
                total = tl.sum(acc, axis=0)
                denom = 1.0
                if REDUCE == 2:
                    denom = tl.maximum(tl.sum(cnt, axis=0), 1).to(tl.float32) * denom_per_row
                tl.store(OUT, total / denom)
                tl.store(SCALE, 1.0 / denom)
                tl.atomic_xchg(COUNTER, 0)  # ready for the next launch
