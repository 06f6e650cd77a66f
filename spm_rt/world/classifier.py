"""A small CNN that reads shape (3 classes) and colour (4 classes) off a 32x32 shapes-world image.

It judges generated images (base-model fidelity, what an SPM erased or kept), so it is trained on
ground-truth renders degraded roughly the way a small decoder degrades them (blur, a slight colour
cast and contrast change, noise). A fill-ratio rule is not good enough for this (the
prototype's called up to 60% of generated squares "circle").
"""
from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from spm_rt.world.data import COLOURS, SHAPES, sample_batch

SHAPE_NAMES = SHAPES
COLOUR_NAMES = COLOURS


class ShapesClassifier(nn.Module):
    """Two-headed CNN: ``forward(images [N,3,32,32] in [0,1]) -> (shape_logits [N,3], colour_logits [N,4])``."""

    def __init__(self, width: int = 32):
        super().__init__()
        w = width
        self.features = nn.Sequential(
            nn.Conv2d(3, w, 3, padding=1), nn.SiLU(),
            nn.Conv2d(w, w, 3, padding=1, stride=2), nn.SiLU(),  # 16x16
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.SiLU(),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1, stride=2), nn.SiLU(),  # 8x8
            nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.SiLU(),
        )
        self.shape_head = nn.Linear(4 * w, len(SHAPES))
        self.colour_head = nn.Linear(4 * w, len(COLOURS))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.features(images * 2 - 1)
        pooled = torch.cat([h.mean((2, 3)), h.amax((2, 3))], 1)  # position-invariant
        return self.shape_head(pooled), self.colour_head(pooled)

    @torch.no_grad()
    def classify(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(shape_idx [N], colour_idx [N]) for images [N, 3, 32, 32] in [0, 1]."""
        _check_images(images)
        p = next(self.parameters())
        shape_logits, colour_logits = self(images.to(device=p.device, dtype=p.dtype))
        return shape_logits.argmax(1).cpu(), colour_logits.argmax(1).cpu()


def _check_images(images: torch.Tensor) -> None:
    if images.ndim != 4 or images.shape[1] != 3 or images.shape[2:] != (32, 32):
        raise ValueError(f"expected images [N, 3, 32, 32] in [0, 1], got shape {tuple(images.shape)}")


def degrade(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random degradations like a small VAE decoder's: blur, colour cast, noise. [N,3,H,W] -> same."""
    n = images.shape[0]
    # Blur with a random sigma in [0, 1] px (per image), as a separable 5-tap Gaussian.
    sigma = torch.rand(n, generator=generator) * 1.0 + 1e-3
    taps = torch.arange(-2, 3, dtype=torch.float32)
    k = torch.exp(-(taps.view(1, -1) ** 2) / (2 * sigma.view(-1, 1) ** 2))
    k = k / k.sum(1, keepdim=True)  # [N, 5]
    x = images.reshape(1, n * 3, *images.shape[2:])
    kk = k.repeat_interleave(3, 0)  # [3N, 5]
    x = F.conv2d(F.pad(x, (2, 2, 0, 0), mode="replicate"), kk.view(-1, 1, 1, 5), groups=3 * n)
    x = F.conv2d(F.pad(x, (0, 0, 2, 2), mode="replicate"), kk.view(-1, 1, 5, 1), groups=3 * n)
    x = x.view_as(images)
    cast = (torch.rand(n, 3, 1, 1, generator=generator) - 0.5) * 0.12
    gain = 1 + (torch.rand(n, 1, 1, 1, generator=generator) - 0.5) * 0.2
    noise = torch.randn(x.shape, generator=generator) * torch.rand(n, 1, 1, 1, generator=generator) * 0.06
    return ((x - 0.5) * gain + 0.5 + cast + noise).clamp(0, 1)


@dataclass
class ClassifierTrainConfig:
    """Training recipe for the shipped classifier (~0.12 s a step, about 75 s on two idle CPU cores)."""

    seed: int = 0
    steps: int = 600
    batch_size: int = 128
    lr: float = 2e-3
    width: int = 32
    eval_samples: int = 2000


def train_classifier(cfg: ClassifierTrainConfig | None = None, progress: bool = True) -> tuple[ShapesClassifier, dict]:
    """Train a :class:`ShapesClassifier` on degraded ground-truth renders; returns (model, log).

    ``log`` holds held-out accuracies on fresh clean renders (seed not used in training) and on
    degraded ones.

    Example::

        >>> model, log = train_classifier(ClassifierTrainConfig(steps=10), progress=False)
        >>> sorted(log["heldout"])
        ['clean', 'degraded']
    """
    from tqdm.auto import tqdm

    cfg = cfg or ClassifierTrainConfig()
    torch.manual_seed(cfg.seed)
    model = ShapesClassifier(cfg.width)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.steps, pct_start=0.1)
    gen = torch.Generator().manual_seed(cfg.seed)
    t0 = time.time()
    bar = tqdm(range(cfg.steps), desc="classifier", disable=not progress)
    for _ in bar:
        b = sample_batch(cfg.batch_size, gen, caption_mix={"full": 1.0})
        x = torch.where(torch.rand(cfg.batch_size, 1, 1, 1, generator=gen) < 0.8, degrade(b.images, gen), b.images)
        shape_logits, colour_logits = model(x)
        loss = F.cross_entropy(shape_logits, b.shape_idx) + F.cross_entropy(colour_logits, b.colour_idx)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")
    model.eval()
    log = {"config": cfg.__dict__, "train_seconds": time.time() - t0,
           "heldout": evaluate_classifier(model, cfg.eval_samples, seed=10_000 + cfg.seed)}
    return model, log


