"""Triton gated-SPM kernels vs the float64 reference, run on CPU by the Triton interpreter.

Triton decides interpreter-or-compiler when a kernel is decorated, i.e. when its module is
imported. Other test modules may import ``spm_rt.kernels.gated_linear`` (and triton) first in the
same pytest process, so this file loads its own copy of the module and of its kernels
(``gated_linear._load_copy``) with TRITON_INTERPRET=1 set only for that load; the interpreted
kernels then run on CPU tensors whatever was imported before.

Tolerances (house rule): fp32 relative error < 1e-5 against float64; fp16/bf16 at most 2x the
error PyTorch makes at that dtype (the reference run at that dtype against float64).
Under the interpreter, bf16 dots run as fp32 dots of the bf16 values (``_mma``'s UPCAST_DOT, the
interpreter multiplies raw bf16 bit patterns otherwise): bf16 loads, casts and stores are checked
here, the bf16 tensor-core MMA only on a GPU. The interpreter's fp32 -> bf16 cast truncates instead
of rounding to nearest (measured: 2x the rounding error of torch's cast), so the bf16 errors here
run about 1.4x PyTorch's, still inside the 2x rule; on a GPU the cast rounds to nearest.
"""
from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("triton")

from subproc import run_python  # noqa: E402
from spm_rt.kernels import tiles as T  # noqa: E402  (the tile table the launcher reads at call time)
from spm_rt.kernels.reference import gated_spm_linear_ref  # noqa: E402


def _load_interpreted():
    from spm_rt.kernels.gated_linear import _load_copy

    mod = _load_copy("_gated_linear_interpreted", interpret=True)  # the launchers and their kernels
    assert mod._interpreting(), "kernels were not built by the interpreter"
    return mod


gl = _load_interpreted()


@pytest.fixture(autouse=True)
def _ops_use_interpreted(monkeypatch):
    """The registered custom ops (spm_rt.kernels.ops, used by GatedSPMLinearFunction) run this
    file's interpreted kernels."""
    import spm_rt.kernels.ops as ops

    monkeypatch.setattr(ops, "kernel_module", gl)

SMALL_TILES = dict(FWD_BLOCK_M=16, FWD_BLOCK_M_SMALL=16, FWD_BLOCK_N=16, FWD_BLOCK_K=16, FWD_BLOCK_M_FP32=16,
                   FWD_BLOCK_K_FP32=16, LOAD_BLOCK_R=16, SHRINK_BLOCK_M=16, SHRINK_BLOCK_K=16, LOWRANK_BLOCK_M=16,
                   LOWRANK_BLOCK_PQ=16)


@pytest.fixture
def tiles(monkeypatch):
    """tiles("small") forces 16-wide tiles: several M/N tiles, K-loop remainders, R chunks, M splits."""

    def apply(kind):
        if kind == "small":
            for name, value in SMALL_TILES.items():
                monkeypatch.setattr(T, name, value)
            # the forward's tile table: 16-wide tiles, fused up to pad16(K*r) = 32 (K = 17 splits)
            small = T.FwdConfig(16, 16, 16, 4, 3, 32)
            monkeypatch.setattr(T, "FWD_TABLE", ((0, 1 << 30, small),))
            monkeypatch.setattr(T, "CFG_FP32", small)

    return apply


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _tol(dtype, torch_err):
    return 1e-5 if dtype == torch.float32 else 2 * torch_err


def _make(m, in_f, out, k, r, groups, bias, seed=0, samples=3, shared_scale=True):
    """float64 inputs; rows_per_sample = m // samples."""
    gen = torch.Generator().manual_seed(seed)
    f = dict(dtype=torch.float64, generator=gen)
    x = torch.randn(m, in_f, **f)
    w = torch.randn(groups * out, in_f, **f) / in_f**0.5
    b = torch.randn(groups * out, **f) if bias else None
    d = torch.randn(groups * k * r, in_f, **f) / in_f**0.5
    u = torch.randn(groups * out, k * r, **f) / (k * r) ** 0.5
    scale = (torch.rand(k if shared_scale else groups * k, generator=gen) + 0.5).float()
    gates = torch.rand(samples, k, generator=gen).float()
    gates[0, 0] = 0.0  # a fully closed gate
    return x, w, b, d, u, scale, gates, m // samples


