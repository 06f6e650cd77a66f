"""The one stacked representation of K SPMs for one adapted module.

Every consumer (merged weights, the gated torch path, Triton kernels, training, ONNX export)
reads this layout and no other::

    down  [K*r, in]   rows k*r .. k*r+r-1 belong to SPM k (zero rows where SPM k has rank < r
                      or does not adapt this module)
    up    [out, K*r]  columns likewise
    scale [K]         float32, alpha_k / r_k of this module (0 where SPM k does not adapt it);
                      combine="official": scale[0] is the network-wide scale, the first SPM's
                      metadata alpha / rank, in *every* module (also where SPM 0 does not adapt
                      it), and scale[1:] are unused. The reference loads the key-by-key sum into
                      one adapter built with the first SPM's metadata, so that one scale applies
                      to every module; a per-module scale[0] would drop the other SPMs' updates
                      wherever SPM 0 has no weights (scale 0 there).
    rank  r           the largest rank among the K SPMs

Tensors live in the adapted module's dtype and device.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from spm_rt.formats import SPM, ModuleWeights, SPMFormatError, adapted_modules, module_shape, resolve


@dataclass
class Stack:
    down: torch.Tensor  # [K*r, in]
    up: torch.Tensor  # [out, K*r]
    scale: torch.Tensor  # [K] float32
    rank: int

    @property
    def num_spms(self) -> int:
        return self.scale.shape[0]


def network_scale(spms: list[SPM]) -> float:
    """The official combine's one scale for the whole network: the first SPM's metadata alpha / rank."""
    return float(spms[0].alpha) / float(spms[0].rank)


def stack_module(module: nn.Module, per_spm: list[ModuleWeights | None], rank: int,
                 official_scale: float | None = None) -> Stack:
    """Stack the K SPMs' weights for one module (None where an SPM does not adapt it);
    ``official_scale`` (combine="official") goes into scale[0]."""
    out_f, in_f = module_shape(module)
    k = len(per_spm)
    w = module.weight
    down = torch.zeros(k * rank, in_f, dtype=w.dtype, device=w.device)
    up = torch.zeros(out_f, k * rank, dtype=w.dtype, device=w.device)
    scale = torch.zeros(k, dtype=torch.float32, device=w.device)
    for i, mw in enumerate(per_spm):
        if mw is None:
            continue
        r = mw.rank
        down[i * rank : i * rank + r] = mw.down.to(device=w.device, dtype=w.dtype)
        up[:, i * rank : i * rank + r] = mw.up.to(device=w.device, dtype=w.dtype)
        scale[i] = mw.alpha / r
    if official_scale is not None:
        scale[0] = official_scale
    return Stack(down, up, scale, rank)


def stack_spms(modules: dict[str, nn.Module], spms: list[SPM], k_max: int | None = None,
               rank: int | None = None, combine: str = "linear") -> dict[str, Stack]:
    """Validate ``spms`` against ``modules`` (path -> Linear / 1x1 Conv2d, or anything with a
    ``weight`` of the right shape) and stack them per module, with K padded to ``k_max`` and r to
    ``rank`` (zero rows, zero scale: padding slots have no effect whatever their gate).
    ``combine`` decides what scale[0] holds (see the module docstring).

    The one padding rule for every consumer (runtime capacity, ONNX export). Every SPM is
    validated before anything is built, so a bad SPM raises :class:`SPMFormatError` without side
    effects.
    """
    if not spms:
        raise SPMFormatError("no SPMs given")
    k_max = len(spms) if k_max is None else int(k_max)
    if len(spms) > k_max:
        raise ValueError(f"{len(spms)} SPMs do not fit k_max={k_max}")
    resolved = [resolve(spm, modules) for spm in spms]
    need = max(max((w.rank for w in r.values()), default=1) for r in resolved)
    rank = need if rank is None else int(rank)
    if need > rank:
        raise ValueError(f"SPM rank {need} exceeds the stacked rank {rank}")
    if combine not in ("linear", "official"):
        raise ValueError(f"combine must be 'linear' or 'official', got {combine!r}")
    official = network_scale(spms) if combine == "official" else None
    pad = [None] * (k_max - len(spms))
    return {path: stack_module(mod, [r.get(path) for r in resolved] + pad, rank, official)
            for path, mod in modules.items()}


def build_stacks(unet: nn.Module, spms: list[SPM], k_max: int | None = None,
                 rank: int | None = None, combine: str = "linear") -> dict[str, Stack]:
    """:func:`stack_spms` over every adapted module of ``unet``."""
    modules = adapted_modules(unet)
    if not modules:
        raise SPMFormatError(f"{type(unet).__name__} has no Transformer2DModel with Linear/Conv2d layers to adapt")
    return stack_spms(modules, spms, k_max, rank, combine)
