"""Adapted layers: the original Linear / 1x1 Conv2d (kept, never copied) plus the SPM stack.

Two strategies per forward:

* merged: ``W_b = W + update(gates)`` formed once per distinct gate vector and cached (a small
  LRU); the forward is a plain ``F.linear`` / ``F.conv2d`` with the cached copy (a batch with
  several gate vectors runs each group of rows with its own copy). The original
  weight is never written, so restoring is swapping the module back.
* gated: the low-rank branch per row (``spm_rt.functional``), needed when rows of one batch
  carry different gates, and for training (D, U require grad).

``auto`` picks merged when every row of the UNet batch has the same gates, gated otherwise.
With no gates set (outside a call) or all gates zero, the forward is the base module's own.

Projections that read the same input inside one attention block form a :class:`SharedInput`:
attn1's to_q/to_k/to_v (self-attention: all read the hidden states) and attn2's to_k/to_v (both
read the text embeddings). Two things follow:

* Triton gated path: the first member called runs all of them as one grouped launch
  (``groups=3`` / ``2``: x read once) and leaves the others' outputs in the call's gate state,
  where their own calls pick them up (same input tensor, unmodified) instead of recomputing.
* Cross-attention k/v are functions of the text embeddings and the gates only, both fixed for a
  whole generation, so attn2's to_k/to_v outputs are kept for the call and reused at every
  denoising step (any strategy or backend; ``LayerConfig.reuse_cross_kv``).

Both are skipped where gradients are needed or a graph is being traced.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from spm_rt import gating
from spm_rt.functional import gated_conv1x1, gated_linear, resolve_backend
from spm_rt.kernels.reference import merged_weight_ref
from spm_rt.stack import Stack

STRATEGIES = ("auto", "merged", "gated")


@dataclass
class LayerConfig:
    """Shared by every adapted layer of one patched UNet (changing it changes them all)."""

    combine: str = "linear"
    strategy: str = "auto"
    backend: str = "auto"
    merge_cache_size: int = 2
    reuse_cross_kv: bool = True  # keep attn2 to_k/to_v outputs for the whole call (see module doc)


class SPMLayer(nn.Module):
    """Base of SPMLinear / SPMConv1x1: holds ``base`` (the original module) and ``stack``."""

    _spm_wrapper = True

    def __init__(self, base: nn.Module, stack: Stack, config: LayerConfig):
        super().__init__()
        self.base = base
        self.config = config
        self.shared: SharedInput | None = None  # set by patch() for attention projections
        self.set_stack(stack)

    def set_stack(self, stack: Stack) -> None:
        # Plain attributes, not buffers/parameters: the UNet's state_dict stays the base model's.
        self.stack = stack
        if self.shared is not None:
            self.shared.invalidate()
        self._merged: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()

    # -- merged strategy ------------------------------------------------------------------
    def merged_weight(self, key: tuple, gates: torch.Tensor) -> torch.Tensor:
        """The merged weight for one gate vector (cached), shaped like ``base.weight``."""
        cache_key = (self.config.combine, key)
        with self._lock:
            hit = self._merged.get(cache_key)
            if hit is not None:
                self._merged.move_to_end(cache_key)
                return hit
        w = self.base.weight
        s = self.stack
        merged = merged_weight_ref(w.reshape(w.shape[0], -1), s.down, s.up, s.scale, gates,
                                   self.config.combine, s.rank).view_as(w)
        with self._lock:
            self._merged[cache_key] = merged
            while len(self._merged) > max(self.config.merge_cache_size, 1):
                self._merged.popitem(last=False)
        return merged

    def clear_cache(self) -> None:
        with self._lock:
            self._merged.clear()

    def _use_merged(self, rows: gating.RowGates) -> bool:
        if self.stack.down.requires_grad or self.stack.up.requires_grad:
            return False  # training: gradients must flow through the branch
        strategy = self.config.strategy
        return strategy == "merged" or (strategy == "auto" and rows.uniform)

    def _needs_grad(self, x: torch.Tensor) -> bool:
        return torch.is_grad_enabled() and (x.requires_grad or self.stack.down.requires_grad
                                            or self.stack.up.requires_grad)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        state = gating.current()
        if state is None:
            return self.base(x)
        shared = self.shared if self.shared is not None and not state.traced and not self._needs_grad(x) else None
        keep = shared is not None and shared.cross and self.config.reuse_cross_kv
        if shared is not None:
            hit = state.take_output(self, x, keep=keep)
            if hit is not None:
                return hit
        out = self._forward(x, state, shared)
        if keep:
            state.put_output(self, x, out)
        return out

    def _forward(self, x: torch.Tensor, state: gating.GateState, shared: "SharedInput | None") -> torch.Tensor:
        rows = state.rows(x.shape[0], x.device)
        if rows.all_zero and not (self.stack.down.requires_grad or self.stack.up.requires_grad):
            return self.base(x)
        if self._use_merged(rows):
            if rows.uniform:
                return self._base_forward(x, self.merged_weight(rows.key, rows.gates[0]))
            return self._grouped_merged_forward(x, rows.gates)
        backend = resolve_backend(self.config.backend, x.device)
        if shared is not None and backend == "triton":
            return shared.forward_all(self, x, rows.gates, state)
        return self._gated_forward(x, rows.gates, backend)

    def _grouped_merged_forward(self, x: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
        """strategy='merged' on a batch with several gate vectors: one merged weight per distinct
        vector, each applied to its own rows."""
        unique, inverse = torch.unique(gates, dim=0, return_inverse=True)
        out = None
        for i in range(unique.shape[0]):
            idx = (inverse == i).nonzero().flatten()
            g = unique[i]
            y = self._base_forward(x[idx], self.merged_weight(tuple(g.tolist()), g))
            if out is None:
                out = y.new_empty((x.shape[0],) + y.shape[1:])
            out[idx] = y
        return out

    def _base_forward(self, x, weight):  # pragma: no cover - overridden
        raise NotImplementedError

    _gated_op = None  # the functional op of the subclass (gated_linear / gated_conv1x1)

    def _gated_forward(self, x, gates, backend):
        s = self.stack
        return self._gated_op(x, self.base.weight, self.base.bias, s.down, s.up, s.scale, gates,
                              self.config.combine, s.rank, backend)

    def extra_repr(self) -> str:
        s = self.stack
        return f"spms={s.num_spms}, rank={s.rank}, combine={self.config.combine}, strategy={self.config.strategy}"


class SPMLinear(SPMLayer):
    """An ``nn.Linear`` with K stacked SPMs."""

    def _base_forward(self, x, weight):
        return F.linear(x, weight, self.base.bias)

    _gated_op = staticmethod(gated_linear)


class SPMConv1x1(SPMLayer):
    """A 1x1 ``nn.Conv2d`` (SD1.x ``proj_in``/``proj_out``) with K stacked SPMs."""

    def _base_forward(self, x, weight):
        return F.conv2d(x, weight, self.base.bias)

    _gated_op = staticmethod(gated_conv1x1)


class SharedInput:
    """Adapted projections of one attention block that read the same input tensor
    (see the module docstring). ``cross``: they read the text embeddings (attn2 to_k/to_v)."""

    def __init__(self, members: list[SPMLinear], cross: bool):
        self.members = members
        self.cross = cross
        self._cat = None
        for m in members:
            m.shared = self

    @staticmethod
    def compatible(members: list[SPMLayer]) -> bool:
        first = members[0]
        return all(isinstance(m, SPMLinear) and m.base.weight.shape == first.base.weight.shape
                   and m.base.weight.dtype == first.base.weight.dtype
                   and m.base.weight.device == first.base.weight.device
                   and m.stack.down.shape == first.stack.down.shape and m.stack.rank == first.stack.rank
                   for m in members)

    def invalidate(self) -> None:
        self._cat = None

    def concatenated(self) -> tuple:
        """(weight [G*out, in], bias [G*out] | None, down [G*K*r, in], up [G*out, K*r], scale [G*K]):
        built on first use by the grouped kernel (a copy of the members' weights, freed by remove())."""
        if self._cat is None:
            ms = self.members
            biases = [m.base.bias for m in ms]
            bias = None if all(b is None for b in biases) else torch.cat(
                [b if b is not None else m.base.weight.new_zeros(m.base.weight.shape[0]) for b, m in zip(biases, ms)])
            self._cat = (torch.cat([m.base.weight for m in ms]), bias, torch.cat([m.stack.down for m in ms]),
                         torch.cat([m.stack.up for m in ms]), torch.cat([m.stack.scale for m in ms]))
        return self._cat

    def forward_all(self, caller: SPMLayer, x: torch.Tensor, gates: torch.Tensor,
                    state: gating.GateState) -> torch.Tensor:
        """One grouped Triton launch for every member; the others' outputs wait in ``state``."""
        from spm_rt.kernels import gated_linear as kernels

        weight, bias, down, up, scale = self.concatenated()
        g = len(self.members)
        x2 = x.reshape(-1, x.shape[-1]).contiguous()  # [M, in]
        y = kernels.gated_spm_linear_triton(x2, weight, bias, down, up, scale, gates, x2.shape[0] // x.shape[0],
                                            caller.config.combine, caller.stack.rank, groups=g)  # [M, G*out]
        n = weight.shape[0] // g
        outs = [y[:, i * n:(i + 1) * n].view(*x.shape[:-1], n) for i in range(g)]
        mine = None
        for member, out in zip(self.members, outs):
            if member is caller:
                mine = out
            else:
                state.put_output(member, x, out)
        return mine


def attention_groups(unet: nn.Module, layers: dict[str, SPMLayer]) -> list[SharedInput]:
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


def wrap(module: nn.Module, stack: Stack, config: LayerConfig) -> SPMLayer:
    if isinstance(module, nn.Conv2d):
        return SPMConv1x1(module, stack, config)
    if isinstance(module, nn.Linear):
        return SPMLinear(module, stack, config)
    raise TypeError(f"cannot adapt {type(module).__name__}")


def _parent(root: nn.Module, path: str) -> tuple[nn.Module, str]:
    parent_path, _, name = path.rpartition(".")
    return (root.get_submodule(parent_path) if parent_path else root), name


def patch(unet: nn.Module, stacks: dict[str, Stack], config: LayerConfig) -> dict[str, SPMLayer]:
    """Replace every module in ``stacks`` by its adapted layer (all or nothing)."""
    from spm_rt.formats import adapted_modules

    modules = adapted_modules(unet)
    missing = [p for p in stacks if p not in modules]
    if missing:
        raise KeyError(f"no adapted module at {missing[:3]}")
    layers = {path: wrap(modules[path], stack, config) for path, stack in stacks.items()}
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
    attention_groups(unet, layers)
    return layers


def unpatch(unet: nn.Module, layers: dict[str, SPMLayer]) -> None:
    """Put the original modules back (the same objects: bit-exact)."""
    for path, layer in layers.items():
        parent, name = _parent(unet, path)
        if getattr(parent, name) is layer:
            setattr(parent, name, layer.base)
        layer.clear_cache()
        if layer.shared is not None:
            layer.shared.invalidate()
