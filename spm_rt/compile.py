"""``spm_rt.compile(pipe, spms)``: patch a diffusers SD pipeline so it erases the SPMs' concepts."""
from __future__ import annotations

import contextlib
import os
import warnings
from dataclasses import fields, replace

import torch

from spm_rt import gating, guard
from spm_rt.config import SPMConfig
from spm_rt.formats import SPM, SPMFormatError, load_spm
from spm_rt.functional import resolve_backend
from spm_rt.gating import validate_gates
from spm_rt.layers import SPMLayer
from spm_rt.patching import patch, unpatch
from spm_rt.precision import precision_report
from spm_rt.stack import Stack, build_stacks
from spm_rt.transport import CalibratedTransport, Transport

__all__ = ["SPMConfig", "SPMPipeline", "compile", "load_spms"]


def load_spms(spms, concepts=None) -> list[SPM]:
    """Load each of ``spms`` (paths or SPMs; one path or SPM alone is fine); ``concepts`` names each
    SPM's concepts (a name or a list per SPM) where given, overriding file metadata."""
    if isinstance(spms, (str, os.PathLike, SPM)):
        spms = [spms]
    spms = list(spms)
    if concepts is not None and len(concepts) != len(spms):
        raise ValueError(f"concepts names {len(concepts)} SPMs, {len(spms)} given")
    out = []
    for i, s in enumerate(spms):
        names = None if concepts is None else concepts[i]
        if isinstance(s, SPM):
            if names is not None:
                s = replace(s, concepts=[names] if isinstance(names, str) else list(names))
            out.append(s)
        elif isinstance(s, (str, os.PathLike)):
            out.append(load_spm(s, concepts=names))
        else:
            raise TypeError(f"spms[{i}] must be a path or an SPM, got {type(s).__name__}")
    return out


CALIBRATION_KEY = "spm_rt.calibration"


def _file_calibration(spm: SPM) -> dict:
    """Calibration prompt sets stored in an SPM file's metadata (JSON: concept -> [pos, neg])."""
    import json

    raw = spm.metadata.get(CALIBRATION_KEY)
    if not raw:
        return {}
    try:
        data = json.loads(raw)
        return {c: (list(v[0]), list(v[1])) for c, v in data.items()}
    except (ValueError, TypeError, IndexError, AttributeError) as exc:
        raise SPMFormatError(f"{spm.source}: metadata {CALIBRATION_KEY} is malformed ({exc})") from exc


