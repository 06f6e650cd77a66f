"""The SPM trainer: the reference algorithm (semantics section 5) on spm_rt's own adapted layers.

The membranes being trained are the layers inference uses: ``build_stacks`` + ``layers.patch``
with the stacked ``down``/``up`` of the single trained SPM (K = 1, so the stack *is* the SPM) held
as fp32 master ``nn.Parameter``s. "SPM on" is ``use_gates(ones)``; "off" is ``gates_off`` (gates 0),
where every layer runs its base module (outside any call a patched UNet erases: gates 1). The UNet and text encoder(s) stay frozen in the inference dtype;
gradients flow through the gated branch (spm_rt.functional: PyTorch autograd on CPU, the fused
Triton op on CUDA when installed).

One iteration (all random draws from one seeded CPU generator, so a run is reproducible and a
checkpoint's generator state makes ``--resume`` reproduce an uninterrupted run):

1. pick a prompt setting, draw ``t_to`` in [1, max_denoising_steps - 1], the resolution bucket and
   the initial latents;
2. SPM on, no grad: denoise from step 0 to ``t_to`` with CFG 3 on (unconditional, target)
   (SDXL: guidance rescale 0.7, pooled embeddings and add_time_ids, as the reference's XL trainer);
3. SPM off, no grad: conditional predictions for ``positive``, ``neutral`` and the anchors at the
   training timestep ``timesteps_T[int(t_to * T / max_denoising_steps)]``;
4. SPM on, with grad: conditional predictions for ``target`` and the anchors;
5. loss = MSE(eps_target, eps_neutral - eta (eps_positive - eps_neutral))
   (+ la_strength * MSE(anchors on, anchors off) for ``erase_with_la``).

The reference runs each CFG-1 prediction on a doubled (unconditional, conditional) batch and keeps
the conditional half; only the conditional rows are computed here (the same values, half the
work). Every sampled anchor contributes (see :mod:`spm_rt.train.anchors` for the reference's
anchor-layout defect that is fixed).
"""
from __future__ import annotations

import contextlib
import csv
import dataclasses
import inspect
import json
import os
import warnings
from pathlib import Path

import torch

from spm_rt.formats import save_spm
from spm_rt.train.anchors import anchoring_loss, erase_loss, sample_anchors
from spm_rt.train.config import TrainConfig, load_config
from spm_rt.train.membrane import TrainableSPM
from spm_rt.train.setup import _DTYPES, _noise_scheduler, build_lr_scheduler, build_optimizer, load_pipeline

__all__ = ["Trainer", "TrainableSPM", "train", "load_pipeline", "build_optimizer", "build_lr_scheduler"]

CFG_TRAJECTORY = 3.0  # the reference denoises the training latents with CFG 3
XL_GUIDANCE_RESCALE = 0.7  # the reference's SDXL trainer rescales every CFG prediction by 0.7
STATE_SUFFIX = ".state.pt"


@dataclasses.dataclass
class _Cond:
    """UNet conditioning for N rows."""

    emb: torch.Tensor  # [N, 77, d]
    pooled: torch.Tensor | None = None  # [N, p] (SDXL)
    time_ids: torch.Tensor | None = None  # [N, 6] (SDXL)

    @staticmethod
    def cat(parts: list["_Cond"]) -> "_Cond":
        xl = parts[0].pooled is not None
        return _Cond(torch.cat([p.emb for p in parts]),
                     torch.cat([p.pooled for p in parts]) if xl else None,
                     torch.cat([p.time_ids for p in parts]) if xl else None)

    def repeat(self, n: int) -> "_Cond":
        return _Cond(self.emb.repeat_interleave(n, 0),
                     None if self.pooled is None else self.pooled.repeat_interleave(n, 0),
                     None if self.time_ids is None else self.time_ids.repeat_interleave(n, 0))



# ---------------------------------------------------------------------------------------------
# the trainer

