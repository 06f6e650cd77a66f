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
  ``scale[0]`` is then the network-wide scale (the first SPM's metadata alpha / rank, in every
  module: see ``spm_rt.stack``).

Also here, importable without triton (the CPU fallback and the float64 path of the custom ops):
the grouped forward and backward in torch (``gated_spm_linear_torch``,
``gated_spm_linear_bwd_ref``) that the Triton kernels implement, and ``GatedOperands``, the one
record of the op's operands that the launchers (Triton, native, custom ops) pass around.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch

COMBINES = ("linear", "official")


@dataclasses.dataclass(frozen=True)
class GatedOperands:
    """The operands of one gated projection (G groups of K stacked rank-r SPMs), in the order every
    public launcher takes them: ``f(x, weight, bias, down, up, scale, gates, rows_per_sample,
    combine, rank, groups)``.

    Example::

        >>> x, W = torch.randn(6, 8), torch.randn(4, 8)
        >>> ops = GatedOperands(x, W, None, torch.randn(2, 8), torch.randn(4, 2), torch.ones(2),
        ...                     torch.ones(2, 2), rows_per_sample=3)
        >>> ops.shapes()  # (out per group, K, K*r)
        (4, 2, 2)
        >>> y, c = gated_spm_linear_torch(*ops.astuple())
    """

    x: torch.Tensor  # [M, in] (or [..., in])
    weight: torch.Tensor  # [G*out, in]
    bias: Optional[torch.Tensor]  # [G*out]
    down: torch.Tensor  # [G*K*r, in]
    up: torch.Tensor  # [G*out, K*r]
    scale: torch.Tensor  # [K] or [G*K], float32
    gates: torch.Tensor  # [B, K] float32; M = B * rows_per_sample
    rows_per_sample: int
    combine: str = "linear"
    rank: int = 1
    groups: int = 1

    def astuple(self) -> tuple:
        """The 11 operands in launcher order (shallow: the tensors themselves)."""
        return tuple(getattr(self, f.name) for f in dataclasses.fields(self))

    def replace(self, **changes) -> "GatedOperands":
        return dataclasses.replace(self, **changes)

    @property
    def x2(self) -> torch.Tensor:
        """x as [M, in] (a view where possible)."""
        return self.x.reshape(-1, self.x.shape[-1]) if self.x.dim() != 2 else self.x

    def check_types(self, *, gates_contiguous: bool, x: torch.Tensor | None = None) -> None:
        """check_operand_types on these operands (x: the tensor whose dtype and device rule)."""
        check_operand_types(self.x if x is None else x, self.weight, self.bias, self.down, self.up, self.scale,
                            self.gates, self.rank, self.groups, gates_contiguous=gates_contiguous)

    def shapes(self, x_features: int | None = None, m_rows: int | None = None) -> tuple[int, int, int]:
        """check_operand_shapes: (out per group, K, K*r); x's features and rows unless given."""
        x2 = self.x2
        return check_operand_shapes(x2.shape[1] if x_features is None else x_features,
                                    x2.shape[0] if m_rows is None else m_rows, self.weight, self.bias, self.down,
                                    self.up, self.scale, self.gates, self.rows_per_sample, self.rank, self.groups)


def gate_coefficients(
    z: torch.Tensor,  # [B, ..., K, r, ...]: sample on axis 0, SPM on k_axis, rank on k_axis + 1
    gates: torch.Tensor,  # [B, K] float32, one gate vector per sample
    scale: torch.Tensor,  # [K] float32 (the stacked layout's scale; official reads scale[0] only)
    combine: str,
    k_axis: int,
    *,
    inplace: bool = False,
) -> torch.Tensor:
    """The gating of the shrink output, written once for every torch consumer (this reference,
    the torch backend in ``spm_rt.functional`` and the ONNX exporter): returns c, z's shape and
    dtype.

    ``linear``: ``c = z * gates[b, k] * scale[k]``; ``official``:
    ``c[b, .., k, j, ..] = scale[0] * gates[b, k] * sum_k' gates[b, k'] z[b, .., k', j, ..]``.
    Gate-times-scale products are formed in float32 (float64 for float64 z), then cast to z's
    dtype; the rest of the math runs in z's dtype. ``inplace=True`` (linear only, no autograd)
    multiplies z in place. Only elementwise ops, a sum and a reshape of the ``[B, K]`` gates: in an
    ONNX graph the ``scale`` initializer feeds a Mul directly.
    """
    if combine not in COMBINES:
        raise ValueError(f"combine must be one of {COMBINES}, got {combine!r}")
    k = gates.shape[1]
    view = [gates.shape[0]] + [1] * (z.dim() - 1)
    view[k_axis] = k

    def per_k(t):  # [B, K] -> broadcastable against z
        return t.reshape(view)

    def as_(t, dtype):  # no cast node where none is needed (an ONNX Cast would sit between scale and its Mul)
        return t if t.dtype == dtype else t.to(dtype)

    acc = torch.promote_types(z.dtype, torch.float32)
    g = as_(gates, acc)
    if combine == "linear":
        coef = per_k(as_(g * as_(scale, acc), z.dtype))
        return z.mul_(coef) if inplace else z * coef
    w = (z * per_k(as_(g, z.dtype))).sum(dim=k_axis, keepdim=True)
    return w * per_k(as_(g * as_(scale[0], acc), z.dtype))


