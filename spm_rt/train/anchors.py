"""Latent Anchoring and the erase objective (semantics section 5, steps 5 and 6).

Anchors are random embeddings, as in the reference code (not the paper's sampled concepts):
Gaussian directions of the target embedding's shape, each accepted with probability
``1 - cos(anchor, target)`` and rescaled to 0.8..1.2 times the target embedding's norm.

Fixed here: the reference lays its anchor batch out as ``[uncond, a1, uncond, a2, ...]`` and then
splits it in half as if it were ``[uncond half, cond half]``, so only the second half of the
anchors is ever predicted as a condition and half of the anchoring weight falls on the empty
prompt. spm_rt predicts every sampled anchor as the condition of its own row: all
``sampling_batch_size`` anchors contribute, and none of the weight goes to the empty prompt.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def sample_anchors(
    target: torch.Tensor,  # [1, ...] one prompt's embedding (e.g. [1, 77, d] or a pooled [1, p])
    n: int,
    generator: torch.Generator,  # a CPU generator: the draws do not depend on the device
) -> torch.Tensor:
    """``n`` anchor embeddings shaped like ``target`` ([n, ...], on target's device and dtype).

    Example::

        >>> g = torch.Generator().manual_seed(0)
        >>> sample_anchors(torch.randn(1, 77, 32), 4, g).shape
        torch.Size([4, 77, 32])
    """
    t = target.detach().reshape(-1).to("cpu", torch.float32)
    t_norm = t.norm()
    out = []
    while len(out) < n:
        while True:
            noise = torch.randn(t.shape, generator=generator)
            noise = noise / noise.norm()
            sim = torch.dot(t, noise) / t_norm.clamp_min(1e-12)  # noise has unit norm
            if torch.rand((), generator=generator) < 1 - sim:
                break
        scale = torch.rand((), generator=generator) * 0.4 + 0.8
        out.append(scale * noise * t_norm)
    return torch.stack(out).view(n, *target.shape[1:]).to(device=target.device, dtype=target.dtype)


def erase_loss(
    eps_target: torch.Tensor,  # [B, C, h, w] SPM on, prompt = target
    eps_positive: torch.Tensor,  # [B, C, h, w] SPM off, prompt = positive
    eps_neutral: torch.Tensor,  # [B, C, h, w] SPM off, prompt = neutral
    guidance_scale: float,  # eta
) -> torch.Tensor:
    """``MSE(eps_target, eps_neutral - eta * (eps_positive - eps_neutral))`` in float32."""
    goal = eps_neutral.float() - guidance_scale * (eps_positive.float() - eps_neutral.float())
    return F.mse_loss(eps_target.float(), goal.detach())


def anchoring_loss(
    eps_anchor_on: torch.Tensor,  # [S, C, h, w] SPM on
    eps_anchor_off: torch.Tensor,  # [S, C, h, w] SPM off
) -> torch.Tensor:
    """``MSE(eps_on, eps_off)`` over every anchor, in float32."""
    return F.mse_loss(eps_anchor_on.float(), eps_anchor_off.float().detach())
