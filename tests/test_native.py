"""spm_rt.kernels.native (ctypes loader of libspm_kernels) on CPU: the error paths always; info(),
plan() and the arch message through ctypes where the library has been built ($SPM_KERNELS_LIB or
build/libspm_kernels.so). The GPU forward is checked by ctest (spm_gpu_forward) and
bench/gpu_check.sh, not here.

One kernel table: for every layer shape of the GPU check, the Triton launcher's launches (recorded
on CPU) and the library's plan (spm_plan_create, from the table native/aot.py generated from
kernels/tiles.py) must be the same kernel: tile, warps, stages, pattern, BLOCK_R, N tiles per
program, grid, alignment specialisation. A second test shows the check fails when the tables differ.
"""
from __future__ import annotations

import ctypes.util
import logging
import os
import sys
from pathlib import Path

import pytest
import torch

from spm_rt.kernels import native

REPO = Path(__file__).resolve().parent.parent


def _built_library() -> str | None:
    env = os.environ.get(native.ENV_VAR)
    if env:
        return env
    p = REPO / "build" / native.LIBRARY_NAME
    return str(p) if p.exists() else None


BUILT = _built_library()
needs_lib = pytest.mark.skipif(BUILT is None, reason="libspm_kernels not built (cmake -S . -B build && "
                                                     "cmake --build build) and SPM_KERNELS_LIB unset")


@pytest.fixture(autouse=True)
def _fresh_loader(monkeypatch):
    monkeypatch.setattr(native, "_loaded", {})