def spm_coefficients(
    z: torch.Tensor,  # [M, K*r] shrink output x D^T
    scale: torch.Tensor,  # [K] per-SPM alpha / rank
    gates: torch.Tensor,  # [B, K] per-sample gates
    rows_per_sample: int,
    combine: str = "linear",
    rank: int = 1,
) -> torch.Tensor:
    """Gate the shrink output: returns c [M, K*r] in z's dtype (:func:`gate_coefficients` on
    row-major z)."""
    if combine not in COMBINES:
        raise ValueError(f"combine must be one of {COMBINES}, got {combine!r}")
    m, kr = z.shape
    k = gates.shape[1]
    if kr != k * rank:
        raise ValueError(f"z has {kr} columns, expected K*r = {k}*{rank}")
    b = gates.shape[0]
    if m != b * rows_per_sample:
        raise ValueError(f"{m} rows do not split into {b} samples of {rows_per_sample} rows")
    z4 = z.reshape(b, rows_per_sample, k, rank)
    return gate_coefficients(z4, gates, scale, combine, 2).reshape(m, kr)


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
    out: torch.Tensor | None = None,  # [out, in] in weight's dtype: written in place when given
) -> torch.Tensor:
    """W + (the SPM update for one gate vector), accumulated in float32 (float64 for float64
    weights) and rounded once to the weight's dtype: [out, in].

    One ``addmm`` per layer (no full-size temporaries beyond the result): on SD1.5's 192 layers
    this halved the merge time against an einsum followed by an add. With ``out`` (a persistent
    merged-weight buffer) the result is written there: directly by the addmm where the
    accumulation dtype is the weight's own, else by one rounding copy.
    """
    k = gates.shape[0]
    acc = torch.promote_types(weight.dtype, torch.float32)
    g = gates.to(acc)
    s = scale.to(acc)
    w = weight.to(acc)
    direct = out if out is not None and out.dtype == acc else None  # addmm writes the buffer itself
    if combine == "linear":
        u = up.to(acc) * (g * s).repeat_interleave(rank)  # [out, K*r]: gates folded into the small factor
        merged = torch.addmm(w, u, down.to(acc), out=direct)
    elif combine == "official":
        u_sum = (up.to(acc).view(up.shape[0], k, rank) * g[None, :, None]).sum(1)  # [out, r]
        d_sum = (down.to(acc).view(k, rank, -1) * g[:, None, None]).sum(0)  # [r, in]
        merged = torch.addmm(w, u_sum, d_sum, alpha=float(s[0]), out=direct)
    else:
        raise ValueError(f"combine must be one of {COMBINES}, got {combine!r}")
    if out is None:
        return merged.to(weight.dtype)
    if direct is None:
        out.copy_(merged)  # round once into the weight dtype
    return out


