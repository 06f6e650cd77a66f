"""spm_plan handles of libspm_kernels: the plan descriptor built from shapes, dtypes, strides and
alignment, the handle that owns a plan, the per-device LRU cache of plans, and preparing a plan
(loading its kernels into the device's context).

Split from ``spm_rt.kernels.native``, whose ``plan`` and forward use these.
"""
from __future__ import annotations

import collections
import ctypes
import threading

import torch

from spm_rt.kernels.native_abi import (_COMBINES, _DTYPES, _NO_CONTEXT, _PATTERNS, SPM_OK, NativeKernelError,
                                       NativeUnavailableError, _PlanDesc, _PlanInfo, _raise)

_PLAN_CACHE_SIZE = 256
_prepare_lock = threading.Lock()
_plans: collections.OrderedDict = collections.OrderedDict()  # key -> _NativePlan (LRU)
_lock = threading.Lock()  # guards _plans


def _make_desc(lib, m, in_features, out_features, ldx, ldy, num_spms, rank, groups, rows_per_sample,
               scale_per_group, dtype, combine, pattern, has_bias, alignment, arch, sm_count, ld_gates=0,
               gates_broadcast=False) -> _PlanDesc:
    if combine not in _COMBINES:
        raise ValueError(f"combine must be one of {tuple(_COMBINES)}, got {combine!r}")
    if pattern not in _PATTERNS:
        raise ValueError(f"pattern must be one of {tuple(_PATTERNS)}, got {pattern!r}")
    if dtype not in _DTYPES:
        raise NativeUnavailableError(f"the native kernels are compiled for float16 and bfloat16, not {dtype}",
                                     "SPM_ERR_UNSUPPORTED")
    d = _PlanDesc()
    lib.spm_plan_desc_init(ctypes.byref(d))
    d.dtype, d.combine, d.pattern = _DTYPES[dtype], _COMBINES[combine], _PATTERNS[pattern]
    d.m, d.in_features, d.out_features, d.ldx, d.ldy = m, in_features, out_features, ldx, ldy
    d.rows_per_sample, d.ld_gates, d.gates_broadcast = rows_per_sample, ld_gates, int(gates_broadcast)
    d.num_spms, d.rank, d.groups, d.scale_per_group = num_spms, rank, groups, int(scale_per_group)
    d.has_bias, d.alignment, d.arch, d.sm_count = int(has_bias), alignment, arch, sm_count
    return d


class _NativePlan:
    """An spm_plan handle (destroyed with this object) and what it runs."""

    def __init__(self, lib, desc: _PlanDesc):
        self.lib, self.handle, self.prepared = lib, ctypes.c_void_p(), False
        status = lib.spm_plan_create(ctypes.byref(desc), ctypes.byref(self.handle))
        if status != SPM_OK:
            _raise(lib, status, "spm_plan_create")
        pi = _PlanInfo()
        lib.spm_plan_info_init(ctypes.byref(pi))
        status = lib.spm_plan_get_info(self.handle, ctypes.byref(pi))
        if status != SPM_OK:
            _raise(lib, status, "spm_plan_get_info")
        self.info = pi

    def __del__(self):
        if getattr(self, "handle", None) and self.handle.value:
            self.lib.spm_plan_destroy(self.handle)
            self.handle = ctypes.c_void_p()


def _alignment(*tensors) -> int:
    """The largest power of two (<= 256) dividing every pointer."""
    bits = 256
    for t in tensors:
        if t is not None:
            bits |= t.data_ptr()
    return bits & -bits


def _device_plan(lib, key, desc_args, device) -> _NativePlan:
    with _lock:
        p = _plans.get(key)
        if p is not None:
            _plans.move_to_end(key)
            return p
    p = _NativePlan(lib, _make_desc(lib, *desc_args))
    with _lock:
        _plans[key] = p
        while len(_plans) > _PLAN_CACHE_SIZE:
            _plans.popitem(last=False)
    return p


def _prepare(lib, p: _NativePlan, stream: int, device) -> None:
    if torch.cuda.is_current_stream_capturing():
        raise NativeKernelError("the native plan for this shape is not prepared and a CUDA graph capture is running: "
                                "run one call eagerly first (loading kernels cannot be captured)")
    status = lib.spm_plan_prepare(p.handle, ctypes.c_void_p(stream))
    if status == _NO_CONTEXT:  # a thread where torch has not made the device's context current yet
        torch.cuda.synchronize(device)
        status = lib.spm_plan_prepare(p.handle, ctypes.c_void_p(stream))
    if status != SPM_OK:
        _raise(lib, status, "spm_plan_prepare")
    p.prepared = True
