"""The shapes world: a tiny text-to-image model whose concepts can be checked.

Three shapes x four colours on 32x32 white images. The package ships

- a trained SD1.x-architecture ``StableDiffusionPipeline`` (``assets/shapes/``, fp16 safetensors,
  loaded back in fp32 by :func:`load_shapes_pipeline`);
- a small CNN that reads shape and colour off an image (``assets/classifier.safetensors``,
  :func:`load_classifier`, :func:`classify`), to judge what a generation shows;
- the prompts: :func:`prompts` (every "a {colour} {shape}") and :func:`world_prompt_sets` (for each
  concept, the prompts that contain it and those that do not).

Example::

    >>> import torch
    >>> from spm_rt.world import load_shapes_pipeline, classify, SHAPES, COLOURS
    >>> pipe = load_shapes_pipeline()
    >>> images = pipe("a red circle", num_inference_steps=20, guidance_scale=4.0, output_type="pt",
    ...               generator=torch.Generator().manual_seed(0)).images
    >>> shape_idx, colour_idx = classify(images)
"""
from __future__ import annotations

import warnings
from importlib import resources
from pathlib import Path

import torch

from spm_rt.world.classifier import COLOUR_NAMES, SHAPE_NAMES, ShapesClassifier, classify, load_classifier
from spm_rt.world.data import COLOURS, SHAPES, caption

__all__ = [
    "SHAPES", "COLOURS", "SHAPE_NAMES", "COLOUR_NAMES", "CONCEPTS", "ShapesClassifier", "classify",
    "load_classifier", "load_shapes_pipeline", "shapes_pipeline_dir", "shipped_spms", "hardened_spms", "prompts", "world_prompt_sets",
]

CONCEPTS = SHAPES + COLOURS


def shapes_pipeline_dir() -> Path:
    """The folder of the shipped pipeline (package data ``spm_rt/world/assets/shapes``)."""
    return Path(str(resources.files("spm_rt.world") / "assets" / "shapes"))


def shipped_spms() -> list[Path]:
    """The SPM files shipped with the shapes world (``assets/spms``, trained by ``spm-rt
    train-spms``), sorted by name: ``circle.safetensors`` (erases circles, keeps the colour) and
    ``red.safetensors`` (erases red).

    Example::

        >>> [p.name for p in shipped_spms()]
        ['circle.safetensors', 'red.safetensors']
    """
    folder = Path(str(resources.files("spm_rt.world") / "assets" / "spms"))
    files = sorted(folder.glob("*.safetensors")) if folder.is_dir() else []
    return [f for f in files if not f.stem.endswith("_hardened")]


def hardened_spms() -> list[Path]:
    """The adversarially trained SPMs shipped beside the plain ones (``spm-rt train-spms
    --hardened``: adversarial Latent Anchoring, ``configs/<concept>_hardened.yaml``), sorted by name.

    Example::

        >>> [p.name for p in hardened_spms()]  # doctest: +SKIP
        ['circle_hardened.safetensors', 'red_hardened.safetensors']
    """
    folder = Path(str(resources.files("spm_rt.world") / "assets" / "spms"))
    return sorted(folder.glob("*_hardened.safetensors")) if folder.is_dir() else []


def load_shapes_pipeline(dtype: torch.dtype = torch.float32, path: str | Path | None = None):
    """The shipped shapes-world ``StableDiffusionPipeline``, loaded offline with ``from_pretrained``.

    Stored in fp16; ``dtype`` is what it is loaded as (fp32 by default). Generates 32x32 images
    (16x16x4 latents). The progress bar is off; turn it on with ``pipe.set_progress_bar_config``.

    Example::

        >>> pipe = load_shapes_pipeline()
        >>> pipe("a blue square", num_inference_steps=20, output_type="np").images.shape
        (1, 32, 32, 3)
    """
    from diffusers import StableDiffusionPipeline

    folder = Path(path) if path is not None else shapes_pipeline_dir()
    if not (folder / "model_index.json").exists():
        raise FileNotFoundError(f"no shapes pipeline at {folder} (model_index.json missing)")
    with warnings.catch_warnings():
        # Newer diffusers renamed ``torch_dtype`` to ``dtype`` (a FutureWarning); older ones only know the former.
        warnings.simplefilter("ignore", FutureWarning)
        pipe = StableDiffusionPipeline.from_pretrained(str(folder), torch_dtype=dtype, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def prompts() -> list[str]:
    """Every full prompt "a {colour} {shape}", colours outer, shapes inner (12 prompts).

    Example::

        >>> prompts()[:3]
        ['a red circle', 'a red square', 'a red triangle']
    """
    return [caption(s, c) for c in COLOURS for s in SHAPES]


def world_prompt_sets() -> dict[str, dict[str, list[str]]]:
    """For each concept (each shape and each colour), the in-distribution prompts that contain it
    and those that do not: ``{concept: {"with": [...], "without": [...]}}``.

    The prompts are the full ones ("a red circle") and the partial ones the base model was trained
    on ("a circle", "a red shape"); the empty prompt belongs to no concept and is left out.

    Example::

        >>> sets = world_prompt_sets()
        >>> sets["circle"]["with"][:3]
        ['a circle', 'a red circle', 'a green circle']
        >>> "a red shape" in sets["circle"]["without"]
        True
    """
    every = ([caption(s, None) for s in SHAPES] + [caption(None, c) for c in COLOURS] + prompts())
    out = {}
    for concept in CONCEPTS:
        with_ = [p for p in every if concept in p.split()]
        out[concept] = {"with": with_, "without": [p for p in every if p not in with_]}
    return out
