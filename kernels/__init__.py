"""spm_rt.kernels: tensor-level ops (leaves). Triton is imported lazily by the launchers."""
from spm_rt.kernels.reference import gated_spm_linear_ref, merged_weight_ref, spm_coefficients

__all__ = ["gated_spm_linear_ref", "merged_weight_ref", "spm_coefficients"]