class SPMPipeline:
    """A diffusers pipeline patched with SPMs. Calling it calls the pipeline with gates computed
    from the prompts (Facilitated Transport) or given explicitly.

    Example::

        >>> import spm_rt
        >>> from spm_rt.testing import tiny_pipeline, random_spm
        >>> pipe = tiny_pipeline(0)
        >>> rt = spm_rt.compile(pipe, [random_spm(pipe.unet, "circle")])
        >>> out = rt(["a red circle", "a blue square"], num_inference_steps=2, output_type="np")
        >>> out.images.shape
        (2, 32, 32, 3)
        >>> rt.remove()  # the pipeline is bit-exactly the original again
    """

    def __init__(self, pipe, spms: list[SPM], config: SPMConfig):
        self.pipe = pipe
        self.config = config  # the one config object: the gate state and every layer read this one
        self.layers: dict[str, SPMLayer] = {}
        self.spms: list[SPM] = []
        self.transport: Transport | None = None
        self._install(spms, first=True)

    @property
    def layer_config(self) -> SPMConfig:
        """The config the layers read: ``self.config`` itself (kept as a name for old callers)."""
        return self.config

    # -- lifecycle ----------------------------------------------------------------------------
    def _slots(self, spms: list[SPM]) -> tuple[int, int | None]:
        """(k_max, rank) to stack with: the existing capacity where the new set fits it."""
        k_max = max(self.config.k_max or len(spms), len(spms))
        if not self.layers:
            return k_max, None
        layer = next(iter(self.layers.values()))
        have_k, have_r = layer.spm_scale.shape[0], layer.rank
        need_r = max(s.rank for s in spms)
        if len(spms) <= have_k and need_r <= have_r:
            return have_k, have_r
        return max(k_max, have_k), max(need_r, have_r)

    def _prepare(self, spms: list[SPM]):
        """Everything that can fail, with no side effects: stacks and transport."""
        k_max, rank = self._slots(spms)
        stacks = build_stacks(_unet(self.pipe), spms, k_max, rank, self.config.combine)
        transport = None
        if self.config.transport == "calibrated":
            calibration = dict(self.config.calibration or {})
            for s in spms:  # SPM files may carry their own calibration prompt sets
                for c, sets in _file_calibration(s).items():
                    calibration.setdefault(c, sets)
            transport = CalibratedTransport(self.pipe, [s.concepts or [] for s in spms], calibration)
        elif self.config.transport != "fixed":
            transport = Transport(self.pipe, [s.concepts or [] for s in spms], self.config.transport)
        if self.config.fixed_gates is not None and len(self.config.fixed_gates) != len(spms):
            raise ValueError(f"fixed_gates has {len(self.config.fixed_gates)} values for {len(spms)} SPMs")
        return stacks, transport

    def _install(self, spms: list[SPM], first: bool = False) -> None:
        with self._passthrough():  # calibrated transports encode prompts: not a direct pipeline call
            stacks, transport = self._prepare(spms)
        if first:
            self.layers = patch(_unet(self.pipe), stacks, self.config)
            try:
                precision_report(self.layers)  # measure each layer's merge error at install, not in the first call
            except BaseException:
                unpatch(_unet(self.pipe), self.layers)
                self.layers = {}
                raise
            self.spms, self.transport = spms, transport
            return
        if set(stacks) != set(self.layers):
            raise SPMFormatError("the new SPMs adapt a different set of modules")
        state = self._state
        # all or nothing: the old stacks (small: rank-r factors) are kept until the new set is in
        # and measured; any error on the way (an out-of-memory included) puts them back
        old = {path: Stack(layer.spm_down.clone(), layer.spm_up.clone(), layer.spm_scale.clone(), layer.rank)
               for path, layer in self.layers.items()}
        old_k = state.k_max
        try:
            in_place = [layer.write_stack(stacks[path]) for path, layer in self.layers.items()]
            k_max = next(iter(stacks.values())).num_spms
            if state.k_max != k_max:
                state.resize(k_max)
            precision_report(self.layers)
        except BaseException:
            for path, layer in self.layers.items():
                layer.write_stack(old[path])
            if state.k_max != old_k:
                state.resize(old_k)
            raise
        if not all(in_place):
            warnings.warn(f"set_spms: {len(spms)} SPMs (rank {max(s.rank for s in spms)}) exceed the preallocated "
                          "slots; SPM buffers were reallocated, so compiled graphs will be rebuilt (pass a larger "
                          "k_max to spm_rt.compile to avoid this)", stacklevel=3)
        self.spms, self.transport = spms, transport

    def _passthrough(self):
        state = gating.find_state(_unet(self.pipe)) if self.pipe is not None else None
        return state.passthrough() if state is not None else contextlib.nullcontext()

    @property
    def _state(self):
        return gating.state_of(self)

    @property
    def k_max(self) -> int:
        """SPM slots preallocated in every adapted layer."""
        return self._state.k_max

    def set_spms(self, spms, *, concepts=None) -> "SPMPipeline":
        """Swap the concept set in place (all or nothing); returns self. Waits for a running call.

        With at most ``k_max`` SPMs the new tensors are copied into the same storage, so a
        compiled UNet (and its captured CUDA graphs) keeps working without a recompile.

        Example::

            >>> rt.set_spms(["snoopy.safetensors", "mickey.safetensors"])  # doctest: +SKIP
        """
        self._check_live()
        self._state.refuse_nested("set_spms")
        spms = load_spms(spms, concepts)
        with self._state.lock:
            self._install(spms)
        return self

    def precision_report(self) -> dict:
        """How much of each adapted layer's SPM update survives merging into the weight dtype.

        ``{"layers": {path: {"dtype", "merge_error", "auto_path"}}, "summary": {"layers", "dtype",
        "limit", "median", "max", "worst", "over_limit"}}``. ``merge_error`` is the relative error
        of the update a merged weight applies at gates 1 for every SPM (``|round(W + dW) - W - dW|
        / |dW|``); where it exceeds ``limit`` (``spm_rt.layers.MERGE_ERROR_MAX``) strategy="auto"
        runs that layer gated (``auto_path``). Measured again after a dtype change or ``set_spms``.

        Example::

            >>> import spm_rt, torch
            >>> from spm_rt.testing import tiny_pipeline, random_spm
            >>> pipe = tiny_pipeline(0, dtype=torch.bfloat16)
            >>> rt = spm_rt.compile(pipe, [random_spm(pipe.unet, "circle", std=0.01)], transport="fixed")
            >>> report = rt.precision_report()
            >>> report["summary"]["dtype"], report["summary"]["max"] > report["summary"]["limit"]
            ('bfloat16', True)
        """
        self._check_live()
        return precision_report(self.layers)

    def remove(self):
        """Restore the original pipeline bit-exactly (the original module objects); returns it."""
        self._check_live()
        self._state.refuse_nested("remove")
        with self._state.lock:
            unpatch(_unet(self.pipe), self.layers)
            guard.unhook_encode_prompt(self.pipe)
            guard.unhook_unet(self.pipe.unet)  # the torch.compile wrapper's hooks (compile_unet)
        self.layers = {}
        del self.pipe._spm_rt
        pipe, self.pipe = self.pipe, None
        return pipe

    def _check_live(self):
        if self.pipe is None:
            raise RuntimeError("this SPMPipeline was removed")

    def compile_unet(self, **compile_kwargs) -> "SPMPipeline":
        """``torch.compile`` the patched UNet in place (``pipe.unet = torch.compile(pipe.unet, ...)``,
        ``fullgraph=True`` by default); returns self. Any prompt, gates, mixed batch or ``set_spms``
        within ``k_max`` then runs without a recompile (one graph per path taken per batch shape).

        Example::

            >>> rt = spm_rt.compile(pipe, ["snoopy.safetensors"]).compile_unet(mode="reduce-overhead")  # doctest: +SKIP
        """
        self._check_live()
        compile_kwargs.setdefault("fullgraph", True)
        self.pipe.unet = torch.compile(_unet(self.pipe), **compile_kwargs)
        guard.hook_unet(self.pipe.unet)  # fail-closed hooks run eagerly around the graph
        return self

    # -- gates ---------------------------------------------------------------------------------
    @property
    def concepts(self) -> list[list[str] | None]:
        """Concept names of each SPM, in gate order."""
        return [s.concepts for s in self.spms]

    @property
    def num_spms(self) -> int:
        return len(self.spms)

    def gates(self, prompts: str | list[str]) -> torch.Tensor:
        """Gates ``[B, K]`` the pipeline would use for these prompts.

        Example::

            >>> rt.gates(["a red circle", "a blue square"])  # doctest: +SKIP
            tensor([[0.9964], [0.7015]])
        """
        self._check_live()
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if self.transport is None:
            fixed = self.config.fixed_gates or [1.0] * self.num_spms
            return torch.tensor(fixed, dtype=torch.float32).expand(len(prompts), -1).clone()
        state = self._state
        # the transport runs the pipeline's own text encoder (encode_prompt): one at a time, and
        # not mistaken for a direct pipeline call by spm_rt.guard
        with state.lock, state.passthrough():
            return self.transport.gates(prompts)

    def _call_gates(self, prompt, gates, kwargs) -> torch.Tensor:
        k = self.num_spms
        if isinstance(prompt, str):
            n_prompts = 1
        elif prompt is not None:
            n_prompts = len(prompt)
        else:
            emb = kwargs.get("prompt_embeds")
            n_prompts = emb.shape[0] if emb is not None else 1
        if gates is not None:
            g = validate_gates(gates, self._state.k_max)
            if g.shape[0] == 1 and torch.as_tensor(gates).dim() == 1:
                g = g.expand(n_prompts, -1)
            if g.shape[1] != k or g.shape[0] != n_prompts:
                raise ValueError(f"gates must be [K]={[k]} or [B, K]={[n_prompts, k]}, got {list(g.shape)}")
            return g
        if prompt is None:
            if self.transport is not None:
                raise ValueError("prompt_embeds without prompt: pass gates=... (transport needs the prompt text)")
            return self.gates([""] * n_prompts)
        return self.gates(prompt)

    def __call__(self, prompt=None, *args, gates=None, **kwargs):
        """Run the pipeline with the SPMs gated per prompt; returns what ``pipe(...)`` returns.

        ``gates`` ([K] or [B, K]) overrides Facilitated Transport.
        """
        self._check_live()
        state = self._state
        state.refuse_nested("rt(...)")
        # One call at a time per pipeline, gates included: Facilitated Transport encodes with the
        # pipeline's own encode_prompt, which must not interleave with another thread's call.
        with state.lock:
            g = self._call_gates(prompt, gates, kwargs)
            per = int(kwargs.get("num_images_per_prompt") or 1)
            with gating.use_gates(self, g, per):
                return self.pipe(prompt, *args, **kwargs)

    def __getattr__(self, name):  # pipeline attributes (unet, vae, device, ...) pass through
        if name == "pipe":
            raise AttributeError(name)
        return getattr(self.pipe, name)

    def __repr__(self) -> str:
        return (f"SPMPipeline({type(self.pipe).__name__ if self.pipe else 'removed'}, spms={self.concepts}, "
                f"combine={self.config.combine}, transport={self.config.transport}, strategy={self.config.strategy}, "
                f"backend={self.config.backend}, layers={len(self.layers)})")