def evaluate_classifier(model: ShapesClassifier, n: int = 2000, seed: int = 12345) -> dict:
    """Accuracy of ``model`` on ``n`` fresh renders, clean and degraded: {"clean": {"shape", "colour"}, ...}."""
    gen = torch.Generator().manual_seed(seed)
    b = sample_batch(n, gen, caption_mix={"full": 1.0})
    out = {}
    for name, x in (("clean", b.images), ("degraded", degrade(b.images, gen))):
        s, c = model.classify(x)
        out[name] = {"shape": (s == b.shape_idx).float().mean().item(),
                     "colour": (c == b.colour_idx).float().mean().item()}
    return out


def save_classifier(model: ShapesClassifier, path: str | Path) -> None:
    """Save the weights as safetensors (with the width in the metadata)."""
    from safetensors.torch import save_file

    from spm_rt.formats import public_permissions

    width = model.features[0].out_channels
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path), metadata={"width": str(width)})
    public_permissions(path)


def load_classifier(path: str | Path | None = None) -> ShapesClassifier:
    """Load a classifier; ``path=None`` loads the shipped ``spm_rt/world/assets/classifier.safetensors``.

    Example::

        >>> clf = load_classifier()
        >>> shape_idx, colour_idx = clf.classify(torch.ones(1, 3, 32, 32))
    """
    from safetensors import safe_open
    from safetensors.torch import load_file

    if path is None:
        path = resources.files("spm_rt.world") / "assets" / "classifier.safetensors"
    with safe_open(str(path), "pt") as fh:
        width = int((fh.metadata() or {}).get("width", 32))
    model = ShapesClassifier(width)
    model.load_state_dict(load_file(str(path)))
    return model.eval()


@functools.lru_cache(maxsize=1)
def _shipped() -> ShapesClassifier:
    return load_classifier()


def classify(images: torch.Tensor, classifier: ShapesClassifier | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Shape and colour of each image: (shape_idx [N], colour_idx [N]) as int64, indices into
    ``SHAPES`` / ``COLOURS``. ``images``: [N, 3, 32, 32] in [0, 1]. Uses the shipped classifier
    unless one is given.

    Example::

        >>> from spm_rt.world.data import render
        >>> img = render(torch.tensor([2]), torch.tensor([1]), torch.tensor([[16.0, 16.0]]), torch.tensor([9.0]))
        >>> [SHAPES[i] for i in classify(img)[0]], [COLOURS[i] for i in classify(img)[1]]
        (['triangle'], ['green'])
    """
    return (classifier or _shipped()).classify(images)
