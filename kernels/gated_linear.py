"""Fused gated multi-SPM projection in Triton: forward, backward and the autograd Function.

One op, one file (Liger style). The op is ``gated_spm_linear_ref`` in ``reference.py``::

    z = x D^T                               # [M, K*r]  shrink
    c = coefficients(z, gates[row // rows_per_sample], scale)   # gated, see reference.py
    y = x W^T + b + c U^T                   # [M, out]  base GEMM + expand

Two launch patterns for the forward (``pattern=`` on the launchers, "auto" picks):

* ``"fused"`` (pattern A, vLLM fused LoRA / Nunchaku): the shrink ``x D^T`` is a second small
  ``tl.dot`` inside the base GEMM's reduction loop, reusing the x tile already loaded; the gates
  are applied in registers and the expand ``c U^T`` is one more dot in the epilogue. x is read
  once and y written once, so for the memory-bound SD1.5 shapes the branch is nearly free. Every
  N tile recomputes the shrink, so its extra MMA work is ``pad16(K*r) / BLOCK_N`` of the base GEMM.
* ``"split"`` (pattern B, LoRAFusion): a small shrink kernel writes ``c`` [M, K*r] once, then the
  GEMM kernel computes ``x W^T + c U^T + b`` with the expand as extra reduction steps. Better when
  K*r is large (the redundant per-N-tile shrink of pattern A would cost more than a re-read of x).

``groups=G`` runs G projections that share x (attn1 to_q/to_k/to_v) in one launch over
concatenated weights; group g's output columns only see group g's coefficients.

The backward (LoRAFusion-style; W, bias, gates and scale are frozen)::

    dc = dy U ;  dz = coefficients(dc)   (the gating is a symmetric linear map in both modes)
    dU = dy^T c ;  dD = dz^T x ;  dx = dy W + dz D

runs as: the shrink kernel on (dy, U) -> dz; the GEMM kernel in its "load c" mode with
transposed strides -> dx; a split-M low-rank kernel -> dU and dD. float64 has no Triton path
(no fp64 ``tl.dot`` on the tensor cores): the autograd Function routes float64 through
``gated_spm_linear_torch`` / ``gated_spm_linear_bwd_ref``, which are the same formulas in torch,
so ``torch.autograd.gradcheck`` checks the backward formulas the kernels implement.

Interpreter: the kernels call only Triton builtins, never the ``triton.language`` functions that
are themselves ``@triton.jit`` (``tl.sum``, ``tl.cdiv``, ``tl.zeros``): those are built when
triton is imported, and in a process that imported triton before setting TRITON_INTERPRET=1 the
interpreter cannot call them. tests/test_kernels.py runs in exactly that situation.

Nothing here was timed on a GPU when written: the tile sizes below come from the arithmetic in
the comments and from the no-GPU compile check (tests/test_kernels_compile.py), not from runs.
"""
from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError as exc:  # pragma: no cover - exercised only without triton
    raise ImportError("spm_rt.kernels.gated_linear needs triton: pip install 'spm_rt[triton]'") from exc

from spm_rt.kernels.reference import (  # noqa: F401 (the torch formulas are re-exported)
    COMBINES, GatedOperands, gated_spm_linear_bwd_ref, gated_spm_linear_torch)
from spm_rt.kernels import tiles
from spm_rt.kernels.tiles import (  # noqa: F401 (re-exported for benchmarks and tests)
    CFG_64x64, CFG_128x64, CFG_128x128, CFG_128x256, CFG_FP32, FWD_CANDIDATES, FwdConfig)

__all__ = [
    "gated_spm_linear_triton",
    "gated_spm_conv1x1_triton",
    "GatedSPMLinearFunction",
    "gated_spm_linear_torch",
    "gated_spm_linear_bwd_ref",
]

# ---------------------------------------------------------------------------------------------
# Tuning constants: the tiles live in spm_rt.kernels.tiles (one table for this launcher and the
# native library, native/aot.py); read through ``tiles.NAME`` at call time, so a test that patches
# the tiles module changes every launch. The names below are re-exported for benchmarks.

