"""The optimised attacks of ``spm-rt attack``: prefix embeddings in the manner of UnlearnDiffAtk.

``k`` prefix positions right after the start token carry attacker-chosen input embeddings; the
pipeline's own text encoder runs over ``[start, adv_1..adv_k, prompt tokens, end, padding]`` and
every transport gates *that* encoding (:meth:`spm_rt.transport.Transport.gates_encoded`), exactly as
a deployed pipeline would gate what it is given. The loss is UnlearnDiffAtk's: the denoising loss
``|| eps_theta(x_t, t, c_adv) - eps ||^2`` toward base-model latents of the same prompt, through
what the pipeline runs under the current gate.

* **soft**: the prefix is free continuous embeddings (the strongest white-box attack);
* **hard**: PEZ-style, the forward pass uses the nearest real vocabulary embeddings (cosine) and
  the gradient updates the continuous copy (straight-through): the result is a string of real
  tokens a user can type, and token-overlap gates see those tokens;
* schedule **through**: minimise the denoising loss under the current gate, plus
  ``gate_weight * gate`` (adaptive: the attacker is pushed to keep the gate shut);
* schedule **two_stage**: first ``close_steps`` steps minimise the gate only (close it), then the
  denoising loss against what then runs (the base UNet where the gate is 0) with
  ``close_weight * gate`` keeping it closed.

Budget (:class:`AttackBudget`, defaults at UnlearnDiffAtk's scale): ``steps`` Adam steps per prompt,
one timestep drawn per step and restart from a stratified permutation of [0, T), ``restarts``
independent prefixes per prompt (all prompts and restarts in one batch), the classifier checked
every ``check_every`` steps on ``check_images`` images per prefix (attack seeds); a prompt stops as
soon as one restart succeeds (early stop) and the best restart is kept (highest check score, then
lowest loss).

Example::

    >>> res = prefix_attack(victim, ["a photo of a red circle"], "circle", targets, AttackBudget(steps=4),
    ...                     verdict)  # doctest: +SKIP
    >>> res.prefix.shape  # doctest: +SKIP
    torch.Size([1, 4, 64])
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch

from spm_rt.world.attack_splits import seed_for


@dataclass
class AttackBudget:
    """One optimised attack's budget (defaults: the full run)."""

    steps: int = 200          # Adam steps per prompt (UnlearnDiffAtk: ~40 per timestep, early stop)
    restarts: int = 3         # independent prefixes per prompt; best-of is kept
    tokens: int = 4           # prefix positions (UnlearnDiffAtk: 3 for objects, 5 for nudity)
    lr: float = 0.05          # Adam step, relative to the mean token-embedding norm
    check_every: int = 50     # classifier check (early stop) every N steps, and at the end
    check_images: int = 2     # images per prefix per check (attack seeds, not the reported ones)
    refs: int = 4             # base-model target latents per prompt
    gate_weight: float = 1.0  # through: loss += gate_weight * gate
    close_steps: int = 40     # two_stage: steps that only close the gate
    close_weight: float = 10.0  # two_stage: loss += close_weight * gate afterwards


@dataclass
class Victim:
    """What the attacked pipeline runs: ``rt`` (a compiled pipeline, ``strategy="gated"``), the gate
    mode (``base``: no SPM; ``fixed``: gates 1; otherwise a transport from
    :func:`spm_rt.world.attack.build_transports`), and the attacked SPM's index."""

    rt: object
    mode: str
    transport: object = None
    spm_index: int = 0

    @property
    def pipe(self):
        return self.rt.pipe

    def gates(self, emb: torch.Tensor, eot: torch.Tensor, tokens: list[set[int]]) -> torch.Tensor | None:
        """[B, K] float64 gates of encoded prompts (differentiable for transports); None for base."""
        if self.mode == "base":
            return None
        if self.mode == "fixed":
            return torch.ones(emb.shape[0], self.rt.num_spms, dtype=torch.float64)
        return self.transport.gates_encoded(emb, eot, tokens)

    def predict(self, xt, t, emb, gates) -> torch.Tensor:
        """UNet noise prediction under per-row gates (``None``: every membrane shut)."""
        from spm_rt import gates_off, use_gates

        unet = self.pipe.unet
        if gates is None:  # the base model on purpose: outside a call a patched UNet erases
            with gates_off(self.rt):
                return unet(xt, t, encoder_hidden_states=emb).sample
        with use_gates(self.rt, gates.detach().float(), rows=True):
            return unet(xt, t, encoder_hidden_states=emb).sample