def merged_update_error(
    weight: torch.Tensor,  # [out, in] in the weight dtype the merge rounds to
    down: torch.Tensor,  # [K*r, in]
    up: torch.Tensor,  # [out, K*r]
    scale: torch.Tensor,  # [K]
    gates: torch.Tensor,  # [K] one gate vector
    combine: str = "linear",
    rank: int = 1,
    rows_per_chunk: int = 1024,
) -> float:
    """How much of the SPM update the merged weight loses to rounding: ``|(round(W + dW) - W) -
    dW| / |dW|`` (Frobenius norms, exact dW in float64), with ``round(W + dW)`` exactly what
    :func:`merged_weight_ref` returns. 0.0 when the update is zero.

    Round-to-nearest drops every element of dW below half an ulp of W, so the figure grows as the
    weight dtype narrows (fp32 ~1e-5, fp16 ~1e-2, bf16 ~1e-1 on SPM-sized updates). Rows are
    processed in chunks (the merge is row-separable) to bound the float64 temporaries.

    Example::

        >>> W = torch.randn(8, 16); D = torch.randn(1, 16) * 1e-2; U = torch.randn(8, 1) * 1e-2
        >>> merged_update_error(W, D, U, torch.ones(1), torch.ones(1)) < 1e-3
        True
        >>> merged_update_error(W.bfloat16(), D.bfloat16(), U.bfloat16(), torch.ones(1), torch.ones(1)) > 0.5
        True
    """
    err2 = ref2 = 0.0
    for r0 in range(0, weight.shape[0], rows_per_chunk):
        w = weight[r0:r0 + rows_per_chunk]
        u = up[r0:r0 + rows_per_chunk]
        w64 = w.double()
        exact = merged_weight_ref(w64, down.double(), u.double(), scale.double(), gates.double(), combine, rank) - w64
        applied = merged_weight_ref(w, down, u, scale, gates, combine, rank).double() - w64
        err2 += float((applied - exact).pow(2).sum())
        ref2 += float(exact.pow(2).sum())
    return (err2 / ref2) ** 0.5 if ref2 > 0 else 0.0


# ---------------------------------------------------------------------------------------------
# Torch versions of the same formulas: the float64 path of the autograd Function and the oracle


def _group_slices(weight, bias, down, up, scale, gates, groups):
    n = weight.shape[0] // groups
    k = gates.shape[1]
    kr = down.shape[0] // groups
    for g in range(groups):
        s = scale if scale.shape[0] == k else scale[g * k:(g + 1) * k]
        yield (slice(g * n, (g + 1) * n), slice(g * kr, (g + 1) * kr), weight[g * n:(g + 1) * n],
               None if bias is None else bias[g * n:(g + 1) * n], down[g * kr:(g + 1) * kr],
               up[g * n:(g + 1) * n], s)