# Exact fp32: the contract is fp32 relative error < 1e-5, which tf32 (~3e-4) would break.
FP32_DOT_PRECISION = "ieee"
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


# ---------------------------------------------------------------------------------------------
# Host side

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _interpreting() -> bool:
    """True when the kernels were built by TRITON_INTERPRET=1 (they then run on CPU tensors)."""
    return not isinstance(_gated_spm_fwd_kernel, triton.runtime.JITFunction)


def _pad16(n: int) -> int:
    return tiles.pad16(n)



def _dot_precision(dtype: torch.dtype) -> str:
    return FP32_DOT_PRECISION if dtype == torch.float32 else "tf32"  # ignored for 16-bit inputs


def _upcast_dot(dtype: torch.dtype) -> bool:
    return dtype == torch.bfloat16 and _interpreting()


def _device_guard(t: torch.Tensor):
    return torch.cuda.device(t.device) if t.is_cuda else _NullContext()


class _NullContext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _validate(ops: GatedOperands, x_features: int, m_rows: int):
    """Check everything a launch relies on; returns (N per group, K, K*r)."""
    if ops.combine not in COMBINES:
        raise ValueError(f"combine must be one of {COMBINES}, got {ops.combine!r}")
    if ops.x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"x must be float16, bfloat16 or float32 for the Triton path, got {ops.x.dtype}")
    # gates may be strided (an ``expand``ed [1, K] -> [B, K] has row stride 0): the kernels read
    # them through (stride_gb, stride_gk)
    ops.check_types(gates_contiguous=False)
    if not ops.x.is_cuda and not _interpreting():
        raise ValueError(f"the Triton path needs CUDA tensors (got {ops.x.device}); use gated_spm_linear_ref on CPU")
    return ops.shapes(x_features, m_rows)


def _dtype_name(dtype: torch.dtype) -> str:
    return {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}[dtype]


def _pick_pattern(pattern: str | None, kr: int, cfg: FwdConfig | None = None) -> bool | None:
    """True for the fused shrink (pattern A), False for split; "auto" asks the tile config (the
    table's fused_max_rank), or returns None without one (tiles.plan_forward decides then)."""
    if pattern in (None, "auto"):
        return tiles.fused_for(kr, cfg) if cfg is not None else None
    if pattern not in ("fused", "split"):
        raise ValueError(f"pattern must be 'auto', 'fused' or 'split', got {pattern!r}")
    return pattern == "fused"


_FORCED_CONFIG: list = []  # forced_config's stack


class forced_config:  # noqa: N801 (a context manager used like a function)
    """``with forced_config(cfg):`` every forward launch uses ``cfg`` instead of FWD_TABLE's pick
    (benchmarks of the candidates, tests). ``n_per_prog`` forces the N tiles per program (the
    largest divisor of the N tiles not above it); None keeps the config's rule (the SM-count rule
    for configs with ``n_loop``, else 1)."""

    def __init__(self, cfg: FwdConfig, n_per_prog: int | None = None):
        self.entry = (cfg, n_per_prog)

    def __enter__(self):
        _FORCED_CONFIG.append(self.entry)
        return self.entry[0]

    def __exit__(self, *exc):
        _FORCED_CONFIG.remove(self.entry)
        return False

    def __str__(self):
        cfg, npp = self.entry
        return f"{cfg.block_m}x{cfg.block_n}x{cfg.block_k} w{cfg.num_warps} s{cfg.num_stages}" + (
            f" n_per_prog<={npp}" if npp else "")


def _fwd_config(m_rows: int, n: int, dtype: torch.dtype, arch: int = tiles.DEFAULT_ARCH) -> FwdConfig:
    """The table's tiling for (rows per launch, out per group, dtype, arch), or the forced one."""
    if _FORCED_CONFIG:
        return _FORCED_CONFIG[-1][0]
    return tiles.fwd_config(m_rows, n, _dtype_name(dtype), arch)


