"""The ``@triton.jit`` device code of the fused gated SPM projection: the forward GEMM kernel
(fused or loaded shrink), the shrink kernel and the split-M low-rank gradient kernel, and the jit
helpers they share. Kernels only: the host launchers that pick tiles and launch them are in
``gated_linear.py`` (which re-exports these names; tests and native/aot.py read them there), the
formulas they implement and their torch reference in ``reference.py``.

Interpreter: the kernels call only Triton builtins, never the ``triton.language`` functions that
are themselves ``@triton.jit`` (``tl.sum``, ``tl.cdiv``, ``tl.zeros``): those are built when
triton is imported, and in a process that imported triton before setting TRITON_INTERPRET=1 the
interpreter cannot call them. tests/test_kernels.py runs in exactly that situation.
"""
from __future__ import annotations

try:
    import triton
    import triton.language as tl
except ImportError as exc:  # pragma: no cover - exercised only without triton
    raise ImportError("spm_rt.kernels.gated_linear needs triton: pip install 'spm_rt[triton]'") from exc

# The fused forward loads its gates [BLOCK_M, BLOCK_R] (fp32) and U tile before the K loop only up to
# this many gate elements (16 registers per thread at 4 warps); above it (128 x 32 and wider) the
# registers held through the loop made the sm_80 M128 variants spill (native ctest spm_cubins).
PREFETCH_MAX_ELEMS = tl.constexpr(2048)

# ---------------------------------------------------------------------------------------------
# Kernels


@triton.jit
def _mma(a, b, acc, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr):
    """acc + a @ b. UPCAST_DOT is set only under TRITON_INTERPRET with bfloat16: the interpreter's
    tl.dot multiplies bf16 bit patterns (triton issue #11584); fp32 products of bf16 values are
    exact, so the upcast dot computes what the tensor cores do (exact products, fp32 sums)."""
    if UPCAST_DOT:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        out = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
    return out


@triton.jit
def _add(a, b):
    # tl.reduce(x, axis, _add) is tl.sum(x, axis); see "Interpreter" in the module docstring
    return a + b


@triton.jit
def _row_offsets(pid_m, M, rows_per_sample, tiles_per_sample, stride_b, stride_m,
                 BLOCK_M: tl.constexpr, SAMPLE_TILES: tl.constexpr):
    """Rows of one program: flat row index, sample of each row, validity, memory offset (int64).

    SAMPLE_TILES tiles rows inside one sample (NCHW 1x1 conv: sample stride and pixel stride
    differ); otherwise rows are flat with one row stride.
    """
    if SAMPLE_TILES:
        sid = pid_m // tiles_per_sample
        row_in = (pid_m % tiles_per_sample) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_mask = row_in < rows_per_sample
        rows = sid * rows_per_sample + row_in
        sample = sid + tl.full([BLOCK_M], 0, dtype=tl.int32)
        # clamp out-of-range rows onto valid memory so loads need no row mask
        row_in = row_in % rows_per_sample
        mem = sid.to(tl.int64) * stride_b + row_in.to(tl.int64) * stride_m
    else:
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        row_mask = rows < M
        sample = rows // rows_per_sample
        mem = (rows % M).to(tl.int64) * stride_m
    return rows, sample, row_mask, mem


@triton.jit
def _load_gating(gates_ptr, scale_ptr, sample, row_mask, offs_r, KR, stride_gb, stride_gk,
                 RANK: tl.constexpr, OFFICIAL: tl.constexpr):
    """Gates per (row, column) [BLOCK_M, BLOCK_R] and the scale (per column, or the scalar s0 for
    "official"), loaded apart from the math so the forward can issue them before its K loop.

    Padding columns (offs_r >= KR) and rows outside M get gate 0, hence c = 0 there.
    """
    r_mask = offs_r < KR
    spm = offs_r // RANK
    g = tl.load(gates_ptr + sample.to(tl.int64)[:, None] * stride_gb + spm[None, :] * stride_gk,
                mask=row_mask[:, None] & r_mask[None, :], other=0.0)
    if OFFICIAL:
        s = tl.load(scale_ptr)
    else:
        s = tl.load(scale_ptr + spm, mask=r_mask, other=0.0)
    return g, s