def _unet(pipe):
    """The pipeline's UNet, unwrapped from ``torch.compile`` where it was compiled."""
    unet = pipe.unet
    return getattr(unet, "_orig_mod", unet)


def compile(pipe, spms, *, combine: str | None = None, transport: str | None = None, strategy: str | None = None,
            backend: str | None = None, concepts: list | None = None, config: SPMConfig | None = None,
            **config_kwargs) -> SPMPipeline:
    """Patch ``pipe`` (any diffusers Stable Diffusion 1.x/2.x/XL pipeline, text-to-image,
    img2img or inpaint) with ``spms`` (paths or loaded SPMs) and return an :class:`SPMPipeline`.

    The pipeline is patched per instance and all-or-nothing: any error (a bad file, an SPM made
    for another architecture, a bad option) leaves it untouched. ``concepts`` names each SPM's
    concepts where files lack the metadata (a list with one entry per SPM: a name or a list).

    Example::

        >>> import spm_rt, diffusers
        >>> pipe = diffusers.StableDiffusionPipeline.from_pretrained("path/to/sd-v1-4")  # doctest: +SKIP
        >>> rt = spm_rt.compile(pipe, ["snoopy.safetensors", "mickey.safetensors"])  # doctest: +SKIP
        >>> image = rt("a photo of snoopy").images[0]  # doctest: +SKIP
    """
    if getattr(pipe, "_spm_rt", None) is not None:
        raise RuntimeError("this pipeline is already compiled with spm_rt: use rt.set_spms(...) or rt.remove() first")
    if getattr(pipe, "unet", None) is None:
        raise TypeError(f"{type(pipe).__name__} has no UNet: spm_rt supports Stable Diffusion (1.x/2.x/XL) pipelines")
    # explicit keywords override ``config`` (or the defaults); unknown keywords are errors
    given = dict(combine=combine, transport=transport, strategy=strategy, backend=backend, **config_kwargs)
    known = {f.name for f in fields(SPMConfig)}
    unknown = sorted(set(given) - known)
    if unknown:
        raise TypeError(f"spm_rt.compile got unknown option(s) {unknown}; SPMConfig has {sorted(known)}")
    cfg = replace(config or SPMConfig(), **{k: v for k, v in given.items() if v is not None})
    cfg.validate()
    resolve_backend(cfg.backend, _unet(pipe).device)  # an unusable backend fails here, before patching
    rt = SPMPipeline(pipe, load_spms(spms, concepts), cfg)
    pipe._spm_rt = rt
    guard.hook_encode_prompt(rt)  # a direct pipe(...) call gets the gates rt(...) would give it
    return rt
