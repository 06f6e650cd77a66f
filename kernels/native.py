"""ctypes loader of libspm_kernels: the gated SPM projection compiled ahead of time (no Triton JIT).

The native library (``CMakeLists.txt`` at the repository root; see the README's "Native library")
holds the Triton kernels of ``gated_linear.py`` as cubins for the architectures it was built for
(sm_80 and sm_90 by default), so the first call launches at once. It is optional: nothing else in
``spm_rt`` needs it, and this module imports neither triton nor the library until asked.

Where the library is looked for, first hit wins:

1. ``$SPM_KERNELS_LIB`` (a file, or a directory holding ``libspm_kernels.so``); if set, nothing else;
2. ``libspm_kernels.so`` next to this module (a wheel that ships it);
3. ``build/libspm_kernels.so`` of the source checkout (``cmake -S . -B build && cmake --build build``);
4. the system library path (``ctypes.util.find_library("spm_kernels")``, e.g. after ``cmake --install``).

API:

* ``is_available(device=None)`` / ``unavailable_reason(device=None)``: can the forward run here
  (library found, ABI matches, a CUDA driver and device, cubins for the device's architecture)?
* ``info()``: the library's contents as a dict (version, archs, ranks, variants, path).
* ``gated_spm_linear_native(x, weight, bias, down, up, scale, gates, rows_per_sample, combine="linear",
  rank=1, groups=1, *, pattern="auto", fallback=None)``: the same signature and contract as
  ``gated_spm_linear_triton`` (forward only, fp16/bf16 CUDA tensors, no autograd).
* ``plan(...)``: which compiled variants a call would launch on an architecture (no GPU needed).

Errors: ``NativeUnavailableError`` (a ``NativeKernelError``, a ``RuntimeError``) means "cannot run
here": library missing or built for another architecture or ABI, no driver/device, or no compiled
variant (fp32 inputs, a rank or K*r the build does not hold). That is the one to fall back on::

    try:
        y = gated_spm_linear_native(x, W, b, D, U, scale, gates, rows)
    except NativeUnavailableError:
        y = gated_spm_linear_triton(x, W, b, D, U, scale, gates, rows)

which ``fallback="triton"`` does for you. Bad arguments raise ``ValueError``/``TypeError`` (never
a fallback: the Triton path would reject them too); a failing CUDA call raises ``NativeKernelError``.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
import threading
from pathlib import Path

import torch

__all__ = [
    "NativeKernelError",
    "NativeUnavailableError",
    "library_path",
    "is_available",
    "unavailable_reason",
    "info",
    "plan",
    "gated_spm_linear_native",
]

LIBRARY_NAME = "libspm_kernels.so"
ENV_VAR = "SPM_KERNELS_LIB"
ABI_VERSION = 1  # SPM_KERNELS_ABI_VERSION of include/spm_kernels.h this loader speaks

# spm_status codes (include/spm_kernels.h)
SPM_OK = 0
_STATUS = {
    1: "SPM_ERR_INVALID_ARGUMENT", 2: "SPM_ERR_SHAPE", 3: "SPM_ERR_UNSUPPORTED", 4: "SPM_ERR_TOO_LARGE",
    5: "SPM_ERR_WORKSPACE", 6: "SPM_ERR_NO_DRIVER", 7: "SPM_ERR_NO_DEVICE", 8: "SPM_ERR_NO_CONTEXT",
    9: "SPM_ERR_ARCH", 10: "SPM_ERR_CUDA", 11: "SPM_ERR_INTERNAL",
}
_UNAVAILABLE = {3, 6, 7, 9}  # run elsewhere (Triton / torch) on these
_ARGUMENT = {1, 2, 4}
_NO_CONTEXT = 8
_DTYPES = {torch.float16: 0, torch.bfloat16: 1}
_COMBINES = {"linear": 0, "official": 1}
_PATTERNS = {"auto": 0, "fused": 1, "split": 2}


class NativeKernelError(RuntimeError):
    """A call into libspm_kernels failed; ``status`` is the spm_status name (or None)."""

    def __init__(self, message: str, status: str | None = None):
        super().__init__(message)
        self.status = status


class NativeUnavailableError(NativeKernelError):
    """The native path cannot run this call here: fall back to the Triton (or torch) path."""


class _NativeArgumentError(NativeKernelError, ValueError):
    """The library rejected the arguments (also a ValueError, as the Triton launcher raises)."""


class _Args(ctypes.Structure):
    """spm_gated_linear_args (include/spm_kernels.h); size checked against the library."""

    _fields_ = [
        ("x", ctypes.c_void_p), ("weight", ctypes.c_void_p), ("bias", ctypes.c_void_p),
        ("down", ctypes.c_void_p), ("up", ctypes.c_void_p), ("scale", ctypes.c_void_p),
        ("gates", ctypes.c_void_p), ("y", ctypes.c_void_p), ("workspace", ctypes.c_void_p),
        ("workspace_bytes", ctypes.c_size_t),
        ("m", ctypes.c_int64), ("in_features", ctypes.c_int64), ("out_features", ctypes.c_int64),
        ("ldx", ctypes.c_int64), ("ldy", ctypes.c_int64), ("rows_per_sample", ctypes.c_int64),
        ("num_spms", ctypes.c_int32), ("rank", ctypes.c_int32), ("groups", ctypes.c_int32),
        ("scale_per_group", ctypes.c_int32),
        ("dtype", ctypes.c_int), ("combine", ctypes.c_int), ("pattern", ctypes.c_int),
    ]


class _Plan(ctypes.Structure):
    _fields_ = [
        ("fused", ctypes.c_int), ("shrink_variant", ctypes.c_int), ("forward_variant", ctypes.c_int),
        ("shrink_grid", ctypes.c_uint * 3), ("forward_grid", ctypes.c_uint * 3),
        ("workspace_bytes", ctypes.c_size_t),
    ]


_lock = threading.Lock()
_loaded: dict[str, ctypes.CDLL] = {}


def _candidates() -> list[str]:
    env = os.environ.get(ENV_VAR)
    if env:
        p = Path(env)
        return [str(p / LIBRARY_NAME if p.is_dir() else p)]
    here = Path(__file__).resolve().parent
    out = [str(here / LIBRARY_NAME), str(here.parent / "build" / LIBRARY_NAME)]
    found = ctypes.util.find_library("spm_kernels")
    if found:
        out.append(found)
    return out


def library_path() -> str | None:
    """The library file the loader would use, or None when there is none.

    Example::

        >>> library_path()  # doctest: +SKIP
        '/src/spm_rt/build/libspm_kernels.so'
    """
    for c in _candidates():
        if os.path.isfile(c) or (os.sep not in c and c):  # find_library returns a bare soname
            return c
    return None


def _load() -> ctypes.CDLL:
    path = library_path()
    if path is None:
        where = (f"${ENV_VAR}={os.environ[ENV_VAR]} does not exist" if os.environ.get(ENV_VAR)
                 else f"looked in: {', '.join(_candidates())}")
        raise NativeUnavailableError(
            f"libspm_kernels not found ({where}). Build it with `cmake -S . -B build && cmake --build build -j2` "
            f"(README: Native library) or set {ENV_VAR}; the Triton path (gated_spm_linear_triton) needs no "
            "native library.")
    with _lock:
        lib = _loaded.get(path)
        if lib is not None:
            return lib
        try:
            lib = ctypes.CDLL(path)
        except OSError as exc:
            raise NativeUnavailableError(f"cannot load {path}: {exc}") from exc
        try:
            _declare(lib)
        except AttributeError as exc:
            raise NativeUnavailableError(f"{path} is not libspm_kernels (or too old): {exc}") from exc
        abi = lib.spm_kernels_abi_version()
        size = lib.spm_gated_linear_args_size()
        if abi != ABI_VERSION or size != ctypes.sizeof(_Args):
            raise NativeUnavailableError(
                f"{path} speaks ABI {abi} (args {size} bytes); this loader expects ABI {ABI_VERSION} "
                f"({ctypes.sizeof(_Args)} bytes): rebuild the library from this checkout")
        _loaded[path] = lib
        return lib


def _declare(lib: ctypes.CDLL) -> None:
    c = ctypes
    lib.spm_kernels_abi_version.restype = c.c_int
    lib.spm_gated_linear_args_size.restype = c.c_size_t
    lib.spm_kernels_info_json.restype = c.c_char_p
    lib.spm_kernels_arch_for_cc.argtypes = [c.c_int]
    lib.spm_kernels_arch_for_cc.restype = c.c_int
    lib.spm_kernels_init.restype = c.c_int
    lib.spm_last_error.restype = c.c_char_p
    lib.spm_status_string.argtypes = [c.c_int]
    lib.spm_status_string.restype = c.c_char_p
    lib.spm_gated_linear_forward.argtypes = [c.c_void_p, c.POINTER(_Args)]
    lib.spm_gated_linear_forward.restype = c.c_int
    lib.spm_gated_linear_workspace_size.argtypes = [c.POINTER(_Args), c.POINTER(c.c_size_t)]
    lib.spm_gated_linear_workspace_size.restype = c.c_int
    lib.spm_gated_linear_plan.argtypes = [c.POINTER(_Args), c.c_int, c.POINTER(_Plan)]
    lib.spm_gated_linear_plan.restype = c.c_int


def _raise(lib: ctypes.CDLL, status: int, what: str):
    name = _STATUS.get(status, f"status {status}")
    msg = f"{what}: {name}: {lib.spm_last_error().decode(errors='replace')}"
    if status in _UNAVAILABLE:
        raise NativeUnavailableError(msg, name)
    if status in _ARGUMENT:
        raise _NativeArgumentError(msg, name)
    raise NativeKernelError(msg, name)


def info() -> dict:
    """The library's contents: version, triton_version, archs, ranks, variants, and its path.

    Raises NativeUnavailableError when there is no loadable library.

    Example::

        >>> info()["archs"]  # doctest: +SKIP
        [80, 90]
    """
    lib = _load()
    out = json.loads(lib.spm_kernels_info_json().decode())
    out["library"] = library_path()
    return out


def unavailable_reason(device=None) -> str | None:
    """Why the native forward cannot run on ``device`` (default: the current CUDA device), or None.

    Example::

        >>> unavailable_reason()  # doctest: +SKIP
        'no CUDA device visible to torch (torch.cuda.is_available() is False)'
    """
    try:
        lib = _load()
    except NativeUnavailableError as exc:
        return str(exc)
    if not torch.cuda.is_available():
        return "no CUDA device visible to torch (torch.cuda.is_available() is False)"
    dev = torch.device("cuda", torch.cuda.current_device()) if device is None else torch.device(device)
    major, minor = torch.cuda.get_device_capability(dev)
    if not lib.spm_kernels_arch_for_cc(major * 10 + minor):
        archs = ", ".join(f"sm_{a}" for a in info()["archs"])
        return (f"{dev} is sm_{major}{minor}; {library_path()} holds kernels for {archs} only "
                f"(rebuild with -DSPM_CUDA_ARCHS=\"...;{major}{minor}\")")
    status = lib.spm_kernels_init()  # the driver as the library sees it (dlopen of libcuda.so.1)
    if status != SPM_OK:
        return f"{_STATUS.get(status)}: {lib.spm_last_error().decode(errors='replace')}"
    return None


def is_available(device=None) -> bool:
    """True when ``gated_spm_linear_native`` can run on ``device`` (see ``unavailable_reason``).

    Example::

        >>> backend = "native" if is_available() else "triton"  # doctest: +SKIP
    """
    return unavailable_reason(device) is None


def _fill_args(m, in_features, out_features, ldx, ldy, num_spms, rank, groups, rows_per_sample, scale_per_group,
               dtype, combine, pattern, ptrs) -> _Args:
    if combine not in _COMBINES:
        raise ValueError(f"combine must be one of {tuple(_COMBINES)}, got {combine!r}")
    if pattern not in _PATTERNS:
        raise ValueError(f"pattern must be one of {tuple(_PATTERNS)}, got {pattern!r}")
    if dtype not in _DTYPES:
        raise NativeUnavailableError(f"the native kernels are compiled for float16 and bfloat16, not {dtype}",
                                     "SPM_ERR_UNSUPPORTED")
    a = _Args()
    for k, v in ptrs.items():
        setattr(a, k, v)
    a.m, a.in_features, a.out_features, a.ldx, a.ldy = m, in_features, out_features, ldx, ldy
    a.rows_per_sample, a.num_spms, a.rank, a.groups = rows_per_sample, num_spms, rank, groups
    a.scale_per_group = int(scale_per_group)
    a.dtype, a.combine, a.pattern = _DTYPES[dtype], _COMBINES[combine], _PATTERNS[pattern]
    return a


def plan(m: int, in_features: int, out_features: int, num_spms: int, rank: int = 1, groups: int = 1, *,
         rows_per_sample: int | None = None, dtype: torch.dtype = torch.float16, combine: str = "linear",
         has_bias: bool = True, pattern: str = "auto", arch: int = 90) -> dict:
    """The variants a forward of this shape launches on ``arch`` (no GPU needed; for tests and logs).

    Assumes contiguous, 256-byte aligned tensors (what torch allocates). Returns
    ``{"fused", "shrink", "forward", "shrink_grid", "forward_grid", "workspace_bytes"}``.

    Example::

        >>> plan(8192, 320, 320, 16)["forward"]  # doctest: +SKIP
        'fwd_fused_linear_r1_R16_bias_aligned_M128_fp16_sm90'
    """
    lib = _load()
    fake = {k: 0x100000 * (i + 1) for i, k in enumerate(("x", "weight", "bias", "down", "up", "scale", "gates", "y"))}
    if not has_bias:
        fake["bias"] = None
    a = _fill_args(m, in_features, out_features, in_features, groups * out_features, num_spms, rank, groups,
                   rows_per_sample or max(m, 1), False, dtype, combine, pattern, fake)
    p = _Plan()
    status = lib.spm_gated_linear_plan(ctypes.byref(a), arch, ctypes.byref(p))
    if status != SPM_OK:
        _raise(lib, status, "spm_gated_linear_plan")
    variants = info()["variants"]
    return {
        "fused": bool(p.fused),
        "shrink": None if p.fused else variants[p.shrink_variant]["name"],
        "forward": variants[p.forward_variant]["name"],
        "shrink_grid": None if p.fused else tuple(p.shrink_grid),
        "forward_grid": tuple(p.forward_grid),
        "workspace_bytes": int(p.workspace_bytes),
    }


def _check_tensors(x2, weight, bias, down, up, scale, gates, rows_per_sample, rank, groups):
    """The tensor facts the C API cannot see (it gets pointers and sizes): returns (out, K)."""
    from spm_rt.kernels.reference import check_operand_shapes, check_operand_types

    if not isinstance(rows_per_sample, int) or rows_per_sample < 1:
        raise ValueError(f"rows_per_sample must be a positive int, got {rows_per_sample!r}")
    check_operand_types(x2, weight, bias, down, up, scale, gates, rank, groups, gates_contiguous=True)
    if not x2.is_cuda:
        raise ValueError(f"the native path needs CUDA tensors (got {x2.device}); use gated_spm_linear_ref on CPU")
    n, k, _ = check_operand_shapes(x2.shape[1], x2.shape[0], weight, bias, down, up, scale, gates, rows_per_sample,
                                   rank, groups)
    return n, k


def gated_spm_linear_native(
    x: torch.Tensor,  # [M, in] (or [..., in]); fp16 / bf16 CUDA, last dim contiguous
    weight: torch.Tensor,  # [G*out, in]  G projections sharing x, concatenated
    bias: torch.Tensor | None,  # [G*out]
    down: torch.Tensor,  # [G*K*r, in]
    up: torch.Tensor,  # [G*out, K*r]
    scale: torch.Tensor,  # [K] (shared by the groups) or [G*K], float32
    gates: torch.Tensor,  # [B, K] float32; M = B * rows_per_sample
    rows_per_sample: int,
    combine: str = "linear",
    rank: int = 1,
    groups: int = 1,
    *,
    pattern: str = "auto",  # "fused", "split" or "auto" (the Triton launcher's rule)
    fallback: str | None = None,  # "triton": run gated_spm_linear_triton on NativeUnavailableError
) -> torch.Tensor:
    """``y = x W^T + b + coefficients(x D^T) U^T`` -> [..., G*out] with the AOT-compiled kernels.

    Same contract as ``gated_spm_linear_triton`` (forward only, no autograd), launched on the
    current torch stream of x's device. Raises NativeUnavailableError where the native path
    cannot run (see the module docstring) unless ``fallback="triton"``.

    Example::

        >>> f16 = dict(device="cuda", dtype=torch.float16)  # doctest: +SKIP
        >>> x, W = torch.randn(154, 768, **f16), torch.randn(320, 768, **f16)  # doctest: +SKIP
        >>> D, U = torch.randn(4, 768, **f16), torch.randn(320, 4, **f16)  # doctest: +SKIP
        >>> gates = torch.rand(2, 4, device="cuda")  # doctest: +SKIP
        >>> y = gated_spm_linear_native(x, W, None, D, U, torch.ones(4, device="cuda"), gates, 77)  # doctest: +SKIP
    """
    if fallback not in (None, "triton"):
        raise ValueError(f"fallback must be None or 'triton', got {fallback!r}")
    try:
        return _forward(x, weight, bias, down, up, scale, gates, rows_per_sample, combine, rank, groups, pattern)
    except NativeUnavailableError:
        if fallback is None:
            raise
    from spm_rt.kernels.gated_linear import gated_spm_linear_triton  # imports triton: only on fallback

    return gated_spm_linear_triton(x, weight, bias, down, up, scale, gates, rows_per_sample, combine, rank, groups,
                                   pattern=pattern)


def _forward(x, weight, bias, down, up, scale, gates, rows_per_sample, combine, rank, groups, pattern):
    lib = _load()
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1]) if x.dim() != 2 else x
    out, k = _check_tensors(x2, weight, bias, down, up, scale, gates, rows_per_sample, rank, groups)
    if x2.stride(-1) != 1:
        raise ValueError("x must have a contiguous last dimension (rows may be strided)")
    m, in_f = x2.shape
    ldx = x2.stride(0) if m > 1 else in_f
    n_total = weight.shape[0]
    y = torch.empty((m, n_total), device=x.device, dtype=x.dtype)
    if m == 0:
        return y.reshape(*lead, n_total)
    ptrs = {"x": x2.data_ptr(), "weight": weight.data_ptr(), "bias": bias.data_ptr() if bias is not None else None,
            "down": down.data_ptr(), "up": up.data_ptr(), "scale": scale.data_ptr(), "gates": gates.data_ptr(),
            "y": y.data_ptr()}
    a = _fill_args(m, in_f, out, ldx, n_total, k, rank, groups, rows_per_sample, scale.shape[0] != k, x.dtype,
                   combine, pattern, ptrs)
    ws_bytes = ctypes.c_size_t(0)
    status = lib.spm_gated_linear_workspace_size(ctypes.byref(a), ctypes.byref(ws_bytes))
    if status != SPM_OK:
        _raise(lib, status, "spm_gated_linear_workspace_size")
    workspace = None
    if ws_bytes.value:
        workspace = torch.empty(ws_bytes.value, device=x.device, dtype=torch.uint8)  # from torch's caching allocator
        a.workspace, a.workspace_bytes = workspace.data_ptr(), ws_bytes.value
    with torch.cuda.device(x.device):
        stream = torch.cuda.current_stream(x.device).cuda_stream
        status = lib.spm_gated_linear_forward(ctypes.c_void_p(stream), ctypes.byref(a))
        if status == _NO_CONTEXT:  # a thread where torch has not made the device's context current yet
            torch.cuda.synchronize(x.device)
            status = lib.spm_gated_linear_forward(ctypes.c_void_p(stream), ctypes.byref(a))
    if status != SPM_OK:
        _raise(lib, status, "spm_gated_linear_forward")
    # the workspace may be freed now: the caching allocator reuses it only in later work on this stream
    return y.reshape(*lead, n_total)
