"""Where pipelines come from: the embedded models by name, anything else the diffusers way."""
from __future__ import annotations

import os

import torch

EMBEDDED = ("shapes", "tiny", "tiny-sd2", "tiny-sdxl")


def load_pipeline(name_or_path: str = "shapes", *, dtype: torch.dtype = torch.float32, device: str | None = None):
    """A diffusers pipeline: ``"shapes"`` (the shipped shapes-world model), ``"tiny"`` /
    ``"tiny-sd2"`` / ``"tiny-sdxl"`` (random offline test pipelines), or a local diffusers folder
    loaded with ``DiffusionPipeline.from_pretrained``.

    Example::

        >>> pipe = load_pipeline("tiny")
        >>> type(pipe).__name__
        'StableDiffusionPipeline'
    """
    if name_or_path == "shapes":
        from spm_rt.world import load_shapes_pipeline

        pipe = load_shapes_pipeline(dtype=dtype)
    elif name_or_path in ("tiny", "tiny-sd2", "tiny-sdxl"):
        from spm_rt.testing import tiny_pipeline

        arch = {"tiny": "sd15", "tiny-sd2": "sd2", "tiny-sdxl": "sdxl"}[name_or_path]
        pipe = tiny_pipeline(0, arch, dtype=dtype)
    else:
        from diffusers import DiffusionPipeline

        if not os.path.isdir(name_or_path):
            raise FileNotFoundError(f"model {name_or_path!r} is neither one of {EMBEDDED} nor a local diffusers folder")
        pipe = DiffusionPipeline.from_pretrained(name_or_path, torch_dtype=dtype, local_files_only=True)
        if hasattr(pipe, "safety_checker") and getattr(pipe, "safety_checker", None) is not None:
            pass  # keep the user's checker: erasure is not a replacement for it
    if device:
        pipe = pipe.to(device)
    return pipe
