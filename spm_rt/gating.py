"""Per-call gate state, as module state that compiled graphs and CUDA graphs can read.

Every patched UNet owns one :class:`GateState` (held as a plain attribute of the UNet and of each
adapted layer, not as a registered child module; its gate buffer follows the UNet through
``.to()`` / ``.half()`` / ``deepcopy`` via the layers' ``_apply``). Gates are fixed for a whole
generation, so at the start of a call the per-row gate matrix is written **in place** into one
float32 buffer on the UNet's device, ``row_gates [max_batch_rows, k_max]``, allocated once at
patch time (``SPMConfig.max_batch_rows``; a call needing more rows is refused with a message
naming the option, never silently reallocated). Adapted layers read ``row_gates[:N]`` for a UNet
batch of ``N`` rows; the buffer's data pointer never changes while ``k_max`` does not (so
``torch.compile`` graphs and captured CUDA graphs stay valid).

Row layout. For ``B`` prompts with ``n`` images each, diffusers lays out ``R = B*n`` UNet rows
without classifier-free guidance and ``2R`` rows ``[unconditional half, conditional half]`` with
it; each prompt's gates apply to its rows in both halves. Row ``i`` therefore gets the gates of
prompt-image ``i % R``, which covers both layouts (and any batch size for a single prompt) with
one buffer written once per call.

The path a call takes is one Python attribute, ``mode``, fixed for the call:

* ``"off"``     every gate 0 (an explicit :func:`gates_off` block): the base layers, bit for bit
* ``"merged"``  every row has the same gates: each layer reads its merged weight
* ``"gated"``   rows differ (or training): the low-rank branch per row
* ``"grouped"`` strategy="merged" with rows that differ: one merged copy per distinct gate
  vector, each applied to its own rows (eager only; under ``torch.compile`` it runs the
  ``"gated"`` graph: see :attr:`GateState.graph_mode`)

Fail closed. Outside any call the state is *open*: ``row_gates`` all ones and mode ``"gated"``,
so a UNet called with no gates erases every concept at full strength instead of running the base
model (``spm_rt.guard`` adds, in eager mode, the gates Facilitated Transport gives a direct
``pipe(...)`` call, and makes other threads wait for a running call). Membranes are shut only by
asking: gates 0 in a call, or :func:`gates_off`.

One call at a time per patched UNet, and no nesting: a diffusers pipeline keeps per-call
scheduler state, so :func:`use_gates` (and ``SPMPipeline.__call__``) hold the state's lock for
the call, another thread waits for it, and a second call started on the same thread while one runs
(a step callback calling ``rt(...)``, ``use_gates`` or ``set_spms``) is refused with
:class:`NestedCallError` instead of silently replacing the running call's gates.
"""
from __future__ import annotations

import contextlib
import threading
import weakref

import torch

DEFAULT_MAX_BATCH_ROWS = 64  # UNet rows (32 prompt-images with CFG); SPMConfig.max_batch_rows


class NestedCallError(RuntimeError):
    """A call (``rt(...)``, ``use_gates``, ``set_spms``, ``remove``) started on a thread that is
    already running a call on the same patched UNet."""


def validate_gates(gates, k_max: int, what: str = "gates") -> torch.Tensor:
    """The one check of a gate argument: ``[K]`` or ``[B, K]``, ``1 <= K <= k_max``, ``B >= 1``,
    finite; returns a float32 CPU ``[B, K]`` tensor."""
    g = torch.as_tensor(gates, dtype=torch.float32).detach().cpu()
    if g.dim() == 1:
        g = g[None]
    if g.dim() != 2 or g.shape[0] == 0 or not 1 <= g.shape[1] <= k_max:
        raise ValueError(f"{what} must be [K] or [B, K] with 1 <= K <= {k_max} SPM slots, got shape {list(g.shape)}")
    if not torch.isfinite(g).all():
        raise ValueError(f"{what} must be finite, got {g.tolist()}")
    return g


