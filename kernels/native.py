"""ctypes loader of libspm_kernels: the gated SPM projection compiled ahead of time (no Triton JIT).

The native library (``CMakeLists.txt`` at the repository root; see docs/native.md)
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
* ``plan(...)``: which compiled variants a call would launch on an architecture (no GPU needed):
  the library's ``spm_plan_create`` from shapes, dtypes, strides and alignment alone.
* ``fallbacks()`` / ``reset_fallbacks()``: how often ``fallback="triton"`` (the ``spm_rt::gated_linear_native``
  op uses it) ran the Triton JIT instead, by reason; the first fallback of each reason is logged
  (logger ``spm_rt.kernels.native``, WARNING), later ones at DEBUG.

The forward uses the library's plan API: one plan per (shape, dtype, strides, alignment, device),
created and prepared (kernels loaded into the device's context) on the first call with that key,
then executed on torch's current stream; a first call inside a CUDA graph capture raises (run one
call eagerly first: loading modules is not capturable).

Errors: ``NativeUnavailableError`` (a ``NativeKernelError``, a ``RuntimeError``) means "cannot run
here": library missing or built for another architecture or ABI, no driver/device, or no compiled
variant (fp32 inputs, a rank or K*r the build does not hold). That is the one to fall back on::

    try:
        y = gated_spm_linear_native(x, W, b, D, U, scale, gates, rows)
    except NativeUnavailableError:
        y = gated_spm_linear_triton(x, W, b, D, U, scale, gates, rows)

which ``fallback="triton"`` does for you. Bad arguments raise ``ValueError``/``TypeError`` (never
a fallback: the Triton path would reject them too); a failing CUDA call raises ``NativeKernelError``.

This module finds and loads the library and runs the forward; the ctypes mirror of the C ABI
(structs, status codes, exceptions) is ``native_abi`` and the plan handles and their cache are
``native_plan``, beside it.
"""
from __future__ import annotations

import collections
import ctypes
import ctypes.util
import json
import logging
import os
import threading
from pathlib import Path

import torch

from spm_rt.kernels.native_abi import (  # noqa: F401 (the ABI's public names are re-exported)
    _DTYPES, _NOT_PREPARED, _STATUS, ABI_VERSION, SPM_OK, NativeKernelError, NativeUnavailableError, _Args,
    _declare, _Pointers, _raise)
from spm_rt.kernels.native_plan import _alignment, _device_plan, _make_desc, _NativePlan, _prepare, _prepare_lock

__all__ = [
    "NativeKernelError",
    "NativeUnavailableError",
    "library_path",
    "is_available",
    "unavailable_reason",
    "info",
    "plan",
    "gated_spm_linear_native",
    "fallbacks",
    "reset_fallbacks",
]

log = logging.getLogger(__name__)

LIBRARY_NAME = "libspm_kernels.so"
ENV_VAR = "SPM_KERNELS_LIB"

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
            f"(docs/native.md) or set {ENV_VAR}; the Triton path (gated_spm_linear_triton) needs no "
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


def plan(m: int, in_features: int, out_features: int, num_spms: int, rank: int = 1, groups: int = 1, *,
         rows_per_sample: int | None = None, dtype: torch.dtype = torch.float16, combine: str = "linear",
         has_bias: bool = True, pattern: str = "auto", arch: int = 90, sm_count: int = 0,
         alignment: int = 256) -> dict:
    """What a forward of this shape runs on ``arch`` (no GPU needed; for tests and logs).

    The library's ``spm_plan_create`` from shapes, dtypes, contiguous strides and ``alignment``
    (bytes every pointer is aligned to: torch allocations are 256) alone; ``sm_count`` 0 means the
    table's default (132). Returns ``{"fused", "shrink", "forward", "shrink_grid", "forward_grid",
    "n_per_prog", "workspace_bytes", "sm_count", "variants"}`` (the variants' info dicts).

    Example::

        >>> plan(8192, 320, 320, 16)["forward"]  # doctest: +SKIP
        'fwd_fused_linear_r1_R16_bias_aligned_M64N64w4_fp16_sm90'
    """
    lib = _load()
    d = _make_desc(lib, m, in_features, out_features, in_features, groups * out_features, num_spms, rank, groups,
                   rows_per_sample or max(m, 1), False, dtype, combine, pattern, has_bias, alignment, arch, sm_count)
    p = _NativePlan(lib, d).info
    variants = info()["variants"]
    return {
        "fused": bool(p.fused),
        "shrink": None if p.fused else variants[p.shrink_variant]["name"],
        "forward": variants[p.forward_variant]["name"],
        "shrink_grid": None if p.fused else tuple(p.shrink_grid),
        "forward_grid": tuple(p.forward_grid),
        "n_per_prog": int(p.n_per_prog),
        "workspace_bytes": int(p.workspace_bytes),
        "sm_count": int(p.sm_count),
        "variants": {"forward": variants[p.forward_variant],
                     "shrink": None if p.fused else variants[p.shrink_variant]},
    }


