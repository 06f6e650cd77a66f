"""spm_rt.kernels.native (ctypes loader of libspm_kernels) on CPU: the error paths always; info(),
plan() and the arch message through ctypes where the library has been built ($SPM_KERNELS_LIB or
build/libspm_kernels.so). The GPU forward is checked by ctest (spm_gpu_forward) and
bench/gpu_check.sh, not here.
"""
from __future__ import annotations

import ctypes.util
import os
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
    assert native.gated_spm_linear_native(*_args(), fallback="triton", pattern="split") == "triton result"
    assert calls == [{"pattern": "split"}]
    with pytest.raises(ValueError, match="fallback"):
        native.gated_spm_linear_native(*_args(), fallback="torch")


@needs_lib
def test_info_lists_the_expected_variants(monkeypatch):
    monkeypatch.setenv(native.ENV_VAR, BUILT)
    info = native.info()
    assert info["abi_version"] == native.ABI_VERSION
    assert info["library"] == BUILT
    archs, ranks = info["archs"], info["ranks"]
    assert 1 in ranks and archs and archs == sorted(archs)  # the default build: [80, 90]
    per = 2 * len(ranks) * 2 * 2 * 3 + 2 * 3 + 2 * len(ranks) * 2 * 2
    assert len(info["variants"]) == len(archs) * 2 * per
    names = {v["name"] for v in info["variants"]}
    for arch in archs:
        for dt in ("fp16", "bf16"):
            for combine in ("linear", "official"):
                assert f"fwd_fused_{combine}_r1_R16_bias_aligned_M128_{dt}_sm{arch}" in names
                assert f"shrink_{combine}_r1_R128_generic_M64_{dt}_sm{arch}" in names
            assert f"fwd_split_R64_nobias_generic_M64_{dt}_sm{arch}" in names
    assert info["max_fused_rank"] == 32 and info["max_split_rank"] == 128


@needs_lib
def test_plan_matches_the_triton_launcher_rules(monkeypatch):
    monkeypatch.setenv(native.ENV_VAR, BUILT)
    arch = native.info()["archs"][-1]
    p = native.plan(8192, 320, 320, 16, arch=arch)  # SD1.5 self-attention projection
    assert p["fused"] and p["forward"] == f"fwd_fused_linear_r1_R16_bias_aligned_M128_fp16_sm{arch}"
    assert p["forward_grid"] == (5, 64, 1) and p["workspace_bytes"] == 0
    p = native.plan(8192, 320, 320, 16, groups=3, has_bias=False, dtype=torch.bfloat16, combine="official", arch=arch)
    assert p["forward"] == f"fwd_fused_official_r1_R16_nobias_aligned_M128_bf16_sm{arch}"
    assert p["forward_grid"] == (15, 64, 1)  # q/k/v in one launch
    p = native.plan(8192, 320, 320, 64, arch=arch)  # K*r = 64 > FUSED_MAX_RANK: split
    assert not p["fused"] and p["shrink"] == f"shrink_linear_r1_R64_aligned_M64_fp16_sm{arch}"
    assert p["workspace_bytes"] == 8192 * 64 * 2
    assert native.plan(154, 768, 320, 4, arch=arch)["forward"].endswith(f"aligned_M64_fp16_sm{arch}")
    assert "_generic_" in native.plan(1000, 300, 200, 5, rows_per_sample=500, arch=arch)["forward"]


@needs_lib
def test_library_errors_become_python_exceptions(monkeypatch):
    monkeypatch.setenv(native.ENV_VAR, BUILT)
    with pytest.raises(native.NativeUnavailableError, match="SPM_ERR_ARCH.*SPM_CUDA_ARCHS") as exc:
        native.plan(8192, 320, 320, 16, arch=75)
    assert exc.value.status == "SPM_ERR_ARCH"
    with pytest.raises(native.NativeUnavailableError, match="SPM_ERR_UNSUPPORTED"):
        native.plan(8192, 320, 320, 16, rank=7)
    with pytest.raises(native.NativeUnavailableError, match="SPM_ERR_UNSUPPORTED"):
        native.plan(8192, 320, 320, 64, pattern="fused")
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