class GateState:
    """The gate buffer and call state of one patched UNet (see the module docstring).

    It is not an ``nn.Module``: each adapted layer holds it as a plain attribute and moves its
    buffer along when the layer is moved or cast (``SPMLayer._apply``), so ``.half()`` visits it
    once per layer without re-registering it ~200 times as a child."""

    def __init__(self, k_max: int, device: torch.device | str | None = None,
                 max_batch_rows: int = DEFAULT_MAX_BATCH_ROWS):
        if int(max_batch_rows) < 1:
            raise ValueError(f"max_batch_rows must be >= 1, got {max_batch_rows}")
        self.row_gates = torch.ones(int(max_batch_rows), k_max, device=device)  # [rows, k_max] float32
        self.mode = "gated"
        self.graph_mode = "gated"  # what layers read under torch.compile: "grouped" runs the gated graph
        self.last_mode = "off"
        self.period = 1  # R: row i carries the gates of prompt-image i % R
        self.backend = "torch"  # resolved per call for the UNet's device (spm_rt.functional)
        self.groups: tuple | None = None  # mode "grouped": (row -> group index [R], gate vectors [G, K])
        self.reuse: dict = {}  # outputs kept within one call (eager only, see spm_rt.grouping)
        self.layers: dict = {}  # path -> adapted layer (set by spm_rt.patching.patch)
        self.config = None  # the SPMConfig shared by the layers (set by patch)
        self.owner: int | None = None  # thread id running a call (None: idle, open)
        self.recent: list = []  # (prompt_embeds, negative_embeds, gates, per) of direct pipe calls (spm_rt.guard)
        self.hooks: list = []  # removable handles of spm_rt.guard's hooks
        self._lock = threading.RLock()
        self._tls = threading.local()

    def __getstate__(self):
        state = self.__dict__.copy()
        for key in ("_lock", "_tls"):
            state.pop(key, None)
        state.update(reuse={}, recent=[], owner=None, hooks=[])
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.RLock()
        self._tls = threading.local()

    def move(self, fn) -> None:
        """Apply a module ``_apply`` function to the gate buffer, keeping it float32 (gate precision)."""
        moved = fn(self.row_gates)
        if moved.device != self.row_gates.device:
            self.row_gates = moved.to(torch.float32) if moved.dtype != torch.float32 else moved

    @property
    def k_max(self) -> int:
        return self.row_gates.shape[1]

    @property
    def max_batch_rows(self) -> int:
        return self.row_gates.shape[0]

    @property
    def lock(self) -> threading.RLock:
        return self._lock

    def in_call(self) -> bool:
        """True on the thread that runs the current call."""
        return self.owner == threading.get_ident()

    def refuse_nested(self, what: str) -> None:
        if self.in_call():
            raise NestedCallError(f"{what} inside a running spm_rt call on the same thread (e.g. from a step "
                                  "callback) is refused: it would replace the running generation's gates or SPMs. "
                                  "Run it after the call returns.")

    @contextlib.contextmanager
    def passthrough(self):
        """Block in which the pipeline's own encode_prompt is not treated as a direct call
        (Facilitated Transport encoding prompts for gates)."""
        tls = self._tls
        tls.passthrough = getattr(tls, "passthrough", 0) + 1
        try:
            yield
        finally:
            tls.passthrough -= 1

    def passing_through(self) -> bool:
        return getattr(self._tls, "passthrough", 0) > 0

    def resize(self, k_max: int) -> None:
        """New gate width (more SPMs than slots): a new buffer, so compiled graphs rebuild. Only
        between calls (set_spms holds the lock and refuses to run inside a call)."""
        if self.owner is not None:
            raise NestedCallError("the gate buffer cannot be resized during a call")
        self.row_gates = torch.ones(self.row_gates.shape[0], k_max, device=self.row_gates.device)
        self.open()

    def open(self) -> None:
        """The idle state: every membrane open (gates 1 on every row), every weight pristine, no
        per-call copies kept."""
        for layer in self.layers.values():
            layer.restore_weight()  # bit-exact, from the host copy (no-op unless merged)
        for group in self.__dict__.pop("_cat_groups", ()):
            group.invalidate()
        self.row_gates.fill_(1.0)
        self.period = 1
        self.mode = self.graph_mode = "gated"
        self.reuse = {}
        self.groups = None

    # -- one call ------------------------------------------------------------------------------
    @contextlib.contextmanager
    def call(self, gates, images_per_prompt: int = 1, *, rows: bool = False):
        """Run a block as one call with these gates: holds the lock, owns the state for this
        thread, refuses nesting, and returns to the open state afterwards."""
        self.refuse_nested("use_gates / rt(...)")
        with self._lock:
            training = any(layer.trainable for layer in self.layers.values())
            self.begin(gates, images_per_prompt, rows=rows, strategy=self.config.strategy, training=training)
            self.owner = threading.get_ident()
            try:
                yield self
            finally:
                self.owner = None
                self.end()

    def begin(self, gates: torch.Tensor, images_per_prompt: int = 1, *, rows: bool = False,
              strategy: str = "auto", training: bool = False) -> None:
        """Write a call's gates (``[B, K]`` prompt gates, or ``[N, K]`` UNet-row gates with
        ``rows=True``) into the buffer, choose the call's mode and prepare merged weights."""
        from spm_rt.functional import resolve_backend

        gates = validate_gates(gates, self.k_max)
        k = gates.shape[1]
        per = 1 if rows else int(images_per_prompt)
        table = gates.repeat_interleave(per, dim=0)  # [R, K]: one row per prompt-image
        r = table.shape[0]
        need = r if rows else 2 * r  # the CFG layout doubles the rows
        cap = self.row_gates.shape[0]
        if need > cap:
            raise ValueError(f"a call with {r} {'UNet rows' if rows else 'prompt-images'} needs {need} gate rows, more "
                             f"than max_batch_rows={cap} (pass a larger max_batch_rows to spm_rt.compile: the row "
                             "buffer is allocated once so compiled graphs stay valid)")
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
        if not table.any():
            mode = "off"  # every membrane shut, asked for explicitly: the base model bit for bit
        elif training or strategy == "gated":
            mode = "gated"
        elif uniform:
            mode = "merged"
        elif strategy == "merged":
            mode = "grouped"
            vectors, inverse = torch.unique(table, dim=0, return_inverse=True)
            sizes = torch.bincount(inverse, minlength=vectors.shape[0]).tolist()  # host-side: no device sync
            self.groups = (inverse.to(self.row_gates.device), vectors, sizes)
        else:
            mode = "gated"
        if mode == "merged":
            g = full[0]
            for layer in self.layers.values():
                layer.prepare_merged(g)
        self.mode = mode
        # compiled graphs specialise on graph_mode only: "grouped" is an eager per-batch path, the
        # gated graph computes the same thing, so one graph serves both
        self.graph_mode = "gated" if mode == "grouped" else mode

    def end(self) -> None:
        self.last_mode = self.mode  # for reports (benchmarks record the path a call took)
        self.open()

    def check_rows(self, n: int, where: str) -> None:
        """Eager-mode check that a UNet batch of ``n`` rows maps onto the call's gates."""
        if n > self.row_gates.shape[0] or n % self.period:
            raise ValueError(f"{where}: a UNet batch of {n} rows does not map onto the call's gates for "
                             f"{self.period} prompt-images (expected a multiple: R or 2R with classifier-free "
                             f"guidance, at most max_batch_rows={self.row_gates.shape[0]})")

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


