"""Adapted projections of one attention block that read the same input tensor.

attn1's to_q/to_k/to_v (self-attention) and attn2's to_k/to_v (both read the text embeddings)
form a :class:`SharedInput`. In eager mode two things follow:

* Triton gated path: the first member called runs all of them as one grouped launch
  (``groups=3`` / ``2``: x read once) and leaves the others' outputs in the gate state, where
  their own calls pick them up (same input tensor, unmodified) instead of recomputing.
* Cross-attention k/v are functions of the text embeddings and the gates only, both fixed for a
  whole generation, so attn2's to_k/to_v outputs are kept for the call and reused at every
  denoising step (any strategy or backend; ``SPMConfig.reuse_cross_kv``).

Both are skipped where they cannot be done safely: gradients needed, inference mode (inference
tensors have no version counter to detect in-place changes), and graph capture
(``torch.compile`` traces the plain per-layer ops instead).

The grouped launch reads the members' weights concatenated. That copy is built on the first
grouped launch of a call and dropped when the call ends (``GateState.end``) and whenever a member
is moved, cast or gets new SPMs: it never outlives a call, so it neither holds device memory
between calls nor stays behind on the old device after ``.to()``.
"""
from __future__ import annotations

import torch
from torch import nn


class SharedInput:
    """Adapted projections of one attention block that read the same input tensor (see the module
    docstring). ``cross``: they read the text embeddings (attn2 to_k/to_v)."""

    def __init__(self, members: list, cross: bool):
        self.members = members
        self.cross = cross
        self._cat = None
        for m in members:
            m.shared = self

    @staticmethod
    def compatible(members: list) -> bool:
        from spm_rt.layers import SPMLinear

        first = members[0]
        return all(isinstance(m, SPMLinear) and m.weight.shape == first.weight.shape
                   and m.weight.dtype == first.weight.dtype and m.weight.device == first.weight.device
                   and m.spm_down.shape == first.spm_down.shape and m.rank == first.rank
                   for m in members)

    def invalidate(self) -> None:
        self._cat = None

    def forward(self, caller, x: torch.Tensor, mode: str, state) -> torch.Tensor:
        """``caller(x)`` in eager mode: a kept output where one is valid, else computed (and kept
        for the call for cross-attention k/v)."""
        keep = self.cross and caller.config.reuse_cross_kv
        hit = state.take_output(caller, x, keep=keep)
        if hit is not None:
            return hit
        out = caller.eager_forward(x, mode, state, self)
        if keep:
            state.put_output(caller, x, out)
        return out

    def concatenated(self) -> tuple:
        """(weight [G*out, in], bias [G*out] | None, down [G*K*r, in], up [G*out, K*r], scale [G*K]):
        built on first use in a call by the grouped kernel (see the module docstring)."""
        ms = self.members
        ident = tuple((m._weight_id(), m.spm_down.data_ptr(), m.spm_down._version) for m in ms)
        if self._cat is None or self._cat[0] != ident:
            biases = [m.bias for m in ms]
            bias = None if all(b is None for b in biases) else torch.cat(
                [b if b is not None else m.weight.new_zeros(m.weight.shape[0]) for b, m in zip(biases, ms)])
            self._cat = (ident, (torch.cat([m.weight for m in ms]), bias, torch.cat([m.spm_down for m in ms]),
                                 torch.cat([m.spm_up for m in ms]), torch.cat([m.spm_scale for m in ms])))
            state = ms[0].spm_state
            state.__dict__.setdefault("_cat_groups", set()).add(self)  # dropped at the call's end
        return self._cat[1]

    def forward_all(self, caller, x: torch.Tensor, gates: torch.Tensor, state) -> torch.Tensor:
        """One grouped Triton launch for every member; the others' outputs wait in ``state``."""
        from spm_rt.functional import grouped_gated_linear

        weight, bias, down, up, scale = self.concatenated()
        g = len(self.members)
        y = grouped_gated_linear(x, weight, bias, down, up, scale, gates, caller.config.combine, caller.rank, g)
        n = weight.shape[0] // g
        mine = None
        for i, member in enumerate(self.members):
            out = y[..., i * n:(i + 1) * n]
            if member is caller:
                mine = out
            else:
                state.put_output(member, x, out)
        return mine


def attention_groups(unet: nn.Module, layers: dict) -> list[SharedInput]:
    """The :class:`SharedInput` groups of the patched ``layers`` (diffusers ``Attention`` blocks)."""
    groups = []
    for path, module in unet.named_modules():
        if not all(hasattr(module, a) for a in ("to_q", "to_k", "to_v", "is_cross_attention")):
            continue
        names = ("to_k", "to_v") if module.is_cross_attention else ("to_q", "to_k", "to_v")
        prefix = f"{path}." if path else ""
        members = [layers.get(prefix + n) for n in names]
        if any(m is None for m in members) or not SharedInput.compatible(members):
            continue
        groups.append(SharedInput(members, cross=module.is_cross_attention))
    return groups
