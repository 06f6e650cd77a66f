"""The gated multi-SPM projection on tensors, with backend dispatch.

``torch`` backend: two extra small GEMMs with in-place gating and an in-place ``addmm_`` expand
(no concatenated weights, no output copies). ``triton`` backend: the fused kernels in
``spm_rt.kernels.gated_linear`` (CUDA, or CPU under ``TRITON_INTERPRET=1``), called as the
``torch.library`` ops of ``spm_rt.kernels.ops``. Both are autograd-compatible for the training path
(the torch one through PyTorch's own autograd). ``native``: the AOT-compiled ``libspm_kernels``
(``spm_rt.kernels.native``, forward only, no JIT), the Triton op where it has no variant.
"""
from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F

from spm_rt.kernels.reference import gate_coefficients

BACKENDS = ("auto", "torch", "triton", "native")


@functools.lru_cache(maxsize=1)
def is_triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def resolve_backend(backend: str, device: torch.device) -> str:
    """'auto' -> 'triton' on CUDA when triton imports, else 'torch'."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        # device first: importing triton costs seconds and is pointless on a CPU tensor
        return "triton" if device.type == "cuda" and is_triton_available() else "torch"
    if backend == "triton":
        if not is_triton_available():
            raise ImportError("backend='triton' needs triton: pip install 'spm_rt[triton]'")
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError(f"backend='triton' on a {device.type} tensor needs TRITON_INTERPRET=1 "
                               "(set before triton is imported) or a CUDA device")
    if backend == "native":
        # the AOT-compiled library (CMakeLists.txt): no JIT at first call; forward only (training,
        # fp32 and shapes without a compiled variant fall back to the Triton op at call time)
        from spm_rt.kernels import native

        reason = native.unavailable_reason(device)
        if reason is not None:
            raise RuntimeError(f"backend='native' cannot run on {device}: {reason}")
    return backend


def gated_linear(
    x: torch.Tensor,  # [N, ..., in]
    weight: torch.Tensor,  # [out, in]
    bias: torch.Tensor | None,  # [out]
    down: torch.Tensor,  # [K*r, in]
    up: torch.Tensor,  # [out, K*r]
    scale: torch.Tensor,  # [K] float32
    gates: torch.Tensor,  # [N, K] float32, one row per leading index of x
    combine: str = "linear",
    rank: int = 1,
    backend: str = "torch",
) -> torch.Tensor:
    """``x W^T + b + coefficients(x D^T) U^T`` with per-sample gates; returns [N, ..., out]."""
    n = x.shape[0]
    in_f = x.shape[-1]
    x2 = x.reshape(-1, in_f)
    rows = x2.shape[0] // n
    if backend == "native" and not (torch.is_grad_enabled() and (x.requires_grad or down.requires_grad
                                                                  or up.requires_grad)):
        from spm_rt.kernels.ops import gated_linear_native_op

        y = gated_linear_native_op(x2.contiguous(), weight, bias, down, up, scale, gates, rows, combine, rank, 1)
        return y.view(*x.shape[:-1], weight.shape[0])
    if backend in ("triton", "native"):
        from spm_rt.kernels.ops import gated_linear as op

        return op(x2, weight, bias, down, up, scale, gates, rows, combine, rank).view(*x.shape[:-1], weight.shape[0])
    y = F.linear(x2, weight, bias)  # [M, out]
    z = F.linear(x2, down)  # [M, K*r]
    # the one gating function of every torch consumer; in place on z when no gradient flows
    inplace = combine == "linear" and not z.requires_grad
    c = gate_coefficients(z.view(n, rows, -1, rank), gates, scale, combine, 2, inplace=inplace).view(-1, z.shape[1])
    if y.requires_grad or c.requires_grad or up.requires_grad:
        y = y + c @ up.t()
    else:
        y.addmm_(c, up.t())
    return y.view(*x.shape[:-1], weight.shape[0])


def gated_conv1x1(
    x: torch.Tensor,  # [N, in, H, W]
    weight: torch.Tensor,  # [out, in, 1, 1]
    bias: torch.Tensor | None,  # [out]
    down: torch.Tensor,  # [K*r, in]
    up: torch.Tensor,  # [out, K*r]
    scale: torch.Tensor,  # [K]
    gates: torch.Tensor,  # [N, K]
    combine: str = "linear",
    rank: int = 1,
    backend: str = "torch",
) -> torch.Tensor:
    """The same op for a 1x1 Conv2d on NCHW input (SD1.x ``proj_in``/``proj_out``): [N, out, H, W]."""
    n, c_in, h, w = x.shape
    if backend in ("triton", "native"):  # the native library has no NCHW variant: the Triton op
        if not (torch.is_grad_enabled() and (x.requires_grad or down.requires_grad or up.requires_grad)):
            from spm_rt.kernels.ops import gated_conv1x1_op

            # reads and writes NCHW directly (pixel and image strides in the kernel): no copy
            return gated_conv1x1_op(x, weight, bias, down, up, scale, gates, combine, rank)
        # training: the autograd op takes row-major [M, in], so one permute copy of the NHWC view
        x2 = x.permute(0, 2, 3, 1)
        y = gated_linear(x2, weight.view(weight.shape[0], c_in), bias, down, up, scale, gates, combine, rank, backend)
        return y.permute(0, 3, 1, 2)
    y = F.conv2d(x, weight, bias)  # [N, out, H, W] (1x1, stride 1: checked when the layer is built)
    x3 = x.reshape(n, c_in, h * w)
    z = torch.matmul(down, x3)  # [N, K*r, HW]
    inplace = combine == "linear" and not z.requires_grad
    c = gate_coefficients(z.view(n, -1, rank, h * w), gates, scale, combine, 1, inplace=inplace).view_as(z)
    y3 = y.view(n, -1, h * w)
    u = up.unsqueeze(0).expand(n, -1, -1)
    if y.requires_grad or c.requires_grad or up.requires_grad:
        return (y3 + torch.bmm(u, c)).view_as(y)
    y3.baddbmm_(u, c)
    return y


def grouped_gated_linear(
    x: torch.Tensor,  # [N, ..., in]
    weight: torch.Tensor,  # [G*out, in]  G projections reading x, concatenated
    bias: torch.Tensor | None,  # [G*out]
    down: torch.Tensor,  # [G*K*r, in]
    up: torch.Tensor,  # [G*out, K*r]
    scale: torch.Tensor,  # [G*K] float32
    gates: torch.Tensor,  # [N, K] float32
    combine: str,
    rank: int,
    groups: int,
) -> torch.Tensor:
    """G gated projections of one input in one Triton launch (x read once): [N, ..., G*out]."""
    from spm_rt.kernels.ops import gated_linear as op

    n = x.shape[0]
    x2 = x.reshape(-1, x.shape[-1])
    y = op(x2, weight, bias, down, up, scale, gates, x2.shape[0] // n, combine, rank, groups)
    return y.view(*x.shape[:-1], weight.shape[0])