class Trainer:
    """Runs the reference training algorithm on spm_rt layers; see the module docstring.

    ``pipe`` overrides ``config.pretrained_model`` (it is modified in place: UNet and text encoders
    are frozen, moved to the device and cast to ``train.precision``; the UNet is patched until
    :meth:`close`). ``membrane`` replaces the trained adapter with any object offering
    ``parameters()`` and ``on()`` (and ``off()`` where outside ``on()`` is not the base model; benchmarks compare other LoRA implementations with it; saving
    then is unavailable).

    Example::

        >>> trainer = Trainer(load_config("run.yaml"))  # doctest: +SKIP
        >>> path = trainer.run()  # doctest: +SKIP
        >>> trainer.history[-1]["erase"]  # doctest: +SKIP
    """

    def __init__(self, config: TrainConfig, pipe=None, *, membrane=None, progress: bool = True):
        self.config = config
        self.progress = progress
        t = config.train
        self.device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if t.device == "auto" else t.device)
        self.dtype = _DTYPES[t.precision]
        self.pipe = pipe if pipe is not None else load_pipeline(config)
        self.sdxl = getattr(self.pipe, "text_encoder_2", None) is not None
        self.unet = self.pipe.unet
        self.text_encoders = [te for te in (self.pipe.text_encoder, getattr(self.pipe, "text_encoder_2", None))
                              if te is not None]
        for m in [self.unet, *self.text_encoders]:
            m.requires_grad_(False)
            m.eval()
            w = next(m.parameters())
            if w.device != self.device:
                m.to(self.device)
            if w.dtype != self.dtype:  # cast only when needed (diffusers warns on every dtype cast)
                m.to(dtype=self.dtype)
        self.vae_scale_factor = int(getattr(self.pipe, "vae_scale_factor", 8))
        self.scheduler = _noise_scheduler(t.noise_scheduler, self.pipe.scheduler.config,
                                          config.pretrained_model.v_pred)
        self._step_takes_generator = "generator" in inspect.signature(self.scheduler.step).parameters

        self.generator = torch.Generator().manual_seed(t.seed)
        init = _adversarial_init(config) if membrane is None else None
        self.membrane = membrane if membrane is not None else TrainableSPM(
            self.unet, config.concepts, config.network.rank, config.network.alpha,
            generator=self.generator, backend=t.backend, init=init)
        try:
            self.optimizer = build_optimizer(self.membrane.parameters(), config)
            self.lr_scheduler = build_lr_scheduler(self.optimizer, config)
            self.embeds = self._encode_settings()
            self.adversarial = None
            if config.adversarial is not None:
                from spm_rt.train.adversarial import AdversarialPopulation

                self.adversarial = AdversarialPopulation(self, config.adversarial, self.generator)
        except BaseException:
            self.close()  # leave the pipeline unpatched
            raise
        self.step_count = 0
        self.history: list[dict] = []

    # -- conditioning ---------------------------------------------------------------------
    @torch.no_grad()
    def _encode(self, prompt: str) -> _Cond:
        pipe = self.pipe
        if not self.sdxl:
            ids = pipe.tokenizer([prompt], padding="max_length", max_length=pipe.tokenizer.model_max_length,
                                 truncation=True, return_tensors="pt").input_ids.to(self.device)
            return _Cond(pipe.text_encoder(ids)[0])  # last hidden state, as the reference
        embs, pooled = [], None
        for tok, te in ((pipe.tokenizer, pipe.text_encoder), (pipe.tokenizer_2, pipe.text_encoder_2)):
            ids = tok([prompt], padding="max_length", max_length=tok.model_max_length, truncation=True,
                      return_tensors="pt").input_ids.to(self.device)
            out = te(ids, output_hidden_states=True)
            embs.append(out.hidden_states[-2])  # penultimate layer, as SDXL and the reference
            pooled = out.text_embeds if hasattr(out, "text_embeds") else out[0]  # text_encoder_2's projection
        return _Cond(torch.cat(embs, dim=-1), pooled)

    def _encode_settings(self) -> list[dict[str, _Cond]]:
        cache: dict[str, _Cond] = {}
        out = []
        for ps in self.config.prompts:
            d = {}
            for role in ("target", "positive", "neutral", "unconditional"):
                text = getattr(ps, role)
                if text not in cache:
                    cache[text] = self._encode(text)
                d[role] = cache[text]
            out.append(d)
        return out

    def _time_ids(self, h: int, w: int, dynamic_crops: bool, g: torch.Generator) -> torch.Tensor:
        """SDXL add_time_ids (original size, crop top-left, target size) in pixels, as the reference."""
        if dynamic_crops:
            s = float(torch.rand((), generator=g)) * 2 + 1
            orig = (int(h * s), int(w * s))
            crop = (int(torch.randint(0, orig[0] - h + 1, (), generator=g)),
                    int(torch.randint(0, orig[1] - w + 1, (), generator=g)))
        else:
            orig, crop = (h, w), (0, 0)
        return torch.tensor([[*orig, *crop, h, w]], dtype=self.dtype, device=self.device)

    # -- UNet calls -----------------------------------------------------------------------
    def _unet(self, latents: torch.Tensor, t, cond: _Cond) -> torch.Tensor:
        x = self.scheduler.scale_model_input(latents, t)
        kwargs = {}
        if cond.pooled is not None:
            kwargs["added_cond_kwargs"] = {"text_embeds": cond.pooled, "time_ids": cond.time_ids}
        return self.unet(x, t, encoder_hidden_states=cond.emb, **kwargs).sample

    def _resolution(self, ps, g: torch.Generator) -> tuple[int, int]:
        if not ps.dynamic_resolution:
            return ps.resolution, ps.resolution
        # The reference's buckets: multiples of 64 px (8 latent pixels) in [res/2, res); scaled to
        # the VAE's factor so small embedded models get buckets too.
        step = 8 * self.vae_scale_factor
        lo, hi = (ps.resolution // 2) // step, ps.resolution // step
        if hi <= lo:
            return ps.resolution, ps.resolution
        h = int(torch.randint(lo, hi, (), generator=g)) * step
        w = int(torch.randint(lo, hi, (), generator=g)) * step
        return h, w

    def _losses(self, g: torch.Generator) -> dict:
        """One draw of the training objective (grad enabled for the SPM-on pass if the caller allows)."""
        cfg = self.config
        t_cfg = cfg.train
        idx = int(torch.randint(0, len(cfg.prompts), (), generator=g))
        ps, emb = cfg.prompts[idx], self.embeds[idx]
        t_to = int(torch.randint(1, t_cfg.max_denoising_steps, (), generator=g))
        h, w = self._resolution(ps, g)
        b, f = ps.batch_size, self.vae_scale_factor
        sched = self.scheduler
        sched.set_timesteps(t_cfg.max_denoising_steps, device=self.device)
        latents = torch.randn(b, self.unet.config.in_channels, h // f, w // f, generator=g)
        latents = (latents * sched.init_noise_sigma).to(self.device, self.dtype)

        def cond(role: str, n: int) -> _Cond:
            c = emb[role]
            if self.sdxl:
                c = _Cond(c.emb, c.pooled, time_ids)
            return c.repeat(n)

        time_ids = self._time_ids(h, w, ps.dynamic_crops, g) if self.sdxl else None
        step_kwargs = {"generator": g} if self._step_takes_generator else {}

        # 2. the training latents: SPM on, CFG 3 from step 0 to t_to
        with torch.no_grad(), self.membrane.on():
            traj = _Cond.cat([cond("unconditional", b), cond("target", b)])
            for t in sched.timesteps[:t_to]:
                pred = self._unet(torch.cat([latents, latents]), t, traj)
                uncond, text = pred.chunk(2)
                guided = uncond + CFG_TRAJECTORY * (text - uncond)
                if self.sdxl:
                    guided = _rescale_cfg(guided, text, XL_GUIDANCE_RESCALE)
                latents = sched.step(guided, t, latents, **step_kwargs).prev_sample

        sched.set_timesteps(sched.config.num_train_timesteps, device=self.device)
        t_train = sched.timesteps[int(t_to * sched.config.num_train_timesteps / t_cfg.max_denoising_steps)]

        la = ps.action == "erase_with_la"
        anchors = None
        if la:
            s = ps.sampling_batch_size
            anchors = _Cond(sample_anchors(emb["target"].emb, s, g))
            if self.sdxl:
                anchors = _Cond(anchors.emb, sample_anchors(emb["target"].pooled, s, g), time_ids.repeat(s, 1))
            anchor_latents = latents.repeat(s // b, 1, 1, 1)  # anchor i sees latent i % b, as the reference

        # adversarial Latent Anchoring: the target under attack prefixes of the population, and the
        # retain set (real non-target prompts) anchored beside the random anchors
        adv = self.adversarial
        adv_emb = retain = None
        if adv is not None and adv.active(self.step_count):
            adv_emb = adv.conditions(idx, adv.cfg.per_step, g)  # [m, 77, d] or None
        if adv is not None and la:
            retain = adv.retain_conditions(adv.cfg.retain_per_step, g)  # [r, 77, d] or None
        m = 0 if adv_emb is None else adv_emb.shape[0]
        r = 0 if retain is None else retain.shape[0]
        extra = ([_Cond(retain.to(self.dtype))] if r else [])
        extra_latents = ([latents[torch.arange(r) % b]] if r else [])  # retain row i sees latent i % b

        # 3. SPM off: positive, neutral (anchors, retain) in one batch
        off_ctx = getattr(self.membrane, "off", contextlib.nullcontext)  # other membranes: off outside on()
        with torch.no_grad(), off_ctx():
            parts = [cond("positive", b), cond("neutral", b)] + ([anchors] if la else []) + extra
            lat = torch.cat([latents, latents] + ([anchor_latents] if la else []) + extra_latents)
            off = self._unet(lat, t_train, _Cond.cat(parts))
        eps_pos, eps_neu = off[:b], off[b:2 * b]

        # 4. SPM on, with grad: target (adversarial targets, anchors, retain) in one batch
        with self.membrane.on():
            parts = [cond("target", b)] + ([_Cond(adv_emb.repeat_interleave(b, 0))] if m else []) + \
                ([anchors] if la else []) + extra
            lat = torch.cat([latents] + ([latents.repeat(m, 1, 1, 1)] if m else []) + ([anchor_latents] if la else [])
                            + extra_latents)
            on = self._unet(lat, t_train, _Cond.cat(parts))

        out = {"prompt": idx, "t_to": t_to, "erase": erase_loss(on[:b], eps_pos, eps_neu, ps.guidance_scale),
               "_latents": latents, "_t": t_train}
        out["loss"] = out["erase"]
        if m:
            out["adversarial"] = erase_loss(on[b:b + m * b], eps_pos.repeat(m, 1, 1, 1), eps_neu.repeat(m, 1, 1, 1),
                                            ps.guidance_scale)
            out["loss"] = out["loss"] + adv.cfg.weight * out["adversarial"]
        if la:
            n_on, n_off = len(on) - r, len(off) - r
            out["anchoring"] = anchoring_loss(on[b + m * b:n_on], off[2 * b:n_off])
            out["loss"] = out["loss"] + ps.la_strength * out["anchoring"]
        if r:
            out["retain"] = anchoring_loss(on[n_on:], off[n_off:])
            out["loss"] = out["loss"] + ps.la_strength * out["retain"]
        return out

    # -- public loop ----------------------------------------------------------------------
    def step(self) -> dict:
        """One optimisation step; returns (and records in ``history``) its losses as floats."""
        refresh = getattr(self.membrane, "refresh", None)
        if refresh is not None:
            refresh()
        adv = self.adversarial
        if adv is not None and adv.due(self.step_count):
            adv.refresh(self.generator)
        self.optimizer.zero_grad(set_to_none=True)
        losses = self._losses(self.generator)
        if adv is not None:
            adv.remember(losses["_latents"], losses["_t"])
        losses["loss"].backward()
        if self.config.train.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.membrane.parameters(), self.config.train.max_grad_norm)
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.lr_scheduler.step()
        self.step_count += 1
        rec = {"step": self.step_count, "prompt": losses["prompt"], "t_to": losses["t_to"], "lr": lr,
               "loss": losses["loss"].item(), "erase": losses["erase"].item(),
               "anchoring": losses["anchoring"].item() if "anchoring" in losses else None}
        if adv is not None:
            rec["adversarial"] = losses["adversarial"].item() if "adversarial" in losses else None
            if adv.retain is not None:
                rec["retain"] = losses["retain"].item() if "retain" in losses else None
        self.history.append(rec)
        return rec

    @torch.no_grad()
    def evaluate(self, n: int = 4, seed: int = 12345) -> dict:
        """Mean erase and anchoring losses over ``n`` draws with a fixed seed (no update, and the
        training generator is untouched): a low-noise view of progress.

        Example::

            >>> trainer.evaluate(8)  # doctest: +SKIP
            {'erase': 0.0123, 'anchoring': 1.2e-07}
        """
        refresh = getattr(self.membrane, "refresh", None)
        if refresh is not None:
            refresh()
        g = torch.Generator().manual_seed(seed)
        erase, anchor, n_anchor = 0.0, 0.0, 0
        for _ in range(n):
            out = self._losses(g)
            erase += float(out["erase"])
            if "anchoring" in out:
                anchor += float(out["anchoring"])
                n_anchor += 1
        return {"erase": erase / n, "anchoring": anchor / n_anchor if n_anchor else None}

    def run(self, resume: str | os.PathLike | None = None) -> Path:
        """Train to ``train.iterations``, saving every ``save.per_steps``; returns the final file
        ``<save.path>/<save.name>_last.safetensors``."""
        from tqdm.auto import tqdm

        if resume is not None:
            self.load_checkpoint(resume)
        total = self.config.train.iterations
        la = any(p.action == "erase_with_la" for p in self.config.prompts)
        with tqdm(total=total, initial=self.step_count, desc="SPM training", disable=not self.progress,
                  dynamic_ncols=True) as bar:
            while self.step_count < total:
                rec = self.step()
                post = {"erase": f"{rec['erase']:.4g}"}
                if la:
                    post["anchor"] = "-" if rec["anchoring"] is None else f"{rec['anchoring']:.3g}"
                bar.set_postfix(post, refresh=False)
                bar.update(1)
                if self.step_count % self.config.save.per_steps == 0 and self.step_count < total:
                    self.save_checkpoint()
        path = self.save(Path(self.config.save.path) / f"{self.config.save.name}_last.safetensors")
        self._write_history()
        return path

    # -- files ----------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> Path:
        """Write the SPM (reference layout, ``save.precision``, with metadata) to ``path``."""
        if not isinstance(self.membrane, TrainableSPM):
            raise RuntimeError("this trainer trains a foreign membrane; it cannot save an SPM")
        spm = self.membrane.to_spm()
        spm.metadata = {"spm_rt.train": json.dumps({
            "step": self.step_count, "iterations": self.config.train.iterations, "seed": self.config.train.seed,
            "model": self.config.pretrained_model.name_or_path,
            "actions": sorted({p.action for p in self.config.prompts}),
            "adversarial": self.config.to_dict().get("adversarial"),
            "adversarial_seconds": None if self.adversarial is None else round(self.adversarial.seconds, 3),
        })}
        return save_spm(spm, path, dtype=_DTYPES[self.config.save.precision])

    def save_checkpoint(self) -> Path:
        """``<name>_<step>steps.safetensors`` plus ``.state.pt`` (fp32 weights, optimizer, LR
        schedule, generator state and loss history) for ``resume``."""
        base = Path(self.config.save.path) / f"{self.config.save.name}_{self.step_count}steps"
        path = self.save(base.with_suffix(".safetensors"))
        state = {
            "format": "spm_rt.train/1",
            "step": self.step_count,
            "membrane": self.membrane.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "lr_scheduler": self.lr_scheduler.state_dict(),
            "generator": self.generator.get_state(),
            "history": json.dumps(self.history),
            "config": json.dumps(self.config.to_dict(), sort_keys=True),
        }
        if self.adversarial is not None:
            state["adversarial"] = self.adversarial.state_dict()
        tmp = Path(str(base) + STATE_SUFFIX + ".tmp")
        torch.save(state, tmp)
        os.replace(tmp, str(base) + STATE_SUFFIX)
        return path

    def load_checkpoint(self, path: str | os.PathLike) -> None:
        """Restore a checkpoint written by :meth:`save_checkpoint` (give the ``.safetensors`` or
        the ``.state.pt``)."""
        path = Path(path)
        state_path = path if path.name.endswith(STATE_SUFFIX) else Path(str(path.with_suffix("")) + STATE_SUFFIX)
        if not state_path.is_file():
            raise FileNotFoundError(f"{state_path}: no training state next to {path} (only checkpoints written "
                                    f"every save.per_steps carry one)")
        state = torch.load(state_path, map_location="cpu", weights_only=True)
        if state.get("format") != "spm_rt.train/1":
            raise ValueError(f"{state_path}: not an spm_rt training state")
        saved = json.loads(state["config"])
        now = self.config.to_dict()
        for section in ("network",):
            if saved[section] != now[section]:
                raise ValueError(f"{state_path}: checkpoint has {section} {saved[section]}, config has {now[section]}")
        # where files go (save.*) does not change the trajectory
        diff = sorted(f"{s}.{k}" for s in now if isinstance(now[s], dict) and s != "save"
                      for k in now[s] if saved.get(s, {}).get(k) != now[s][k])
        if saved["prompts"] != now["prompts"]:
            diff.append("prompts")
        if diff:
            warnings.warn(f"resuming with a config that differs from the checkpoint's in {', '.join(diff)}; "
                          "the run will not reproduce an uninterrupted one", stacklevel=2)
        self.membrane.load_state_dict(state["membrane"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        self.generator.set_state(state["generator"])
        if self.adversarial is not None and "adversarial" in state:
            self.adversarial.load_state_dict(state["adversarial"])
        self.step_count = int(state["step"])
        self.history = json.loads(state["history"])

    def _write_history(self) -> None:
        path = Path(self.config.save.path) / f"{self.config.save.name}_losses.csv"
        with open(path, "w", newline="") as fh:
            names = ["step", "prompt", "t_to", "lr", "loss", "erase", "anchoring"]
            adv = self.adversarial
            names += [] if adv is None else ["adversarial"] + (["retain"] if adv.retain is not None else [])
            w = csv.DictWriter(fh, fieldnames=names)
            w.writeheader()
            w.writerows(self.history)

    def close(self) -> None:
        """Unpatch the UNet."""
        remove = getattr(self.membrane, "remove", None)
        if remove is not None:
            remove()


def _adversarial_init(config: TrainConfig):
    """The SPM an adversarial run starts from (``adversarial.init``), or None."""
    adv = config.adversarial
    if adv is None or not adv.init:
        return None
    from spm_rt.formats import load_spm

    path = Path(adv.init)
    if not path.is_absolute() and config.source:
        path = Path(config.source).parent / path
    if not path.is_file():
        raise FileNotFoundError(f"adversarial.init {adv.init!r}: no SPM file at {path}")
    spm = load_spm(path, concepts=config.concepts)
    if spm.rank > config.network.rank:
        raise ValueError(f"adversarial.init {path}: rank {spm.rank}, above network.rank {config.network.rank} "
                         "(an init can be widened to a higher rank, not narrowed)")
    return spm


def _rescale_cfg(guided: torch.Tensor, text: torch.Tensor, rescale: float) -> torch.Tensor:
    """Guidance rescale (Lin et al. 2023), as diffusers and the reference's SDXL trainer apply it."""
    dims = list(range(1, text.ndim))
    rescaled = guided * (text.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True))
    return rescale * rescaled + (1 - rescale) * guided


def train(config: TrainConfig | dict | str | os.PathLike, *, resume: str | os.PathLike | None = None, pipe=None,
          progress: bool = True) -> Path:
    """Train an SPM from a config (a :class:`TrainConfig`, a dict, or a YAML path) and return the
    path of the final file (``<save.path>/<save.name>_last.safetensors``), loadable by
    :func:`spm_rt.load_spm` and by diffusers' ``pipe.load_lora_weights``.

    ``resume`` continues from a checkpoint written every ``save.per_steps`` (reproducing the
    uninterrupted run). ``pipe`` trains on a pipeline object instead of loading
    ``pretrained_model.name_or_path``.

    Example::

        >>> from spm_rt.train import train
        >>> path = train({
        ...     "prompts": [{"target": "circle", "action": "erase_with_la", "resolution": 32,
        ...                  "sampling_batch_size": 2}],
        ...     "pretrained_model": {"name_or_path": "tiny"},
        ...     "train": {"iterations": 2, "max_denoising_steps": 3, "optimizer_type": "AdamW"},
        ...     "save": {"name": "circle", "path": "out"},
        ... }, progress=False)  # doctest: +SKIP
        >>> path.name  # doctest: +SKIP
        'circle_last.safetensors'
    """
    if isinstance(config, (str, os.PathLike)):
        config = load_config(config)
    elif isinstance(config, dict):
        config = TrainConfig.from_dict(config)
    for note in config.notes:
        warnings.warn(note, stacklevel=2)
    trainer = Trainer(config, pipe, progress=progress)
    try:
        return trainer.run(resume=resume)
    finally:
        trainer.close()
