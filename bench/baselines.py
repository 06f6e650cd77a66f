"""What spm_rt is measured against: the reference SPM inference and diffusers/PEFT.

* The reference way (``ReferenceSPMNetwork``): the SPM repo's inference builds one unfused LoRA
  branch per adapted module (``lora_down``/``lora_up`` as ``nn.Linear`` or 1x1 ``nn.Conv2d``) and
  patches the original module's ``forward``:
  ``org_forward(x) + lora_up(lora_down(x)) * multiplier * scale``. For K SPMs it multiplies every
  tensor of SPM k by gamma_k, sums them key by key and loads the sum (``combine="official"``), once
  per prompt: different gates mean a rebuild and one prompt at a time.
* diffusers/PEFT (``peft_load`` / ``peft_set_gates`` / ``peft_unload``): each SPM file loaded with
  ``pipe.load_lora_weights(file, adapter_name=...)``, gates as ``set_adapters(..., adapter_weights=)``
  (the paper's linear combination; also one prompt at a time).
* ``bare(pipe)``: the base model with whatever adapters are installed taken out of the forward path
  for a moment (same module objects), so base rounds can be interleaved with variant rounds.
"""
from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import torch
from torch import nn

from spm_rt.formats import SPM, adapted_modules, lora_key, save_spm


class ReferenceSPMLayer(nn.Module):
    """One adapted module as the reference inference runs it (an unfused rank-r branch)."""

    def __init__(self, org_module: nn.Module, rank: int, alpha: float, multiplier: float = 1.0):
        super().__init__()
        if isinstance(org_module, nn.Conv2d):
            self.lora_down = nn.Conv2d(org_module.in_channels, rank, 1, bias=False)
            self.lora_up = nn.Conv2d(rank, org_module.out_channels, 1, bias=False)
        elif isinstance(org_module, nn.Linear):
            self.lora_down = nn.Linear(org_module.in_features, rank, bias=False)
            self.lora_up = nn.Linear(rank, org_module.out_features, bias=False)
        else:
            raise TypeError(f"cannot adapt {type(org_module).__name__}")
        self.scale = alpha / rank
        self.multiplier = multiplier
        self._org = [org_module]  # a list so it is not registered as a submodule
        self.org_forward = None
        self.to(device=org_module.weight.device, dtype=org_module.weight.dtype)

    def apply_to(self) -> None:
        # As the reference does: the original module's forward becomes this branch's forward.
        org = self._org[0]
        self.org_forward = org.forward
        org.forward = self.forward

    def restore(self) -> None:
        org = self._org[0]
        if org.__dict__.get("forward") == self.forward:
            del org.forward

    def forward(self, x):
        return self.org_forward(x) + self.lora_up(self.lora_down(x)) * self.multiplier * self.scale


class ReferenceSPMNetwork:
    """The reference inference's SPM network for K SPMs: one ``ReferenceSPMLayer`` per adapted
    module, loaded with the gamma-weighted key-by-key sum of the SPMs' tensors.

    Example::

        >>> net = ReferenceSPMNetwork(pipe.unet, [spm_a, spm_b])  # doctest: +SKIP
        >>> net.set_gates([1.0, 0.3]); net.apply()  # doctest: +SKIP
    """

    def __init__(self, unet: nn.Module, spms: list[SPM]):
        modules = adapted_modules(unet)
        rank = max(s.rank for s in spms)
        alpha = spms[0].alpha  # the reference takes alpha from the first SPM's metadata
        self.layers = {path: ReferenceSPMLayer(mod, rank, alpha) for path, mod in modules.items()}
        # Per-key stacks [K, ...] of each SPM's tensors, as the reference holds its loaded state dicts.
        self._down = {}  # path -> [K, r, in]
        self._up = {}  # path -> [K, out, r]
        for path, layer in self.layers.items():
            key = lora_key(path)
            w = layer.lora_down.weight
            downs, ups = [], []
            for s in spms:
                mw = s.weights.get(key)
                d = torch.zeros(rank, layer.lora_down.weight.shape[1], dtype=w.dtype)
                u = torch.zeros(layer.lora_up.weight.shape[0], rank, dtype=w.dtype)
                if mw is not None:
                    d[: mw.rank] = mw.down.to(w.dtype)
                    u[:, : mw.rank] = mw.up.to(w.dtype)
                downs.append(d)
                ups.append(u)
            self._down[path] = torch.stack(downs).to(w.device)
            self._up[path] = torch.stack(ups).to(w.device)
        self.applied = False

    @torch.no_grad()
    def set_gates(self, gates) -> None:
        """Load ``sum_k gates[k] * tensors_k`` key by key (the reference's per-prompt rebuild)."""
        for path, layer in self.layers.items():
            down, up = self._down[path], self._up[path]
            g = torch.as_tensor(gates, dtype=down.dtype, device=down.device)
            layer.lora_down.weight.copy_((down * g[:, None, None]).sum(0).view_as(layer.lora_down.weight))
            layer.lora_up.weight.copy_((up * g[:, None, None]).sum(0).view_as(layer.lora_up.weight))

    def apply(self) -> None:
        for layer in self.layers.values():
            layer.apply_to()
        self.applied = True

    def restore(self) -> None:
        for layer in self.layers.values():
            layer.restore()
        self.applied = False


