"""The C ABI of libspm_kernels (include/spm_kernels.h) in ctypes: status codes, enum values,
the argument / plan structs, the function prototypes, and the exceptions a status maps to.

Split from ``spm_rt.kernels.native`` (the loader), which re-exports the public names. Standard
library and torch only; nothing here loads the library.
"""
from __future__ import annotations

import ctypes

import torch

ABI_VERSION = 2  # SPM_KERNELS_ABI_VERSION of include/spm_kernels.h this loader speaks

# spm_status codes (include/spm_kernels.h)
SPM_OK = 0
_STATUS = {
    1: "SPM_ERR_INVALID_ARGUMENT", 2: "SPM_ERR_SHAPE", 3: "SPM_ERR_UNSUPPORTED", 4: "SPM_ERR_TOO_LARGE",
    5: "SPM_ERR_WORKSPACE", 6: "SPM_ERR_NO_DRIVER", 7: "SPM_ERR_NO_DEVICE", 8: "SPM_ERR_NO_CONTEXT",
    9: "SPM_ERR_ARCH", 10: "SPM_ERR_CUDA", 11: "SPM_ERR_INTERNAL", 12: "SPM_ERR_NOT_PREPARED", 13: "SPM_ERR_VERSION",
}
_UNAVAILABLE = {3, 6, 7, 9}  # run elsewhere (Triton / torch) on these
_ARGUMENT = {1, 2, 4}
_NO_CONTEXT = 8
_NOT_PREPARED = 12
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


class _PlanDesc(ctypes.Structure):
    """spm_plan_desc (include/spm_kernels.h); struct_size / version checked by the library."""

    _fields_ = [
        ("struct_size", ctypes.c_size_t), ("version", ctypes.c_int32),
        ("dtype", ctypes.c_int), ("combine", ctypes.c_int), ("pattern", ctypes.c_int),
        ("m", ctypes.c_int64), ("in_features", ctypes.c_int64), ("out_features", ctypes.c_int64),
        ("ldx", ctypes.c_int64), ("ldy", ctypes.c_int64), ("rows_per_sample", ctypes.c_int64),
        ("ld_gates", ctypes.c_int64), ("gates_broadcast", ctypes.c_int32),
        ("num_spms", ctypes.c_int32), ("rank", ctypes.c_int32), ("groups", ctypes.c_int32),
        ("scale_per_group", ctypes.c_int32), ("has_bias", ctypes.c_int32), ("alignment", ctypes.c_uint32),
        ("arch", ctypes.c_int32), ("sm_count", ctypes.c_int32),
    ]


class _PlanInfo(ctypes.Structure):
    _fields_ = [
        ("struct_size", ctypes.c_size_t), ("version", ctypes.c_int32), ("arch", ctypes.c_int32),
        ("sm_count", ctypes.c_int32), ("fused", ctypes.c_int32), ("shrink_variant", ctypes.c_int32),
        ("forward_variant", ctypes.c_int32), ("n_per_prog", ctypes.c_int32),
        ("shrink_grid", ctypes.c_uint32 * 3), ("forward_grid", ctypes.c_uint32 * 3),
        ("workspace_bytes", ctypes.c_size_t),
    ]


class _Pointers(ctypes.Structure):
    _fields_ = [
        ("struct_size", ctypes.c_size_t), ("version", ctypes.c_int32),
        ("x", ctypes.c_void_p), ("weight", ctypes.c_void_p), ("bias", ctypes.c_void_p), ("down", ctypes.c_void_p),
        ("up", ctypes.c_void_p), ("scale", ctypes.c_void_p), ("gates", ctypes.c_void_p), ("y", ctypes.c_void_p),
        ("workspace", ctypes.c_void_p), ("workspace_bytes", ctypes.c_size_t),
    ]


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
    lib.spm_plan_desc_init.argtypes = [c.POINTER(_PlanDesc)]
    lib.spm_plan_desc_init.restype = None
    lib.spm_plan_info_init.argtypes = [c.POINTER(_PlanInfo)]
    lib.spm_plan_info_init.restype = None
    lib.spm_pointers_init.argtypes = [c.POINTER(_Pointers)]
    lib.spm_pointers_init.restype = None
    lib.spm_plan_create.argtypes = [c.POINTER(_PlanDesc), c.POINTER(c.c_void_p)]
    lib.spm_plan_create.restype = c.c_int
    lib.spm_plan_get_info.argtypes = [c.c_void_p, c.POINTER(_PlanInfo)]
    lib.spm_plan_get_info.restype = c.c_int
    lib.spm_plan_prepare.argtypes = [c.c_void_p, c.c_void_p]
    lib.spm_plan_prepare.restype = c.c_int
    lib.spm_plan_execute.argtypes = [c.c_void_p, c.POINTER(_Pointers), c.c_void_p]
    lib.spm_plan_execute.restype = c.c_int
    lib.spm_plan_destroy.argtypes = [c.c_void_p]
    lib.spm_plan_destroy.restype = None


def _raise(lib: ctypes.CDLL, status: int, what: str):
    name = _STATUS.get(status, f"status {status}")
    msg = f"{what}: {name}: {lib.spm_last_error().decode(errors='replace')}"
    if status in _UNAVAILABLE:
        raise NativeUnavailableError(msg, name)
    if status in _ARGUMENT:
        raise _NativeArgumentError(msg, name)
    raise NativeKernelError(msg, name)
