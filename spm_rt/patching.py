"""Patch / unpatch a UNet: swap every adapted module for its :mod:`spm_rt.layers` layer (all or
nothing), give the UNet one :class:`~spm_rt.gating.GateState`, group the attention projections
(:mod:`spm_rt.grouping`) and register the fail-closed hooks (:mod:`spm_rt.guard`)."""
from __future__ import annotations

from torch import nn

from spm_rt import guard
from spm_rt.formats import SPMFormatError
from spm_rt.gating import DEFAULT_MAX_BATCH_ROWS, GateState
from spm_rt.grouping import attention_groups
from spm_rt.layers import SPMConv1x1, SPMLayer, SPMLinear
from spm_rt.stack import Stack


def wrap(path: str, module: nn.Module, stack: Stack, config, state: GateState) -> SPMLayer:
    if isinstance(module, nn.Conv2d):
        if module.stride != (1, 1) or module.padding not in ((0, 0), 0, "valid") or module.dilation != (1, 1):
            raise SPMFormatError(f"{path}: only 1x1 Conv2d layers with stride 1 and no padding/dilation can carry "
                                 f"an SPM, got {module}")
        return SPMConv1x1(module, stack, config, state, path)
    if isinstance(module, nn.Linear):
        return SPMLinear(module, stack, config, state, path)
    raise TypeError(f"{path}: cannot adapt {type(module).__name__}")


def _parent(root: nn.Module, path: str) -> tuple[nn.Module, str]:
    parent_path, _, name = path.rpartition(".")
    return (root.get_submodule(parent_path) if parent_path else root), name


def patch(unet: nn.Module, stacks: dict[str, Stack], config) -> dict[str, SPMLayer]:
    """Replace every module in ``stacks`` by its adapted layer (all or nothing); the UNet gets one
    :class:`GateState` (``unet._spm_rt_state``) shared by the layers, holding ``config`` (an
    :class:`~spm_rt.config.SPMConfig`)."""
    from spm_rt.formats import adapted_modules

    if unet.__dict__.get("_spm_rt_state") is not None:
        raise RuntimeError(f"{type(unet).__name__} is already patched by spm_rt (call remove() first)")
    modules = adapted_modules(unet)
    missing = [p for p in stacks if p not in modules]
    if missing:
        raise KeyError(f"no adapted module at {missing[:3]}")
    first = next(iter(stacks.values()))
    rows = getattr(config, "max_batch_rows", DEFAULT_MAX_BATCH_ROWS)
    state = GateState(first.num_spms, device=first.down.device, max_batch_rows=rows)
    state.config = config
    layers = {path: wrap(path, modules[path], stack, config, state) for path, stack in stacks.items()}
    done = []
    try:
        for path, layer in layers.items():
            parent, name = _parent(unet, path)
            if getattr(getattr(parent, name), "_spm_wrapper", False):
                raise RuntimeError(f"{path} is already patched by spm_rt (call remove() first)")
            setattr(parent, name, layer)
            done.append(path)
    except BaseException:
        unpatch(unet, {p: layers[p] for p in done})
        raise
    state.layers = layers
    unet.__dict__["_spm_rt_state"] = state  # plain attribute: not a submodule of the UNet itself
    attention_groups(unet, layers)
    guard.hook_unet(unet)
    return layers


def unpatch(unet: nn.Module, layers: dict[str, SPMLayer]) -> None:
    """Put the original modules back (the same objects, holding the layers' current parameter
    objects, pristine: bit-exact)."""
    for path, layer in layers.items():
        layer.restore_weight()
        parent, name = _parent(unet, path)
        base = layer.base
        # follow parameter objects replaced while patched (e.g. by offload hooks)
        base._parameters["weight"] = layer._parameters["weight"]
        if "bias" in base._parameters:
            base._parameters["bias"] = layer._parameters["bias"]
        if getattr(parent, name) is layer:
            setattr(parent, name, base)
        layer._pristine = None
        if layer.shared is not None:
            layer.shared.invalidate()
    guard.unhook_unet(unet)
    unet.__dict__.pop("_spm_rt_state", None)
