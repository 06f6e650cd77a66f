"""Small offline models for tests, benchmarks and examples.

``tiny_pipeline`` builds a randomly initialised Stable Diffusion (1.x or XL) pipeline with the
real CLIP tokenizer and SD-architecture UNet blocks (cross-attention Transformer2DModels), small
enough to run a full generation in well under a second on a CPU. ``random_spm`` makes an SPM
with non-zero up and down vectors for every adapted module of a UNet.
"""
from __future__ import annotations

import torch

from spm_rt.formats import SPM, ModuleWeights, adapted_modules, lora_key


def _text_encoder(hidden: int, seed: int, with_projection: bool = False, projection_dim: int = 32):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from spm_rt.tokenizer import VOCAB_SIZE

    cfg = CLIPTextConfig(
        vocab_size=VOCAB_SIZE, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=77, projection_dim=projection_dim,
        bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
    )
    torch.manual_seed(seed)
    model = (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(cfg)
    return model.eval()


def tiny_pipeline(seed: int = 0, arch: str = "sd15", *, sample_size: int = 16, dtype=torch.float32):
    """A small random ``StableDiffusionPipeline`` (arch "sd15"/"sd2") or ``StableDiffusionXLPipeline``
    ("sdxl"), built offline.

    "sd15" uses 1x1-conv ``proj_in``/``proj_out`` as SD1.x does; "sd2" and "sdxl" use linear
    projections. ``sample_size`` is the latent size (images are 2x larger: the VAE has one
    downsampling step).

    Example::

        >>> pipe = tiny_pipeline(0)
        >>> image = pipe("a red circle", num_inference_steps=2, output_type="np").images[0]
        >>> image.shape
        (32, 32, 3)
    """
    from diffusers import (AutoencoderKL, DDIMScheduler, StableDiffusionPipeline,
                           StableDiffusionXLPipeline, UNet2DConditionModel)

    from spm_rt.tokenizer import clip_tokenizer

    if arch not in ("sd15", "sd2", "sdxl"):
        raise ValueError(f"arch must be 'sd15', 'sd2' or 'sdxl', got {arch!r}")
    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32),
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1, norm_num_groups=8, sample_size=2 * sample_size,
    ).eval()
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    common = dict(
        sample_size=sample_size, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), norm_num_groups=8,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    )
    if arch == "sdxl":
        te1 = _text_encoder(32, seed + 1)
        te2 = _text_encoder(32, seed + 2, with_projection=True, projection_dim=32)
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            **common, cross_attention_dim=64, attention_head_dim=(2, 4), use_linear_projection=True,
            addition_embed_type="text_time", addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=32 + 6 * 8, transformer_layers_per_block=(1, 2),
        ).eval()
        pipe = StableDiffusionXLPipeline(
            vae=vae, text_encoder=te1, text_encoder_2=te2, tokenizer=clip_tokenizer(),
            tokenizer_2=clip_tokenizer(pad_token="!"), unet=unet, scheduler=scheduler,
        )
    else:
        te = _text_encoder(32, seed + 1)
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            **common, cross_attention_dim=32, attention_head_dim=(2, 4),
            use_linear_projection=(arch == "sd2"),
        ).eval()
        pipe = StableDiffusionPipeline(
            vae=vae, text_encoder=te, tokenizer=clip_tokenizer(), unet=unet, scheduler=scheduler,
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
    pipe.set_progress_bar_config(disable=True)
    return pipe if dtype == torch.float32 else pipe.to(dtype=dtype)


def random_spm(unet, concepts: str | list[str], seed: int = 0, *, rank: int = 1, alpha: float = 1.0,
               std: float = 0.3, dtype=torch.float32) -> SPM:
    """An SPM with random (non-zero) down and up vectors for every adapted module of ``unet``.

    Example::

        >>> spm = random_spm(tiny_pipeline(0).unet, "circle")
        >>> spm.concepts, spm.rank
        (['circle'], 1)
    """
    gen = torch.Generator().manual_seed(seed)
    weights = {}
    for path, module in adapted_modules(unet).items():
        out_f, in_f = module.weight.shape[:2]
        down = torch.randn(rank, in_f, generator=gen) * (std / in_f**0.5)
        up = torch.randn(out_f, rank, generator=gen) * std
        weights[lora_key(path)] = ModuleWeights(down.to(dtype), up.to(dtype), float(alpha),
                                               conv=isinstance(module, torch.nn.Conv2d))
    concepts = [concepts] if isinstance(concepts, str) else list(concepts)
    return SPM(concepts=concepts, rank=rank, alpha=float(alpha), weights=weights)
