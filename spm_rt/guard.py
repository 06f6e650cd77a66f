"""Fail closed: every path through a patched UNet erases (architecture: "Fail closed").

Three paths reach the UNet of a patched pipeline besides ``rt(...)`` / :func:`~spm_rt.use_gates`:

* **a direct ``pipe(...)``** on the pipeline that was patched. The pipeline's own ``encode_prompt``
  is wrapped *on this instance* (an instance attribute, no class is touched); it computes the
  gates ``rt(...)`` would give the prompts (Facilitated Transport, or the fixed gates) and
  remembers them with the embeddings it returned. When the UNet is then called with exactly
  those embeddings (``[cond]`` or ``[uncond, cond]`` rows), the UNet's forward pre-hook runs that
  step with those gates: the same images as ``rt(...)``.
* **a bare ``pipe.unet(...)``** outside any call (own sampling loop, unknown embeddings): every
  membrane open, gates 1 for every SPM. An SPM at gate 1 is the erasure it was trained to do;
  nothing is run unerased without being asked (:func:`~spm_rt.gates_off` asks).
* **another thread** calling ``pipe.unet(...)`` while a call runs: the pre-hook takes the call
  lock, so it waits for the running call to end and then runs with its own gates (never the
  running call's).

The hooks run in eager mode. Dynamo traces a compiled module's own hooks into its graph, where
they are no-ops (the graph reads the open state: gates 1), so :meth:`SPMPipeline.compile_unet`
registers the same hooks on the ``torch.compile`` wrapper, where they run eagerly around the
graph. A UNet compiled by hand (``pipe.unet = torch.compile(pipe.unet)``) has no wrapper hooks:
outside ``rt(...)`` it still erases (gates 1), but direct ``pipe(...)`` calls get gates 1 instead
of Facilitated Transport's, and other threads are not held back: use ``rt.compile_unet()``.
"""
from __future__ import annotations

import inspect
import threading
import types

import torch

from spm_rt.gating import GateState

_RECENT = 4  # direct-call embeddings remembered (a pipeline encodes once per call)


def _state(module) -> GateState | None:
    module = getattr(module, "_orig_mod", module)
    return module.__dict__.get("_spm_rt_state")


def _frames(state: GateState) -> list:
    tls = state._tls
    if not hasattr(tls, "frames"):
        tls.frames = []
    return tls.frames


def _unet_inputs(args, kwargs):
    sample = args[0] if args else kwargs.get("sample")
    emb = kwargs.get("encoder_hidden_states", args[2] if len(args) > 2 else None)
    return sample, emb


def _tracing() -> bool:
    """Inside a graph capture (dynamo, torch.jit.trace, ONNX export): the hooks stay out of it.
    ONNX export traces the UNet with spm_rt's layers swapped for its own graph modules."""
    return torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()


def _hooked(module):
    """``(state, frames)`` of a patched UNet's hook call, or None (not patched, or inside a capture)."""
    if _tracing():
        return None
    state = _state(module)
    return None if state is None else (state, _frames(state))


def _pre_hook(module, args, kwargs):
    hooked = _hooked(module)
    if hooked is None:
        return None
    state, frames = hooked
    if state.in_call():  # inside rt(...) / use_gates on this thread: its gates hold
        sample, _ = _unet_inputs(args, kwargs)
        if isinstance(sample, torch.Tensor):  # the batch-shape check, also in front of a compiled graph
            state.check_rows(sample.shape[0], "UNet input")
        frames.append(False)
        return None
    state.lock.acquire()  # another thread's call: wait for it to end
    try:
        sample, emb = _unet_inputs(args, kwargs)
        n = sample.shape[0] if isinstance(sample, torch.Tensor) else 1
        found = lookup(state, emb, n)
        if found is not None:
            gates, per = found
        else:  # unknown embeddings: every membrane open
            gates, per = torch.ones(1, state.k_max), 1
        training = any(layer.trainable for layer in state.layers.values())
        state.begin(gates, per, rows=found is None, strategy=state.config.strategy, training=training)
        state.owner = threading.get_ident()
    except BaseException:
        state.lock.release()
        raise
    frames.append(True)
    return None


