"""The shapes world's text-to-image model: a tiny SD1.x-architecture ``StableDiffusionPipeline``.

Same component classes and wiring as Stable Diffusion 1.x, scaled down for 32x32 images:

- ``AutoencoderKL`` with two blocks (one downsampling step): 32x32x3 images <-> 16x16x4 latents;
- ``CLIPTextModel`` with the real CLIP tokenizer's 49,408-token vocabulary, 77 positions;
- ``UNet2DConditionModel`` with cross-attention ``Transformer2DModel`` blocks at every level,
  SD1.x style (``use_linear_projection=False``: ``proj_in``/``proj_out`` are 1x1 convs);
- ``DDIMScheduler`` with SD's scaled-linear beta schedule.

Stored in fp16 safetensors (the token embedding dominates the size) and loaded back in fp32.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from spm_rt.tokenizer import VOCAB_SIZE

# SD 1.x's noise schedule; training (DDPM) and sampling (DDIM) share it.
SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon",
)


@dataclass
class ShapesModelConfig:
    """Sizes of the shapes-world model. The defaults are the shipped model's.

    Chosen from the prototype (UNet widths (32, 64), one cross-attention level, 2x64 text encoder:
    shape right ~90%, colour ~80%), with cross-attention at both levels (and the mid block) and
    wider blocks: 2.38 M UNet parameters, 3.27 M text encoder (3.16 M of them the token embedding),
    0.17 M VAE. One training step at batch 32 took 0.55 s on two idle CPU cores. The shipped model
    draws the right shape 99% and the right colour 100% of the time (``assets/shapes/fidelity.json``).
    """

    image_size: int = 32
    unet_channels: tuple[int, ...] = (48, 96)
    unet_layers_per_block: int = 1
    unet_attention_head_dim: int = 16  # channels per head (SD1.x passes heads here; see build_unet)
    text_hidden: int = 64
    text_layers: int = 2
    text_heads: int = 2
    text_intermediate: int = 256
    # Flat-colour shapes are easy to reconstruct; (16, 32) is 4x cheaper than (32, 64), which matters
    # because every training step also encodes its batch.
    vae_channels: tuple[int, ...] = (16, 32)
    latent_channels: int = 4
    vae_scaling_factor: float = 1.0  # replaced by 1/std of the training latents after VAE training

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ShapesModelConfig":
        d = dict(d)
        for k in ("unet_channels", "vae_channels"):
            if k in d:
                d[k] = tuple(d[k])
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


def build_vae(cfg: ShapesModelConfig):
    from diffusers import AutoencoderKL

    n = len(cfg.vae_channels)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=cfg.latent_channels,
        block_out_channels=tuple(cfg.vae_channels),
        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
        layers_per_block=1, norm_num_groups=8, sample_size=cfg.image_size,
        scaling_factor=cfg.vae_scaling_factor,
    )


def build_text_encoder(cfg: ShapesModelConfig):
    from transformers import CLIPTextConfig, CLIPTextModel

    tc = CLIPTextConfig(
        vocab_size=VOCAB_SIZE, hidden_size=cfg.text_hidden, intermediate_size=cfg.text_intermediate,
        num_hidden_layers=cfg.text_layers, num_attention_heads=cfg.text_heads, max_position_embeddings=77,
        projection_dim=cfg.text_hidden, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
        hidden_act="quick_gelu",
    )
    return CLIPTextModel(tc)


def build_unet(cfg: ShapesModelConfig):
    from diffusers import UNet2DConditionModel

    n = len(cfg.unet_channels)
    latent_size = cfg.image_size // 2 ** (len(cfg.vae_channels) - 1)
    # SD1.x configs pass the number of heads as ``attention_head_dim`` (a diffusers naming quirk);
    # we give each level channels // unet_attention_head_dim heads.
    heads = tuple(max(1, c // cfg.unet_attention_head_dim) for c in cfg.unet_channels)
    return UNet2DConditionModel(
        sample_size=latent_size, in_channels=cfg.latent_channels, out_channels=cfg.latent_channels,
        layers_per_block=cfg.unet_layers_per_block, block_out_channels=tuple(cfg.unet_channels),
        down_block_types=("CrossAttnDownBlock2D",) * n, up_block_types=("CrossAttnUpBlock2D",) * n,
        mid_block_type="UNetMidBlock2DCrossAttn", cross_attention_dim=cfg.text_hidden,
        attention_head_dim=heads, use_linear_projection=False, norm_num_groups=16,
    )


def build_scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(**SCHEDULER_CONFIG)


def build_shapes_pipeline(cfg: ShapesModelConfig | None = None, seed: int = 0):
    """A randomly initialised shapes-world pipeline (what ``train_base`` starts from).

    Example::

        >>> pipe = build_shapes_pipeline(seed=0)
        >>> pipe.unet.config.block_out_channels
        [48, 96]
    """
    from diffusers import StableDiffusionPipeline

    from spm_rt.tokenizer import clip_tokenizer

    cfg = cfg or ShapesModelConfig()
    torch.manual_seed(seed)
    vae = build_vae(cfg)
    torch.manual_seed(seed + 1)
    text_encoder = build_text_encoder(cfg)
    torch.manual_seed(seed + 2)
    unet = build_unet(cfg)
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=clip_tokenizer(), unet=unet,
        scheduler=build_scheduler(), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    return pipe


def param_counts(pipe) -> dict[str, int]:
    """Parameter counts per component (and the text encoder's token embedding on its own)."""
    te = pipe.text_encoder
    return {
        "unet": sum(p.numel() for p in pipe.unet.parameters()),
        "text_encoder": sum(p.numel() for p in te.parameters()),
        "token_embedding": te.get_input_embeddings().weight.numel(),
        "vae": sum(p.numel() for p in pipe.vae.parameters()),
    }


def save_pipeline(pipe, out_dir, dtype=torch.float16) -> None:
    """Save ``pipe`` with ``save_pretrained`` (safetensors, tokenizer included) in ``dtype``.

    The pipeline is cast to ``dtype`` for saving and back to its own dtype afterwards, so loading
    with ``from_pretrained(out_dir, torch_dtype=torch.float32)`` gives an fp32 copy.
    """
    from pathlib import Path

    from spm_rt.tokenizer import write_clip_tokenizer_files

    own = pipe.unet.dtype
    pipe.to(dtype=dtype)
    try:
        pipe.save_pretrained(out_dir, safe_serialization=True)
    finally:
        pipe.to(dtype=own)
    tok_dir = Path(out_dir) / "tokenizer"
    if not (tok_dir / "vocab.json").exists():
        # transformers 5 saves only tokenizer.json; the slow CLIPTokenizer of transformers 4.x (which
        # pyproject still allows) loads from vocab.json + merges.txt, so write those too (~2 MB).
        write_clip_tokenizer_files(tok_dir)