@dataclass
class AttackResult:
    prefix: torch.Tensor          # [B, k, d] the best restart's prefix (projected for hard)
    ids: torch.Tensor             # [B, 77] token ids (prefix positions: the projected tokens for hard)
    tokens: list                  # [B] token-id sets the gates see
    check_score: list             # [B] best restart's last check score
    steps_used: list              # [B] Adam steps until stop
    loss_first: list = field(default_factory=list)
    loss_last: list = field(default_factory=list)
    prefix_text: list = field(default_factory=list)  # hard: the typed prefix


# ---------------------------------------------------------------------------------------------
# encoding with a prefix

@contextlib.contextmanager
def _prefix_embeddings(text_encoder, prefix: torch.Tensor, start: int = 1):
    """Within the block, the text encoder's input embeddings at positions ``start..start+k`` are
    ``prefix`` [B or 1, k, d] (a forward hook on its token embedding; the rest of CLIP's forward,
    causal mask and end-of-text pooling included, is its own)."""
    k = prefix.shape[1]

    def hook(module, inputs, output):
        out = output.clone()
        out[:, start:start + k] = prefix.to(out.dtype).expand(out.shape[0], -1, -1)
        return out

    handle = text_encoder.get_input_embeddings().register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def prefixed_ids(tokenizer, prompt: str, placeholder: list[int]) -> tuple[torch.Tensor, set[int]]:
    """Token ids ``[1, 77]`` of ``[start, placeholder..., prompt tokens, end, pad]`` and the set of
    the prompt's real token ids (what token overlap can see)."""
    ids = tokenizer(prompt, truncation=True, max_length=tokenizer.model_max_length - len(placeholder)).input_ids
    full = ids[:1] + list(placeholder) + ids[1:]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    full = full + [pad] * (tokenizer.model_max_length - len(full))
    return torch.tensor([full]), set(ids) - set(tokenizer.all_special_ids)