# ---------------------------------------------------------------------------------------------
# diffusers / PEFT

def _quiet_diffusers():
    from diffusers.utils import logging as dlogging

    dlogging.set_verbosity_error()
    logging.getLogger("peft").setLevel(logging.ERROR)


def write_spm_files(spms: list[SPM], folder: str | Path) -> list[Path]:
    """Save SPMs in the reference layout (what ``load_lora_weights`` reads)."""
    folder = Path(folder)
    return [save_spm(s, folder / f"spm_{k:03d}.safetensors") for k, s in enumerate(spms)]


def peft_adapter_name(k: int) -> str:
    return f"spm_{k:03d}"


def peft_loaded(pipe) -> list[str]:
    """Names of the LoRA adapters loaded into the UNet (in load order)."""
    cfg = getattr(pipe.unet, "peft_config", None) or {}
    return list(cfg)


def peft_load(pipe, files: list[Path]) -> list[str]:
    """Load the first ``len(files)`` SPM files as adapters (skipping those already loaded)."""
    import warnings

    _quiet_diffusers()
    have = set(peft_loaded(pipe))
    names = []
    for k, f in enumerate(files):
        name = peft_adapter_name(k)
        if name not in have:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                pipe.load_lora_weights(str(f), adapter_name=name)
        names.append(name)
    return names


def peft_set_gates(pipe, names: list[str], gates) -> None:
    """Activate ``names`` with per-adapter weights ``gates`` (diffusers' multi-adapter API)."""
    pipe.set_adapters(names, adapter_weights=[float(g) for g in gates])


def peft_unload(pipe) -> None:
    if peft_loaded(pipe):
        pipe.unload_lora_weights()


# ---------------------------------------------------------------------------------------------
# the bare base model, interleaved with variant rounds

def _parent(root: nn.Module, path: str):
    parent_path, _, name = path.rpartition(".")
    return (root.get_submodule(parent_path) if parent_path else root), name


@contextlib.contextmanager
def bare(pipe):
    """Run the block on the base UNet: spm_rt layers and PEFT LoRA layers are swapped for their
    base modules and reference-way forward patches are lifted; everything is put back after."""
    unet = pipe.unet
    swapped = []  # (parent, name, wrapper)
    unpatched = []  # (module, forward)
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except Exception:  # peft missing: nothing of it can be installed
        BaseTunerLayer = ()
    for path, mod in list(unet.named_modules()):
        if not path:
            continue
        base = None
        if getattr(mod, "_spm_wrapper", False):
            base = mod.base
        elif BaseTunerLayer and isinstance(mod, BaseTunerLayer):
            base = mod.get_base_layer()
        if base is not None:
            parent, name = _parent(unet, path)
            if getattr(parent, name) is mod:
                swapped.append((parent, name, mod))
        fwd = mod.__dict__.get("forward")
        if fwd is not None and isinstance(getattr(fwd, "__self__", None), ReferenceSPMLayer):
            unpatched.append((mod, fwd))
    try:
        for parent, name, mod in swapped:
            setattr(parent, name, mod.base if getattr(mod, "_spm_wrapper", False) else mod.get_base_layer())
        for mod, _ in unpatched:
            del mod.forward
        yield
    finally:
        for parent, name, mod in swapped:
            setattr(parent, name, mod)
        for mod, fwd in unpatched:
            mod.forward = fwd