def gated_spm_linear_torch(
    x: torch.Tensor,  # [M, in]
    weight: torch.Tensor,  # [G*out, in]
    bias: torch.Tensor | None,  # [G*out]
    down: torch.Tensor,  # [G*K*r, in]
    up: torch.Tensor,  # [G*out, K*r]
    scale: torch.Tensor,  # [K] or [G*K]
    gates: torch.Tensor,  # [B, K]
    rows_per_sample: int,
    combine: str = "linear",
    rank: int = 1,
    groups: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Grouped reference forward in x's dtype: returns (y [M, G*out], c [M, G*K*r]).

    Example::

        >>> y, c = gated_spm_linear_torch(x, W, None, D, U, s, g, rows_per_sample=77)  # doctest: +SKIP
    """
    ys, cs = [], []
    for _, _, w_g, b_g, d_g, u_g, s_g in _group_slices(weight, bias, down, up, scale, gates, groups):
        c_g = spm_coefficients(x @ d_g.t(), s_g, gates, rows_per_sample, combine, rank)
        ys.append(torch.nn.functional.linear(x, w_g, b_g) + c_g @ u_g.t())
        cs.append(c_g)
    return torch.cat(ys, dim=1), torch.cat(cs, dim=1)


def gated_spm_linear_bwd_ref(
    dy: torch.Tensor,  # [M, G*out]
    x: torch.Tensor,  # [M, in]
    weight: torch.Tensor,  # [G*out, in]
    down: torch.Tensor,  # [G*K*r, in]
    up: torch.Tensor,  # [G*out, K*r]
    scale: torch.Tensor,  # [K] or [G*K]
    gates: torch.Tensor,  # [B, K]
    rows_per_sample: int,
    combine: str = "linear",
    rank: int = 1,
    groups: int = 1,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward of the op in torch (math in x's dtype): returns (dx, d_down, d_up).

    ``dc = dy U; dz = coefficients(dc); dU = dy^T c; dD = dz^T x; dx = dy W + dz D``; the gating
    map is symmetric (diagonal for "linear", ``s0 g g^T (x) I_r`` for "official"), so the
    coefficients function is its own adjoint.

    Example::

        >>> dx, dD, dU = gated_spm_linear_bwd_ref(dy, x, W, D, U, s, g, rows_per_sample=6)  # doctest: +SKIP
    """
    dx = dy.new_zeros(x.shape)
    dd = torch.empty_like(down)
    du = torch.empty_like(up)
    for cols, rs, w_g, _, d_g, u_g, s_g in _group_slices(weight, None, down, up, scale, gates, groups):
        dy_g = dy[:, cols]
        c_g = spm_coefficients(x @ d_g.t(), s_g, gates, rows_per_sample, combine, rank)
        dz_g = spm_coefficients(dy_g @ u_g, s_g, gates, rows_per_sample, combine, rank)
        du[cols] = dy_g.t() @ c_g
        dd[rs] = dz_g.t() @ x
        dx += dy_g @ w_g + dz_g @ d_g
    return dx, dd, du


# ---------------------------------------------------------------------------------------------
# Operand checks shared by the launchers (Triton: kernels/gated_linear.py; the AOT library's
# loader: kernels/native.py). Types first, then the caller's own device rule, then shapes.


def check_operand_types(x, weight, bias, down, up, scale, gates, rank, groups, *, gates_contiguous: bool) -> None:
    """rank/groups, dtypes (x's for weight/down/up/bias, float32 for scale/gates), contiguity, one
    device. ``gates_contiguous=False`` allows strided (e.g. ``expand``ed) gates."""
    if not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be a positive int, got {rank!r}")
    if not isinstance(groups, int) or groups < 1:
        raise ValueError(f"groups must be a positive int, got {groups!r}")
    for name, t in {"weight": weight, "down": down, "up": up, "bias": bias}.items():
        if t is None:
            continue
        if t.dtype != x.dtype:
            raise TypeError(f"{name} has dtype {t.dtype}, expected x's dtype {x.dtype}")
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous (call .contiguous() once when stacking)")
    for name, t in {"scale": scale, "gates": gates}.items():
        if t.dtype != torch.float32:
            raise TypeError(f"{name} must be float32, got {t.dtype}")
    if not scale.is_contiguous():
        raise ValueError("scale must be contiguous")
    if gates_contiguous and not gates.is_contiguous():
        raise ValueError("gates must be contiguous")
    all_t = [x, weight, down, up, scale, gates] + ([bias] if bias is not None else [])
    if any(t.device != x.device for t in all_t):
        raise ValueError(f"all tensors must be on one device, got {sorted({str(t.device) for t in all_t})}")


def check_operand_shapes(x_features: int, m_rows: int, weight, bias, down, up, scale, gates, rows_per_sample, rank,
                         groups) -> tuple[int, int, int]:
    """The stacked layout's shapes for G groups of K SPMs; returns (out per group, K, K*r)."""
    if weight.dim() != 2 or down.dim() != 2 or up.dim() != 2:
        raise ValueError("weight, down and up must be 2-D: [G*out, in], [G*K*r, in], [G*out, K*r]")
    if gates.dim() != 2:
        raise ValueError(f"gates must be [B, K], got shape {tuple(gates.shape)}")
    n_total, in_f = weight.shape
    if n_total % groups:
        raise ValueError(f"weight has {n_total} rows, not divisible by groups={groups}")
    k = gates.shape[1]
    kr = k * rank
    if x_features != in_f:
        raise ValueError(f"x has {x_features} features, weight expects {in_f}")
    if tuple(down.shape) != (groups * kr, in_f):
        raise ValueError(f"down must be [G*K*r, in] = [{groups * kr}, {in_f}], got {tuple(down.shape)}")
    if tuple(up.shape) != (n_total, kr):
        raise ValueError(f"up must be [G*out, K*r] = [{n_total}, {kr}], got {tuple(up.shape)}")
    if bias is not None and tuple(bias.shape) != (n_total,):
        raise ValueError(f"bias must be [G*out] = [{n_total}], got {tuple(bias.shape)}")
    if scale.dim() != 1 or scale.shape[0] not in (k, groups * k):
        raise ValueError(f"scale must be [K] or [G*K] with K = {k}, got {tuple(scale.shape)}")
    if not isinstance(rows_per_sample, int) or rows_per_sample < 1:
        raise ValueError(f"rows_per_sample must be a positive int, got {rows_per_sample!r}")
    if gates.shape[0] * rows_per_sample != m_rows:
        raise ValueError(f"{m_rows} rows do not split into {gates.shape[0]} samples of {rows_per_sample} rows")
    return n_total // groups, k, kr
