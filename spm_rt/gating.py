"""Per-call gate state, as module state that compiled graphs and CUDA graphs can read.

Every patched UNet owns one :class:`GateState` (an ``nn.Module`` shared by all its adapted
layers). Gates are fixed for a whole generation, so at the start of a call the per-row gate
matrix is written **in place** into one preallocated float32 buffer on the UNet's device
(``row_gates [capacity, k_max]``); adapted layers read ``row_gates[:N]`` for a UNet batch of
``N`` rows. No Python-side lookup happens per layer on the hot path, the buffer's data pointer
never changes between calls (so ``torch.compile`` graphs and captured CUDA graphs stay valid),
and ``.to()``, ``deepcopy`` and offload hooks move it with the UNet.

Row layout. For ``B`` prompts with ``n`` images each, diffusers lays out ``R = B*n`` UNet rows
without classifier-free guidance and ``2R`` rows ``[unconditional half, conditional half]`` with
it; each prompt's gates apply to its rows in both halves. Row ``i`` therefore gets the gates of
prompt-image ``i % R``, which covers both layouts (and any batch size for a single prompt) with
one buffer written once per call.

The path a call takes is one Python attribute, ``mode``, fixed for the call:

* ``"off"``     no call running, or every gate 0: the base layers, bit for bit
* ``"merged"``  every row has the same gates: each layer reads its merged-weight buffer
* ``"gated"``   rows differ (or training): the low-rank branch per row
* ``"grouped"`` strategy="merged" with rows that differ: one merged copy per distinct gate
  vector, each applied to its own rows (eager only; under ``torch.compile`` such a batch takes
  the gated path)

A compiled UNet therefore holds at most one graph per mode it has seen per batch shape.

A diffusers pipeline keeps per-call scheduler state, so one patched UNet runs one call at a
time: :func:`use_gates` (and ``SPMPipeline.__call__``) hold the state's lock for the call.
"""
from __future__ import annotations

import contextlib
import threading
import weakref

import torch
from torch import nn

MODES = ("off", "merged", "gated", "grouped")
_MIN_CAPACITY = 16  # rows; grown to the next power of two when a call needs more


