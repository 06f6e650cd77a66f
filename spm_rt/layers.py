"""Adapted layers: an original Linear / 1x1 Conv2d plus the stacked SPMs, as module state.

Everything an adapted layer needs on the hot path is a tensor it owns (so ``.to()``, ``.half()``,
offload hooks and ``deepcopy`` move it, and ``torch.compile`` / CUDA graphs see fixed tensors):

* ``weight`` / ``bias``: the original module's own ``Parameter`` objects (not copies), registered
  under the original names, so ``unet.state_dict()`` keeps the base model's keys and tensors;
* ``spm_down [k_max*r, in]``, ``spm_up [out, k_max*r]``, ``spm_scale [k_max]`` (float32):
  non-persistent buffers in the one stacked layout of ``spm_rt.stack``, rewritten in place
  (``copy_``) when the SPM set changes within ``k_max`` slots;
* ``spm_state``: the UNet's shared :class:`~spm_rt.gating.GateState` (a plain attribute).

The forward reads the state's mode (one Python attribute per call, see spm_rt.gating): ``off``
-> the base op on ``weight``; ``merged`` -> the base op on ``weight``, which holds ``W +
update(gates)`` for this call (merged in place by :meth:`SPMLayer.prepare_merged` and restored
bit-exactly by :meth:`SPMLayer.restore_weight` at the end of the call, from a pristine copy in
host memory: merged mode costs no device memory); ``gated`` -> the low-rank branch per row
(``spm_rt.functional``) with ``row_gates[:N]``; ``grouped`` -> one merged temporary per distinct
gate vector (eager). The original module object is kept (unregistered) and restored by
:func:`spm_rt.patching.unpatch`, bit-exactly.

Half precision: see ``spm_rt.precision`` (which layers strategy="auto" runs gated because a
merge would round too much of the update away). Projections that share an input: see
``spm_rt.grouping``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from spm_rt.functional import gated_conv1x1, gated_linear
from spm_rt.gating import GateState
from spm_rt.kernels.reference import merged_update_error, merged_weight_ref
from spm_rt.precision import merge_allowed, warn_lossy_merge
from spm_rt.stack import Stack


def _compiling() -> bool:
    return torch.compiler.is_compiling()


def _no_grad_needed(x: torch.Tensor) -> bool:
    """The one test for the eager-only shortcuts (output reuse, grouped launches): no autograd
    graph to build, and tensors with version counters (not inference tensors)."""
    return not (x.is_inference() or torch.is_inference_mode_enabled() or (torch.is_grad_enabled() and x.requires_grad))


class SPMLayer(nn.Module):
    """Base of SPMLinear / SPMConv1x1 (see the module docstring for the state it owns)."""

    _spm_wrapper = True

    def __init__(self, base: nn.Module, stack: Stack, config, state: GateState, path: str = ""):
        super().__init__()
        self.__dict__["base"] = base  # the original module, kept but not registered (state_dict keys)
        self.__dict__["spm_state"] = state  # shared by every layer: a plain attribute, not a child module
        self.path = path
        self.register_parameter("weight", base.weight)
        self.register_parameter("bias", base.bias)
        self.register_buffer("spm_down", stack.down, persistent=False)  # [k_max*r, in]
        self.register_buffer("spm_up", stack.up, persistent=False)  # [out, k_max*r]
        self.register_buffer("spm_scale", stack.scale.float(), persistent=False)  # [k_max] float32
        self.rank = stack.rank
        self.shared = None  # spm_rt.grouping.SharedInput, set by patch() for attention projections
        self._factors = None  # training: (down, up) tensors that carry gradients, else None
        self.merge_error: float | None = None  # update lost by merging at unit gates (spm_rt.precision)
        self._merge_error_for = None  # (weight identity, combine, SPM buffer versions) it was measured for
        self.merge_gated = False  # this call's merged mode runs the gated branch here (set per call)
        self._merged = False  # weight currently holds a merge (between prepare_merged and restore_weight)
        self._pristine = None  # host copy of the weight, the source of every bit-exact restore
        self._clean_version = None  # weight._version when it last held exactly _pristine
        self._weight_epoch = 0  # bumped when the weight changes outside spm_rt (a new pristine copy)
        self._scale_host = None  # (spm_scale version, CPU copy): official merges read scale[0] without a sync

    @property
    def config(self):
        """The pipeline's one :class:`~spm_rt.config.SPMConfig` (read at each call)."""
        return self.spm_state.config

    # -- state -----------------------------------------------------------------------------------
    def _apply(self, fn, recurse=True):
        if self._merged:
            self.restore_weight()  # never move or cast a merged weight: restore first
        scale = self.spm_scale
        super()._apply(fn, recurse)
        if self.spm_scale.dtype != torch.float32:  # keep the scales float32 whatever the UNet's dtype
            self.spm_scale = scale.to(device=self.spm_scale.device)
        self.spm_state.move(fn)  # the shared gate buffer follows the UNet (float32)
        if self.shared is not None:
            self.shared.invalidate()
        return self

    @property
    def stack(self) -> Stack:
        """The layer's SPMs in the stacked layout (views of its buffers, or the training factors)."""
        down, up = self._factors or (self.spm_down, self.spm_up)
        return Stack(down, up, self.spm_scale, self.rank)

    @property
    def trainable(self) -> bool:
        return self._factors is not None

    def write_stack(self, stack: Stack) -> bool:
        """Put ``stack`` into the buffers: in place when the shapes match (same storage, so compiled
        and captured graphs stay valid); returns False when new buffers had to be allocated."""
        if self.shared is not None:
            self.shared.invalidate()
        same = (stack.down.shape == self.spm_down.shape and stack.up.shape == self.spm_up.shape
                and stack.scale.shape == self.spm_scale.shape)
        if same:
            with torch.no_grad():
                self.spm_down.copy_(stack.down)
                self.spm_up.copy_(stack.up)
                self.spm_scale.copy_(stack.scale)
            return True
        dev, dt = self.weight.device, self.weight.dtype
        self.spm_down = stack.down.to(device=dev, dtype=dt)
        self.spm_up = stack.up.to(device=dev, dtype=dt)
        self.spm_scale = stack.scale.to(device=dev, dtype=torch.float32)
        self.rank = stack.rank
        return False

    def set_factors(self, down: torch.Tensor | None, up: torch.Tensor | None = None) -> None:
        """Training: run the gated branch with these (gradient-carrying) factors instead of the
        buffers; ``set_factors(None)`` returns to the buffers."""
        self._factors = None if down is None else (down, up)

    # -- merged strategy -------------------------------------------------------------------------
    def _weight_id(self) -> tuple:
        """Identity of the (pristine) weight: changes when it is replaced, cast, moved or written
        outside spm_rt, not by spm_rt's own merge / restore."""
        w = self.weight
        if not self._merged and w._version != self._clean_version:
            self._weight_epoch += 1
            self._clean_version = w._version
        return (w.data_ptr(), w.dtype, w.device, self._weight_epoch)

    def refresh_merge_error(self) -> float:
        """``merge_error`` for the current weight dtype and SPMs (measured again only when they
        changed): the relative error of the update a merged weight applies at gates 1 for every
        SPM (``spm_rt.kernels.reference.merged_update_error``)."""
        key = (self._weight_id(), self.config.combine, self.spm_down.data_ptr(), self.spm_down._version,
               self.spm_up._version, self.spm_scale._version)
        if self._merge_error_for != key:
            if self._merged:
                self.restore_weight()
            w = self.weight.detach()
            gates = torch.ones(self.spm_scale.shape[0], device=w.device)
            with torch.no_grad():
                self.merge_error = merged_update_error(w.reshape(w.shape[0], -1), self.spm_down, self.spm_up,
                                                       self.spm_scale, gates, self.config.combine, self.rank)
            self._merge_error_for = key
        return self.merge_error

    def prepare_merged(self, gates: torch.Tensor) -> None:
        """Merge ``update(gates)`` into ``weight`` in place for one call (gates [k_max] float32, on
        CPU), after saving a pristine host copy where the weight changed since the last one. Under
        strategy="auto" a layer whose merge would lose more than MERGE_ERROR_MAX of the update at
        this call's smallest gate (``spm_rt.precision.merge_allowed``) is marked to run gated
        instead (``merge_gated``) and merges nothing; under "merged" it merges and warns once."""
        if self._merged:
            self.restore_weight()
        allowed = merge_allowed(self.refresh_merge_error(), gates, self.config.combine)
        self.merge_gated = not allowed and self.config.strategy == "auto"
        if self.merge_gated:
            return
        if not allowed:
            warn_lossy_merge(self)
        self._save_pristine()
        w = self.weight
        with torch.no_grad():
            self._merge(gates.to(w.device), out=w.detach())  # in place: no second device copy
        self._merged = True

    def _save_pristine(self) -> None:
        w = self.weight
        self._weight_id()  # notices a weight changed outside spm_rt
        p = self._pristine
        if p is None or p.shape != w.shape or p.dtype != w.dtype or self.__dict__.get("_pristine_epoch") != \
                self._weight_epoch:
            host = torch.empty(w.shape, dtype=w.dtype, device="cpu",
                               pin_memory=w.device.type == "cuda" and torch.cuda.is_available())
            host.copy_(w.detach())
            self._pristine = host
            self.__dict__["_pristine_epoch"] = self._weight_epoch

    def restore_weight(self) -> None:
        """Put the pristine weight back (bit-exact) after a merged call."""
        if not self._merged:
            return
        w = self.weight
        with torch.no_grad():
            w.detach().copy_(self._pristine, non_blocking=self._pristine.is_pinned())
        self._merged = False
        self._clean_version = w._version

    def _merge(self, gates: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """``W + update(gates)`` shaped like the weight (into ``out`` when given, which may be the
        weight itself)."""
        w = self.weight.detach()
        scale = self.spm_scale
        if self.config.combine == "official":  # the reference reads float(scale[0]): from a host copy, no sync
            if self._scale_host is None or self._scale_host[0] != (scale.data_ptr(), scale._version):
                self._scale_host = ((scale.data_ptr(), scale._version), scale.detach().cpu())
            scale = self._scale_host[1]
        with torch.no_grad():
            flat = None if out is None else out.view(w.shape[0], -1)
            return merged_weight_ref(w.reshape(w.shape[0], -1), self.spm_down, self.spm_up, scale, gates,
                                     self.config.combine, self.rank, out=flat).view_as(w)

    # -- forward ---------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        state = self.spm_state
        compiling = _compiling()
        mode = state.graph_mode if compiling else state.mode  # one Python attribute, constant per call
        if self._factors is not None:
            mode = "gated" if mode != "off" else "off"
        elif mode == "merged" and self.merge_gated:
            mode = "gated"  # merging would lose too much of the update in this dtype (spm_rt.precision)
        if mode == "off":
            return self._base_forward(x, self.weight)
        if compiling:  # "grouped" never reaches a graph: graph_mode maps it to "gated"
            if mode == "merged":  # weight holds this call's merge
                return self._base_forward(x, self.weight)
            torch._check(x.shape[0] <= state.row_gates.shape[0])
            return self._gated_forward(x, state.row_gates[: x.shape[0]], state.backend)
        state.check_rows(x.shape[0], self.path or type(self).__name__)
        shared = self.shared
        if shared is not None and self._factors is None and _no_grad_needed(x):
            return shared.forward(self, x, mode, state)
        return self.eager_forward(x, mode, state)

    def eager_forward(self, x: torch.Tensor, mode: str, state: GateState, shared=None) -> torch.Tensor:
        """The eager path of one call mode ("merged", "grouped" or "gated")."""
        if mode == "merged":
            return self._base_forward(x, self.weight)
        if mode == "grouped":
            return self._grouped_merged_forward(x, state)
        gates = state.row_gates[: x.shape[0]]
        if shared is not None and state.backend == "triton":
            return shared.forward_all(self, x, gates, state)
        return self._gated_forward(x, gates, state.backend)

    def _grouped_merged_forward(self, x: torch.Tensor, state: GateState) -> torch.Tensor:
        """strategy='merged' on a batch with several gate vectors: one merged weight per distinct
        vector (formed once per call, freed at its end), each applied to its own rows. The row
        order is formed once per call on the device, the group sizes come from the host-side gate
        table: no host sync per layer per step."""
        inverse, vectors, sizes = state.groups  # [R] on the device, [G, K] on the host, G ints
        cache = state.reuse.setdefault(("grouped", id(self)), {})
        reps = x.shape[0] // inverse.shape[0]
        order = state.reuse.get(("grouped-order", x.shape[0]))
        if order is None:
            order = state.reuse[("grouped-order", x.shape[0])] = torch.argsort(inverse.repeat(reps), stable=True)
        out, start = None, 0
        for i, size in enumerate(sizes):
            idx = order[start:start + size * reps]
            start += size * reps
            if i not in cache:
                g = torch.zeros(self.spm_scale.shape[0])
                g[: vectors.shape[1]] = vectors[i]
                cache[i] = self._merge(g.to(x.device))
            y = self._base_forward(x.index_select(0, idx), cache[i])
            if out is None:
                out = y.new_empty((x.shape[0],) + y.shape[1:])
            out.index_copy_(0, idx, y)
        return out

    def _base_forward(self, x, weight):  # pragma: no cover - overridden
        raise NotImplementedError

    _gated_op = None  # the functional op of the subclass (gated_linear / gated_conv1x1)

    def _gated_forward(self, x, gates, backend):
        down, up = self._factors or (self.spm_down, self.spm_up)
        return self._gated_op(x, self.weight, self.bias, down, up, self.spm_scale, gates,
                              self.config.combine, self.rank, backend)

    def extra_repr(self) -> str:
        return (f"slots={self.spm_scale.shape[0]}, rank={self.rank}, combine={self.config.combine}, "
                f"strategy={self.config.strategy}")


class SPMLinear(SPMLayer):
    """An ``nn.Linear`` with K stacked SPMs."""

    def _base_forward(self, x, weight):
        return F.linear(x, weight, self.bias)

    _gated_op = staticmethod(gated_linear)


class SPMConv1x1(SPMLayer):
    """A 1x1 ``nn.Conv2d`` (SD1.x ``proj_in``/``proj_out``) with K stacked SPMs (stride 1, no
    padding or dilation: checked at patch time)."""

    def _base_forward(self, x, weight):
        return F.conv2d(x, weight, self.bias)

    _gated_op = staticmethod(gated_conv1x1)