def encode_prefixed(pipe, ids: torch.Tensor, prefix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(prompt embeddings [B, 77, d], end-of-text state [B, d]) of ``ids`` with the prefix
    positions' input embeddings replaced by ``prefix`` [B, k, d]; differentiable in ``prefix``."""
    te = pipe.text_encoder
    with _prefix_embeddings(te, prefix):
        out = te(ids.to(te.device))
    return out.last_hidden_state, out.pooler_output


def _vocabulary(pipe) -> tuple[torch.Tensor, torch.Tensor]:
    """(unit-normed embedding table [V, d], allowed token ids [V'] without special tokens)."""
    table = pipe.text_encoder.get_input_embeddings().weight.detach().float()
    allowed = torch.ones(table.shape[0], dtype=torch.bool)
    allowed[list(pipe.tokenizer.all_special_ids)] = False
    return torch.nn.functional.normalize(table, dim=1), allowed.nonzero().squeeze(1)


def project_to_vocabulary(prefix: torch.Tensor, unit_table: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Nearest real token (cosine) of every prefix embedding: ids [B, k]."""
    sims = torch.nn.functional.normalize(prefix.detach().float(), dim=-1) @ unit_table[allowed].t()  # [B, k, V']
    return allowed[sims.argmax(-1)]


# ---------------------------------------------------------------------------------------------
# images

def latents_for(pipe, n: int, seed: int) -> torch.Tensor:
    cfg = pipe.unet.config
    g = torch.Generator().manual_seed(seed)
    return torch.randn((n, cfg.in_channels, cfg.sample_size, cfg.sample_size), generator=g)


@torch.no_grad()
def generate(victim: Victim | None, pipe, n: int, seeds: list[int], *, steps: int, guidance_scale: float,
             prompts: list[str] | None = None, prompt_embeds: torch.Tensor | None = None,
             gates: torch.Tensor | None = None, output_type: str = "pt") -> torch.Tensor:
    """``n`` images per prompt (prompt i from seed ``seeds[i]``), one batch: [B, n, 3, H, W]
    (``output_type="latent"``: latents). ``victim=None`` or ``gates=None``: the base model."""
    B = len(seeds)
    latents = torch.cat([latents_for(pipe, n, sd) for sd in seeds]).to(pipe.device, pipe.unet.dtype)
    kw = dict(num_inference_steps=steps, guidance_scale=guidance_scale, output_type=output_type, latents=latents)
    if prompt_embeds is not None:  # [B, 77, d]
        kw["prompt_embeds"] = prompt_embeds.detach().repeat_interleave(n, 0)
    else:
        kw["prompt"] = [p for p in prompts for _ in range(n)]
    if victim is None or gates is None:  # the base model on purpose (a patched pipe erases otherwise)
        from spm_rt import gates_off

        with gates_off(pipe):
            out = pipe(**kw).images
    else:
        out = victim.rt(gates=torch.as_tensor(gates).float().repeat_interleave(n, 0), **kw).images
    out = out.float().cpu()
    if output_type == "pt":
        out = out.clamp(0, 1)
    return out.view(B, n, *out.shape[1:])


# ---------------------------------------------------------------------------------------------
# the attack

def prefix_attack(victim: Victim, prompts: list[str], concept: str, targets: torch.Tensor, budget: AttackBudget,
                  verdict, *, kind: str = "soft", schedule: str = "through", seed: int = 0, steps_gen: int = 10,
                  guidance_scale: float = 4.0, classifier=None, progress=None) -> AttackResult:
    """Optimise ``budget.restarts`` prefixes per prompt (all in one batch) against ``victim``.

    ``targets`` [B, n_ref, 4, h, w]: base-model latents of each prompt (the denoising target).
    ``verdict``: :class:`spm_rt.world.verdicts.Verdict` for the early-stop check. ``progress``: an
    optional callable ``(n_steps)`` advanced as steps are taken.
    """
    if kind not in ("soft", "hard"):
        raise ValueError(f"attack kind {kind!r}: soft or hard")
    if schedule not in ("through", "two_stage"):
        raise ValueError(f"attack schedule {schedule!r}: through or two_stage")
    pipe = victim.pipe
    te, unet, sched = pipe.text_encoder, pipe.unet, pipe.scheduler
    for p in list(te.parameters()) + list(unet.parameters()):
        p.requires_grad_(False)
    g = torch.Generator().manual_seed(seed)
    B, R, k = len(prompts), budget.restarts, budget.tokens
    N = B * R  # row = prompt b, restart r at b * R + r
    unit_table, allowed = _vocabulary(pipe)
    table = te.get_input_embeddings().weight.detach().float()
    start = allowed[torch.randint(len(allowed), (N, k), generator=g)]  # random real tokens
    ids, tokens = [], []
    for row in range(N):
        i, tk = prefixed_ids(pipe.tokenizer, prompts[row // R], start[row].tolist())
        ids.append(i)
        tokens.append(tk)
    ids = torch.cat(ids)  # [N, 77]
    prefix = table[start].clone().requires_grad_(True)  # [N, k, d]
    scale = float(table.norm(dim=1).mean())
    opt = torch.optim.Adam([prefix], lr=budget.lr * scale)
    T = sched.config.num_train_timesteps
    strata = torch.stack([torch.randperm(budget.steps, generator=g) for _ in range(N)])  # [N, steps]
    alphas = sched.alphas_cumprod.float()
    n_ref = targets.shape[1]

    def current(rows: torch.Tensor, grad: bool):
        """(embeddings, eot, token sets, projected ids) of ``rows`` under the current prefix."""
        p = prefix[rows]
        row_ids, row_tokens = ids[rows].clone(), [set(tokens[r]) for r in rows.tolist()]
        proj = None
        if kind == "hard":
            proj = project_to_vocabulary(p, unit_table, allowed)  # [n, k]
            p = p + (table[proj] - p).detach()  # straight-through
            row_ids[:, 1:1 + k] = proj
            row_tokens = [t | set(pr.tolist()) for t, pr in zip(row_tokens, proj)]
        if not grad:
            p = p.detach()
        emb, eot = encode_prefixed(pipe, row_ids, p)
        return emb, eot, row_tokens, row_ids

    active = torch.ones(N, dtype=torch.bool)
    score = torch.zeros(N)
    loss_ema = torch.full((N,), float("inf"))
    used = torch.zeros(N, dtype=torch.long)
    first = torch.full((N,), float("nan"))
    for step in range(budget.steps):
        rows = active.nonzero().squeeze(1)
        if len(rows) == 0:
            break
        emb, eot, row_tokens, _ = current(rows, grad=True)
        gates = victim.gates(emb, eot, row_tokens)  # [n, K] or None
        gate_term = torch.zeros(len(rows), dtype=torch.float64)
        if gates is not None and victim.mode != "fixed":
            gate_term = gates[:, victim.spm_index]
        closing = schedule == "two_stage" and step < budget.close_steps
        if closing:
            per_row = torch.zeros(len(rows))
            total = gate_term.sum()
        else:
            b = rows // R
            ref = torch.randint(n_ref, (len(rows),), generator=g)
            x0 = targets[b, ref]  # [n, 4, h, w]
            u = torch.rand(len(rows), generator=g)
            t = ((strata[rows, step].float() + u) * T / budget.steps).long().clamp_(0, T - 1)
            noise = torch.randn(x0.shape, generator=g)
            a = alphas[t].view(-1, 1, 1, 1)
            xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
            pred = victim.predict(xt.to(pipe.device, unet.dtype), t.to(pipe.device), emb, gates)
            per_row = ((pred.float().cpu() - noise) ** 2).flatten(1).mean(1)  # [n]
            weight = budget.close_weight if schedule == "two_stage" else budget.gate_weight
            total = per_row.sum() + weight * gate_term.float().sum()
        if total.requires_grad:
            opt.zero_grad(set_to_none=True)
            total.backward()
            opt.step()
        used[rows] += 1
        if not closing:
            d = per_row.detach()
            first[rows] = torch.where(first[rows].isnan(), d, first[rows])
            loss_ema[rows] = torch.where(loss_ema[rows].isinf(), d, 0.8 * loss_ema[rows] + 0.2 * d)
        if progress is not None:
            progress(1)
        last = step == budget.steps - 1
        if verdict is not None and ((step + 1) % budget.check_every == 0 or last) and not closing:
            rows = active.nonzero().squeeze(1)
            with torch.no_grad():
                emb, eot, row_tokens, _ = current(rows, grad=False)
                gates = victim.gates(emb, eot, row_tokens)
                seeds = [seed_for(prompts[int(r) // R], "attack", 7919 * int(r) + step) for r in rows]
                imgs = generate(victim, pipe, budget.check_images, seeds, steps=steps_gen,
                                guidance_scale=guidance_scale, prompt_embeds=emb,
                                gates=None if gates is None else gates.float())
            shown = verdict.shows(imgs.flatten(0, 1), concept, classifier).view(len(rows), -1).float().mean(1)
            score[rows] = shown
            for b in set((rows // R).tolist()):  # early stop: a prompt with a successful restart stops
                sl = slice(b * R, (b + 1) * R)
                if bool((score[sl] >= 0.5).any()):
                    active[sl] = False
    # best of restarts: highest check score, then lowest loss
    key = score * 1e6 - torch.nan_to_num(loss_ema, posinf=1e5)
    best = torch.stack([b * R + key[b * R:(b + 1) * R].argmax() for b in range(B)])
    with torch.no_grad():
        emb, eot, row_tokens, row_ids = current(best, grad=False)
    final = prefix[best].detach().clone()
    text = []
    if kind == "hard":
        proj = row_ids[:, 1:1 + k]
        final = table[proj].clone()
        text = [pipe.tokenizer.decode(p.tolist()) for p in proj]
    return AttackResult(prefix=final, ids=row_ids, tokens=row_tokens, check_score=score[best].tolist(),
                        steps_used=used[best].tolist(), loss_first=first[best].tolist(),
                        loss_last=loss_ema[best].tolist(), prefix_text=text)


def target_latents(pipe, prompts: list[str], n: int, *, steps: int, guidance_scale: float) -> torch.Tensor:
    """Base-model latents of each prompt, the attack's denoising targets: [B, n, 4, h, w] (attack
    seeds; repeated prompts get the same latents)."""
    seeds = [seed_for(p, "attack") for p in prompts]
    return generate(None, pipe, n, seeds, steps=steps, guidance_scale=guidance_scale, prompts=prompts,
                    output_type="latent")


def random_prefix(pipe, prompts: list[str], k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, list[set[int]]]:
    """The 0-step control: ``k`` random real tokens before each prompt, as an attack's first step
    would start. Returns (embeddings [B, 77, d], eot [B, d], token sets incl. the random tokens)."""
    g = torch.Generator().manual_seed(seed)
    _, allowed = _vocabulary(pipe)
    table = pipe.text_encoder.get_input_embeddings().weight.detach().float()
    toks = allowed[torch.randint(len(allowed), (len(prompts), k), generator=g)]
    ids, sets = [], []
    for p, t in zip(prompts, toks):
        i, s = prefixed_ids(pipe.tokenizer, p, t.tolist())
        ids.append(i)
        sets.append(s | set(t.tolist()))
    with torch.no_grad():
        emb, eot = encode_prefixed(pipe, torch.cat(ids), table[toks])
    return emb, eot, sets
