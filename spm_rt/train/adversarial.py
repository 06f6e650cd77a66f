"""Adversarial Latent Anchoring: the ``adversarial:`` block of a training config.

A min-max in the AdvUnlearn / RECE spirit on top of the reference objective. The inner step is the
prefix-embedding attack of ``spm-rt attack`` (:mod:`spm_rt.world.attack_optim`), run against the
SPM being trained (gate 1): ``k`` input embeddings after the start token of ``target``, optimised so
that the erased model's noise prediction for ``prefix + target`` matches the *base* model's
prediction for ``positive`` (the concept coming back), at latents and timesteps of recent training
iterations. The outer step adds the erase loss under those prefixes to the plain one; Latent
Anchoring (unchanged) keeps non-targets. The population is warm-started at every refresh, so it
tracks the membrane as it hardens.

A retain set (``retain:``, real non-target prompts) is anchored every iteration beside the random
anchors: those sit off the text encoder's output manifold and protect no real prompt. (Retain prompts
under the population's prefixes were tried and undo the erasure: the prefixes carry the concept, so
anchoring them to the base model teaches the membrane to let it through.)

Cost: ``attack_steps`` forward + backward passes over ``population`` rows every ``refresh_every``
iterations, plus ``per_step`` extra rows in each iteration's SPM-on pass.

Example (YAML)::

    adversarial:
      population: 8
      refresh_every: 50
      attack_steps: 10
      per_step: 2
"""
from __future__ import annotations

import time
from collections import deque

import torch


class AdversarialPopulation:
    """The attack prefixes of one training run (SD1.x/2.x: one text encoder)."""

    def __init__(self, trainer, cfg, generator: torch.Generator):
        from spm_rt.world.attack_optim import prefixed_ids

        if trainer.sdxl:
            raise ValueError("adversarial: training supports pipelines with one text encoder (SD1.x/2.x), not SDXL")
        self.trainer, self.cfg = trainer, cfg
        pipe = trainer.pipe
        self.pipe = pipe
        te = pipe.text_encoder
        table = te.get_input_embeddings().weight.detach().float()
        allowed = torch.ones(table.shape[0], dtype=torch.bool)
        allowed[list(pipe.tokenizer.all_special_ids)] = False
        allowed = allowed.nonzero().squeeze(1)
        settings = trainer.config.prompts
        self.setting = torch.tensor([i % len(settings) for i in range(cfg.population)])  # [P]
        start = allowed[torch.randint(len(allowed), (cfg.population, cfg.tokens), generator=generator)]
        self.ids = torch.cat([prefixed_ids(pipe.tokenizer, settings[int(s)].target, t.tolist())[0]
                              for s, t in zip(self.setting, start)]).to(trainer.device)  # [P, 77]
        self.prefix = table[start].clone().to(trainer.device).requires_grad_(True)  # [P, k, d]
        self.opt = torch.optim.Adam([self.prefix], lr=cfg.lr * float(table.norm(dim=1).mean()))
        self.buffer: deque = deque(maxlen=cfg.buffer)  # (latents [1, c, h, w], timestep)
        self.emb: torch.Tensor | None = None  # [P, 77, d] the population's conditions (no grad)
        # retain set: the prompts' encodings [R, 77, d]
        self.retain = torch.cat([trainer._encode(p).emb for p in cfg.retain]) if cfg.retain else None
        self.log: list[dict] = []
        self.seconds = 0.0

    def active(self, step: int) -> bool:
        return step >= self.cfg.start and bool(self.buffer)

    def due(self, step: int) -> bool:
        return step >= self.cfg.start and (step - self.cfg.start) % self.cfg.refresh_every == 0 and bool(self.buffer)

    def remember(self, latents: torch.Tensor, t) -> None:
        self.buffer.append((latents.detach()[:1].clone(), t))

    def _encode(self) -> torch.Tensor:
        from spm_rt.world.attack_optim import encode_prefixed

        emb, _ = encode_prefixed(self.pipe, self.ids, self.prefix.to(self.pipe.text_encoder.dtype))
        return emb

    def refresh(self, generator: torch.Generator) -> dict:
        """``attack_steps`` Adam steps of the attack against the current membrane (gate 1)."""
        t0 = time.time()
        tr = self.trainer
        P = self.cfg.population
        positives = torch.cat([tr.embeds[int(s)]["positive"].emb for s in self.setting])  # [P, 77, d]
        first = last = None
        for _ in range(self.cfg.attack_steps):
            pick = torch.randint(len(self.buffer), (P,), generator=generator)
            x = torch.cat([self.buffer[int(j)][0] for j in pick])
            t = torch.stack([torch.as_tensor(self.buffer[int(j)][1]) for j in pick]).to(tr.device)
            with torch.no_grad(), tr.membrane.off():  # the base model's prediction (membrane shut)
                want = tr.unet(tr.scheduler.scale_model_input(x, t), t, encoder_hidden_states=positives).sample
            emb = self._encode()
            with tr.membrane.on():
                got = tr.unet(tr.scheduler.scale_model_input(x, t), t, encoder_hidden_states=emb).sample
            loss = torch.nn.functional.mse_loss(got.float(), want.float())
            (grad,) = torch.autograd.grad(loss, [self.prefix])  # the membrane's own grads stay untouched
            self.opt.zero_grad(set_to_none=True)
            self.prefix.grad = grad
            self.opt.step()
            last = loss.item()
            first = last if first is None else first
        with torch.no_grad():
            self.emb = self._encode().detach()
        dt = time.time() - t0
        self.seconds += dt
        rec = {"step": tr.step_count, "attack_loss_first": first, "attack_loss_last": last, "seconds": dt}
        self.log.append(rec)
        return rec

    def conditions(self, setting: int, n: int, generator: torch.Generator) -> torch.Tensor | None:
        """``n`` population conditions of prompt setting ``setting`` ([n, 77, d]), drawn without
        replacement where the population allows; None before the first refresh."""
        if self.emb is None:
            return None
        members = (self.setting == setting).nonzero().squeeze(1)
        if len(members) == 0:
            return None
        order = members[torch.randperm(len(members), generator=generator)]
        pick = order[torch.arange(n) % len(order)]
        return self.emb[pick]

    def retain_conditions(self, n: int, generator: torch.Generator) -> torch.Tensor | None:
        """``n`` retain prompts' conditions ([n, 77, d], drawn with replacement); None without a
        retain set."""
        if self.retain is None:
            return None
        return self.retain[torch.randint(len(self.retain), (n,), generator=generator)]

    def state_dict(self) -> dict:
        return {"prefix": self.prefix.detach().cpu().clone(), "optimizer": self.opt.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        with torch.no_grad():
            self.prefix.copy_(state["prefix"])
        self.opt.load_state_dict(state["optimizer"])
        self.emb = None  # re-encoded at the next refresh
