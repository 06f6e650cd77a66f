"""Per-call gate state.

Gates are held in a ``contextvars.ContextVar``: each thread (and each asyncio task) sees only the
gates of its own call, so two threads driving one patched pipeline with different prompts cannot
see each other's gates.

A UNet call sees ``N`` batch rows. For ``B`` prompts with ``n`` images each, diffusers pipelines
lay out ``N = B*n`` rows (no classifier-free guidance) or ``N = 2*B*n`` rows as
``[unconditional half, conditional half]``; each prompt's gates apply to its rows in both halves.
"""
from __future__ import annotations

import contextlib
import contextvars
import weakref
from dataclasses import dataclass, field

import torch

_STATE: contextvars.ContextVar["GateState | None"] = contextvars.ContextVar("spm_rt_gates", default=None)


@dataclass
class RowGates:
    gates: torch.Tensor  # [N, K] float32 on the layer's device
    uniform: bool  # every row has the same gate vector
    all_zero: bool  # every membrane closed on every row: the base layer's output, bit for bit
    key: tuple  # hashable id of the (uniform) gate vector, for merged-weight caches


@dataclass
class GateState:
    """Gates for one pipeline call: ``prompt_gates [B, K]`` and ``images_per_prompt``.

    ``row_gates`` (optional, ``[N, K]``) fixes the gates of every UNet batch row directly, as the
    training path and exported graphs do.
    """

    prompt_gates: torch.Tensor  # [B, K]
    images_per_prompt: int = 1
    row_gates: torch.Tensor | None = None  # [N, K]
    traced: bool = False  # inside a graph capture (ONNX export, torch.compile): never read gate values
    _cache: dict = field(default_factory=dict, repr=False)
    # Outputs of adapted layers kept for reuse within this call (spm_rt.layers.SharedInput):
    # id(layer) -> (weakref to the input, input version, output, output version).
    _reuse: dict = field(default_factory=dict, repr=False)

    def put_output(self, layer, x: torch.Tensor, out: torch.Tensor) -> None:
        """Remember that ``layer(x)`` is ``out`` for the rest of this call."""
        self._reuse[id(layer)] = (weakref.ref(x), x._version, out, out._version)

    def take_output(self, layer, x: torch.Tensor, *, keep: bool) -> torch.Tensor | None:
        """``layer(x)`` if it was remembered for this very tensor, unmodified since (same object,
        same in-place version counters of input and output); dropped after use unless ``keep``."""
        entry = self._reuse.get(id(layer))
        if entry is None:
            return None
        ref, x_version, out, out_version = entry
        if ref() is not x or x._version != x_version or out._version != out_version:
            del self._reuse[id(layer)]
            return None
        if not keep:
            del self._reuse[id(layer)]
        return out

    def rows(self, n_rows: int, device: torch.device) -> RowGates:
        if self.traced:
            # Data-dependent checks would bake one gate vector into the graph: always gated.
            g = self._expand(n_rows).to(device=device, dtype=torch.float32)
            return RowGates(g, uniform=False, all_zero=False, key=())
        key = (n_rows, str(device))
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        g = self._expand(n_rows).to(device=device, dtype=torch.float32)
        uniform = bool((g == g[:1]).all())
        rows = RowGates(g, uniform, bool((g == 0).all()),
                        tuple(g[0].tolist()) if uniform else ())
        self._cache[key] = rows
        return rows

    def _expand(self, n: int) -> torch.Tensor:
        if self.row_gates is not None:
            if self.row_gates.shape[0] != n:
                raise ValueError(f"row gates cover {self.row_gates.shape[0]} UNet batch rows, the UNet got {n}")
            return self.row_gates
        g = self.prompt_gates
        b, per = g.shape[0], self.images_per_prompt
        if n == b * per:
            return g.repeat_interleave(per, dim=0)
        if n == 2 * b * per:  # classifier-free guidance: [uncond, cond], same gates for both halves
            return g.repeat_interleave(per, dim=0).repeat(2, 1)
        if b == 1:
            return g.expand(n, -1)
        raise ValueError(f"cannot map a UNet batch of {n} rows onto {b} prompts x {per} images per prompt "
                         "(expected B*n or 2*B*n rows)")


def current() -> GateState | None:
    """The gate state of the running call, or None (membranes closed)."""
    return _STATE.get()


@contextlib.contextmanager
def use_gates(gates: torch.Tensor | GateState, images_per_prompt: int = 1, *, rows: bool = False,
              traced: bool = False):
    """Run the block with these gates: ``[B, K]`` prompt gates (or ``[N, K]`` UNet-row gates when
    ``rows=True``). ``traced=True`` makes every layer take the gated path without inspecting the
    gate values, as graph capture (ONNX export) needs.

    Example::

        >>> with use_gates(torch.tensor([[1.0, 0.0]])):  # doctest: +SKIP
        ...     noise = pipe.unet(latents, t, encoder_hidden_states=emb).sample
    """
    if isinstance(gates, GateState):
        state = gates
    else:
        if not traced:
            gates = torch.as_tensor(gates, dtype=torch.float32)
        if gates.dim() == 1:
            gates = gates[None]
        if gates.dim() != 2:
            raise ValueError(f"gates must be [K] or [B, K], got shape {list(gates.shape)}")
        state = GateState(gates, images_per_prompt, row_gates=gates if rows else None, traced=traced)
    token = _STATE.set(state)
    try:
        yield state
    finally:
        _STATE.reset(token)
