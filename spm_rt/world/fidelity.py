"""How faithfully a shapes-world pipeline draws what its prompt says, judged by the classifier."""
from __future__ import annotations

import torch

from spm_rt.world.data import COLOURS, SHAPES, parse_caption


@torch.no_grad()
def generate(pipe, prompt: str, n: int, *, steps: int = 20, guidance_scale: float = 4.0, seed: int = 0,
             batch_size: int = 64) -> torch.Tensor:
    """``n`` images for ``prompt``: [n, 3, 32, 32] float in [0, 1] (CPU), deterministic given ``seed``.

    Example::

        >>> images = generate(load_shapes_pipeline(), "a red circle", 4)
        >>> images.shape
        torch.Size([4, 3, 32, 32])
    """
    gen = torch.Generator(device="cpu").manual_seed(seed)
    out = []
    for start in range(0, n, batch_size):
        k = min(batch_size, n - start)
        # Draw the initial latents here (on CPU) so results do not depend on the pipeline's device.
        shape = (k, pipe.unet.config.in_channels, pipe.unet.config.sample_size, pipe.unet.config.sample_size)
        latents = torch.randn(shape, generator=gen).to(device=pipe.device, dtype=pipe.unet.dtype)
        images = pipe([prompt] * k, num_inference_steps=steps, guidance_scale=guidance_scale, latents=latents,
                      output_type="pt").images
        out.append(images.float().cpu().clamp(0, 1))
    return torch.cat(out)


def measure_fidelity(pipe, prompts: list[str] | None = None, n_per_prompt: int = 16, *, steps: int = 20,
                     guidance_scale: float = 4.0, seed: int = 0, classifier=None, progress: bool = False) -> dict:
    """Generate ``n_per_prompt`` images per prompt and classify them.

    Returns ``{"per_prompt": {prompt: {"shape": acc, "colour": acc, "both": acc, "n": n}}, "overall": {...}}``;
    an attribute a prompt leaves open (e.g. the shape in "a red shape") is scored as None there and
    left out of the overall figures for it ("both" needs a full prompt).

    Example::

        >>> report = measure_fidelity(load_shapes_pipeline(), ["a red circle"], 4)
        >>> sorted(report["overall"])
        ['both', 'colour', 'shape']
    """
    from tqdm.auto import tqdm

    from spm_rt.world.classifier import classify
    from spm_rt.world import prompts as all_prompts

    prompts = list(prompts or all_prompts())
    per_prompt, totals = {}, {"shape": [], "colour": [], "both": []}
    for i, prompt in enumerate(tqdm(prompts, desc="fidelity", disable=not progress)):
        images = generate(pipe, prompt, n_per_prompt, steps=steps, guidance_scale=guidance_scale, seed=seed + i)
        shape_idx, colour_idx = classify(images, classifier)
        shape, colour = parse_caption(prompt)
        shape_ok = (shape_idx == SHAPES.index(shape)) if shape else None
        colour_ok = (colour_idx == COLOURS.index(colour)) if colour else None
        both_ok = shape_ok & colour_ok if shape and colour else None
        row = {"n": n_per_prompt}
        for name, ok in (("shape", shape_ok), ("colour", colour_ok), ("both", both_ok)):
            row[name] = None if ok is None else ok.float().mean().item()
            if ok is not None:
                totals[name].append(ok)
        row["predicted_shapes"] = {s: int((shape_idx == j).sum()) for j, s in enumerate(SHAPES)}
        row["predicted_colours"] = {c: int((colour_idx == j).sum()) for j, c in enumerate(COLOURS)}
        per_prompt[prompt] = row
    overall = {k: (torch.cat(v).float().mean().item() if v else None) for k, v in totals.items()}
    return {"per_prompt": per_prompt, "overall": overall,
            "settings": {"n_per_prompt": n_per_prompt, "steps": steps, "guidance_scale": guidance_scale, "seed": seed}}
