"""Train the shapes world's base text-to-image model from scratch on CPU.

Two stages, reproducible from one seed:

1. VAE: reconstruction (MSE) plus a small KL term; afterwards the latent scaling factor is set to
   1 / std of the training latents, as SD's 0.18215 was chosen.
2. UNet and text encoder jointly: epsilon prediction under the DDPM forward process with the
   DDIM scheduler's own beta schedule, captions from :mod:`spm_rt.world.data` (its 10% empty
   captions are the classifier-free-guidance dropout), AdamW with warmup and cosine decay,
   Min-SNR-5 loss weights (faster convergence in few steps), gradient clipping, and an EMA of the
   weights, which is what gets saved.

The result is saved with ``save_pretrained(..., safe_serialization=True)`` in fp16 (tokenizer
included) plus ``training_log.json``.
"""
from __future__ import annotations

import json
import math
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from spm_rt.world.data import CAPTION_MIX, sample_batch
from spm_rt.world.model import SCHEDULER_CONFIG, ShapesModelConfig, build_shapes_pipeline, param_counts, save_pipeline


@dataclass
class BaseTrainConfig:
    """The training recipe. Defaults are the shipped model's.

    Cost: ~0.59 s per UNet step at batch 32 on two idle CPU cores: a rebuild took 30.3 minutes
    and was bit-identical to the shipped weights (bench/results/shapes_world_rebuild). The shipped
    run took 90 minutes of wall time because it shared the two cores with 3-6 other processes.
    """

    seed: int = 0
    vae_steps: int = 400
    vae_batch_size: int = 32
    vae_lr: float = 1e-3
    kl_weight: float = 1e-4  # on the per-element KL; only keeps the latent scale in check
    steps: int = 3000  # UNet + text encoder steps
    batch_size: int = 32
    lr: float = 5e-4
    warmup_steps: int = 200
    final_lr_ratio: float = 0.1  # cosine decay ends at lr * this
    weight_decay: float = 0.01  # not applied to the token embedding (almost all of its rows are unused)
    min_snr_gamma: float = 5.0
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    num_threads: int = 2
    save_every: int = 1000  # write the EMA pipeline every this many steps (0: only at the end)
    caption_mix: dict = field(default_factory=lambda: dict(CAPTION_MIX))


class _EMA:
    """Exponential moving average of parameters, with the usual (1 + n) / (10 + n) warm-up."""

    def __init__(self, params, decay: float):
        self.params = list(params)
        self.shadow = [p.detach().clone() for p in self.params]
        self.decay = decay
        self.n = 0

    @torch.no_grad()
    def update(self) -> None:
        self.n += 1
        d = min(self.decay, (1 + self.n) / (10 + self.n))
        torch._foreach_lerp_(self.shadow, [p.detach() for p in self.params], 1 - d)

    @torch.no_grad()
    def swap(self) -> None:
        """Exchange live and averaged weights (call twice to undo)."""
        for p, s in zip(self.params, self.shadow):
            tmp = p.detach().clone()
            p.copy_(s)
            s.copy_(tmp)


def _lr_factor(step: int, cfg: BaseTrainConfig) -> float:
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.final_lr_ratio + (1 - cfg.final_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def train_vae(vae, cfg: BaseTrainConfig, data_gen: torch.Generator, noise_gen: torch.Generator,
              progress: bool = True) -> dict:
    """Stage 1: train ``vae`` in place; returns its log (losses, scaling factor)."""
    from tqdm.auto import tqdm

    vae.train()
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.vae_lr, total_steps=max(1, cfg.vae_steps), pct_start=0.1)
    curve, window = [], []
    bar = tqdm(range(cfg.vae_steps), desc="vae", disable=not progress)
    for step in bar:
        x = sample_batch(cfg.vae_batch_size, data_gen, caption_mix={"full": 1.0}).images * 2 - 1
        posterior = vae.encode(x).latent_dist
        z = posterior.sample(generator=noise_gen)
        rec = vae.decode(z).sample
        rec_loss = F.mse_loss(rec, x)
        kl = posterior.kl().mean() / z[0].numel()
        loss = rec_loss + cfg.kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), cfg.grad_clip)
        opt.step()
        sched.step()
        window.append((rec_loss.item(), kl.item()))
        if (step + 1) % 50 == 0 or step + 1 == cfg.vae_steps:
            r, k = (sum(v) / len(v) for v in zip(*window))
            curve.append({"step": step + 1, "rec_mse": r, "kl_per_element": k})
            window = []
            bar.set_postfix(rec=f"{r:.5f}", kl=f"{k:.3f}")
    vae.eval()
    with torch.no_grad():
        x = sample_batch(1024, torch.Generator().manual_seed(cfg.seed + 777), caption_mix={"full": 1.0}).images * 2 - 1
        posterior = vae.encode(x).latent_dist
        z = posterior.sample(generator=noise_gen)
        scaling_factor = 1.0 / z.std().item()
        heldout_mse = F.mse_loss(vae.decode(posterior.mode()).sample, x).item()
    vae.register_to_config(scaling_factor=scaling_factor)
    return {"curve": curve, "scaling_factor": scaling_factor, "heldout_rec_mse": heldout_mse,
            "latent_mean": z.mean().item(), "latent_std": z.std().item()}


