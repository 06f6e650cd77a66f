"""The Triton gated-SPM kernels as ``torch.library`` custom ops.

Registered ops (opaque to ``torch.compile``: dynamo traces straight through them with no graph
break, inductor calls them as they are, and CUDA graphs capture their launches):

* ``spm_rt::gated_linear(x, weight, bias, down, up, scale, gates, rows_per_sample, combine, rank,
  groups, store_c) -> (y [M, G*out], c [M, G*K*r] or [0])``, with autograd registered (gradients
  for x, down and up through ``spm_rt::gated_linear_backward``);
* ``spm_rt::gated_linear_backward(...) -> (dx, d_down, d_up)`` (empty ``[0]`` where not asked);
* ``spm_rt::gated_conv1x1(x, weight, bias, down, up, scale, gates, combine, rank) -> y`` (forward
  only, NCHW or channels_last in and out, no copy).

Each op has a fake (meta) kernel giving output shapes without running anything. The real
kernels import triton on first use (``spm_rt.kernels.gated_linear``); this module itself imports
only torch. float64 inputs run the torch formulas (for gradcheck).

Example::

    >>> import torch, spm_rt.kernels.ops  # registers the ops
    >>> torch.ops.spm_rt.gated_linear.default  # doctest: +ELLIPSIS
    <OpOverload(op='spm_rt.gated_linear', overload='default')>
"""
from typing import Optional

import torch
from torch import Tensor

from spm_rt.kernels.reference import GatedOperands, gated_spm_linear_bwd_ref, gated_spm_linear_torch


# The module holding the kernels and launchers. Tests that run the Triton interpreter in a process
# where triton was already imported for CUDA load their own interpreted copy of
# ``spm_rt.kernels.gated_linear`` and point this at it (see tests/test_kernels.py).
kernel_module = None


def _impl():
    if kernel_module is not None:
        return kernel_module
    from spm_rt.kernels import gated_linear

    return gated_linear


@torch.library.custom_op("spm_rt::gated_linear", mutates_args=())
def gated_linear_op(
    x: Tensor,  # [M, in], last dim contiguous
    weight: Tensor,  # [G*out, in]
    bias: Optional[Tensor],  # [G*out]
    down: Tensor,  # [G*K*r, in]
    up: Tensor,  # [G*out, K*r]
    scale: Tensor,  # [K] or [G*K] float32
    gates: Tensor,  # [B, K] float32; M = B * rows_per_sample
    rows_per_sample: int,
    combine: str,
    rank: int,
    groups: int,
    store_c: bool,
) -> tuple[Tensor, Tensor]:
    ops = GatedOperands(x, weight, bias, down, up, scale, gates, rows_per_sample, combine, rank, groups)
    if x.dtype == torch.float64:
        y, c = gated_spm_linear_torch(*ops.replace(scale=scale.double(), gates=gates.double()).astuple())
    else:
        y, c = _impl()._forward_2d(ops, "auto", store_c=store_c)
    return y, (c if store_c and c is not None else x.new_empty(0))


@gated_linear_op.register_fake
def _gated_linear_fake(x, weight, bias, down, up, scale, gates, rows_per_sample, combine, rank, groups, store_c):
    m = x.shape[0]
    return x.new_empty(m, weight.shape[0]), x.new_empty((m, down.shape[0]) if store_c else (0,))