class GateState(nn.Module):
    """The gate buffer and call state of one patched UNet (see the module docstring)."""

    def __init__(self, k_max: int, device: torch.device | str | None = None):
        super().__init__()
        self.register_buffer("row_gates", torch.zeros(_MIN_CAPACITY, k_max, device=device), persistent=False)
        self.mode = "off"
        self.last_mode = "off"
        self.period = 1  # R: row i carries the gates of prompt-image i % R
        self.backend = "torch"  # resolved per call for the UNet's device (spm_rt.functional)
        self.groups: tuple | None = None  # mode "grouped": (row -> group index [R], gate vectors [G, K])
        self.reuse: dict = {}  # outputs kept within one call (eager only, see spm_rt.layers.SharedInput)
        self.layers: dict = {}  # path -> adapted layer (set by spm_rt.layers.patch)
        self.config = None  # the LayerConfig shared by the layers (set by patch)
        self._lock = threading.RLock()

    # the gate buffer stays float32 whatever dtype the UNet is cast to (gate precision)
    def _apply(self, fn, recurse=True):
        gates = self.row_gates
        super()._apply(fn, recurse)
        if self.row_gates.dtype != torch.float32:
            self.row_gates = gates.to(device=self.row_gates.device)
        return self

    def __getstate__(self):
        state = self.__dict__.copy()
        state.pop("_lock", None)
        state["reuse"] = {}
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        self._lock = threading.RLock()

    @property
    def k_max(self) -> int:
        return self.row_gates.shape[1]

    @property
    def lock(self) -> threading.RLock:
        return self._lock

    def resize(self, k_max: int) -> None:
        """New gate width (more SPMs than slots): a new buffer, so compiled graphs rebuild."""
        self.row_gates = torch.zeros(self.row_gates.shape[0], k_max, device=self.row_gates.device)

    # -- one call ------------------------------------------------------------------------------
    def begin(self, gates: torch.Tensor, images_per_prompt: int = 1, *, rows: bool = False,
              strategy: str = "auto", training: bool = False) -> None:
        """Write a call's gates (``[B, K]`` prompt gates, or ``[N, K]`` UNet-row gates with
        ``rows=True``) into the buffer, choose the call's mode and prepare merged weights."""
        from spm_rt.functional import resolve_backend

        gates = torch.as_tensor(gates, dtype=torch.float32).detach()
        if gates.dim() == 1:
            gates = gates[None]
        k = gates.shape[1] if gates.dim() == 2 else -1
        if gates.dim() != 2 or k > self.k_max or gates.shape[0] == 0:
            raise ValueError(f"gates must be [K] or [B, K] with K <= {self.k_max} SPM slots, got shape "
                             f"{list(gates.shape)}")
        if not torch.isfinite(gates).all():
            raise ValueError("gates must be finite")
        per = 1 if rows else int(images_per_prompt)
        table = gates.repeat_interleave(per, dim=0).cpu()  # [R, K]: one row per prompt-image
        r = table.shape[0]
        need = r if rows else 2 * r  # the CFG layout doubles the rows
        if need > self.row_gates.shape[0]:
            cap = 1 << (need - 1).bit_length()
            self.row_gates = torch.zeros(cap, self.k_max, device=self.row_gates.device)
        cap = self.row_gates.shape[0]
        full = torch.zeros(cap, self.k_max)
        full[:, :k] = table[torch.arange(cap) % r]
        self.row_gates.copy_(full)  # in place: same storage for every call
        self.period = r
        where = (self.config.backend, self.row_gates.device)
        if self.__dict__.get("_backend_for") != where:  # resolved once per (option, device), not per call
            self.backend = resolve_backend(*where)
            self.__dict__["_backend_for"] = where
        self.reuse = {}
        self.groups = None
        uniform = bool((table == table[:1]).all())
        if training:
            mode = "gated"
        elif not table.any():
            mode = "off"
        elif strategy == "gated":
            mode = "gated"
        elif uniform:
            mode = "merged"
        elif strategy == "merged":
            mode = "grouped"
            vectors, inverse = torch.unique(table, dim=0, return_inverse=True)
            self.groups = (inverse, vectors)
        else:
            mode = "gated"
        if mode == "merged":
            g = full[0]
            for layer in self.layers.values():
                layer.prepare_merged(g)
        self.mode = mode

    def end(self) -> None:
        self.last_mode = self.mode  # for reports (benchmarks record the path a call took)
        self.mode = "off"
        self.reuse = {}
        self.groups = None

    def check_rows(self, n: int, where: str) -> None:
        """Eager-mode check that a UNet batch of ``n`` rows maps onto the call's gates."""
        if n > self.row_gates.shape[0] or n % self.period:
            raise ValueError(f"{where}: a UNet batch of {n} rows does not map onto the call's gates for "
                             f"{self.period} prompt-images (expected a multiple: R or 2R with classifier-free "
                             "guidance)")

    # -- outputs kept for reuse within one call (eager only) -------------------------------------
    def put_output(self, layer, x: torch.Tensor, out: torch.Tensor) -> None:
        """Remember that ``layer(x)`` is ``out`` for the rest of this call."""
        self.reuse[id(layer)] = (weakref.ref(x), x._version, out, out._version)

    def take_output(self, layer, x: torch.Tensor, *, keep: bool) -> torch.Tensor | None:
        """``layer(x)`` if it was remembered for this very tensor, unmodified since (same object,
        same in-place version counters of input and output); dropped after use unless ``keep``."""
        entry = self.reuse.get(id(layer))
        if entry is None:
            return None
        ref, x_version, out, out_version = entry
        if ref() is not x or x._version != x_version or out._version != out_version:
            del self.reuse[id(layer)]
            return None
        if not keep:
            del self.reuse[id(layer)]
        return out


def state_of(target) -> GateState:
    """The :class:`GateState` of an SPMPipeline, a patched diffusers pipeline or a patched UNet
    (``torch.compile``-wrapped or not)."""
    obj = target
    if not isinstance(obj, nn.Module):
        obj = getattr(obj, "pipe", obj)  # SPMPipeline -> diffusers pipeline
        obj = getattr(obj, "unet", obj)  # pipeline -> UNet
    obj = getattr(obj, "_orig_mod", obj)  # torch.compile's wrapper -> UNet
    state = obj.__dict__.get("_spm_rt_state") if isinstance(obj, nn.Module) else None
    if state is None:
        raise TypeError(f"{type(target).__name__} is not patched by spm_rt (no SPM gate state found)")
    return state


@contextlib.contextmanager
def use_gates(target, gates, images_per_prompt: int = 1, *, rows: bool = False):
    """Run the block with these gates on ``target``'s patched UNet: ``[B, K]`` prompt gates (or
    ``[N, K]`` UNet-row gates when ``rows=True``). Holds the UNet's call lock; the membranes close
    again when the block ends.

    Example::

        >>> import spm_rt, torch
        >>> from spm_rt.testing import tiny_pipeline, random_spm
        >>> pipe = tiny_pipeline(0)
        >>> rt = spm_rt.compile(pipe, [random_spm(pipe.unet, "circle")], transport="fixed")
        >>> x, emb = torch.randn(2, 4, 16, 16), torch.randn(2, 77, 32)
        >>> with torch.no_grad(), spm_rt.use_gates(rt, [[1.0]]):
        ...     noise = pipe.unet(x, 10, emb).sample
        >>> noise.shape
        torch.Size([2, 4, 16, 16])
    """
    state = state_of(target)
    with state.lock:
        training = any(layer.trainable for layer in state.layers.values())
        state.begin(gates, images_per_prompt, rows=rows, strategy=state.config.strategy, training=training)
        try:
            yield state
        finally:
            state.end()