@triton.jit
def _apply_gating(z, g, s, offs_r, RANK: tl.constexpr, OFFICIAL: tl.constexpr):
    """c = coefficients(z) for one group's K*r columns (z: [BLOCK_M, BLOCK_R] fp32), g and s from
    _load_gating."""
    if OFFICIAL:
        zg = z * g
        if RANK == 1:
            w = tl.reduce(zg, 1, _add)[:, None]
        else:
            # w[m, j] = sum_k g_k z[m, k*r + j], broadcast back onto every column with col % r == j
            j = offs_r % RANK
            w = z * 0.0
            for jj in tl.static_range(RANK):
                sel = (j == jj)[None, :]
                wj = tl.reduce(tl.where(sel, zg, 0.0), 1, _add)
                w = tl.where(sel, wj[:, None], w)
        c = w * g * s
    else:
        c = z * g * s[None, :]
    return c


@triton.jit
def _gate_coefficients(z, gates_ptr, scale_ptr, sample, row_mask, offs_r, KR,
                       stride_gb, stride_gk, RANK: tl.constexpr, OFFICIAL: tl.constexpr):
    """c = coefficients(z) for one group's K*r columns (z: [BLOCK_M, BLOCK_R] fp32)."""
    g, s = _load_gating(gates_ptr, scale_ptr, sample, row_mask, offs_r, KR, stride_gb, stride_gk, RANK, OFFICIAL)
    return _apply_gating(z, g, s, offs_r, RANK, OFFICIAL)


@triton.jit
def _k_loop(acc, zacc, x_ptrs, w_ptrs, d_ptrs, IN, r_mask, stride_xk, stride_wk, stride_dk,
            BLOCK_K: tl.constexpr, WITH_SHRINK: tl.constexpr, EVEN_K: tl.constexpr,
            DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr):
    """acc += x W^T over the whole reduction; with WITH_SHRINK also zacc += x D^T from the same x tiles."""
    offs_k = tl.arange(0, BLOCK_K)
    for k0 in range(0, IN, BLOCK_K):
        if EVEN_K:
            xt = tl.load(x_ptrs)
            wt = tl.load(w_ptrs)
        else:
            k_mask = (k0 + offs_k) < IN
            xt = tl.load(x_ptrs, mask=k_mask[None, :], other=0.0)
            wt = tl.load(w_ptrs, mask=k_mask[:, None], other=0.0)
        acc = _mma(xt, wt, acc, DOT_PRECISION, UPCAST_DOT)
        if WITH_SHRINK:
            if EVEN_K:
                dt = tl.load(d_ptrs, mask=r_mask[None, :], other=0.0)
            else:
                dt = tl.load(d_ptrs, mask=k_mask[:, None] & r_mask[None, :], other=0.0)
            zacc = _mma(xt, dt, zacc, DOT_PRECISION, UPCAST_DOT)
            d_ptrs += BLOCK_K * stride_dk
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk
    return acc, zacc