# ---------------------------------------------------------------------------------------------
# Fallback accounting: gated_spm_linear_native(..., fallback="triton") never falls back silently.

_fallbacks: collections.Counter = collections.Counter()


def fallbacks() -> dict[str, int]:
    """How many native calls ran the Triton JIT instead, by reason (the spm_status name, or
    ``"library unavailable"``).

    Example::

        >>> fallbacks()  # doctest: +SKIP
        {'SPM_ERR_UNSUPPORTED': 3}
    """
    with _lock:
        return dict(_fallbacks)


def reset_fallbacks() -> None:
    """Zero the fallback counters (the next fallback of each reason is logged at WARNING again)."""
    with _lock:
        _fallbacks.clear()


def _count_fallback(exc: NativeUnavailableError) -> None:
    reason = exc.status or "library unavailable"
    with _lock:
        _fallbacks[reason] += 1
        first = _fallbacks[reason] == 1
    log.log(logging.WARNING if first else logging.DEBUG,
            "native gated projection unavailable, running the Triton JIT instead (%s): %s", reason, exc)


def _check_tensors(ops) -> tuple[int, int]:
    """The tensor facts the C API cannot see (it gets pointers and sizes): returns (out, K)."""
    if not isinstance(ops.rows_per_sample, int) or ops.rows_per_sample < 1:
        raise ValueError(f"rows_per_sample must be a positive int, got {ops.rows_per_sample!r}")
    # gates may be strided (an expand()ed [1, K] -> [B, K] has row stride 0): the kernels take a row stride
    ops.check_types(gates_contiguous=False)
    if not ops.x.is_cuda:
        raise ValueError(f"the native path needs CUDA tensors (got {ops.x.device}); use gated_spm_linear_ref on CPU")
    n, k, _ = ops.shapes()
    return n, k


def gated_spm_linear_native(
    x: torch.Tensor,  # [M, in] (or [..., in]); fp16 / bf16 CUDA, last dim contiguous
    weight: torch.Tensor,  # [G*out, in]  G projections sharing x, concatenated
    bias: torch.Tensor | None,  # [G*out]
    down: torch.Tensor,  # [G*K*r, in]
    up: torch.Tensor,  # [G*out, K*r]
    scale: torch.Tensor,  # [K] (shared by the groups) or [G*K], float32
    gates: torch.Tensor,  # [B, K] float32, any row stride (0: one gate row for all); M = B * rows_per_sample
    rows_per_sample: int,
    combine: str = "linear",
    rank: int = 1,
    groups: int = 1,
    *,
    pattern: str = "auto",  # "fused", "split" or "auto" (the tile table's rule, as the Triton launcher)
    fallback: str | None = None,  # "triton": run gated_spm_linear_triton on NativeUnavailableError
) -> torch.Tensor:
    """``y = x W^T + b + coefficients(x D^T) U^T`` -> [..., G*out] with the AOT-compiled kernels.

    Same contract as ``gated_spm_linear_triton`` (forward only, no autograd), launched on the
    current torch stream of x's device. Raises NativeUnavailableError where the native path
    cannot run (see the module docstring) unless ``fallback="triton"``, which runs the Triton JIT
    instead and counts it (``fallbacks()``) and logs it.

    Example::

        >>> f16 = dict(device="cuda", dtype=torch.float16)  # doctest: +SKIP
        >>> x, W = torch.randn(154, 768, **f16), torch.randn(320, 768, **f16)  # doctest: +SKIP
        >>> D, U = torch.randn(4, 768, **f16), torch.randn(320, 4, **f16)  # doctest: +SKIP
        >>> gates = torch.rand(2, 4, device="cuda")  # doctest: +SKIP
        >>> y = gated_spm_linear_native(x, W, None, D, U, torch.ones(4, device="cuda"), gates, 77)  # doctest: +SKIP
    """
    if fallback not in (None, "triton"):
        raise ValueError(f"fallback must be None or 'triton', got {fallback!r}")
    from spm_rt.kernels.reference import GatedOperands

    ops = GatedOperands(x, weight, bias, down, up, scale, gates, rows_per_sample, combine, rank, groups)
    try:
        return _forward(ops, pattern)
    except NativeUnavailableError as exc:
        if fallback is None:
            raise
        _count_fallback(exc)
    from spm_rt.kernels.gated_linear import gated_spm_linear_triton  # imports triton: only on fallback

    return gated_spm_linear_triton(*ops.astuple(), pattern=pattern)


