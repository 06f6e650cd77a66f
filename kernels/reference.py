"""Plain-PyTorch reference of the gated multi-SPM projection.

This is the oracle every fast path is tested against and the CPU fallback. It knows tensors
only (no modules, no pipelines).

The op, for one adapted layer with K stacked SPMs of rank r (R = K * r rows):

    z = x D^T                                   # [M, R]
    c = coefficients(z, gates[sample(row)])     # [M, R]
    y = x W^T + b + c U^T                       # [M, out]

with ``sample(row) = row // rows_per_sample`` and the coefficients

* ``combine="linear"`` (the paper's sum of gated updates):
  ``c[m, k*r + j] = gates[b, k] * scale[k] * z[m, k*r + j]``
* ``combine="official"`` (the reference code: every tensor of SPM k multiplied by gamma_k,
  summed key by key, run as one rank-r adapter with the first SPM's scale):
  ``w[m, j] = sum_k gates[b, k] * z[m, k*r + j]`` and
  ``c[m, k*r + j] = scale[0] * gates[b, k] * w[m, j]``,
  i.e. ``scale_1 * (sum_j g_j U_j)(sum_k g_k D_k) x``: quadratic in the gates, with cross terms.
"""
from __future__ import annotations

import torch

COMBINES = ("linear", "official")


def spm_coefficients(
    z: torch.Tensor,  # [M, K*r] shrink output x D^T
    scale: torch.Tensor,  # [K] per-SPM alpha / rank
    gates: torch.Tensor,  # [B, K] per-sample gates
    rows_per_sample: int,
    combine: str = "linear",
    rank: int = 1,
) -> torch.Tensor:
    """Gate the shrink output: returns c [M, K*r] in z's dtype (math in z's dtype)."""
    if combine not in COMBINES:
        raise ValueError(f"combine must be one of {COMBINES}, got {combine!r}")
    m, kr = z.shape
    k = gates.shape[1]
    if kr != k * rank:
        raise ValueError(f"z has {kr} columns, expected K*r = {k}*{rank}")
    b = gates.shape[0]
    if m != b * rows_per_sample:
        raise ValueError(f"{m} rows do not split into {b} samples of {rows_per_sample} rows")
    g = gates.to(z.dtype)
    s = scale.to(z.dtype)
    z3 = z.view(b, rows_per_sample, k, rank)
    if combine == "linear":
        coef = (g * s)[:, None, :, None]  # [B, 1, K, 1]
        c = z3 * coef
    else:
        w = (z3 * g[:, None, :, None]).sum(dim=2, keepdim=True)  # [B, rows, 1, r]
        c = w * (g * s[0])[:, None, :, None]  # [B, rows, K, r]
    return c.reshape(m, kr)


def gated_spm_linear_ref(
    x: torch.Tensor,  # [M, in]
    weight: torch.Tensor,  # [out, in]
    bias: torch.Tensor | None,  # [out]
    down: torch.Tensor,  # [K*r, in]
    up: torch.Tensor,  # [out, K*r]
    scale: torch.Tensor,  # [K]
    gates: torch.Tensor,  # [B, K]
    rows_per_sample: int,
    combine: str = "linear",
    rank: int = 1,
    upcast: bool = False,
) -> torch.Tensor:
    """y = x W^T + b + coefficients(x D^T) U^T  ->  [M, out].

    ``upcast=True`` computes in float64 and returns float64 (the test oracle); otherwise the
    math runs in x's dtype, as PyTorch would.

    Example::

        >>> x = torch.randn(6, 8); W = torch.randn(5, 8); D = torch.randn(2, 8); U = torch.randn(5, 2)
        >>> y = gated_spm_linear_ref(x, W, None, D, U, torch.ones(2), torch.tensor([[1., 0.]]), 6)
        >>> torch.allclose(y, x @ W.T + (x @ D[:1].T) @ U[:, :1].T, atol=1e-5)
        True
    """
    if upcast:
        x, weight, down, up = (t.double() for t in (x, weight, down, up))
        bias = bias.double() if bias is not None else None
    y = torch.nn.functional.linear(x, weight, bias)
    z = torch.nn.functional.linear(x, down)
    c = spm_coefficients(z, scale, gates, rows_per_sample, combine, rank)
    return y + c @ up.t()


def merged_weight_ref(
    weight: torch.Tensor,  # [out, in]
    down: torch.Tensor,  # [K*r, in]
    up: torch.Tensor,  # [out, K*r]
    scale: torch.Tensor,  # [K]
    gates: torch.Tensor,  # [K] one gate vector
    combine: str = "linear",
    rank: int = 1,
) -> torch.Tensor:
    """W + (the SPM update for one gate vector), accumulated in float32 (float64 for float64
    weights) and rounded once to the weight's dtype: [out, in].

    One ``addmm`` per layer (no full-size temporaries beyond the result): on SD1.5's 192 layers
    this halved the merge time against an einsum followed by an add.
    """
    k = gates.shape[0]
    acc = torch.promote_types(weight.dtype, torch.float32)
    g = gates.to(acc)
    s = scale.to(acc)
    w = weight.to(acc)
    if combine == "linear":
        u = up.to(acc) * (g * s).repeat_interleave(rank)  # [out, K*r]: gates folded into the small factor
        merged = torch.addmm(w, u, down.to(acc))
    elif combine == "official":
        u_sum = (up.to(acc).view(up.shape[0], k, rank) * g[None, :, None]).sum(1)  # [out, r]
        d_sum = (down.to(acc).view(k, rank, -1) * g[:, None, None]).sum(0)  # [r, in]
        merged = torch.addmm(w, u_sum, d_sum, alpha=float(s[0]))
    else:
        raise ValueError(f"combine must be one of {COMBINES}, got {combine!r}")
    return merged.to(weight.dtype)
