"""The one configuration object of a patched pipeline (:class:`SPMConfig`).

``spm_rt.compile`` validates it once; the pipeline, its gate state and every adapted layer hold
the *same* object, so ``rt.config.strategy = "gated"`` (or ``backend``, ``reuse_cross_kv``) takes
effect at the next call. ``combine``, ``k_max`` and ``max_batch_rows`` shape the stacked buffers:
they take effect at the next :meth:`SPMPipeline.set_spms` (``combine``) or not at all (the
buffers are allocated once); ``transport`` / ``calibration`` / ``fixed_gates`` at the next
``set_spms``.
"""
from __future__ import annotations

from dataclasses import dataclass

from spm_rt.functional import BACKENDS
from spm_rt.gating import DEFAULT_MAX_BATCH_ROWS
from spm_rt.kernels.reference import COMBINES
from spm_rt.transport import TRANSPORTS

STRATEGIES = ("auto", "merged", "gated")


@dataclass
class SPMConfig:
    """How a compiled pipeline erases.

    combine:   "linear" (the paper's sum of gated updates) or "official" (the reference code's
               gamma-scaled key-by-key sum: quadratic in the gates, with cross terms).
    transport: "clipcos_tokenuni" (default), "clipcos", "tokenuni", "calibrated" (opt-in: end-of-text
               similarity with per-concept thresholds, see ``CalibratedTransport``), or "fixed"
               (gates come from ``fixed_gates`` or each call's ``gates=``, like the reference's
               manual multipliers).
    strategy:  "auto" (merged when every row of a UNet batch has the same gates, gated otherwise;
               layers whose merge would lose more than ``spm_rt.precision.MERGE_ERROR_MAX`` of the
               update at the call's smallest gate run gated), "merged" or "gated".
    backend:   "auto" (triton on CUDA when installed, torch otherwise), "torch", "triton" or "native"
               (the AOT-compiled ``libspm_kernels``; forward only, the Triton op where it has no variant).
    k_max:     SPM slots preallocated in every adapted layer (default: the number of SPMs).
               ``set_spms`` with at most ``k_max`` SPMs writes into the same storage, so compiled
               graphs and captured CUDA graphs stay valid; more reallocates (and warns).
    max_batch_rows: UNet rows the gate buffer holds (allocated once; default 64 = 32 prompt-images
               with classifier-free guidance). A call needing more rows is refused with a message.
    reuse_cross_kv: keep cross-attention to_k/to_v outputs for a whole generation (they depend only
               on the text embeddings and the gates) instead of recomputing them at every step
               (eager mode; off under inference_mode and inside compiled graphs).
    fixed_gates: default gates [K] for transport="fixed" (ones when None).

    Merged calls merge into the adapted weights in place and restore them bit-exactly at the end
    of the call from a pristine copy kept in host memory (pinned on CUDA): no second copy of the
    weights on the UNet's device.
    """

    combine: str = "linear"
    transport: str = "clipcos_tokenuni"
    strategy: str = "auto"
    backend: str = "auto"
    k_max: int | None = None
    max_batch_rows: int = DEFAULT_MAX_BATCH_ROWS
    reuse_cross_kv: bool = True
    fixed_gates: list[float] | None = None
    calibration: dict | None = None  # transport="calibrated": concept -> (positives, negatives)

    def validate(self) -> None:
        for name, value, allowed in (("combine", self.combine, COMBINES), ("transport", self.transport, TRANSPORTS),
                                     ("strategy", self.strategy, STRATEGIES), ("backend", self.backend, BACKENDS)):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
        if self.k_max is not None and int(self.k_max) < 1:
            raise ValueError(f"k_max must be >= 1, got {self.k_max}")
        if int(self.max_batch_rows) < 1:
            raise ValueError(f"max_batch_rows must be >= 1, got {self.max_batch_rows}")
