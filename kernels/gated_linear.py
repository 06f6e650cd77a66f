"""Fused gated multi-SPM projection in Triton: forward, backward and the autograd Function.

One op (Liger style) in three files: this one (host launchers, backward, autograd entry),
``gated_linear_kernels.py`` (the ``@triton.jit`` device code) and ``gated_linear_plan.py`` (which
tiles a launch uses); this module re-exports the names of both. The op is
``gated_spm_linear_ref`` in ``reference.py``::

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

Triton decides interpreter-or-compiler when a kernel is decorated: ``_load_copy`` builds a private
copy of this module and its kernels in the mode a test or tool needs (see "Interpreter" in
``gated_linear_kernels.py`` for the rule the kernels follow).

Nothing here was timed on a GPU when written: the tile sizes below come from the arithmetic in
the comments and from the no-GPU compile check (tests/test_kernels_compile.py), not from runs.
"""
from __future__ import annotations

import torch

try:
    import triton
except ImportError as exc:  # pragma: no cover - exercised only without triton
    raise ImportError("spm_rt.kernels.gated_linear needs triton: pip install 'spm_rt[triton]'") from exc

from spm_rt.kernels.reference import (  # noqa: F401 (the torch formulas are re-exported)
    COMBINES, GatedOperands, gated_spm_linear_bwd_ref, gated_spm_linear_torch)
from spm_rt.kernels import tiles
from spm_rt.kernels.tiles import (  # noqa: F401 (re-exported for benchmarks and tests)
    CFG_64x64, CFG_128x64, CFG_128x128, CFG_128x256, CFG_FP32, FWD_CANDIDATES, FwdConfig)
from spm_rt.kernels.gated_linear_kernels import (  # noqa: F401 (re-exported: launched here, read by tests)
    PREFETCH_MAX_ELEMS, _gated_shrink_kernel, _gated_spm_fwd_kernel, _lowrank_grad_kernel)
from spm_rt.kernels.gated_linear_plan import (  # noqa: F401 (re-exported for benchmarks and tests)
    _check_row_blocks, _dtype_name, _fwd_config, _fwd_tiles, _pad16, _pick_pattern, forced_config, forward_plan)

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

# ---------------------------------------------------------------------------------------------
# Host side

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _interpreting() -> bool:
    """True when the kernels were built by TRITON_INTERPRET=1 (they then run on CPU tensors)."""
    return not isinstance(_gated_spm_fwd_kernel, triton.runtime.JITFunction)


def _load_copy(name: str, *, interpret: bool):
    """A private copy of this module as ``spm_rt.kernels.<name>``, with its own copy of
    gated_linear_kernels built by the Triton interpreter (``interpret=True``, the kernels then run
    on CPU tensors) or for the compiler, whatever was imported before in this process (Triton picks
    the mode when a kernel is decorated). tests/test_kernels.py and bench/sm90_compile.py use it."""
    import importlib.util
    import os
    import sys

    kernels_name = "spm_rt.kernels.gated_linear_kernels"
    here = os.path.dirname(os.path.abspath(__file__))
    old_env = os.environ.get("TRITON_INTERPRET")
    old_kernels = sys.modules.get(kernels_name)
    if interpret:
        os.environ["TRITON_INTERPRET"] = "1"
    else:
        os.environ.pop("TRITON_INTERPRET", None)

    def exec_copy(mod_name, file):
        spec = importlib.util.spec_from_file_location(mod_name, os.path.join(here, file))
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod

    try:
        sys.modules[kernels_name] = exec_copy(f"spm_rt.kernels.{name}_kernels", "gated_linear_kernels.py")
        return exec_copy(f"spm_rt.kernels.{name}", "gated_linear.py")  # imports the kernels' copy
    finally:
        if old_kernels is None:
            sys.modules.pop(kernels_name, None)
        else:
            sys.modules[kernels_name] = old_kernels
        if old_env is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = old_env


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