def find_state(target) -> GateState | None:
    """The :class:`GateState` of an SPMPipeline, a patched pipeline or UNet, or None."""
    from torch import nn

    obj = target
    if not isinstance(obj, nn.Module):
        obj = getattr(obj, "pipe", obj)  # SPMPipeline -> diffusers pipeline
        obj = getattr(obj, "unet", obj)  # pipeline -> UNet
    obj = getattr(obj, "_orig_mod", obj)  # torch.compile's wrapper -> UNet
    return obj.__dict__.get("_spm_rt_state") if isinstance(obj, nn.Module) else None


def state_of(target) -> GateState:
    """The :class:`GateState` of an SPMPipeline, a patched diffusers pipeline or a patched UNet
    (``torch.compile``-wrapped or not)."""
    state = find_state(target)
    if state is None:
        raise TypeError(f"{type(target).__name__} is not patched by spm_rt (no SPM gate state found)")
    return state


@contextlib.contextmanager
def use_gates(target, gates, images_per_prompt: int = 1, *, rows: bool = False):
    """Run the block with these gates on ``target``'s patched UNet: ``[B, K]`` prompt gates (or
    ``[N, K]`` UNet-row gates when ``rows=True``). Holds the UNet's call lock (another thread
    waits); refused with :class:`NestedCallError` inside a running call on the same thread. When
    the block ends the UNet is open again (gates 1: see the module docstring).

    Example::

        >>> import spm_rt, torch
        >>> from spm_rt.testing import tiny_pipeline, random_spm
        >>> pipe = tiny_pipeline(0)
        >>> rt = spm_rt.compile(pipe, [random_spm(pipe.unet, "circle")], transport="fixed")
        >>> x, emb = torch.randn(2, 4, 16, 16), torch.randn(2, 77, 32)
        >>> with torch.no_grad(), spm_rt.use_gates(rt, [[0.5]]):
        ...     noise = pipe.unet(x, 10, emb).sample
        >>> noise.shape
        torch.Size([2, 4, 16, 16])
    """
    with state_of(target).call(gates, images_per_prompt, rows=rows) as state:
        yield state


@contextlib.contextmanager
def gates_off(target):
    """Run the block with every membrane shut (gates 0: the base model, bit for bit) — the one way
    to run a patched pipeline unerased on purpose (base images for a comparison, the trainer's
    "SPM off" predictions). A no-op context on a pipeline or UNet that is not patched.

    Example::

        >>> with spm_rt.gates_off(rt):  # doctest: +SKIP
        ...     base = pipe("a red circle").images
    """
    state = find_state(target)
    if state is None:
        yield None
        return
    with state.call(torch.zeros(1, state.k_max), rows=True) as s:
        yield s