@triton.jit(do_not_specialize=["N_PER_PROG"])
def _gated_spm_fwd_kernel(
    x_ptr, w_ptr, bias_ptr, down_ptr, up_ptr, scale_ptr, gates_ptr, c_ptr, y_ptr,
    M, N, IN, KR, rows_per_sample, tiles_per_sample, N_PER_PROG,
    stride_xb, stride_xm, stride_xk,
    stride_wn, stride_wk,
    stride_dr, stride_dk,
    stride_un, stride_ur,
    stride_sg, stride_gb, stride_gk,
    stride_cm, stride_cr,
    stride_yb, stride_ym, stride_yn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    RANK: tl.constexpr, HAS_BIAS: tl.constexpr, OFFICIAL: tl.constexpr,
    FUSED_SHRINK: tl.constexpr, STORE_C: tl.constexpr, SAMPLE_TILES: tl.constexpr,
    EVEN_K: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
):
    """y[:, g*N + n] = x W_g^T + c_g U_g^T (+ b): N_PER_PROG consecutive [BLOCK_M, BLOCK_N] tiles of
    group g (N_PER_PROG divides the group's N tiles: the launcher picks it so). N_PER_PROG is a
    runtime argument, never specialised (do_not_specialize): one binary serves every count, so the
    native library compiles one variant per tile config (tiles.plan_forward picks the count from
    the device's SM count).

    FUSED_SHRINK: c_g = coefficients(x D_g^T) from the x tiles of the first tile's main loop
    (pattern A), computed once per program and reused by its other N tiles; optionally written to
    c (STORE_C, for the backward). The bias of each tile, and (up to PREFETCH_MAX_ELEMS) the gates,
    the scale and U of the first tile are loaded before the main loop, so their latency overlaps it. Otherwise c is read from c_ptr ([M, G*KR])
    in BLOCK_R chunks (pattern B, and the backward's dx = dy W + dz D).
    """
    pid_n = tl.program_id(0)  # n fastest: the N tiles of one row block run together, sharing x in L2
    pid_m = tl.program_id(1)
    tiles_n = (N + BLOCK_N - 1) // BLOCK_N
    chunks_n = tiles_n // N_PER_PROG
    group = pid_n // chunks_n
    tile0 = (pid_n % chunks_n) * N_PER_PROG

    rows, sample, row_mask, x_mem = _row_offsets(pid_m, M, rows_per_sample, tiles_per_sample,
                                                 stride_xb, stride_xm, BLOCK_M, SAMPLE_TILES)
    _, _, _, y_mem = _row_offsets(pid_m, M, rows_per_sample, tiles_per_sample,
                                  stride_yb, stride_ym, BLOCK_M, SAMPLE_TILES)
    offs_k = tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, BLOCK_R)
    offs_nt = tl.arange(0, BLOCK_N)
    x_ptrs = x_ptr + x_mem[:, None] + offs_k[None, :] * stride_xk  # [BLOCK_M, BLOCK_K]
    c_rows = rows.to(tl.int64) * stride_cm

    # first tile: prefetch (gates, scale, U, bias), main loop with the shrink, epilogue
    offs_n = tile0 * BLOCK_N + offs_nt
    n_mask = offs_n < N
    cols = (group * N + offs_n).to(tl.int64)  # output column = row of W and U
    w_cols = (group * N + offs_n % N).to(tl.int64)  # clamped: W loads need no column mask
    w_ptrs = w_ptr + w_cols[None, :] * stride_wn + offs_k[:, None] * stride_wk  # [BLOCK_K, BLOCK_N]
    if HAS_BIAS:
        bias = tl.load(bias_ptr + cols, mask=n_mask, other=0.0).to(tl.float32)
    acc = tl.full([BLOCK_M, BLOCK_N], 0, dtype=tl.float32)
    zacc = tl.full([BLOCK_M, BLOCK_R], 0, dtype=tl.float32)
    r_mask = offs_r < KR
    if FUSED_SHRINK:
        if BLOCK_M * BLOCK_R <= PREFETCH_MAX_ELEMS:  # held through the loop: only while that is cheap
            g, s = _load_gating(gates_ptr, scale_ptr + group * stride_sg, sample, row_mask, offs_r, KR,
                                stride_gb, stride_gk, RANK, OFFICIAL)
            ut = tl.load(up_ptr + cols[None, :] * stride_un + offs_r[:, None] * stride_ur,
                         mask=r_mask[:, None] & n_mask[None, :], other=0.0)  # [BLOCK_R, BLOCK_N]
        d_rows = (group * KR + offs_r).to(tl.int64)
        d_ptrs = down_ptr + d_rows[None, :] * stride_dr + offs_k[:, None] * stride_dk  # [BLOCK_K, BLOCK_R]
        acc, zacc = _k_loop(acc, zacc, x_ptrs, w_ptrs, d_ptrs, IN, r_mask, stride_xk, stride_wk, stride_dk,
                            BLOCK_K, True, EVEN_K, DOT_PRECISION, UPCAST_DOT)
        if BLOCK_M * BLOCK_R > PREFETCH_MAX_ELEMS:
            g, s = _load_gating(gates_ptr, scale_ptr + group * stride_sg, sample, row_mask, offs_r, KR,
                                stride_gb, stride_gk, RANK, OFFICIAL)
            ut = tl.load(up_ptr + cols[None, :] * stride_un + offs_r[:, None] * stride_ur,
                         mask=r_mask[:, None] & n_mask[None, :], other=0.0)
        c = _apply_gating(zacc, g, s, offs_r, RANK, OFFICIAL)
        if STORE_C:
            if tile0 == 0:  # one program per (group, row block) writes c for the backward
                c_ptrs = c_ptr + c_rows[:, None] + (group * KR + offs_r)[None, :] * stride_cr
                tl.store(c_ptrs, c.to(c_ptr.dtype.element_ty), mask=row_mask[:, None] & r_mask[None, :])
        c = c.to(ut.dtype)
        acc = _mma(c, ut, acc, DOT_PRECISION, UPCAST_DOT)
    else:
        acc, zacc = _k_loop(acc, zacc, x_ptrs, w_ptrs, x_ptrs, IN, r_mask, stride_xk, stride_wk, stride_dk,
                            BLOCK_K, False, EVEN_K, DOT_PRECISION, UPCAST_DOT)
        c_ptrs = c_ptr + c_rows[:, None] + (group * KR + offs_r)[None, :] * stride_cr  # [BLOCK_M, BLOCK_R]
        u_ptrs = up_ptr + cols[None, :] * stride_un + offs_r[:, None] * stride_ur  # [BLOCK_R, BLOCK_N]
        for r0 in range(0, KR, BLOCK_R):
            rc_mask = (r0 + offs_r) < KR
            ct = tl.load(c_ptrs, mask=row_mask[:, None] & rc_mask[None, :], other=0.0)
            ut = tl.load(u_ptrs, mask=rc_mask[:, None] & n_mask[None, :], other=0.0)
            acc = _mma(ct.to(ut.dtype), ut, acc, DOT_PRECISION, UPCAST_DOT)
            c_ptrs += BLOCK_R * stride_cr
            u_ptrs += BLOCK_R * stride_ur
    if HAS_BIAS:
        acc += bias[None, :]
    y_ptrs = y_ptr + y_mem[:, None] + cols[None, :] * stride_yn
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=row_mask[:, None] & n_mask[None, :])

    # the program's other N tiles (fused only: the launcher uses N_PER_PROG = 1 otherwise), c reused
    if FUSED_SHRINK:
        for t in range(1, N_PER_PROG):
            offs_n = (tile0 + t) * BLOCK_N + offs_nt
            n_mask = offs_n < N
            cols = (group * N + offs_n).to(tl.int64)
            w_cols = (group * N + offs_n % N).to(tl.int64)
            w_ptrs = w_ptr + w_cols[None, :] * stride_wn + offs_k[:, None] * stride_wk
            ut = tl.load(up_ptr + cols[None, :] * stride_un + offs_r[:, None] * stride_ur,
                         mask=r_mask[:, None] & n_mask[None, :], other=0.0)
            if HAS_BIAS:
                bias = tl.load(bias_ptr + cols, mask=n_mask, other=0.0).to(tl.float32)
            acc = tl.full([BLOCK_M, BLOCK_N], 0, dtype=tl.float32)
            acc, zacc = _k_loop(acc, zacc, x_ptrs, w_ptrs, x_ptrs, IN, r_mask, stride_xk, stride_wk, stride_dk,
                                BLOCK_K, False, EVEN_K, DOT_PRECISION, UPCAST_DOT)
            acc = _mma(c, ut, acc, DOT_PRECISION, UPCAST_DOT)
            if HAS_BIAS:
                acc += bias[None, :]
            y_ptrs = y_ptr + y_mem[:, None] + cols[None, :] * stride_yn
            tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=row_mask[:, None] & n_mask[None, :])