@torch.library.custom_op("spm_rt::gated_linear_backward", mutates_args=())
def gated_linear_backward_op(
    dy: Tensor,  # [M, G*out]
    x: Tensor,  # [M, in]
    weight: Tensor,  # [G*out, in]
    down: Tensor,  # [G*K*r, in]
    up: Tensor,  # [G*out, K*r]
    scale: Tensor,  # [K] or [G*K]
    gates: Tensor,  # [B, K]
    c: Tensor,  # [M, G*K*r] (forward coefficients; [0] when d_up is not needed)
    rows_per_sample: int,
    combine: str,
    rank: int,
    groups: int,
    need_dx: bool,
    need_dd: bool,
    need_du: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    if x.dtype == torch.float64:
        dx, dd, du = gated_spm_linear_bwd_ref(dy.to(x.dtype), x, weight, down, up, scale.double(), gates.double(),
                                              rows_per_sample, combine, rank, groups)
    else:
        k = _impl()
        dy = dy.to(x.dtype)
        dy = dy if dy.stride(-1) == 1 else dy.contiguous()
        with k._device_guard(x):
            dx, dd, du = k._backward_triton(dy, x, weight, down, up, scale, gates, c, rows_per_sample, combine, rank,
                                            groups, need_dx, need_dd, need_du)
    return (dx if need_dx else x.new_empty(0), dd if need_dd else x.new_empty(0), du if need_du else x.new_empty(0))


@gated_linear_backward_op.register_fake
def _gated_linear_backward_fake(dy, x, weight, down, up, scale, gates, c, rows_per_sample, combine, rank, groups,
                                need_dx, need_dd, need_du):
    return (torch.empty_like(x) if need_dx else x.new_empty(0), torch.empty_like(down) if need_dd else x.new_empty(0),
            torch.empty_like(up) if need_du else x.new_empty(0))


def _setup_context(ctx, inputs, output):
    x, weight, bias, down, up, scale, gates, rows_per_sample, combine, rank, groups, store_c = inputs
    ctx.save_for_backward(x, weight, down, up, scale, gates, output[1])
    ctx.meta = (rows_per_sample, combine, rank, groups)


def _backward(ctx, dy, _dc):
    x, weight, down, up, scale, gates, c = ctx.saved_tensors
    rows_per_sample, combine, rank, groups = ctx.meta
    need_dx, need_dd, need_du = ctx.needs_input_grad[0], ctx.needs_input_grad[3], ctx.needs_input_grad[4]
    if need_du and c.numel() == 0:
        raise RuntimeError("spm_rt::gated_linear: d_up needs the forward's coefficients (call with store_c=True)")
    dx, dd, du = gated_linear_backward_op(dy, x, weight, down, up, scale, gates, c, rows_per_sample, combine, rank,
                                          groups, need_dx, need_dd, need_du)
    return (dx if need_dx else None, None, None, dd if need_dd else None, du if need_du else None,
            None, None, None, None, None, None, None)


gated_linear_op.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("spm_rt::gated_conv1x1", mutates_args=())
def gated_conv1x1_op(
    x: Tensor,  # [N, C_in, H, W] NCHW or channels_last
    weight: Tensor,  # [out, in] or [out, in, 1, 1]
    bias: Optional[Tensor],  # [out]
    down: Tensor,  # [K*r, in]
    up: Tensor,  # [out, K*r]
    scale: Tensor,  # [K] float32
    gates: Tensor,  # [N, K] float32
    combine: str,
    rank: int,
) -> Tensor:
    return _impl().gated_spm_conv1x1_triton(x, weight, bias, down, up, scale, gates, combine, rank)


@gated_conv1x1_op.register_fake
def _gated_conv1x1_fake(x, weight, bias, down, up, scale, gates, combine, rank):
    channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return torch.empty((x.shape[0], weight.shape[0], x.shape[2], x.shape[3]), dtype=x.dtype, device=x.device,
                       memory_format=fmt)


def gated_linear(x, weight, bias, down, up, scale, gates, rows_per_sample, combine="linear", rank=1, groups=1):
    """``y = x W^T + b + coefficients(x D^T) U^T`` -> [..., G*out] through the custom op, with
    gradients for x, down and up when they require them (the one autograd path of the kernels)."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    x2 = x2 if x2.stride(-1) == 1 else x2.contiguous()
    store_c = torch.is_grad_enabled() and up.requires_grad
    y, _ = gated_linear_op(x2, weight, bias, down, up, scale, gates, rows_per_sample, combine, rank, groups, store_c)
    return y.view(*lead, weight.shape[0])


@torch.library.custom_op("spm_rt::gated_linear_native", mutates_args=())
def gated_linear_native_op(
    x: Tensor,  # [M, in] contiguous, CUDA, fp16/bf16
    weight: Tensor,  # [G*out, in]
    bias: Optional[Tensor],  # [G*out]
    down: Tensor,  # [G*K*r, in]
    up: Tensor,  # [G*out, K*r]
    scale: Tensor,  # [K] or [G*K] float32
    gates: Tensor,  # [B, K] float32
    rows_per_sample: int,
    combine: str,
    rank: int,
    groups: int,
) -> Tensor:
    """The AOT-compiled library's forward (``spm_rt.kernels.native``); where it has no variant for
    the case (fp32, another rank, ...) the Triton kernels run instead."""
    from spm_rt.kernels import native

    ops = GatedOperands(x, weight, bias, down, up, scale, gates, rows_per_sample, combine, rank, groups)
    return native.gated_spm_linear_native(*ops.astuple(), fallback="triton")


@gated_linear_native_op.register_fake
def _gated_linear_native_fake(x, weight, bias, down, up, scale, gates, rows_per_sample, combine, rank, groups):
    return x.new_empty(x.shape[0], weight.shape[0])