def _post_hook(module, args, kwargs, output):
    hooked = _hooked(module)
    if hooked is None:
        return None
    state, frames = hooked
    if frames and frames.pop():
        state.owner = None
        state.end()
        state.lock.release()
    return None


def hook_unet(module) -> None:
    """Register the fail-closed hooks on a patched UNet (or its ``torch.compile`` wrapper)."""
    if module.__dict__.get("_spm_rt_guarded", False):  # (a compiled wrapper forwards getattr to the UNet)
        return
    module.register_forward_pre_hook(_pre_hook, with_kwargs=True)
    module.register_forward_hook(_post_hook, with_kwargs=True, always_call=True)
    module.__dict__["_spm_rt_guarded"] = True


def unhook_unet(module) -> None:
    """Remove the hooks :func:`hook_unet` registered (by function identity: deep copies too)."""
    for hooks in (module._forward_pre_hooks, module._forward_hooks):
        for key in [k for k, fn in hooks.items() if fn in (_pre_hook, _post_hook)]:
            del hooks[key]
            module._forward_hooks_with_kwargs.pop(key, None)
            module._forward_pre_hooks_with_kwargs.pop(key, None)
            module._forward_hooks_always_called.pop(key, None)
    module.__dict__.pop("_spm_rt_guarded", None)


# -- direct pipe(...) calls ------------------------------------------------------------------------
def remember(state: GateState, cond: torch.Tensor, uncond: torch.Tensor | None, gates: torch.Tensor,
             per: int) -> None:
    """Remember the gates of embeddings a direct pipeline call encoded (newest first)."""
    if not isinstance(cond, torch.Tensor) or cond.shape[0] != gates.shape[0] * per:
        return
    state.recent = [(cond, uncond, gates, per)] + state.recent[: _RECENT - 1]


def lookup(state: GateState, emb, n: int):
    """``(gates [B, K], images_per_prompt)`` when the UNet's ``encoder_hidden_states`` are exactly
    embeddings a direct call encoded (rows ``[cond]`` or ``[uncond, cond]``), else None."""
    if not isinstance(emb, torch.Tensor):
        return None
    for cond, uncond, gates, per in list(state.recent):
        r = cond.shape[0]
        if emb.shape[1:] != cond.shape[1:] or emb.device != cond.device:
            continue
        if n == r and emb.shape[0] == r and torch.equal(emb, cond):
            return gates, per
        if (uncond is not None and n == 2 * r and emb.shape[0] == 2 * r and uncond.shape == cond.shape
                and torch.equal(emb[r:], cond) and torch.equal(emb[:r], uncond)):
            return gates, per
    return None


def _encode_prompt(pipe, *args, **kwargs):
    """The pipeline's own ``encode_prompt``, plus remembering the gates of what it encoded (bound
    to the instance: ``copy.deepcopy`` rebinds it to the copy and its own SPMPipeline)."""
    original = type(pipe).encode_prompt
    out = original(pipe, *args, **kwargs)
    rt = pipe.__dict__.get("_spm_rt")
    state = _state(pipe.unet)
    if rt is None or state is None or state.in_call() or state.passing_through():
        return out
    try:
        bound = inspect.signature(original).bind(pipe, *args, **kwargs).arguments
    except TypeError:
        return out
    prompt = bound.get("prompt")
    if prompt is None or not isinstance(out, tuple) or len(out) < 2:
        return out  # embeddings given without text: no gates can be computed, the UNet opens fully
    per = int(bound.get("num_images_per_prompt") or 1)
    remember(state, out[0], out[1], rt.gates(prompt), per)
    return out


def hook_encode_prompt(rt) -> None:
    """Wrap ``rt.pipe.encode_prompt`` on this pipeline instance (an instance attribute: no class
    is patched) so a direct ``pipe(...)`` call gets the gates ``rt(...)`` would compute (see the
    module docstring)."""
    pipe = rt.pipe
    if getattr(type(pipe), "encode_prompt", None) is None or "encode_prompt" in pipe.__dict__:
        return
    pipe.__dict__["encode_prompt"] = types.MethodType(_encode_prompt, pipe)


def unhook_encode_prompt(pipe) -> None:
    fn = pipe.__dict__.get("encode_prompt")
    if getattr(fn, "__func__", None) is _encode_prompt:
        del pipe.__dict__["encode_prompt"]