@triton.jit
def _gated_shrink_kernel(
    a_ptr, b_ptr, scale_ptr, gates_ptr, c_ptr,
    M, KRED, KR, rows_per_sample, tiles_per_sample,
    stride_ab, stride_am, stride_ak, stride_ag,
    stride_br, stride_bk, stride_bg,
    stride_sg, stride_gb, stride_gk,
    stride_cm, stride_cr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, RANK: tl.constexpr,
    OFFICIAL: tl.constexpr, SAMPLE_TILES: tl.constexpr, EVEN_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
):
    """c[:, g*KR + r] = coefficients(sum_k a[:, g, k] b[g, r, k]): one [BLOCK_M, KR] block of group g.

    Forward (split pattern): a = x (shared, stride_ag = 0), b = D_g. Backward: a = dy_g, b = U_g^T,
    giving dz = coefficients(dy U).
    """
    pid_m = tl.program_id(0)
    group = tl.program_id(1)
    rows, sample, row_mask, a_mem = _row_offsets(pid_m, M, rows_per_sample, tiles_per_sample,
                                                 stride_ab, stride_am, BLOCK_M, SAMPLE_TILES)
    offs_k = tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, BLOCK_R)
    r_mask = offs_r < KR
    a_ptrs = a_ptr + group.to(tl.int64) * stride_ag + a_mem[:, None] + offs_k[None, :] * stride_ak
    b_ptrs = b_ptr + group.to(tl.int64) * stride_bg + offs_r[None, :] * stride_br + offs_k[:, None] * stride_bk
    zacc = tl.full([BLOCK_M, BLOCK_R], 0, dtype=tl.float32)
    for k0 in range(0, KRED, BLOCK_K):
        if EVEN_K:
            at = tl.load(a_ptrs)
            bt = tl.load(b_ptrs, mask=r_mask[None, :], other=0.0)
        else:
            k_mask = (k0 + offs_k) < KRED
            at = tl.load(a_ptrs, mask=k_mask[None, :], other=0.0)
            bt = tl.load(b_ptrs, mask=k_mask[:, None] & r_mask[None, :], other=0.0)
        zacc = _mma(at, bt, zacc, DOT_PRECISION, UPCAST_DOT)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    c = _gate_coefficients(zacc, gates_ptr, scale_ptr + group * stride_sg, sample, row_mask, offs_r, KR,
                           stride_gb, stride_gk, RANK, OFFICIAL)
    c_ptrs = c_ptr + rows.to(tl.int64)[:, None] * stride_cm + (group * KR + offs_r)[None, :] * stride_cr
    tl.store(c_ptrs, c.to(c_ptr.dtype.element_ty), mask=row_mask[:, None] & r_mask[None, :])