def _grouped_ref(x, w, b, d, u, scale, gates, rps, combine, r, groups, upcast):
    """Group-by-group gated_spm_linear_ref (the single-projection oracle), concatenated."""
    n, k = w.shape[0] // groups, gates.shape[1]
    kr = k * r
    ys = []
    for g in range(groups):
        s = scale if scale.shape[0] == k else scale[g * k:(g + 1) * k]
        ys.append(gated_spm_linear_ref(x, w[g * n:(g + 1) * n], None if b is None else b[g * n:(g + 1) * n],
                                       d[g * kr:(g + 1) * kr], u[g * n:(g + 1) * n], s, gates, rps, combine, r,
                                       upcast=upcast))
    return torch.cat(ys, dim=1)


# (dtype, combine, K, r, bias, groups, pattern, tiles, m, in, out): tiny odd shapes, every flag
FWD_CASES = [
    (torch.float32, "linear", 1, 1, True, 1, "fused", "default", 21, 37, 29),
    (torch.float32, "official", 3, 2, False, 1, "fused", "small", 21, 37, 29),
    (torch.float32, "linear", 17, 1, True, 3, "split", "small", 21, 37, 29),
    (torch.float32, "official", 17, 2, True, 1, "split", "small", 21, 48, 29),
    (torch.float16, "linear", 3, 2, True, 3, "fused", "small", 21, 48, 29),
    (torch.float16, "official", 1, 1, False, 3, "split", "default", 21, 37, 29),
    (torch.float16, "official", 17, 1, True, 1, "auto", "default", 21, 37, 29),
    (torch.bfloat16, "linear", 17, 2, False, 1, "fused", "small", 21, 37, 29),
    (torch.bfloat16, "official", 3, 1, True, 3, "split", "small", 21, 37, 29),
]


@pytest.mark.parametrize("dtype,combine,k,r,bias,groups,pattern,tile_kind,m,in_f,out", FWD_CASES)
def test_forward_matches_fp64_reference(tiles, dtype, combine, k, r, bias, groups, pattern, tile_kind, m, in_f, out):
    tiles(tile_kind)
    x, w, b, d, u, s, g, rps = _make(m, in_f, out, k, r, groups, bias)
    lo = [t.to(dtype) if t is not None else None for t in (x, w, b, d, u)]
    y = gl.gated_spm_linear_triton(*lo, s, g, rps, combine, r, groups, pattern=pattern)
    assert y.dtype == dtype and y.shape == (m, groups * out)
    y64 = _grouped_ref(*[t.double() if t is not None else None for t in lo], s, g, rps, combine, r, groups, True)
    torch_err = _rel(_grouped_ref(*lo, s, g, rps, combine, r, groups, False), y64)
    err = _rel(y, y64)
    assert err < _tol(dtype, torch_err), f"kernel rel err {err:.2e}, torch at {dtype}: {torch_err:.2e}"


def test_forward_per_group_scale_and_strided_rows():
    """scale [G*K] (one scale vector per projection) and x given as a row-strided view."""
    x, w, b, d, u, s, g, rps = _make(12, 20, 18, 3, 1, 2, True, shared_scale=False, samples=2)
    x_big = torch.randn(12, 40, dtype=torch.float64)
    x_big[:, 5:25] = x
    xv = x_big.float()[:, 5:25]  # rows strided by 40, last dim contiguous
    assert not xv.is_contiguous()
    y = gl.gated_spm_linear_triton(xv, w.float(), b.float(), d.float(), u.float(), s, g, rps, "linear", 1, 2)
    y64 = _grouped_ref(x, w, b, d, u, s, g, rps, "linear", 1, 2, True)
    assert _rel(y, y64) < 1e-5