def _fwd_tiles(m_rows: int, n: int, in_f: int, dtype: torch.dtype):
    """Tiles of the backward's dx launch (the forward kernel in "load c" mode)."""
    if dtype == torch.float32:
        bm, bk = tiles.FWD_BLOCK_M_FP32, tiles.FWD_BLOCK_K_FP32
    else:
        bm = tiles.FWD_BLOCK_M if m_rows >= tiles.FWD_SMALL_M_BELOW else tiles.FWD_BLOCK_M_SMALL
        bk = tiles.FWD_BLOCK_K
    # tiles never larger than the (power-of-two rounded) problem, and at least 16 for tl.dot
    bm = min(bm, _pad16(m_rows))
    bn = min(tiles.FWD_BLOCK_N, _pad16(n))
    bk = min(bk, _pad16(in_f))
    return bm, bn, bk


def _launch_shrink(a, a_strides, stride_ag, b, stride_br, stride_bk, stride_bg, scale, stride_sg, gates,
                   c, m_rows, kred, kr, groups, rows_per_sample, sample_tiles, combine, rank, sp=None):
    """c [M, G*KR] = coefficients(a_g b_g^T) for every group g (see _gated_shrink_kernel); sp: the
    tiles.ShrinkPlan (planned here when None)."""
    if sp is None:
        sp = tiles.plan_shrink(m_rows, kred, kr, groups, _dtype_name(a.dtype), rows_per_sample=rows_per_sample,
                               sample_tiles=sample_tiles, num_samples=gates.shape[0])
    _gated_shrink_kernel[sp.grid](
        a, b, scale, gates, c,
        m_rows, kred, kr, rows_per_sample, sp.tiles_per_sample,
        *a_strides, stride_ag,
        stride_br, stride_bk, stride_bg,
        stride_sg, gates.stride(0), gates.stride(1),
        c.stride(0), c.stride(1),
        BLOCK_M=sp.block_m, BLOCK_K=sp.block_k, BLOCK_R=sp.block_r, RANK=rank,
        OFFICIAL=combine == "official", SAMPLE_TILES=sample_tiles, EVEN_K=sp.even_k,
        DOT_PRECISION=_dot_precision(a.dtype), UPCAST_DOT=_upcast_dot(a.dtype),
        num_warps=tiles.SHRINK_NUM_WARPS, num_stages=tiles.SHRINK_NUM_STAGES,
    )


def _check_row_blocks(m_tiles: int, m_rows: int, block_m: int) -> None:
    if m_tiles > tiles.MAX_ROW_BLOCKS:
        raise ValueError(f"{m_rows} rows need {m_tiles} row blocks of {block_m}; at most {tiles.MAX_ROW_BLOCKS} per "
                         "launch (CUDA grid limit): split x")


def forward_plan(m_rows, in_f, n, kr, groups, dtype, rows_per_sample, *, sample_tiles=False, num_samples=None,
                 fused=None, device=None) -> tiles.ForwardPlan:
    """tiles.plan_forward with this launcher's overrides (forced_config) and the architecture and
    SM count of ``device``: the plan _launch_forward runs (tests compare it with the native
    library's)."""
    forced = _FORCED_CONFIG[-1] if _FORCED_CONFIG else (None, None)
    return tiles.plan_forward(m_rows, in_f, n, kr=kr, groups=groups, dtype=_dtype_name(dtype),
                              rows_per_sample=rows_per_sample, sample_tiles=sample_tiles, num_samples=num_samples,
                              fused=fused, sm_count=tiles.device_sm_count(device), arch=tiles.device_arch(device),
                              config=forced[0], forced_n_per_prog=forced[1])


