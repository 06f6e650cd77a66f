"""Verdicts that chance cannot pass, and the statistics printed beside every rate.

The shipped classifier is a forced choice (3 shapes, 4 colours): a structureless image still gets
a shape, ~1/3 of them "circle" (and the VAE's decodes of random latents come out reddish, so
"red" with probability ~1). A :class:`Verdict` therefore counts an image as showing a concept only
when a shape is *confidently* there: the shape head's top probability is at least ``tau_shape``, as
confident as the classifier is on 95% of the base model's own renders; then the concept's head
(shape or colour) must name the concept. Otherwise the image is "none". The colour head saturates
(probability 1 - 1e-10 on renders, and exactly 1 for "red" on structureless images), so a colour
confidence threshold would carry no information: the shape head's confidence is the "is there an
object" test. ``tau_shape`` is fitted once on renders of the **fitting split** (the world's full
captions, fitting seeds: :func:`fit_verdict`), never on reported prompts. Probabilities are
computed in float64 (float32 softmax rounds the top class to exactly 1).

The chance floor of a verdict is its positive rate on structureless images (VAE decodes of random
latents, held-out seeds): :func:`chance_floor`.

Example::

    >>> from spm_rt.world.verdicts import wilson
    >>> lo, hi = wilson(0, 16)
    >>> round(hi, 3)
    0.194
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from spm_rt.world.data import COLOURS, SHAPES

QUANTILE = 0.05  # the thresholds keep 95% of the base model's fitting renders


def wilson(successes: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """Wilson score 95% interval of a rate ``successes / n`` (``(0, 1)`` for ``n = 0``).

    Example::

        >>> [round(v, 3) for v in wilson(8, 16)]
        [0.28, 0.72]
    """
    if n <= 0:
        return 0.0, 1.0
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def rate(successes: int, n: int) -> dict:
    """``{"rate", "k", "n", "ci95": [lo, hi]}``: every reported rate carries its interval."""
    lo, hi = wilson(successes, n)
    return {"rate": successes / n if n else None, "k": int(successes), "n": int(n), "ci95": [lo, hi]}


def fmt_rate(r: dict | None) -> str:
    """``"12.5% [3.5-36.0] (2/16)"``."""
    if not r or r["n"] == 0:
        return "-"
    lo, hi = r["ci95"]
    return f"{100 * r['rate']:.1f}% [{100 * lo:.1f}-{100 * hi:.1f}] ({r['k']}/{r['n']})"


@dataclass
class Verdict:
    """Confidence-aware reading of an image: concept present, or "none".

    ``tau_shape``: minimum top probability of the shape head (float64 softmax).
    """

    tau_shape: float
    fitted_on: str = ""

    def probabilities(self, images: torch.Tensor, classifier=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(shape probs [N, 3], colour probs [N, 4]) of images [N, 3, 32, 32] in [0, 1]."""
        from spm_rt.world.classifier import _check_images, _shipped

        clf = classifier or _shipped()
        _check_images(images)
        p = next(clf.parameters())
        with torch.no_grad():
            s, c = clf(images.to(device=p.device, dtype=p.dtype))
        return s.double().softmax(1).cpu(), c.double().softmax(1).cpu()

    def shows(self, images: torch.Tensor, concept: str, classifier=None) -> torch.Tensor:
        """[N] bool: the image confidently shows ``concept`` (a shape or a colour)."""
        ps, pc = self.probabilities(images, classifier)
        confident = ps.amax(1) >= self.tau_shape
        if concept in SHAPES:
            return confident & (ps.argmax(1) == SHAPES.index(concept))
        if concept in COLOURS:
            return confident & (pc.argmax(1) == COLOURS.index(concept))
        raise ValueError(f"{concept!r} is not a shapes-world concept ({SHAPES + COLOURS})")

    def correct(self, images: torch.Tensor, shape: str, colour: str, classifier=None) -> torch.Tensor:
        """[N] bool: confidently the asked shape and colour (non-target preservation)."""
        ps, pc = self.probabilities(images, classifier)
        confident = ps.amax(1) >= self.tau_shape
        return confident & (ps.argmax(1) == SHAPES.index(shape)) & (pc.argmax(1) == COLOURS.index(colour))

    def to_dict(self) -> dict:
        return asdict(self)


def fit_verdict(images: torch.Tensor, shape_idx: torch.Tensor, colour_idx: torch.Tensor, classifier=None,
                fitted_on: str = "") -> Verdict:
    """The threshold from renders with known content (the fitting split's base-model renders): the
    :data:`QUANTILE` quantile of the shape head's probability for the asked shape (``colour_idx``
    only has its length checked: the colour head needs no threshold, see the module docstring).

    Example::

        >>> from spm_rt.world.data import render
        >>> imgs = render(torch.tensor([0, 1]), torch.tensor([0, 2]), torch.tensor([[16., 16.]] * 2), torch.tensor([9., 9.]))
        >>> v = fit_verdict(imgs, torch.tensor([0, 1]), torch.tensor([0, 2]))
        >>> bool(v.shows(imgs, "circle")[0])
        True
    """
    v = Verdict(0.0, fitted_on)
    ps, pc = v.probabilities(images, classifier)
    if len(colour_idx) != len(images) or len(shape_idx) != len(images):
        raise ValueError(f"fit_verdict: {len(images)} images, {len(shape_idx)} shape and {len(colour_idx)} colour labels")
    true_s = ps.gather(1, shape_idx.view(-1, 1)).squeeze(1)
    v.tau_shape = float(torch.quantile(true_s, QUANTILE))
    return v


def structureless(pipe, n: int, seed: int) -> torch.Tensor:
    """VAE decodes of random latents: images with no content from the UNet, [n, 3, 32, 32]."""
    g = torch.Generator().manual_seed(seed)
    cfg = pipe.unet.config
    z = torch.randn((n, cfg.in_channels, cfg.sample_size, cfg.sample_size), generator=g)
    with torch.no_grad():
        x = pipe.vae.decode(z.to(pipe.device, pipe.vae.dtype) / pipe.vae.config.scaling_factor).sample
    return ((x.float().cpu() + 1) / 2).clamp(0, 1)


def chance_floor(verdict: Verdict, images: torch.Tensor, concept: str, classifier=None) -> dict:
    """The verdict's positive rate on structureless ``images`` (with its interval), beside the
    forced-choice chance (1/3 shapes, 1/4 colours) and the forced choice's measured rate."""
    from spm_rt.world.classifier import classify

    hits = int(verdict.shows(images, concept, classifier).sum())
    s, c = classify(images, classifier)
    forced = int(((s == SHAPES.index(concept)) if concept in SHAPES else (c == COLOURS.index(concept))).sum())
    return {"verdict": rate(hits, len(images)), "forced_choice": rate(forced, len(images)),
            "forced_choice_uniform": 1 / 3 if concept in SHAPES else 1 / 4}