def _grad_case(dtype, combine, k, r, groups, m=21, in_f=37, out=29, tile_kind="default", tiles=None, seed=1):
    tiles(tile_kind)
    x, w, b, d, u, s, g, rps = _make(m, in_f, out, k, r, groups, True, seed=seed)
    dy = torch.randn(m, groups * out, dtype=torch.float64, generator=torch.Generator().manual_seed(seed + 7))

    def run(fn, dt):
        xs, ds, us = (t.detach().to(dt).clone().requires_grad_() for t in (x, d, u))
        y = fn(xs, w.to(dt), b.to(dt), ds, us)
        y.backward(dy.to(dt))
        return y, xs.grad, ds.grad, us.grad

    def torch_op(xs, w_, b_, ds, us):
        return _grouped_ref(xs, w_, b_, ds, us, s, g, rps, combine, r, groups, False)

    def triton_op(xs, w_, b_, ds, us):
        return gl.GatedSPMLinearFunction.apply(xs, w_, b_, ds, us, s, g, rps, combine, r, groups)

    want = run(torch_op, torch.float64)
    torch_lo = run(torch_op, dtype)
    got = run(triton_op, dtype)
    for name, a, ref, tl_ in zip(("y", "dx", "d_down", "d_up"), got, want, torch_lo):
        assert a.dtype == dtype
        err, torch_err = _rel(a, ref), _rel(tl_, ref)
        assert err < _tol(dtype, torch_err), f"{name}: kernel rel err {err:.2e}, torch at {dtype}: {torch_err:.2e}"


# (dtype, combine, K, r, groups, tiles)
GRAD_CASES = [
    (torch.float32, "linear", 3, 2, 1, "small"),
    (torch.float32, "official", 17, 1, 3, "small"),
    (torch.float32, "official", 1, 2, 1, "default"),
    (torch.float16, "linear", 17, 2, 3, "default"),
    (torch.float16, "official", 3, 1, 1, "small"),
    (torch.bfloat16, "official", 3, 2, 3, "small"),
    (torch.bfloat16, "linear", 1, 1, 1, "default"),
]


@pytest.mark.parametrize("dtype,combine,k,r,groups,tile_kind", GRAD_CASES)
def test_gradients_match_fp64_autograd(tiles, dtype, combine, k, r, groups, tile_kind):
    _grad_case(dtype, combine, k, r, groups, tile_kind=tile_kind, tiles=tiles)


def test_gradient_of_x_only_and_3d_input():
    """Frozen SPMs (no c stored in the forward) and x with leading batch dims."""
    x, w, b, d, u, s, g, rps = _make(12, 20, 18, 3, 2, 1, True, samples=2)
    x3 = x.float().view(2, 6, 20).requires_grad_()
    y = gl.GatedSPMLinearFunction.apply(x3, w.float(), b.float(), d.float(), u.float(), s, g, rps, "official", 2)
    assert y.shape == (2, 6, 18)
    dy = torch.randn(2, 6, 18)
    y.backward(dy)
    x64 = x.clone().requires_grad_()
    gated_spm_linear_ref(x64, w, b, d, u, s, g, rps, "official", 2, upcast=True).backward(dy.double().view(12, 18))
    y64 = gated_spm_linear_ref(x, w, b, d, u, s, g, rps, "official", 2, upcast=True)
    assert _rel(y.detach().view(12, 18), y64) < 1e-5
    assert _rel(x3.grad.view(12, 20), x64.grad) < 1e-5


@pytest.mark.parametrize("combine", ["linear", "official"])
@pytest.mark.parametrize("groups", [1, 2])
def test_gradcheck_fp64(combine, groups):
    """float64 runs the torch formulas of the backward; gradcheck checks them against finite differences."""
    x, w, b, d, u, s, g, rps = _make(6, 5, 4, 3, 2, groups, True, samples=2)
    x, d, u = (t.requires_grad_() for t in (x, d, u))

    def fn(x_, d_, u_):
        return gl.GatedSPMLinearFunction.apply(x_, w, b, d_, u_, s, g, rps, combine, 2, groups)

    assert torch.autograd.gradcheck(fn, (x, d, u))