def train_denoiser(pipe, cfg: BaseTrainConfig, data_gen: torch.Generator, noise_gen: torch.Generator,
                   progress: bool = True, checkpoint=None) -> tuple[dict, _EMA]:
    """Stage 2: train ``pipe.unet`` and ``pipe.text_encoder`` jointly; returns (log, ema).

    ``checkpoint(step, ema)`` is called every ``cfg.save_every`` steps.
    """
    from diffusers import DDPMScheduler
    from tqdm.auto import tqdm

    unet, text_encoder, vae, tok = pipe.unet, pipe.text_encoder, pipe.vae, pipe.tokenizer
    noise_sched = DDPMScheduler(**{k: v for k, v in SCHEDULER_CONFIG.items() if k not in ("set_alpha_to_one",)})
    alphas_cumprod = noise_sched.alphas_cumprod
    sf = vae.config.scaling_factor
    token_cache: dict[str, torch.Tensor] = {}

    def ids_for(captions):
        missing = [c for c in set(captions) if c not in token_cache]
        if missing:
            out = tok(missing, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt")
            token_cache.update(zip(missing, out.input_ids))
        return torch.stack([token_cache[c] for c in captions])

    emb = text_encoder.get_input_embeddings().weight
    decay = [p for p in list(unet.parameters()) + list(text_encoder.parameters()) if p is not emb]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": [emb], "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.999))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, cfg))
    params = list(unet.parameters()) + list(text_encoder.parameters())
    ema = _EMA(params, cfg.ema_decay)
    unet.train()
    text_encoder.train()
    curve, window = [], []
    bar = tqdm(range(cfg.steps), desc="unet+text", disable=not progress)
    for step in bar:
        b = sample_batch(cfg.batch_size, data_gen, caption_mix=cfg.caption_mix)
        with torch.no_grad():
            latents = vae.encode(b.images * 2 - 1).latent_dist.sample(generator=noise_gen) * sf
        t = torch.randint(0, noise_sched.config.num_train_timesteps, (cfg.batch_size,), generator=noise_gen)
        noise = torch.randn(latents.shape, generator=noise_gen)
        noisy = noise_sched.add_noise(latents, noise, t)
        cond = text_encoder(ids_for(b.captions))[0]
        pred = unet(noisy, t, cond).sample
        per_sample = F.mse_loss(pred, noise, reduction="none").mean((1, 2, 3))
        snr = alphas_cumprod[t] / (1 - alphas_cumprod[t])
        weight = snr.clamp(max=cfg.min_snr_gamma) / snr
        loss = (weight * per_sample).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        sched.step()
        ema.update()
        window.append(per_sample.mean().item())
        if (step + 1) % 50 == 0 or step + 1 == cfg.steps:
            curve.append({"step": step + 1, "eps_mse": sum(window) / len(window), "lr": sched.get_last_lr()[0]})
            window = []
            bar.set_postfix(eps_mse=f"{curve[-1]['eps_mse']:.4f}")
        if checkpoint is not None and cfg.save_every and (step + 1) % cfg.save_every == 0 and step + 1 < cfg.steps:
            checkpoint(step + 1, ema)
    unet.eval()
    text_encoder.eval()
    return {"curve": curve}, ema


def train_base(out_dir: str | Path, cfg: BaseTrainConfig | None = None, model_cfg: ShapesModelConfig | None = None,
               progress: bool = True):
    """Train the shapes-world base model and save it to ``out_dir``; returns the (fp32, EMA) pipeline.

    Example (a smoke run; the shipped model uses the defaults)::

        >>> pipe = train_base("/tmp/shapes", BaseTrainConfig(vae_steps=2, steps=2), progress=False)
        >>> sorted(p.name for p in Path("/tmp/shapes").iterdir())[:3]
        ['model_index.json', 'scheduler', 'text_encoder']
    """
    import diffusers
    import transformers

    cfg = cfg or BaseTrainConfig()
    model_cfg = model_cfg or ShapesModelConfig()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(cfg.num_threads)
    pipe = build_shapes_pipeline(model_cfg, seed=cfg.seed)
    data_gen = torch.Generator().manual_seed(cfg.seed)
    noise_gen = torch.Generator().manual_seed(cfg.seed + 1)
    log = {
        "train_config": asdict(cfg), "model_config": model_cfg.to_dict(), "params": param_counts(pipe),
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__,
                     "transformers": transformers.__version__, "python": platform.python_version()},
        "hardware": {"machine": platform.machine(), "processor": platform.processor(), "threads": cfg.num_threads},
    }
    t0 = time.time()
    log["vae"] = train_vae(pipe.vae, cfg, data_gen, noise_gen, progress)
    log["vae"]["seconds"] = time.time() - t0
    log["model_config"]["vae_scaling_factor"] = log["vae"]["scaling_factor"]

    def write(step: int | None) -> None:
        save_pipeline(pipe, out)
        entry = dict(log, completed_steps=step if step is not None else cfg.steps,
                     finished=step is None, seconds=time.time() - t0)
        (out / "training_log.json").write_text(json.dumps(entry, indent=1))

    def checkpoint(step: int, ema: _EMA) -> None:
        ema.swap()
        try:
            write(step)
        finally:
            ema.swap()

    t1 = time.time()
    log["denoiser"], ema = train_denoiser(pipe, cfg, data_gen, noise_gen, progress, checkpoint)
    log["denoiser"]["seconds"] = time.time() - t1
    with torch.no_grad():
        for p, s in zip(ema.params, ema.shadow):
            p.copy_(s)
    write(None)
    pipe.set_progress_bar_config(disable=not progress)
    return pipe
