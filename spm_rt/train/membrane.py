"""The membrane being trained: one SPM's ``down``/``up`` as fp32 master parameters on spm_rt's own
gated layers (``build_stacks`` + ``layers.patch`` with K = 1, so the stack *is* the SPM). "On" is
``use_gates(ones)``, "off" is ``gates_off`` (the base UNet, bit for bit).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from spm_rt.formats import SPM, ModuleWeights, adapted_modules, lora_key
from spm_rt.gating import gates_off, use_gates


class TrainableSPM:
    """One SPM being trained, installed as spm_rt layers on ``unet``.

    ``down``/``up`` are fp32 master ``nn.Parameter``s per adapted module, laid out as the K = 1
    stack (``[r, in]``, ``[out, r]``). Fresh weights follow the reference (down Kaiming-uniform with
    a = sqrt(5), up zeros: a no-op); ``init`` starts from an existing SPM instead (of the same rank,
    or a lower one: then widened, its product kept and the new components a no-op).

    Example::

        >>> from spm_rt.testing import tiny_pipeline
        >>> pipe = tiny_pipeline(0)
        >>> spm = TrainableSPM(pipe.unet, ["circle"], generator=torch.Generator().manual_seed(0))
        >>> with spm.on():
        ...     pass  # UNet calls here run with the membrane open (gradients reach spm.parameters())
        >>> spm.remove()
    """

    def __init__(self, unet: nn.Module, concepts: list[str], rank: int = 1, alpha: float = 1.0, *,
                 generator: torch.Generator | None = None, backend: str = "auto", init: SPM | None = None):
        from spm_rt.config import SPMConfig
        from spm_rt.patching import patch
        from spm_rt.stack import build_stacks

        self.unet = unet
        self.concepts = list(concepts)
        self.rank, self.alpha = int(rank), float(alpha)
        modules = adapted_modules(unet)
        if not modules:
            raise ValueError(f"{type(unet).__name__} has no Transformer2DModel layers to adapt")
        self.conv = {p: isinstance(m, nn.Conv2d) for p, m in modules.items()}
        device = next(unet.parameters()).device
        self.down: dict[str, nn.Parameter] = {}
        self.up: dict[str, nn.Parameter] = {}
        for path, m in modules.items():
            out_f, in_f = m.weight.shape[:2]
            if init is not None:
                w = init.weights[lora_key(path)]
                down, up = w.down.float().clone(), w.up.float().clone()  # [r0, in], [out, r0]
                if init.rank < self.rank:  # widen: the init's product kept, new components a no-op
                    extra = torch.empty(self.rank - init.rank, in_f)
                    nn.init.kaiming_uniform_(extra, a=math.sqrt(5), generator=generator)
                    keep = (init.alpha / init.rank) / (self.alpha / self.rank)
                    down = torch.cat([down, extra])
                    up = torch.cat([up * keep, torch.zeros(out_f, self.rank - init.rank)], 1)
            else:
                down = torch.empty(self.rank, in_f)
                nn.init.kaiming_uniform_(down, a=math.sqrt(5), generator=generator)
                up = torch.zeros(out_f, self.rank)
            self.down[path] = nn.Parameter(down.to(device))
            self.up[path] = nn.Parameter(up.to(device))
        if init is not None and init.rank >= self.rank:
            self.rank, self.alpha = init.rank, init.alpha
        # build_stacks validates shapes and gives each module's scale in the one stacked layout;
        # its down/up copies are then replaced by (casts of) the parameters.
        stacks = build_stacks(unet, [self.to_spm()])
        self.layers = patch(unet, stacks, SPMConfig(strategy="gated", backend=backend))
        self.refresh()

    def parameters(self) -> list[nn.Parameter]:
        """down, up of every module, in UNet order (the optimizer's parameter order)."""
        return [p for path in self.down for p in (self.down[path], self.up[path])]

    def refresh(self) -> None:
        """Point every layer's stack at the parameters (a differentiable cast when the UNet is not
        fp32; called once per iteration, since the cast is part of that iteration's graph)."""
        for path, layer in self.layers.items():
            dtype = layer.weight.dtype
            layer.set_factors(self.down[path].to(dtype), self.up[path].to(dtype))

    def on(self):
        """Context: the membrane is open (gate 1 on every UNet row)."""
        return use_gates(self.unet, torch.ones(1, 1))

    def off(self):
        """Context: the membrane is shut (gate 0: the base UNet, bit for bit)."""
        return gates_off(self.unet)

    def to_spm(self, dtype: torch.dtype | None = None) -> SPM:
        """A detached copy of the current weights as an :class:`~spm_rt.SPM`."""
        weights = {}
        for path in self.down:
            d, u = self.down[path].detach().cpu().clone(), self.up[path].detach().cpu().clone()
            if dtype is not None:
                d, u = d.to(dtype), u.to(dtype)
            weights[lora_key(path)] = ModuleWeights(d, u, self.alpha, conv=self.conv[path])
        return SPM(concepts=list(self.concepts), rank=self.rank, alpha=self.alpha, weights=weights)

    def state_dict(self) -> dict[str, torch.Tensor]:
        out = {}
        for path in self.down:
            out[f"{path}.down"] = self.down[path].detach().cpu().clone()
            out[f"{path}.up"] = self.up[path].detach().cpu().clone()
        return out

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        expected = {f"{p}.{h}" for p in self.down for h in ("down", "up")}
        if set(state) != expected:
            raise ValueError("checkpoint membranes do not match this UNet's adapted modules")
        with torch.no_grad():
            for path in self.down:
                self.down[path].copy_(state[f"{path}.down"])
                self.up[path].copy_(state[f"{path}.up"])

    def remove(self) -> None:
        """Unpatch the UNet (the original modules are back, bit-exact)."""
        from spm_rt.patching import unpatch

        unpatch(self.unet, self.layers)
        self.layers = {}