@pytest.mark.parametrize("combine", ["linear", "official"])
def test_bwd_ref_matches_autograd(combine):
    x, w, b, d, u, s, g, rps = _make(12, 9, 7, 3, 2, 3, False, samples=2)
    dy = torch.randn(12, 21, dtype=torch.float64)
    xs, ds, us = (t.clone().requires_grad_() for t in (x, d, u))
    _grouped_ref(xs, w, b, ds, us, s, g, rps, combine, 2, 3, True).backward(dy)
    dx, dd, du = gl.gated_spm_linear_bwd_ref(dy, x, w, d, u, s.double(), g.double(), rps, combine, 2, 3)
    for got, want in ((dx, xs.grad), (dd, ds.grad), (du, us.grad)):
        assert _rel(got, want) < 1e-12


@pytest.mark.parametrize("dtype,fmt,combine,pattern", [
    (torch.float32, torch.contiguous_format, "official", "fused"),
    (torch.float32, torch.channels_last, "linear", "split"),
    (torch.float16, torch.contiguous_format, "linear", "fused"),
])
def test_conv1x1_reads_and_writes_x_layout(tiles, dtype, fmt, combine, pattern):
    tiles("small")  # 35 pixels per image over 16-row tiles: partial tiles inside each image
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 24, 5, 7, dtype=torch.float64, generator=gen)
    w = torch.randn(40, 24, 1, 1, dtype=torch.float64, generator=gen) / 5
    b = torch.randn(40, dtype=torch.float64, generator=gen)
    d = torch.randn(6, 24, dtype=torch.float64, generator=gen) / 5
    u = torch.randn(40, 6, dtype=torch.float64, generator=gen)
    s, g = torch.rand(3, generator=gen) + 0.5, torch.rand(2, 3, generator=gen)
    lo = [t.to(dtype) for t in (x, w, b, d, u)]
    y = gl.gated_spm_conv1x1_triton(lo[0].contiguous(memory_format=fmt), *lo[1:], s, g, combine, 2, pattern=pattern)
    assert y.shape == (2, 40, 5, 7) and y.is_contiguous(memory_format=fmt)

    def as_rows(t):
        return t.permute(0, 2, 3, 1).reshape(-1, t.shape[1])

    def ref(xx, ww, bb, dd, uu, upcast):
        return gated_spm_linear_ref(as_rows(xx), ww[:, :, 0, 0], bb, dd, uu, s, g, 35, combine, 2, upcast=upcast)

    y64 = ref(*[t.double() for t in lo], True)
    torch_err = _rel(ref(*lo, False), y64)
    assert _rel(as_rows(y), y64) < _tol(dtype, torch_err)


def test_empty_batch():
    x, w, b, d, u, s, g, rps = _make(6, 8, 5, 2, 1, 1, True, samples=2)
    y = gl.gated_spm_linear_triton(x[:0].float(), w.float(), b.float(), d.float(), u.float(), s, g[:0], rps)
    assert y.shape == (0, 5)


@pytest.mark.parametrize("change,message", [
    (dict(x=lambda t: t.double()), "float16, bfloat16 or float32"),
    (dict(w=lambda t: t.half()), "weight has dtype"),
    (dict(u=lambda t: t.t().contiguous().t()), "up must be contiguous"),
    (dict(d=lambda t: t[:-1].contiguous()), "down must be"),
    (dict(g=lambda t: t.double()), "gates must be float32"),
    (dict(rps=lambda v: v + 1), "do not split"),
    (dict(combine=lambda v: "sum"), "combine must be"),
])
def test_launcher_validates_inputs(change, message):
    x, w, b, d, u, s, g, rps = _make(6, 8, 5, 2, 1, 1, True, samples=2)
    args = dict(x=x.float(), w=w.float(), b=b.float(), d=d.float(), u=u.float(), s=s, g=g, rps=rps, combine="linear")
    for key, fn in change.items():
        args[key] = fn(args[key])
    with pytest.raises((ValueError, TypeError), match=message):
        gl.gated_spm_linear_triton(args["x"], args["w"], args["b"], args["d"], args["u"], args["s"], args["g"],
                                   args["rps"], args["combine"])


