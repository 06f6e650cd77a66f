"""Adapted layers: an original Linear / 1x1 Conv2d plus the stacked SPMs, as module state.

Everything an adapted layer needs on the hot path is a tensor it owns (so ``.to()``, ``.half()``,
offload hooks and ``deepcopy`` move it, and ``torch.compile`` / CUDA graphs see fixed tensors):

* ``weight`` / ``bias``: the original module's own ``Parameter`` objects (not copies), registered
  under the original names, so ``unet.state_dict()`` keeps the base model's keys and tensors;
* ``spm_down [k_max*r, in]``, ``spm_up [out, k_max*r]``, ``spm_scale [k_max]`` (float32):
  non-persistent buffers in the one stacked layout of ``spm_rt.stack``, rewritten in place
  (``copy_``) when the SPM set changes within ``k_max`` slots;
* ``merged_weight``: a non-persistent buffer holding ``W + update(gates)`` for the call's gate
  vector, written in place once per distinct gate vector (never a fresh allocation per call);
* ``spm_state``: the UNet's shared :class:`~spm_rt.gating.GateState` (row gates + call mode).

The forward reads ``spm_state.mode`` (one Python attribute per call, see spm_rt.gating):
``off`` -> the base op on ``weight``; ``merged`` -> the base op on ``merged_weight``; ``gated``
-> the low-rank branch per row (``spm_rt.functional``) with ``row_gates[:N]``. The original
module object is kept (unregistered) and restored by :func:`unpatch`, bit-exactly.

Half precision. Merging rounds ``W + dW`` to the weight dtype, which drops every element of dW
below half an ulp of W. Each layer knows how much of a unit-gate update survives that rounding
(``merge_error``: relative error of the applied update, measured at install and again whenever the
weight dtype or the SPMs change). Under ``strategy="auto"`` a layer whose merge would lose more
than :data:`MERGE_ERROR_MAX` runs the gated branch in merged calls too (``merge_gated``: a Python
attribute set in ``GateState.begin`` via :meth:`SPMLayer.prepare_merged`, constant for a call, so
compiled graphs guard on it); ``strategy="merged"`` keeps merging and warns once with the figure.

Projections that read the same input inside one attention block form a :class:`SharedInput`:
attn1's to_q/to_k/to_v (self-attention) and attn2's to_k/to_v (both read the text embeddings).
In eager mode two things follow:

* Triton gated path: the first member called runs all of them as one grouped launch
  (``groups=3`` / ``2``: x read once) and leaves the others' outputs in the gate state, where
  their own calls pick them up (same input tensor, unmodified) instead of recomputing.
* Cross-attention k/v are functions of the text embeddings and the gates only, both fixed for a
  whole generation, so attn2's to_k/to_v outputs are kept for the call and reused at every
  denoising step (any strategy or backend; ``LayerConfig.reuse_cross_kv``).

Both are skipped where they cannot be done safely: gradients needed, inference mode (inference
tensors have no version counter to detect in-place changes), and graph capture
(``torch.compile`` traces the plain per-layer ops instead).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from spm_rt.formats import SPMFormatError
from spm_rt.functional import gated_conv1x1, gated_linear
from spm_rt.gating import GateState
from spm_rt.kernels.reference import merged_update_error, merged_weight_ref
from spm_rt.stack import Stack

STRATEGIES = ("auto", "merged", "gated")

# Largest relative error of a unit-gate SPM update that a merged weight may carry under
# strategy="auto" (beyond it the layer runs gated). 5% of the update is a 5% change of that
# layer's effective gate, below the spread Facilitated Transport itself puts between prompts that
# name a concept (clipcos 0.78-0.81 for "a red/blue/green circle", semantics section 3); bf16
# merges lose 13% on a typical layer and up to 81% (issue 13, shipped circle SPM), fp16 merges
# 1.6% typical and 22% worst, fp32 merges ~1e-5. Measured on CPU (bench/bench_precision.py) the
# gated branch on the layers over this limit costs little against merging: see the README,
# "Half precision".
MERGE_ERROR_MAX = 0.05


@dataclass
class LayerConfig:
    """Shared by every adapted layer of one patched UNet (changing it changes them all)."""

    combine: str = "linear"
    strategy: str = "auto"
    backend: str = "auto"
    reuse_cross_kv: bool = True  # keep attn2 to_k/to_v outputs for the whole call (see module doc)


def _compiling() -> bool:
    return torch.compiler.is_compiling()


class SPMLayer(nn.Module):
    """Base of SPMLinear / SPMConv1x1 (see the module docstring for the state it owns)."""

    _spm_wrapper = True

    def __init__(self, base: nn.Module, stack: Stack, config: LayerConfig, state: GateState, path: str = ""):
        super().__init__()
        self.__dict__["base"] = base  # the original module, kept but not registered (state_dict keys)
        self.path = path
        self.register_parameter("weight", base.weight)
        self.register_parameter("bias", base.bias)
        self.config = config
        self.spm_state = state
        self.register_buffer("spm_down", stack.down, persistent=False)  # [k_max*r, in]
        self.register_buffer("spm_up", stack.up, persistent=False)  # [out, k_max*r]
        self.register_buffer("spm_scale", stack.scale.float(), persistent=False)  # [k_max] float32
        self.register_buffer("merged_weight", None, persistent=False)  # like weight, once merged
        self.rank = stack.rank
        self.shared: SharedInput | None = None  # set by patch() for attention projections
        self._merged_for = None  # what merged_weight currently holds (gates, weight identity)
        self._factors = None  # training: (down, up) tensors that carry gradients, else None
        self.merge_error: float | None = None  # update lost by merging at unit gates (see module doc)
        self._merge_error_for = None  # (weight identity, combine, SPM buffer versions) it was measured for
        self.merge_gated = False  # this call's merged mode runs the gated branch here (set per call)

    # -- state -----------------------------------------------------------------------------------
    def _apply(self, fn, recurse=True):
        scale = self.spm_scale
        super()._apply(fn, recurse)
        if self.spm_scale.dtype != torch.float32:  # keep the scales float32 whatever the UNet's dtype
            self.spm_scale = scale.to(device=self.spm_scale.device)
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
        self._merged_for = None
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
        w = self.weight
        return (w.data_ptr(), w.dtype, w.device, w._version)

    def refresh_merge_error(self) -> float:
        """``merge_error`` for the current weight dtype and SPMs (measured again only when they
        changed): the relative error of the update a merged weight applies at gates 1 for every
        SPM (``spm_rt.kernels.reference.merged_update_error``)."""
        key = (self._weight_id(), self.config.combine, self.spm_down.data_ptr(), self.spm_down._version,
               self.spm_up._version, self.spm_scale._version)
        if self._merge_error_for != key:
            w = self.weight.detach()
            gates = torch.ones(self.spm_scale.shape[0], device=w.device)
            with torch.no_grad():
                self.merge_error = merged_update_error(w.reshape(w.shape[0], -1), self.spm_down, self.spm_up,
                                                       self.spm_scale, gates, self.config.combine, self.rank)
            self._merge_error_for = key
        return self.merge_error

    def prepare_merged(self, gates: torch.Tensor) -> None:
        """Make ``merged_weight`` hold ``W + update(gates)`` (gates [k_max] float32, on CPU), written
        in place; nothing to do when it already holds exactly that. Under strategy="auto" a layer
        whose merge loses more than MERGE_ERROR_MAX of the update is marked to run gated instead
        (``merge_gated``) and merges nothing; under "merged" it merges and warns once."""
        lossy = self.refresh_merge_error() > MERGE_ERROR_MAX
        self.merge_gated = lossy and self.config.strategy == "auto"
        if self.merge_gated:
            return
        if lossy:
            _warn_lossy_merge(self)
        key = (tuple(gates.tolist()), self.config.combine, self._weight_id())
        if self._merged_for == key:
            return
        w = self.weight
        if self.merged_weight is None or self.merged_weight.shape != w.shape or self.merged_weight.dtype != w.dtype \
                or self.merged_weight.device != w.device:
            self.merged_weight = torch.empty_like(w, memory_format=torch.contiguous_format)
        self._merge(gates.to(w.device), out=self.merged_weight)  # in place: no full-size temporary
        self._merged_for = key

    def _merge(self, gates: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """``W + update(gates)`` shaped like the weight (into ``out`` when given)."""
        w = self.weight.detach()
        with torch.no_grad():
            flat = None if out is None else out.view(w.shape[0], -1)
            return merged_weight_ref(w.reshape(w.shape[0], -1), self.spm_down, self.spm_up, self.spm_scale, gates,
                                     self.config.combine, self.rank, out=flat).view_as(w)

    def forget_merged(self) -> None:
        """Mark ``merged_weight`` stale (kept allocated): the next merged call rewrites it."""
        self._merged_for = None

    def release_merged(self) -> None:
        self.merged_weight = None
        self._merged_for = None

    # -- forward ---------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        state = self.spm_state
        mode = state.mode
        if self._factors is not None:
            mode = "gated" if mode != "off" else "off"
        elif mode == "merged" and self.merge_gated:
            mode = "gated"  # merging would lose too much of the update in this dtype (see module doc)
        if mode == "off":
            return self._base_forward(x, self.weight)
        if _compiling():
            if mode == "merged":
                return self._base_forward(x, self.merged_weight)
            return self._gated_forward(x, state.row_gates[: x.shape[0]], state.backend)
        state.check_rows(x.shape[0], self.path or type(self).__name__)
        shared = self.shared
        if shared is None or self._factors is not None or x.is_inference() or torch.is_inference_mode_enabled() \
                or (torch.is_grad_enabled() and x.requires_grad):
            return self._eager_forward(x, state, mode, None)
        keep = shared.cross and self.config.reuse_cross_kv
        hit = state.take_output(self, x, keep=keep)
        if hit is not None:
            return hit
        out = self._eager_forward(x, state, mode, shared)
        if keep:
            state.put_output(self, x, out)
        return out

    def _eager_forward(self, x: torch.Tensor, state: GateState, mode: str, shared: "SharedInput | None"):
        if mode == "merged":
            return self._base_forward(x, self.merged_weight)
        if mode == "grouped":
            return self._grouped_merged_forward(x, state)
        gates = state.row_gates[: x.shape[0]]
        if shared is not None and state.backend == "triton":
            return shared.forward_all(self, x, gates, state)
        return self._gated_forward(x, gates, state.backend)

    def _grouped_merged_forward(self, x: torch.Tensor, state: GateState) -> torch.Tensor:
        """strategy='merged' on a batch with several gate vectors: one merged weight per distinct
        vector (formed once per call), each applied to its own rows."""
        inverse, vectors = state.groups
        cache = state.reuse.setdefault(("grouped", id(self)), {})
        rows = inverse.repeat(x.shape[0] // inverse.shape[0]).to(x.device)  # [N] group of each row
        out = None
        for i in range(vectors.shape[0]):
            idx = (rows == i).nonzero().flatten()
            if i not in cache:
                g = torch.zeros(self.spm_scale.shape[0])
                g[: vectors.shape[1]] = vectors[i]
                cache[i] = self._merge(g.to(x.device))
            y = self._base_forward(x[idx], cache[i])
            if out is None:
                out = y.new_empty((x.shape[0],) + y.shape[1:])
            out[idx] = y
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
        return all(isinstance(m, SPMLinear) and m.weight.shape == first.weight.shape
                   and m.weight.dtype == first.weight.dtype and m.weight.device == first.weight.device
                   and m.spm_down.shape == first.spm_down.shape and m.rank == first.rank
                   for m in members)

    def invalidate(self) -> None:
        self._cat = None

    def concatenated(self) -> tuple:
        """(weight [G*out, in], bias [G*out] | None, down [G*K*r, in], up [G*out, K*r], scale [G*K]):
        built on first use by the grouped kernel (a copy of the members' weights, freed by remove()),
        rebuilt when a member's weight or SPMs changed."""
        ms = self.members
        ident = tuple((m._weight_id(), m.spm_down.data_ptr(), m.spm_down._version) for m in ms)
        if self._cat is None or self._cat[0] != ident:
            biases = [m.bias for m in ms]
            bias = None if all(b is None for b in biases) else torch.cat(
                [b if b is not None else m.weight.new_zeros(m.weight.shape[0]) for b, m in zip(biases, ms)])
            self._cat = (ident, (torch.cat([m.weight for m in ms]), bias, torch.cat([m.spm_down for m in ms]),
                                 torch.cat([m.spm_up for m in ms]), torch.cat([m.spm_scale for m in ms])))
        return self._cat[1]

    def forward_all(self, caller: SPMLayer, x: torch.Tensor, gates: torch.Tensor, state: GateState) -> torch.Tensor:
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


def _warn_lossy_merge(layer: SPMLayer) -> None:
    """strategy="merged" on layers that lose more than MERGE_ERROR_MAX: once per patched UNet."""
    state = layer.spm_state
    if state.__dict__.get("_warned_lossy_merge"):
        return
    state.__dict__["_warned_lossy_merge"] = True
    report = precision_report(state.layers)["summary"]
    warnings.warn(f"strategy='merged': {report['over_limit']} of {report['layers']} adapted layers lose more than "
                  f"{MERGE_ERROR_MAX:.0%} of a unit-gate SPM update when merged in {report['dtype']} (worst "
                  f"{report['max']:.1%} at {report['worst']}, median {report['median']:.1%}); strategy='auto' runs "
                  "those layers gated instead (rt.precision_report() has every layer's figure)", stacklevel=4)


def precision_report(layers: dict[str, SPMLayer]) -> dict:
    """Per adapted layer, how much of a unit-gate update a merged weight loses to rounding into the
    weight dtype, and which path strategy="auto" takes there; plus a summary. Measured again only
    where the dtype or the SPMs changed since the last measurement."""
    rows = {}
    for path, layer in layers.items():
        err = layer.refresh_merge_error()
        rows[path] = {"dtype": str(layer.weight.dtype).replace("torch.", ""), "merge_error": err,
                      "auto_path": "gated" if err > MERGE_ERROR_MAX else "merged"}
    errors = sorted(r["merge_error"] for r in rows.values())
    worst = max(rows, key=lambda p: rows[p]["merge_error"]) if rows else None
    n = len(errors)
    summary = {
        "layers": n,
        "dtype": ",".join(sorted({r["dtype"] for r in rows.values()})),
        "limit": MERGE_ERROR_MAX,
        "median": (errors[(n - 1) // 2] + errors[n // 2]) / 2 if n else 0.0,
        "max": errors[-1] if n else 0.0,
        "worst": worst,
        "over_limit": sum(e > MERGE_ERROR_MAX for e in errors),
    }
    return {"layers": rows, "summary": summary}


def wrap(path: str, module: nn.Module, stack: Stack, config: LayerConfig, state: GateState) -> SPMLayer:
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


def patch(unet: nn.Module, stacks: dict[str, Stack], config: LayerConfig) -> dict[str, SPMLayer]:
    """Replace every module in ``stacks`` by its adapted layer (all or nothing); the UNet gets one
    :class:`GateState` (``unet._spm_rt_state``) shared by the layers."""
    from spm_rt.formats import adapted_modules

    if unet.__dict__.get("_spm_rt_state") is not None:
        raise RuntimeError(f"{type(unet).__name__} is already patched by spm_rt (call remove() first)")
    modules = adapted_modules(unet)
    missing = [p for p in stacks if p not in modules]
    if missing:
        raise KeyError(f"no adapted module at {missing[:3]}")
    first = next(iter(stacks.values()))
    state = GateState(first.num_spms, device=first.down.device)
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
    return layers


def unpatch(unet: nn.Module, layers: dict[str, SPMLayer]) -> None:
    """Put the original modules back (the same objects, holding the layers' current parameter
    objects: bit-exact)."""
    for path, layer in layers.items():
        parent, name = _parent(unet, path)
        base = layer.base
        # follow parameter objects replaced while patched (e.g. by offload hooks)
        base._parameters["weight"] = layer._parameters["weight"]
        if "bias" in base._parameters:
            base._parameters["bias"] = layer._parameters["bias"]
        if getattr(parent, name) is layer:
            setattr(parent, name, base)
        layer.release_merged()
        if layer.shared is not None:
            layer.shared.invalidate()
    unet.__dict__.pop("_spm_rt_state", None)
