"""``spm-rt world ...``: train and look at the shapes world's models.

Subcommands: ``train-base``, ``train-classifier``, ``sample``, ``fidelity``. Evaluation/demo of
SPMs on this world register here too (one ``_add_*`` function each, called from
``add_subcommands``). Heavy imports live inside the command functions.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path


def _set_threads(n: int | None) -> None:
    import torch

    from spm_rt.cli_common import default_threads

    torch.set_num_threads(n if n is not None else default_threads())


def _train_base(args) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from spm_rt.world.train_base import BaseTrainConfig, train_base

    cfg = BaseTrainConfig(seed=args.seed, num_threads=args.threads)
    for name in ("steps", "vae_steps", "batch_size", "lr", "save_every"):
        value = getattr(args, name)
        if value is not None:
            setattr(cfg, name, value)
    train_base(args.out, cfg, progress=not args.no_progress)
    log = json.loads((Path(args.out) / "training_log.json").read_text())
    print(f"saved {args.out} ({log['seconds'] / 60:.1f} min, final eps mse "
          f"{log['denoiser']['curve'][-1]['eps_mse']:.4f})")
    return 0


def _train_classifier(args) -> int:
    from spm_rt.world.classifier import ClassifierTrainConfig, save_classifier, train_classifier

    _set_threads(args.threads)
    cfg = ClassifierTrainConfig(seed=args.seed)
    if args.steps is not None:
        cfg.steps = args.steps
    model, log = train_classifier(cfg, progress=not args.no_progress)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_classifier(model, out)
    out.with_suffix(".json").write_text(json.dumps(log, indent=1))
    held = log["heldout"]
    print(f"saved {out}: held-out accuracy shape {held['clean']['shape']:.4f} colour {held['clean']['colour']:.4f} "
          f"(degraded: shape {held['degraded']['shape']:.4f} colour {held['degraded']['colour']:.4f})")
    return 0


def _load_pipe(model: str | None):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from spm_rt.world import load_shapes_pipeline

    pipe = load_shapes_pipeline(path=model)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _sample(args) -> int:
    import numpy as np
    from PIL import Image

    from spm_rt.world.fidelity import generate

    _set_threads(args.threads)
    pipe = _load_pipe(args.model)
    images = generate(pipe, args.prompt, args.n, steps=args.steps, guidance_scale=args.guidance, seed=args.seed)
    cols = min(args.n, 8)
    rows = -(-args.n // cols)
    pad = rows * cols - args.n
    if pad:
        images = np.concatenate([images.numpy(), np.ones((pad, *images.shape[1:]), np.float32)])
    else:
        images = images.numpy()
    h, w = images.shape[2:]
    grid = images.reshape(rows, cols, 3, h, w).transpose(0, 3, 1, 4, 2).reshape(rows * h, cols * w, 3)
    img = Image.fromarray((grid * 255).round().astype(np.uint8))
    img = img.resize((img.width * args.zoom, img.height * args.zoom), Image.NEAREST)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    img.save(args.out)
    print(f"saved {args.out} ({args.n} samples of {args.prompt!r})")
    return 0


def _fidelity(args) -> int:
    from spm_rt.world.fidelity import measure_fidelity

    _set_threads(args.threads)
    pipe = _load_pipe(args.model)
    report = measure_fidelity(pipe, args.prompt or None, args.n, steps=args.steps, guidance_scale=args.guidance,
                              seed=args.seed, progress=not args.no_progress)
    for prompt, row in report["per_prompt"].items():
        fmt = lambda v: "  -  " if v is None else f"{v:.3f}"  # noqa: E731
        print(f"{prompt:22s} shape {fmt(row['shape'])} colour {fmt(row['colour'])} both {fmt(row['both'])}")
    o = report["overall"]
    print(f"{'overall':22s} shape {o['shape']:.3f} colour {o['colour']:.3f} both "
          f"{'-' if o['both'] is None else format(o['both'], '.3f')}")
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))
    return 0


def _common(p: argparse.ArgumentParser, train: bool = False) -> None:
    if train:
        # training keeps a fixed default: the thread count changes float reduction order, and the
        # shipped weights are rebuilt bit for bit with 2 threads
        p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2: the shipped recipe's)")
    else:
        from spm_rt.cli_common import add_threads_argument

        add_threads_argument(p)
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _add_train_base(sub) -> None:
    p = sub.add_parser("train-base", help="train the shapes-world text-to-image model from scratch")
    p.add_argument("--out", required=True, help="output folder (a diffusers pipeline)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=None, help="UNet + text encoder steps (default: the shipped recipe's)")
    p.add_argument("--vae-steps", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--save-every", type=int, default=None, help="checkpoint every N steps (0: only at the end)")
    _common(p, train=True)
    p.set_defaults(func=_train_base)


def _add_train_classifier(sub) -> None:
    p = sub.add_parser("train-classifier", help="train the shape/colour classifier on ground-truth renders")
    p.add_argument("--out", required=True, help="output .safetensors (a .json log is written beside it)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=None)
    _common(p, train=True)
    p.set_defaults(func=_train_classifier)


def _add_generation_args(p: argparse.ArgumentParser, n: int) -> None:
    p.add_argument("--model", default=None, help="pipeline folder (default: the shipped one)")
    p.add_argument("--n", type=int, default=n, help=f"samples (default {n})")
    p.add_argument("--steps", type=int, default=20, help="DDIM steps (default 20)")
    p.add_argument("--guidance", type=float, default=4.0, help="classifier-free guidance scale (default 4)")
    p.add_argument("--seed", type=int, default=0)


def _add_sample(sub) -> None:
    p = sub.add_parser("sample", help="a grid of samples for one prompt, as a PNG")
    p.add_argument("--prompt", required=True)
    p.add_argument("--out", required=True, help="output .png")
    p.add_argument("--zoom", type=int, default=4, help="nearest-neighbour upscaling (default 4)")
    _add_generation_args(p, 16)
    _common(p)
    p.set_defaults(func=_sample)


def _add_fidelity(sub) -> None:
    p = sub.add_parser("fidelity", help="classifier-judged shape/colour accuracy of the base model's samples")
    p.add_argument("--prompt", action="append", help="prompt to check (repeatable; default: all 12 full prompts)")
    p.add_argument("--out", default=None, help="write the report as JSON")
    _add_generation_args(p, 16)
    _common(p)
    p.set_defaults(func=_fidelity)


def add_subcommands(subparsers) -> None:
    """Register ``spm-rt world ...``."""
    world = subparsers.add_parser("world", help="the shapes world: train, sample, check the embedded default model")
    sub = world.add_subparsers(dest="world_command", metavar="WORLD_COMMAND")
    world.set_defaults(func=lambda args: (world.print_help(), 2)[1])
    for add in (_add_train_base, _add_train_classifier, _add_sample, _add_fidelity):
        add(sub)