def test_compiled_module_rejects_cpu_tensors():
    """Outside the interpreter the launcher refuses CPU tensors with a message (no GPU here)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = (
        "import torch\n"
        "from spm_rt.kernels import gated_spm_linear_triton\n"
        "x = torch.randn(4, 8); w = torch.randn(5, 8); d = torch.randn(2, 8); u = torch.randn(5, 2)\n"
        "try:\n"
        "    gated_spm_linear_triton(x, w, None, d, u, torch.ones(2), torch.ones(1, 2), 4)\n"
        "except ValueError as e:\n"
        "    print('REFUSED', e)\n"
    )
    out = run_python(["-c", code], env=env, timeout=120)
    assert "REFUSED the Triton path needs CUDA tensors" in out.stdout, out.stdout + out.stderr


def test_kernels_package_imports_without_triton():
    """spm_rt.kernels never imports triton eagerly; the lazy names say which extra to install."""
    code = (
        "import sys\n"
        "sys.modules['triton'] = None  # make 'import triton' fail\n"
        "import spm_rt.kernels as k\n"
        "assert 'triton' not in [m for m in sys.modules if sys.modules[m] is not None]\n"
        "k.gated_spm_linear_ref\n"
        "try:\n"
        "    k.gated_spm_linear_triton\n"
        "except ImportError as e:\n"
        "    print('LAZY', e)\n"
    )
    out = run_python(["-c", code], timeout=120)
    assert "LAZY" in out.stdout and "spm_rt[triton]" in out.stdout, out.stdout + out.stderr


@pytest.mark.parametrize("combine", ["linear", "official"])
def test_expanded_and_strided_gates_are_read_through_their_strides(combine):
    """gates.expand(B, -1) (row stride 0) and a transposed view were refused ("gates must be
    contiguous"); the kernels take the strides."""
    x, w, b, d, u, s, g, rps = _make(21, 37, 29, 3, 1, 1, True, samples=3)
    lo = [t.float() for t in (x, w, b, d, u)]
    for gates in (g[1:2].expand(3, -1), g.t().contiguous().t()):
        assert not gates.is_contiguous()
        y = gl.gated_spm_linear_triton(*lo, s, gates, rps, combine)
        want = gated_spm_linear_ref(x, w, b, d, u, s, gates.contiguous(), rps, combine, upcast=True)
        assert _rel(y, want) < 1e-5
    xc = torch.randn(2, 8, 3, 5)
    wc, dc, uc = torch.randn(6, 8, 1, 1), torch.randn(3, 8), torch.randn(6, 3)
    gc = g[2:3].expand(2, -1)
    yc = gl.gated_spm_conv1x1_triton(xc, wc, None, dc, uc, s, gc, combine)
    rows = xc.permute(0, 2, 3, 1).reshape(-1, 8)
    want = gated_spm_linear_ref(rows, wc[:, :, 0, 0], None, dc, uc, s, gc.contiguous(), 15, combine, upcast=True)
    assert _rel(yc.permute(0, 2, 3, 1).reshape(-1, 6), want) < 1e-5


def test_row_block_grid_limit_checked_in_forward_and_backward(tiles, monkeypatch):
    """Row blocks run on CUDA grid axis 1 (at most 65535): both the forward and the backward dx
    launch refuse more before launching anything (a lower limit here, so no huge tensors)."""
    tiles("small")  # 16-row blocks: 40 rows are 3 row blocks
    monkeypatch.setattr(T, "MAX_ROW_BLOCKS", 2)
    x, w, b, d, u, s, g, rps = _make(40, 16, 16, 2, 1, 1, False, samples=2)
    x, w, d, u = (t.float() for t in (x, w, d, u))
    with pytest.raises(ValueError, match="row blocks"):
        gl.gated_spm_linear_triton(x, w, None, d, u, s, g, rps)
    dy = torch.randn(40, 16)
    with pytest.raises(ValueError, match="row blocks"):
        gl._backward_triton(dy, x, w, d, u, s, g, None, rps, "linear", 1, 1, True, False, False)
    monkeypatch.setattr(T, "MAX_ROW_BLOCKS", 3)  # at the limit: runs
    dx, _, _ = gl._backward_triton(dy, x, w, d, u, s, g, None, rps, "linear", 1, 1, True, False, False)
    assert dx.shape == x.shape


# ---------------------------------------------------------------------------------------------
# Every forward tiling the runtime can pick (gated_linear.FWD_TABLE / FWD_CANDIDATES / CFG_FP32),
# forced one by one, with programs looping over several N tiles (the shrink computed once per
# program) and without.


_MODES = [  # (combine, r, K, n_per_prog, pattern)
    ("linear", 1, 16, 3, "fused"),  # 3 of the N tiles per program: one shrink for three tiles
    ("official", 2, 5, 2, "fused"),
    ("linear", 1, 16, 1, "fused"),
    ("official", 1, 20, 1, "split"),
]


def _config_cases():
    """fp16: every mode; bf16 (loads, casts, stores: the MMA is the same): one; fp32: every mode."""
    out = []
    for cfg in dict.fromkeys(gl.FWD_CANDIDATES + tuple(c for _, _, c in T.FWD_TABLE)):
        out += [(cfg, torch.float16, *mode) for mode in _MODES] + [(cfg, torch.bfloat16, *_MODES[1])]
    return out + [(gl.CFG_FP32, torch.float32, *mode) for mode in _MODES]


def test_table_configs_are_candidates():
    assert {c for _, _, c in T.FWD_TABLE} <= set(gl.FWD_CANDIDATES)
    assert gl._pick_pattern("auto", 32, gl.CFG_FP32) is False  # fp32 fuses up to K*r 16 only
    assert T.FWD_TABLE[-1][:2] == (0, 1 << 30), "the last row must match every shape"


@pytest.mark.parametrize("cfg,dtype,combine,r,k,n_per_prog,pattern", _config_cases(),
                         ids=lambda v: str(v).replace("torch.", "").replace(" ", "") if not isinstance(v, tuple)
                         else "x".join(map(str, v[:5])))
def test_every_config_matches_fp64(cfg, dtype, combine, r, k, n_per_prog, pattern):
    """Odd sizes (masked rows, K loop, columns), bias, 3 samples, strided x rows, 2 groups."""
    n_tiles = 3 if n_per_prog == 3 else 2
    m, in_f, out = cfg.block_m + 7 * 3 - (cfg.block_m + 7 * 3) % 3, cfg.block_k + 13, cfg.block_n * (n_tiles - 1) + 9
    x, w, b, d, u, s, g, rps = _make(m, in_f, out, k, r, 2, True, seed=5)
    x_big = torch.zeros(m, in_f + 8, dtype=torch.float64)
    x_big[:, 3:3 + in_f] = x
    lo = [t.to(dtype) for t in (x_big, w, b, d, u)]
    xv = lo[0][:, 3:3 + in_f]  # rows strided by in + 8
    with gl.forced_config(cfg, n_per_prog):
        y = gl.gated_spm_linear_triton(xv, *lo[1:], s, g, rps, combine, r, 2, pattern=pattern)
    lo[0] = xv.contiguous()
    y64 = _grouped_ref(*[t.double() for t in lo], s, g, rps, combine, r, 2, True)
    torch_err = _rel(_grouped_ref(*lo, s, g, rps, combine, r, 2, False), y64)
    err = _rel(y, y64)
    assert err < _tol(dtype, torch_err), f"kernel rel err {err:.2e}, torch at {dtype}: {torch_err:.2e}"


@pytest.mark.parametrize("n_tiles,min_programs,want", [(5, 1, 5), (6, 3, 2), (6, 1000, 1), (7, 2, 1), (12, 4, 3), (1, 1, 1)])
def test_n_per_prog_rule(n_tiles, min_programs, want):
    """The largest divisor of the N tiles that keeps the grid at one program per SM or more."""
    assert T.PROGRAMS_PER_SM == 1
    assert T.n_per_prog(n_tiles, 1, min_programs) == want


def test_table_picks():
    f16 = torch.float16
    assert gl._fwd_config(8192, 320, f16) == gl.CFG_64x64
    assert gl._fwd_config(2048, 1280, f16) == gl.CFG_128x128
    assert gl._fwd_config(8192, 2560, f16) == gl.CFG_128x128
    assert gl._fwd_config(154, 640, f16) == gl.CFG_64x64
    assert gl._fwd_config(8192, 320, torch.float32) == gl.CFG_FP32


@pytest.mark.parametrize("m,in_f,n,k,groups,sm_count,want", [
    # out <= 640: 64x64 tiles, one N tile per program whatever the SM count (issue 24)
    (8192, 320, 320, 16, 1, 132, ("64x64", True, 1, (5, 128))),
    (8192, 320, 320, 16, 3, 132, ("64x64", True, 1, (15, 128))),
    (2048, 640, 640, 64, 1, 132, ("64x64", True, 1, (10, 32))),
    (154, 768, 640, 4, 2, 132, ("64x64", True, 1, (20, 3))),
    # ff GEGLU in: 128x128 tiles loop over N tiles while the grid keeps >= one program per SM
    (8192, 320, 2560, 16, 1, 132, ("128x128", True, 5, (4, 64))),   # 64 row blocks x 4 = 256 >= 132
    (8192, 320, 2560, 16, 1, 114, ("128x128", True, 10, (2, 64))),  # H100 PCIe: 128 >= 114
    (8192, 320, 2560, 16, 1, 1000, ("128x128", True, 1, (20, 64))),
    (2048, 640, 5120, 16, 1, 132, ("128x128", True, 4, (10, 16))),
    (8192, 320, 2560, 80, 1, 132, ("128x128", False, 1, (20, 64))),  # pad16(80) = 128 > 64: split
])
def test_forward_plan(m, in_f, n, k, groups, sm_count, want):
    p = T.plan_forward(m, in_f, n, kr=k, groups=groups, dtype="fp16", rows_per_sample=m // 2, sm_count=sm_count)
    assert (f"{p.config.block_m}x{p.config.block_n}", p.fused, p.n_per_prog, p.grid) == want
    assert (p.shrink is None) == p.fused


def test_device_sm_count_without_a_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert T.device_sm_count() == T.DEFAULT_SM_COUNT == 132
    assert T.device_sm_count("cpu") == 132
    assert T.device_arch() == T.DEFAULT_ARCH == 90


def test_ampere_table_has_no_128x128_and_fuses_up_to_32():
    """sm_8x: the 128x128 tile and the 64x64 fused at BLOCK_R 64 spilled there (compile check)."""
    p = T.plan_forward(8192, 320, 2560, kr=16, groups=1, dtype="fp16", rows_per_sample=4096, arch=80)
    assert (p.config.block_m, p.config.block_n, p.n_per_prog, p.fused) == (64, 64, 1, True)
    assert not T.plan_forward(8192, 320, 320, kr=64, groups=1, dtype="fp16", rows_per_sample=4096, arch=86).fused
    assert T.plan_forward(8192, 320, 320, kr=64, groups=1, dtype="fp16", rows_per_sample=4096, arch=90).fused


def test_gradients_with_shrink_shared_across_n_tiles(monkeypatch):
    """STORE_C from a program that loops over N tiles (c written once per row block) feeds d_up."""
    monkeypatch.setattr(T, "DEFAULT_SM_COUNT", 1)  # CPU: no device SM count, so the default rules
    monkeypatch.setattr(T, "FWD_TABLE", ((0, 1 << 30, T.FwdConfig(16, 16, 16, 4, 3, 32, n_loop=True)),))
    x, w, b, d, u, s, g, rps = _make(21, 37, 45, 3, 1, 2, True, seed=2)  # 3 N tiles per group
    dy = torch.randn(21, 90, dtype=torch.float64)
    xs, ds, us = (t.float().clone().requires_grad_() for t in (x, d, u))
    gl.GatedSPMLinearFunction.apply(xs, w.float(), b.float(), ds, us, s, g, rps, "official", 1, 2).backward(dy.float())
    x64, d64, u64 = (t.clone().requires_grad_() for t in (x, d, u))
    _grouped_ref(x64, w, b, d64, u64, s, g, rps, "official", 1, 2, True).backward(dy)
    for got, want in ((xs.grad, x64.grad), (ds.grad, d64.grad), (us.grad, u64.grad)):
        assert _rel(got, want) < 1e-5