def _launch_forward(x, x_strides, m_rows, rows_per_sample, sample_tiles, weight, bias, down, up, scale, gates,
                    combine, rank, groups, n, kr, y, y_strides, c_out, fused):
    """Run the forward into y; c_out ([M, G*K*r] or None) receives the coefficients. fused: True
    (pattern A), False (pattern B) or None (the tile config of FWD_TABLE decides)."""
    in_f = weight.shape[1]
    plan = forward_plan(m_rows, in_f, n, kr, groups, x.dtype, rows_per_sample, sample_tiles=sample_tiles,
                        num_samples=gates.shape[0], fused=fused, device=x.device)
    _check_row_blocks(plan.grid[1], m_rows, plan.block_m)  # before any launch
    stride_sg = 0 if scale.shape[0] == gates.shape[1] else gates.shape[1]  # 0: one scale shared by groups
    if not plan.fused:
        if c_out is None:
            c_out = torch.empty((m_rows, groups * kr), device=x.device, dtype=x.dtype)
        _launch_shrink(x, x_strides, 0, down, down.stride(0), down.stride(1), kr * down.stride(0),
                       scale, stride_sg, gates, c_out, m_rows, in_f, kr, groups, rows_per_sample,
                       sample_tiles, combine, rank, plan.shrink)
    c_arg = c_out if c_out is not None else y
    cfg = plan.config
    _gated_spm_fwd_kernel[plan.grid](
        x, weight, bias if bias is not None else x, down, up, scale, gates, c_arg, y,
        m_rows, n, in_f, kr, rows_per_sample, plan.tiles_per_sample, plan.n_per_prog,
        *x_strides,
        weight.stride(0), weight.stride(1),
        down.stride(0), down.stride(1),
        up.stride(0), up.stride(1),
        stride_sg, gates.stride(0), gates.stride(1),
        c_arg.stride(0) if c_out is not None else 0, c_arg.stride(1) if c_out is not None else 0,
        *y_strides,
        BLOCK_M=plan.block_m, BLOCK_N=plan.block_n, BLOCK_K=plan.block_k, BLOCK_R=plan.block_r, RANK=rank,
        HAS_BIAS=bias is not None, OFFICIAL=combine == "official",
        FUSED_SHRINK=plan.fused, STORE_C=plan.fused and c_out is not None, SAMPLE_TILES=sample_tiles,
        EVEN_K=plan.even_k, DOT_PRECISION=_dot_precision(x.dtype), UPCAST_DOT=_upcast_dot(x.dtype),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return c_out


def _forward_2d(ops: GatedOperands, pattern, store_c):
    """ops.x [..., in] -> (y [..., G*out], c [M, G*K*r] or None)."""
    x, weight = ops.x, ops.weight
    lead = x.shape[:-1]
    x2 = ops.x2
    m_rows = x2.shape[0]
    n, k, kr = _validate(ops, x2.shape[1], m_rows)
    if x2.stride(-1) != 1:
        raise ValueError("x must have a contiguous last dimension (rows may be strided)")
    y = torch.empty((m_rows, weight.shape[0]), device=x.device, dtype=x.dtype)
    c = torch.empty((m_rows, ops.groups * kr), device=x.device, dtype=x.dtype) if store_c else None
    if m_rows > 0:
        fused = None if pattern in (None, "auto") else _pick_pattern(pattern, kr)  # None: FWD_TABLE decides
        with _device_guard(x):
            _launch_forward(x2, (0, x2.stride(0), x2.stride(1)), m_rows, ops.rows_per_sample, False, weight, ops.bias,
                            ops.down, ops.up, ops.scale, ops.gates, ops.combine, ops.rank, ops.groups, n, kr,
                            y, (0, y.stride(0), y.stride(1)), c, fused)
    return y.reshape(*lead, weight.shape[0]), c


def gated_spm_linear_triton(
    x: torch.Tensor,  # [M, in] (or [..., in]); fp16 / bf16 / fp32, last dim contiguous
    weight: torch.Tensor,  # [G*out, in]  G projections sharing x, concatenated
    bias: torch.Tensor | None,  # [G*out]
    down: torch.Tensor,  # [G*K*r, in]  each group's stack of K SPM downs
    up: torch.Tensor,  # [G*out, K*r]  each group's ups, stacked along out
    scale: torch.Tensor,  # [K] (shared by the groups) or [G*K], float32
    gates: torch.Tensor,  # [B, K] float32, per-sample gates; M = B * rows_per_sample
    rows_per_sample: int,
    combine: str = "linear",
    rank: int = 1,
    groups: int = 1,
    *,
    pattern: str = "auto",  # "fused" (shrink inside the GEMM), "split" (separate shrink), "auto"
) -> torch.Tensor:
    """Fused ``y = x W^T + b + coefficients(x D^T) U^T`` -> [M, G*out] in x's dtype (no autograd).

    Same contract as ``gated_spm_linear_ref`` (fp32 accumulation); with ``groups=G`` the G
    projections sharing x run in one launch and group g's columns use group g's SPMs only.

    Example::

        >>> f16 = dict(device="cuda", dtype=torch.float16)  # doctest: +SKIP
        >>> x, W = torch.randn(154, 768, **f16), torch.randn(320, 768, **f16)  # 2 x 77 text tokens
        >>> D, U = torch.randn(4, 768, **f16), torch.randn(320, 4, **f16)  # K = 4 rank-1 SPMs
        >>> gates = torch.rand(2, 4, device="cuda")  # one gate vector per sample
        >>> y = gated_spm_linear_triton(x, W, None, D, U, torch.ones(4, device="cuda"), gates, 77)
        >>> y.shape
        torch.Size([154, 320])
    """
    y, _ = _forward_2d(GatedOperands(x, weight, bias, down, up, scale, gates, rows_per_sample, combine, rank, groups),
                       pattern, store_c=False)
    return y


def gated_spm_conv1x1_triton(
    x_nchw: torch.Tensor,  # [N, C_in, H, W]; NCHW or channels_last, (H, W) must flatten to one stride
    weight: torch.Tensor,  # [out, in] or [out, in, 1, 1]
    bias: torch.Tensor | None,  # [out]
    down: torch.Tensor,  # [K*r, in] or [K*r, in, 1, 1]
    up: torch.Tensor,  # [out, K*r] or [out, K*r, 1, 1]
    scale: torch.Tensor,  # [K] float32
    gates: torch.Tensor,  # [N, K] float32: one gate vector per image, rows_per_sample = H*W
    combine: str = "linear",
    rank: int = 1,
    *,
    pattern: str = "auto",
) -> torch.Tensor:
    """Gated SPM 1x1 Conv2d (SD1.x proj_in / proj_out) read and written in x's own layout.

    No permute copy: the kernel tiles rows inside one image, so the pixel stride (1 in NCHW,
    C in channels_last) and the image stride are separate kernel strides. Output [N, out, H, W]
    in x's memory format and dtype. Forward only (no autograd).

    Example::

        >>> y = gated_spm_conv1x1_triton(x, conv.weight, conv.bias, D, U, scale, gates)  # doctest: +SKIP
    """
    if x_nchw.dim() != 4:
        raise ValueError(f"x_nchw must be [N, C, H, W], got shape {tuple(x_nchw.shape)}")

    def _flat(t, name):
        if t is not None and t.dim() == 4:
            if t.shape[2:] != (1, 1):
                raise ValueError(f"{name} must be a 1x1 kernel, got shape {tuple(t.shape)}")
            return t.reshape(t.shape[0], t.shape[1])
        return t

    weight, down, up = _flat(weight, "weight"), _flat(down, "down"), _flat(up, "up")
    nb, cin, h, w = x_nchw.shape
    hw = h * w
    sb, sc, sh, sw = x_nchw.stride()
    if h > 1 and w > 1 and sh != w * sw:
        raise ValueError("x's H and W dims must flatten to one stride (NCHW or channels_last)")
    pixel_stride = sw if w > 1 else sh
    n, k, kr = _validate(GatedOperands(x_nchw, weight, bias, down, up, scale, gates, hw, combine, rank, 1), cin,
                         nb * hw)
    channels_last = x_nchw.is_contiguous(memory_format=torch.channels_last) and not x_nchw.is_contiguous()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    y = torch.empty((nb, n, h, w), device=x_nchw.device, dtype=x_nchw.dtype, memory_format=fmt)
    ysb, ysc, ysh, ysw = y.stride()
    y_pixel = ysw if w > 1 else ysh
    if nb * hw > 0:
        with _device_guard(x_nchw):
            _launch_forward(x_nchw, (sb, pixel_stride, sc), nb * hw, hw, True, weight, bias, down, up, scale,
                            gates, combine, rank, 1, n, kr, y, (ysb, y_pixel, ysc), None,
                            None if pattern in (None, "auto") else _pick_pattern(pattern, kr))
    return y


def _backward_triton(dy, x, weight, down, up, scale, gates, c, rows_per_sample, combine, rank, groups,
                     need_dx, need_dd, need_du):
    """dx [M, in], d_down [G*K*r, in], d_up [G*out, K*r] (None where not needed) with Triton kernels."""
    m_rows, in_f = x.shape
    n_total = weight.shape[0]
    n = n_total // groups
    kr = down.shape[0] // groups
    k = gates.shape[1]
    stride_sg = 0 if scale.shape[0] == k else k
    prec = _dot_precision(x.dtype)
    if need_dx:  # checked before any launch: the dx launch puts row blocks on grid axis 1, as the forward
        bm, bn, bk = _fwd_tiles(m_rows, in_f, n_total, x.dtype)
        _check_row_blocks(triton.cdiv(m_rows, bm), m_rows, bm)
    dx = dd = du = None
    dz = None
    if need_dx or need_dd:
        # dz [M, G*KR] = coefficients(dy_g U_g) per group: the shrink kernel with a = dy, b = U_g^T
        dz = torch.empty((m_rows, groups * kr), device=x.device, dtype=x.dtype)
        _launch_shrink(dy, (0, dy.stride(0), dy.stride(1)), n * dy.stride(1), up, up.stride(1), up.stride(0),
                       n * up.stride(0), scale, stride_sg, gates, dz, m_rows, n, kr, groups, rows_per_sample,
                       False, combine, rank)
    if need_dx:
        # dx = dy W + dz D: the forward kernel in "load c" mode, W and D read transposed, one group
        dx = torch.empty_like(x)
        grid = (triton.cdiv(in_f, bn), triton.cdiv(m_rows, bm))
        _gated_spm_fwd_kernel[grid](
            dy, weight, dy, down, down, scale, gates, dz, dx,
            m_rows, in_f, n_total, groups * kr, rows_per_sample, 1, 1,  # tiles_per_sample, N_PER_PROG
            0, dy.stride(0), dy.stride(1),
            weight.stride(1), weight.stride(0),
            0, 0,
            down.stride(1), down.stride(0),
            0, gates.stride(0), gates.stride(1),
            dz.stride(0), dz.stride(1),
            0, dx.stride(0), dx.stride(1),
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, BLOCK_R=min(tiles.LOAD_BLOCK_R, _pad16(groups * kr)), RANK=rank,
            HAS_BIAS=False, OFFICIAL=False, FUSED_SHRINK=False, STORE_C=False, SAMPLE_TILES=False,
            EVEN_K=n_total % bk == 0, DOT_PRECISION=prec, UPCAST_DOT=_upcast_dot(x.dtype),
            num_warps=tiles.FWD_NUM_WARPS, num_stages=tiles.FWD_NUM_STAGES,
        )
    if need_du:
        # dU [G*out, KR]: per group, dy_g^T c_g
        du = _lowrank_grad(dy, dy.stride(0), dy.stride(1), n * dy.stride(1),
                           c, c.stride(0), c.stride(1), kr * c.stride(1), m_rows, n, kr, groups).to(up.dtype)
    if need_dd:
        # dD [G*KR, in] = (x^T dz)^T: in-features on the MMA's M side (wgmma needs 64 rows; K*r is
        # often 16), written transposed into the workspace (groups are concatenated along dz's columns)
        dd = _lowrank_grad(x, x.stride(0), x.stride(1), 0, dz, dz.stride(0), dz.stride(1), 0,
                           m_rows, in_f, groups * kr, 1, transpose_out=True).to(down.dtype)
    return dx, dd, du


def _lowrank_grad(a, stride_am, stride_ap, stride_ag, b, stride_bm, stride_bq, stride_bg, m_rows, p, q, groups,
                  transpose_out=False):
    """out [G*P, Q] (or [Q, G*P] with transpose_out) = per group a_g^T b_g, reduced over M (fp32)."""
    block_p = min(tiles.LOWRANK_BLOCK_PQ, _pad16(p))
    block_q = min(tiles.LOWRANK_BLOCK_PQ, _pad16(q))
    block_m = min(tiles.LOWRANK_BLOCK_M, _pad16(m_rows))
    n_tiles = groups * triton.cdiv(p, block_p) * triton.cdiv(q, block_q)
    m_blocks = triton.cdiv(m_rows, block_m)
    splits = max(1, min(m_blocks, tiles.LOWRANK_TARGET_PROGRAMS // n_tiles))
    rows_per_split = triton.cdiv(m_blocks, splits) * block_m
    splits = triton.cdiv(m_rows, rows_per_split)
    if transpose_out:
        ws = torch.empty((splits, q, groups * p), device=a.device, dtype=torch.float32)
        stride_op, stride_oq = ws.stride(2), ws.stride(1)
    else:
        ws = torch.empty((splits, groups * p, q), device=a.device, dtype=torch.float32)
        stride_op, stride_oq = ws.stride(1), ws.stride(2)
    _lowrank_grad_kernel[(groups * triton.cdiv(p, block_p), triton.cdiv(q, block_q), splits)](
        a, b, ws,
        m_rows, p, q, rows_per_split,
        stride_am, stride_ap, stride_ag,
        stride_bm, stride_bq, stride_bg,
        ws.stride(0), stride_op, stride_oq,
        BLOCK_M=block_m, BLOCK_P=block_p, BLOCK_Q=block_q, DOT_PRECISION=_dot_precision(a.dtype),
        UPCAST_DOT=_upcast_dot(a.dtype),
        num_warps=tiles.FWD_NUM_WARPS, num_stages=tiles.FWD_NUM_STAGES,
    )
    return ws.sum(0) if splits > 1 else ws[0]


class GatedSPMLinearFunction:
    """Autograd for the fused op: gradients for x, down and up (weight, bias, gates, scale frozen).

    ``apply(x, weight, bias, down, up, scale, gates, rows_per_sample, combine, rank[, groups])``
    runs the registered custom op ``spm_rt::gated_linear`` (``spm_rt.kernels.ops``), whose
    autograd formula is registered with ``torch.library``: the same path eager code, training and
    ``torch.compile`` take. fp16/bf16/fp32 run the Triton kernels both ways; float64 runs the
    torch formulas (``gated_spm_linear_torch`` / ``gated_spm_linear_bwd_ref``), for gradcheck.

    Example::

        >>> D.requires_grad_(); U.requires_grad_()  # doctest: +SKIP
        >>> y = GatedSPMLinearFunction.apply(x, W, b, D, U, s, g, 4096, "linear", 1)  # doctest: +SKIP
        >>> y.float().pow(2).mean().backward()  # doctest: +SKIP
    """

    @staticmethod
    def apply(x, weight, bias, down, up, scale, gates, rows_per_sample, combine="linear", rank=1, groups=1):
        from spm_rt.kernels.ops import gated_linear

        if x.dtype == torch.float64:
            _validate_fp64(x.reshape(-1, x.shape[-1]), weight, bias, down, up, scale, gates, rows_per_sample,
                           combine, rank, groups)
        return gated_linear(x, weight, bias, down, up, scale, gates, rows_per_sample, combine, rank, groups)


def _validate_fp64(x, weight, bias, down, up, scale, gates, rows_per_sample, combine, rank, groups):
    if combine not in COMBINES:
        raise ValueError(f"combine must be one of {COMBINES}, got {combine!r}")
    for name, t in {"weight": weight, "down": down, "up": up, "bias": bias}.items():
        if t is not None and t.dtype != torch.float64:
            raise TypeError(f"{name} has dtype {t.dtype}, expected x's dtype torch.float64")
    k = gates.shape[1]
    if tuple(down.shape) != (groups * k * rank, x.shape[1]) or up.shape[1] != k * rank:
        raise ValueError("down/up do not match [G*K*r, in] / [G*out, K*r]")
    if gates.shape[0] * rows_per_sample != x.shape[0]:
        raise ValueError(f"{x.shape[0]} rows do not split into {gates.shape[0]} samples of {rows_per_sample} rows")