@triton.jit
def _lowrank_grad_kernel(
    a_ptr, b_ptr, out_ptr,
    M, P, Q, rows_per_split,
    stride_am, stride_ap, stride_ag,
    stride_bm, stride_bq, stride_bg,
    stride_os, stride_op, stride_oq,
    BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr, DOT_PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
):
    """out[s, g*P + p, q] = sum over rows m of split s of a[m, g, p] * b[m, g, q]  (fp32 workspace).

    dU = dy^T c (a = dy, b = c, per group) and dD^T = x^T dz (a = x, b = dz, one group).
    """
    pid_p = tl.program_id(0)
    pid_q = tl.program_id(1)
    split = tl.program_id(2)
    tiles_p = (P + BLOCK_P - 1) // BLOCK_P
    group = pid_p // tiles_p
    offs_p = (pid_p % tiles_p) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_q = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    p_mask = offs_p < P
    q_mask = offs_q < Q
    m_start = split * rows_per_split
    m_end = tl.minimum(m_start + rows_per_split, M)
    offs_m = m_start + tl.arange(0, BLOCK_M)
    a_ptrs = (a_ptr + group.to(tl.int64) * stride_ag + offs_p[:, None] * stride_ap
              + offs_m.to(tl.int64)[None, :] * stride_am)  # [BLOCK_P, BLOCK_M]
    b_ptrs = (b_ptr + group.to(tl.int64) * stride_bg + offs_q[None, :] * stride_bq
              + offs_m.to(tl.int64)[:, None] * stride_bm)  # [BLOCK_M, BLOCK_Q]
    acc = tl.full([BLOCK_P, BLOCK_Q], 0, dtype=tl.float32)
    for m0 in range(m_start, m_end, BLOCK_M):
        m_mask = (m0 - m_start + offs_m) < m_end
        at = tl.load(a_ptrs, mask=p_mask[:, None] & m_mask[None, :], other=0.0)
        bt = tl.load(b_ptrs, mask=m_mask[:, None] & q_mask[None, :], other=0.0)
        acc = _mma(at, bt, acc, DOT_PRECISION, UPCAST_DOT)
        a_ptrs += BLOCK_M * stride_am
        b_ptrs += BLOCK_M * stride_bm
    out_ptrs = (out_ptr + split.to(tl.int64) * stride_os + (group * P + offs_p)[:, None] * stride_op
                + offs_q[None, :] * stride_oq)
    tl.store(out_ptrs, acc, mask=p_mask[:, None] & q_mask[None, :])