def _args(dtype=torch.float16, m=8, in_f=32, out=16, k=2):
    return (torch.randn(m, in_f).to(dtype), torch.randn(out, in_f).to(dtype), None, torch.randn(k, in_f).to(dtype),
            torch.randn(out, k).to(dtype), torch.ones(k), torch.ones(2, k), m // 2)


def test_missing_library_names_the_build_and_the_env_var(monkeypatch, tmp_path):
    monkeypatch.setenv(native.ENV_VAR, str(tmp_path / "nope" / "libspm_kernels.so"))
    assert native.library_path() is None
    with pytest.raises(native.NativeUnavailableError, match=r"SPM_KERNELS_LIB=.*does not exist.*cmake -S \. -B build"):
        native.info()
    assert not native.is_available()
    assert "not found" in native.unavailable_reason()
    with pytest.raises(native.NativeUnavailableError):
        native.gated_spm_linear_native(*_args())
    assert issubclass(native.NativeUnavailableError, RuntimeError)


def test_env_var_may_name_a_directory(monkeypatch, tmp_path):
    (tmp_path / native.LIBRARY_NAME).write_bytes(b"not an ELF file")
    monkeypatch.setenv(native.ENV_VAR, str(tmp_path))
    assert native.library_path() == str(tmp_path / native.LIBRARY_NAME)
    with pytest.raises(native.NativeUnavailableError, match="cannot load"):
        native.info()


def test_a_library_that_is_not_spm_kernels(monkeypatch):
    libm = ctypes.util.find_library("m")
    if libm is None:
        pytest.skip("no libm to stand in for a foreign library")
    monkeypatch.setenv(native.ENV_VAR, libm)
    with pytest.raises(native.NativeUnavailableError, match="is not libspm_kernels"):
        native.info()


def test_fallback_triton_runs_the_triton_path_when_the_library_is_missing(monkeypatch, tmp_path):
    pytest.importorskip("triton")
    monkeypatch.setenv(native.ENV_VAR, str(tmp_path / "missing.so"))
    calls = []
    import spm_rt.kernels.gated_linear as gl

    def fake_triton(*args, **kwargs):
        calls.append(kwargs)
        return "triton result"

    monkeypatch.setattr(gl, "gated_spm_linear_triton", fake_triton)
    native.reset_fallbacks()
    assert native.fallbacks() == {}
    assert native.gated_spm_linear_native(*_args(), fallback="triton", pattern="split") == "triton result"
    assert calls == [{"pattern": "split"}]
    with pytest.raises(ValueError, match="fallback"):
        native.gated_spm_linear_native(*_args(), fallback="torch")
    assert native.fallbacks() == {"library unavailable": 1}


def test_fallbacks_are_counted_and_logged(monkeypatch, tmp_path, caplog):
    """A native call that falls back to the Triton JIT is counted by reason; the first of each
    reason is logged at WARNING, later ones at DEBUG; without fallback= it raises."""
    pytest.importorskip("triton")
    import spm_rt.kernels.gated_linear as gl

    monkeypatch.setattr(gl, "gated_spm_linear_triton", lambda *a, **k: "triton")
    native.reset_fallbacks()

    def unsupported(*args):
        raise native.NativeUnavailableError("no variant", "SPM_ERR_UNSUPPORTED")

    monkeypatch.setattr(native, "_forward", unsupported)
    with caplog.at_level(logging.DEBUG, logger="spm_rt.kernels.native"):
        for _ in range(3):
            assert native.gated_spm_linear_native(*_args(), fallback="triton") == "triton"
    assert native.fallbacks() == {"SPM_ERR_UNSUPPORTED": 3}
    levels = [r.levelno for r in caplog.records if "running the Triton JIT" in r.getMessage()]
    assert levels == [logging.WARNING, logging.DEBUG, logging.DEBUG]
    with pytest.raises(native.NativeUnavailableError):
        native.gated_spm_linear_native(*_args())
    assert native.fallbacks() == {"SPM_ERR_UNSUPPORTED": 3}  # no fallback asked: not counted
    native.reset_fallbacks()
    assert native.fallbacks() == {}


def test_native_op_falls_back_visibly(monkeypatch):
    """spm_rt::gated_linear_native (ops.py) asks for the Triton fallback: it is counted."""
    pytest.importorskip("triton")
    import spm_rt.kernels.gated_linear as gl
    import spm_rt.kernels.ops  # noqa: F401  (registers the op)

    x, w, b, d, u, s, g, rows = _args(torch.float32)
    monkeypatch.setattr(gl, "gated_spm_linear_triton", lambda *a, **k: torch.zeros(x.shape[0], w.shape[0]))

    def unsupported(*args):
        raise native.NativeUnavailableError("no variant", "SPM_ERR_UNSUPPORTED")

    monkeypatch.setattr(native, "_forward", unsupported)
    native.reset_fallbacks()
    torch.ops.spm_rt.gated_linear_native(x, w, b, d, u, s, g, rows, "linear", 1, 1)
    assert native.fallbacks() == {"SPM_ERR_UNSUPPORTED": 1}


def test_alignment_of_pointers():
    class P:
        def __init__(self, p):
            self.p = p

        def data_ptr(self):
            return self.p

    assert native._alignment(P(0x1000), None, P(0x2040)) == 64
    assert native._alignment(P(0x100002)) == 2
    assert native._alignment(P(1 << 20)) == 256


@needs_lib
def test_info_lists_the_table_variants(monkeypatch):
    monkeypatch.setenv(native.ENV_VAR, BUILT)
    info = native.info()
    assert info["abi_version"] == native.ABI_VERSION
    assert info["library"] == BUILT
    archs, ranks = info["archs"], info["ranks"]
    assert 1 in ranks and archs and archs == sorted(archs)  # the default build: [80, 90]
    from spm_rt.kernels import tiles

    sys.path.insert(0, str(REPO / "native"))
    import types

    import aot  # native/aot.py: its variant set, derived from the tile table

    # every 16-bit tile of the table has compiled variants with its warps and stages
    per = sum(len(aot.variant_specs(types.SimpleNamespace(tiles=tiles), ranks, arch)) for arch in archs)
    assert len(info["variants"]) == 2 * per
    # every 16-bit tile of each arch's table has compiled variants with its warps and stages
    for arch in archs:
        for _, _, cfg in tiles.table_for(arch):
            assert any(v["arch"] == arch and v["block_m"] == cfg.block_m and v["block_n"] == cfg.block_n
                       and v["num_warps"] == cfg.num_warps and v["num_stages"] == cfg.num_stages
                       for v in info["variants"]), (arch, cfg)
    assert info["max_fused_rank"] == max(c.fused_max_rank for a in archs for _, _, c in tiles.table_for(a))
    assert info["max_split_rank"] == 128


# ---------------------------------------------------------------------------------------------
# One kernel table: the Triton launcher's launch == the native plan, every GPU-check shape

def _compiled_gl():
    """gated_linear with real JITFunctions (recorders replace them; nothing is compiled here)."""
    pytest.importorskip("triton")
    sys.path.insert(0, str(REPO / "bench"))
    import sm90_compile

    return sm90_compile.load_compiled()


_GL = None


class _Launches:
    """Recorders in place of the kernels: (kernel name, grid, args, kwargs) of every launch."""

    def __init__(self, gl):
        self.gl, self.log = gl, []

    def __enter__(self):
        self.saved = {n: getattr(self.gl, n) for n in ("_gated_spm_fwd_kernel", "_gated_shrink_kernel")}
        for n, k in self.saved.items():
            rec = self

            class _R:
                arg_names, name = k.arg_names, n

                def __getitem__(self, grid):
                    return lambda *a, **kw: rec.log.append((self.name, tuple(grid), a, kw))

            setattr(self.gl, n, _R())
        return self.log

    def __exit__(self, *exc):
        for n, k in self.saved.items():
            setattr(self.gl, n, k)
        return False


def _jit_kernels(gl, case, k, dtype, combine):
    """The Triton launcher's launches for one case, as comparable records."""
    import aot

    t = lambda *shape, dt=dtype: torch.empty(*shape, dtype=dt)  # noqa: E731
    with _Launches(gl) as log:
        gl.gated_spm_linear_triton(t(case.m, case.in_f), t(case.n_total, case.in_f), t(case.n_total),
                                   t(case.groups * k, case.in_f), t(case.n_total, k), torch.ones(k),
                                   torch.ones(2, k), case.rows_per_sample, combine, 1, case.groups)
    out = []
    for name, grid, args, kw in log:
        vals = dict(zip(_ARG_NAMES[name], args))
        fused = kw.get("FUSED_SHRINK", False)
        ints = aot.ALIGNED_INTS[name] + (aot.ALIGNED_KR_INTS[name] if not fused else ())
        aligned = kw["EVEN_K"] and all(vals[a] % 16 == 0 for a in ints) and all(
            v.data_ptr() % 16 == 0 for v in args if isinstance(v, torch.Tensor))
        rec = {"kernel": "forward" if name == "_gated_spm_fwd_kernel" else "shrink", "block_m": kw["BLOCK_M"],
               "block_k": kw["BLOCK_K"], "block_r": kw["BLOCK_R"], "num_warps": kw["num_warps"],
               "num_stages": kw["num_stages"], "aligned": bool(aligned), "grid": grid + (1,) * (3 - len(grid))}
        if name == "_gated_spm_fwd_kernel":
            rec.update(block_n=kw["BLOCK_N"], fused=fused, has_bias=kw["HAS_BIAS"], n_per_prog=vals["N_PER_PROG"])
        if name == "_gated_shrink_kernel" or fused:
            rec.update(combine="official" if kw["OFFICIAL"] else "linear", rank=kw["RANK"])
        out.append(rec)
    return out


def _native_kernels(case, k, dtype, combine, arch, sm_count):
    p = native.plan(case.m, case.in_f, case.out, k, 1, case.groups, rows_per_sample=case.rows_per_sample, dtype=dtype,
                    combine=combine, has_bias=True, arch=arch, sm_count=sm_count)
    out = []
    for kind in ("shrink", "forward"):
        v = p["variants"][kind]
        if v is None:
            continue
        rec = {"kernel": kind, "block_m": v["block_m"], "block_k": v["block_k"], "block_r": v["block_r"],
               "num_warps": v["num_warps"], "num_stages": v["num_stages"], "aligned": v["aligned"],
               "grid": p["shrink_grid" if kind == "shrink" else "forward_grid"]}
        if kind == "forward":
            rec.update(block_n=v["block_n"], fused=v["fused"], has_bias=v["has_bias"], n_per_prog=p["n_per_prog"])
        if kind == "shrink" or v["fused"]:
            rec.update(combine=v["combine"], rank=v["rank"])
        out.append(rec)
    return out


_ARG_NAMES = {}


def _gpu_check_cases():
    sys.path.insert(0, str(REPO / "bench"))
    import bench_kernels as bk

    # the native library has no NCHW entry: the 1x1 convs run through the Triton path. K = 96 (beyond
    # the GPU check's K) covers the split pattern (shrink + forward), which K <= 64 never takes.
    return [c for c in bk.sd15_cases() + bk.sdxl_cases() if not c.conv], tuple(bk.KS) + (96,)


def _mismatches(gl, arch, sm_count=0):
    """The JIT launcher planned as on a device of ``arch`` (no GPU here) vs the library's plans."""
    from spm_rt.kernels import tiles

    saved = tiles.device_arch
    tiles.device_arch = lambda device=None: arch
    try:
        return _compare(gl, arch, sm_count)
    finally:
        tiles.device_arch = saved


def _compare(gl, arch, sm_count):
    cases, ks = _gpu_check_cases()
    bad, n = [], 0
    for case in cases:
        for k in ks:
            for dtype in (torch.float16, torch.bfloat16):
                for combine in ("linear", "official"):
                    jit = _jit_kernels(gl, case, k, dtype, combine)
                    nat = _native_kernels(case, k, dtype, combine, arch, sm_count)
                    n += 1
                    if jit != nat:
                        bad.append(f"{case.key} K{k} {dtype} {combine}:\n  triton {jit}\n  native {nat}")
    return bad, n


@pytest.fixture
def gl_compiled():
    global _GL
    if _GL is None:
        _GL = _compiled_gl()
        for name in ("_gated_spm_fwd_kernel", "_gated_shrink_kernel"):
            _ARG_NAMES[name] = getattr(_GL, name).arg_names
    sys.path.insert(0, str(REPO / "native"))
    return _GL


@needs_lib
def test_native_plan_is_the_triton_launchers_kernel(monkeypatch, gl_compiled):
    """Every (non-conv) layer shape of the GPU check, K in {1, 4, 16, 64} (+ 96: split), fp16/bf16, both
    combines, on every architecture of the build (the JIT plans for the default SM count here: no GPU)."""
    monkeypatch.setenv(native.ENV_VAR, BUILT)
    for arch in native.info()["archs"]:
        bad, n = _mismatches(gl_compiled, arch)
        assert n >= 100 and not bad, f"{len(bad)} of {n} differ:\n" + "\n".join(bad[:5])


@needs_lib
def test_the_kernel_check_fails_when_the_tables_differ(monkeypatch, gl_compiled):
    """The comparison can fail: a Python table that is not the one the library was built from, or
    another SM count, is caught."""
    from spm_rt.kernels import tiles

    monkeypatch.setenv(native.ENV_VAR, BUILT)
    arch = native.info()["archs"][-1]
    table = "FWD_TABLE" if arch >= 90 else "FWD_TABLE_SM80"
    monkeypatch.setattr(tiles, table, ((0, 1 << 30, tiles.CFG_128x64),))  # another table in Python
    bad, n = _mismatches(gl_compiled, arch)
    assert len(bad) >= n // 2, (len(bad), n)
    monkeypatch.undo()
    monkeypatch.setenv(native.ENV_VAR, BUILT)
    if arch >= 90:  # the table with the N loop
        bad, _ = _mismatches(gl_compiled, arch, sm_count=114)  # the JIT planned for 132 SMs (no GPU here)
        assert any("n_per_prog" in b and "8192x320->2560" in b for b in bad)


@needs_lib
def test_library_errors_become_python_exceptions(monkeypatch):
    monkeypatch.setenv(native.ENV_VAR, BUILT)
    with pytest.raises(native.NativeUnavailableError, match="SPM_ERR_ARCH.*SPM_CUDA_ARCHS") as exc:
        native.plan(8192, 320, 320, 16, arch=75)
    assert exc.value.status == "SPM_ERR_ARCH"
    with pytest.raises(native.NativeUnavailableError, match="SPM_ERR_UNSUPPORTED"):
        native.plan(8192, 320, 320, 16, rank=7)
    with pytest.raises(native.NativeUnavailableError, match="SPM_ERR_UNSUPPORTED"):
        native.plan(8192, 320, 320, 80, pattern="fused")  # pad16(80) = 128 > the tiles' fused_max_rank
    with pytest.raises(native.NativeUnavailableError, match="SPM_ERR_UNSUPPORTED"):
        native.plan(8192, 320, 320, 16, pattern="fused", alignment=2)  # fused variants need 16-byte alignment
    assert "_generic_" in native.plan(8192, 320, 320, 16, alignment=2)["forward"]
    with pytest.raises(native.NativeUnavailableError, match="float16 and bfloat16"):
        native.plan(8192, 320, 320, 16, dtype=torch.float32)
    with pytest.raises(ValueError, match="SPM_ERR_SHAPE"):
        native.plan(8191, 320, 320, 16, rows_per_sample=4096)
    with pytest.raises(ValueError, match="SPM_ERR_TOO_LARGE"):
        native.plan(65536 * 128, 320, 320, 16)
    with pytest.raises(ValueError, match="combine"):
        native.plan(8192, 320, 320, 16, combine="sum")


@needs_lib
def test_forward_rejects_what_the_triton_launcher_rejects(monkeypatch):
    monkeypatch.setenv(native.ENV_VAR, BUILT)
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        native.gated_spm_linear_native(*_args())
    x, w, b, d, u, s, g, rows = _args()
    with pytest.raises(TypeError, match="gates must be float32"):
        native.gated_spm_linear_native(x, w, b, d, u, s, g.double(), rows)
    with pytest.raises(ValueError, match="weight must be contiguous"):
        native.gated_spm_linear_native(x, w.t().contiguous().t(), b, d, u, s, g, rows)
    with pytest.raises(TypeError, match="down has dtype"):
        native.gated_spm_linear_native(x, w, b, d.float(), u, s, g, rows)


@needs_lib
def test_device_of_another_architecture_is_reported(monkeypatch):
    monkeypatch.setenv(native.ENV_VAR, BUILT)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (12, 0))
    reason = native.unavailable_reason()
    assert "sm_120" in reason and "SPM_CUDA_ARCHS" in reason
    assert not native.is_available()


@needs_lib
def test_abi_mismatch_asks_for_a_rebuild(monkeypatch):
    monkeypatch.setenv(native.ENV_VAR, BUILT)
    monkeypatch.setattr(native, "ABI_VERSION", 999)
    with pytest.raises(native.NativeUnavailableError, match="rebuild the library"):
        native.info()


@needs_lib
def test_no_driver_is_reported_without_crashing(monkeypatch):
    """On this CPU machine (or with the driver hidden) the library reports the driver, not a crash."""
    monkeypatch.setenv(native.ENV_VAR, BUILT)
    lib = native._load()
    status = lib.spm_kernels_init()
    if status == native.SPM_OK:
        pytest.skip("a CUDA driver and device are present")
    assert native._STATUS[status] in ("SPM_ERR_NO_DRIVER", "SPM_ERR_NO_DEVICE")
    assert lib.spm_last_error().decode()
