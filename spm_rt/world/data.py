"""A procedural world of coloured shapes: 32x32 RGB images with captions.

Three shapes (circle, square, triangle) x four colours (red, green, blue, yellow), one shape per
image at a random position and size on a white background, rendered anti-aliased from signed
distances in plain torch. Everything is deterministic given a ``torch.Generator`` seed.

Captions come in four kinds so every concept has in-distribution prompts of its own (a bare word
the captions never contain is not a concept in the text encoder):

========  =====================  ===========================
kind      example                share of training captions
========  =====================  ===========================
full      "a red circle"         ``CAPTION_MIX["full"]``
shape     "a circle"             ``CAPTION_MIX["shape"]``
colour    "a red shape"          ``CAPTION_MIX["colour"]``
empty     ""                     ``CAPTION_MIX["empty"]``
========  =====================  ===========================
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

IMAGE_SIZE = 32
SHAPES = ("circle", "square", "triangle")
COLOURS = ("red", "green", "blue", "yellow")
# Saturated and far apart in RGB; green is darker than yellow so the two differ in more than hue.
COLOUR_RGB = {
    "red": (0.90, 0.10, 0.10),
    "green": (0.10, 0.65, 0.15),
    "blue": (0.10, 0.20, 0.90),
    "yellow": (0.95, 0.85, 0.10),
}
CAPTION_KINDS = ("full", "shape", "colour", "empty")
# The empty share doubles as classifier-free-guidance dropout (10%, as SD training does).
CAPTION_MIX = {"full": 0.6, "shape": 0.15, "colour": 0.15, "empty": 0.1}
# Shape "radius" in pixels (circle radius, half the square side, triangle circumradius-ish).
MIN_RADIUS, MAX_RADIUS = 5.0, 11.0


def caption(shape: str | None, colour: str | None) -> str:
    """The caption for a shape and/or colour; either may be None (a partial caption).

    Example::

        >>> caption("circle", "red"), caption("circle", None), caption(None, "red"), caption(None, None)
        ('a red circle', 'a circle', 'a red shape', '')
    """
    if shape is None and colour is None:
        return ""
    if shape is None:
        return f"a {colour} shape"
    if colour is None:
        return f"a {shape}"
    return f"a {colour} {shape}"


@dataclass
class ShapesBatch:
    """One batch of the shapes world.

    images: [N, 3, 32, 32] float in [0, 1]; shape_idx / colour_idx: [N] int64 (ground truth,
    whatever the caption says); captions: N strings; kinds: [N] int64 index into CAPTION_KINDS.
    """

    images: torch.Tensor
    shape_idx: torch.Tensor
    colour_idx: torch.Tensor
    captions: list[str]
    kinds: torch.Tensor


def _pixel_grid(size: int) -> tuple[torch.Tensor, torch.Tensor]:
    coords = torch.arange(size, dtype=torch.float32) + 0.5  # pixel centres
    return coords.view(1, size, 1).expand(1, size, size), coords.view(1, 1, size).expand(1, size, size)


def render(shape_idx: torch.Tensor, colour_idx: torch.Tensor, centre: torch.Tensor, radius: torch.Tensor,
           size: int = IMAGE_SIZE) -> torch.Tensor:
    """Render shapes on white: returns [N, 3, size, size] in [0, 1].

    shape_idx, colour_idx: [N] int; centre: [N, 2] (x, y) in pixels; radius: [N] in pixels.
    Coverage is ``clamp(0.5 - signed_distance, 0, 1)``: a one-pixel anti-aliased edge.

    Example::

        >>> img = render(torch.tensor([0]), torch.tensor([0]), torch.tensor([[16.0, 16.0]]), torch.tensor([8.0]))
        >>> img.shape, img[0, :, 16, 16].tolist()
        (torch.Size([1, 3, 32, 32]), [0.8999999761581543, 0.10000000149011612, 0.10000000149011612])
    """
    ys, xs = _pixel_grid(size)
    cx, cy = centre[:, 0].view(-1, 1, 1), centre[:, 1].view(-1, 1, 1)
    r = radius.view(-1, 1, 1)
    dx, dy = xs - cx, ys - cy
    sdf_circle = torch.sqrt(dx * dx + dy * dy) - r
    sdf_square = torch.maximum(dx.abs(), dy.abs()) - r * 0.85  # same area scale as the circle, roughly
    # Equilateral triangle pointing up (circumradius rt), its bounding box centred on the centre
    # (centroid shifted down by rt/4), so it spans +-0.86 r vertically and +-r horizontally;
    # max of the three edge distances.
    rt = r * 1.15
    k = 3.0 ** 0.5
    ty = dy - rt * 0.25
    e_bottom = ty - rt * 0.5
    e_left = (-k * dx - ty) / 2 - rt * 0.5
    e_right = (k * dx - ty) / 2 - rt * 0.5
    sdf_triangle = torch.maximum(e_bottom, torch.maximum(e_left, e_right))
    sdf = torch.stack([sdf_circle, sdf_square, sdf_triangle], 1)  # [N, 3 shapes, H, W]
    sdf = sdf.gather(1, shape_idx.view(-1, 1, 1, 1).expand(-1, 1, size, size)).squeeze(1)
    alpha = (0.5 - sdf).clamp(0, 1).unsqueeze(1)  # [N, 1, H, W]
    palette = torch.tensor([COLOUR_RGB[c] for c in COLOURS], dtype=torch.float32)
    rgb = palette[colour_idx].view(-1, 3, 1, 1)
    return (1 - alpha) + alpha * rgb


def sample_batch(n: int, generator: torch.Generator, *, caption_mix: dict[str, float] | None = None,
                 size: int = IMAGE_SIZE) -> ShapesBatch:
    """Draw ``n`` random images with captions, deterministically from ``generator``.

    ``caption_mix`` maps each of CAPTION_KINDS to a probability (default CAPTION_MIX); pass
    ``{"full": 1.0}`` for full captions only.

    Example::

        >>> b = sample_batch(4, torch.Generator().manual_seed(0), caption_mix={"full": 1.0})
        >>> b.images.shape, len(b.captions)
        (torch.Size([4, 3, 32, 32]), 4)
    """
    mix = dict(CAPTION_MIX if caption_mix is None else caption_mix)
    unknown = set(mix) - set(CAPTION_KINDS)
    if unknown:
        raise ValueError(f"unknown caption kinds {sorted(unknown)}; expected some of {CAPTION_KINDS}")
    probs = torch.tensor([float(mix.get(k, 0.0)) for k in CAPTION_KINDS])
    if probs.sum() <= 0:
        raise ValueError("caption_mix must give some kind a positive probability")
    shape_idx = torch.randint(len(SHAPES), (n,), generator=generator)
    colour_idx = torch.randint(len(COLOURS), (n,), generator=generator)
    scale = size / IMAGE_SIZE
    radius = (MIN_RADIUS + (MAX_RADIUS - MIN_RADIUS) * torch.rand(n, generator=generator)) * scale
    # Keep the whole shape inside the frame with a one-pixel margin.
    margin = radius + 1.0 * scale
    centre = margin.unsqueeze(1) + (size - 2 * margin).unsqueeze(1) * torch.rand(n, 2, generator=generator)
    kinds = torch.multinomial(probs / probs.sum(), n, replacement=True, generator=generator)
    images = render(shape_idx, colour_idx, centre, radius, size)
    captions = []
    for s, c, k in zip(shape_idx.tolist(), colour_idx.tolist(), kinds.tolist()):
        kind = CAPTION_KINDS[k]
        captions.append(caption(SHAPES[s] if kind in ("full", "shape") else None,
                                COLOURS[c] if kind in ("full", "colour") else None))
    return ShapesBatch(images, shape_idx, colour_idx, captions, kinds)


def parse_caption(text: str) -> tuple[str | None, str | None]:
    """Inverse of :func:`caption`: (shape, colour), either None when the caption leaves it open.

    Example::

        >>> parse_caption("a red circle"), parse_caption("a red shape"), parse_caption("")
        (('circle', 'red'), (None, 'red'), (None, None))
    """
    words = text.split()
    shape = next((w for w in words if w in SHAPES), None)
    colour = next((w for w in words if w in COLOURS), None)
    return shape, colour
