"""spm_rt.kernels: tensor-level ops (leaves). Triton is imported lazily by the launchers.

The Triton names below (``gated_spm_linear_triton``, ``GatedSPMLinearFunction``, ...) resolve on
first access, importing ``spm_rt.kernels.gated_linear`` and triton only then; without triton that
access raises ImportError naming the ``spm_rt[triton]`` extra.
"""

if __name__ == "kernels":  # imported by accident as PyPI's `kernels` (repository root on sys.path)
    from ._shadow import defer_to_installed

    defer_to_installed(__name__, __file__)
else:
    from spm_rt.kernels.reference import (gate_coefficients, gated_spm_linear_bwd_ref, gated_spm_linear_ref,
                                          gated_spm_linear_torch, merged_weight_ref, spm_coefficients)

    __all__ = ["gate_coefficients", "gated_spm_linear_bwd_ref", "gated_spm_linear_ref", "gated_spm_linear_torch",
               "merged_weight_ref", "spm_coefficients"]

    _TRITON_NAMES = (
        "gated_spm_linear_triton",
        "gated_spm_conv1x1_triton",
        "GatedSPMLinearFunction",
    )

    def __getattr__(name):
        if name in _TRITON_NAMES:
            from spm_rt.kernels import gated_linear

            return getattr(gated_linear, name)
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