def _forward(ops, pattern):
    lib = _load()
    x, weight, bias, down, up, scale, gates, rows_per_sample, combine, rank, groups = ops.astuple()
    lead = x.shape[:-1]
    x2 = ops.x2
    out, k = _check_tensors(ops)
    if x2.stride(-1) != 1:
        raise ValueError("x must have a contiguous last dimension (rows may be strided)")
    if gates.shape[1] > 1 and gates.stride(1) != 1:
        gates = gates.contiguous()  # [B, K]: a few bytes; the kernels take any row stride, not a column stride
    m, in_f = x2.shape
    ldx = x2.stride(0) if m > 1 else in_f
    n_total = weight.shape[0]
    y = torch.empty((m, n_total), device=x.device, dtype=x.dtype)
    if m == 0:
        return y.reshape(*lead, n_total)
    if x.dtype not in _DTYPES:
        raise NativeUnavailableError(f"the native kernels are compiled for float16 and bfloat16, not {x.dtype}",
                                     "SPM_ERR_UNSUPPORTED")
    broadcast = gates.shape[0] > 1 and gates.stride(0) == 0
    ld_gates = 0 if broadcast else (gates.stride(0) if gates.shape[0] > 1 else k)
    align = min(16, _alignment(x2, weight, bias, down, up, scale, gates, y))  # 16 is all the variants ask
    dev = x.device
    index = dev.index if dev.index is not None else torch.cuda.current_device()
    major, minor = torch.cuda.get_device_capability(index)
    arch = lib.spm_kernels_arch_for_cc(major * 10 + minor)
    if not arch:
        raise NativeUnavailableError(unavailable_reason(dev) or f"no kernels for sm_{major}{minor}", "SPM_ERR_ARCH")
    from spm_rt.kernels.tiles import device_sm_count

    desc_args = (m, in_f, out, ldx, n_total, k, rank, groups, rows_per_sample, scale.shape[0] != k, x.dtype, combine,
                 pattern, bias is not None, align, arch, device_sm_count(dev), ld_gates, broadcast)
    p = _device_plan(lib, (index,) + desc_args, desc_args, dev)
    with torch.cuda.device(dev):
        stream = torch.cuda.current_stream(dev).cuda_stream
        if not p.prepared:
            with _prepare_lock:  # one thread loads a plan's modules; the others wait for it
                if not p.prepared:
                    _prepare(lib, p, stream, dev)
        workspace = None
        ptrs = _Pointers()
        lib.spm_pointers_init(ctypes.byref(ptrs))
        ptrs.x, ptrs.weight, ptrs.down, ptrs.up = x2.data_ptr(), weight.data_ptr(), down.data_ptr(), up.data_ptr()
        ptrs.bias = bias.data_ptr() if bias is not None else None
        ptrs.scale, ptrs.gates, ptrs.y = scale.data_ptr(), gates.data_ptr(), y.data_ptr()
        if p.info.workspace_bytes:
            # from torch's caching allocator: reused only by later work on this stream
            workspace = torch.empty(p.info.workspace_bytes, device=dev, dtype=torch.uint8)
            ptrs.workspace, ptrs.workspace_bytes = workspace.data_ptr(), p.info.workspace_bytes
        status = lib.spm_plan_execute(p.handle, ctypes.byref(ptrs), ctypes.c_void_p(stream))
        if status == _NOT_PREPARED:  # the context changed under the plan (recreated): load again
            with _prepare_lock:
                _prepare(lib, p, stream, dev)
            status = lib.spm_plan_execute(p.handle, ctypes.byref(ptrs), ctypes.c_void_p(stream))
    if status != SPM_OK:
        _raise(lib, status, "spm_plan_execute")
    return y.reshape(*lead, n_total)
