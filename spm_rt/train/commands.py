"""``spm-rt train``: thin CLI over :func:`spm_rt.train.train`."""
from __future__ import annotations


def add_subcommands(subparsers) -> None:
    p = subparsers.add_parser(
        "train", help="train an SPM from a YAML config (the reference's config.yaml layout)",
        description="Train an SPM (erase loss + Latent Anchoring) on spm_rt's layers. The config keeps the "
                    "reference implementation's field names; see spm_rt/train/configs/ for examples.")
    p.add_argument("--config", "--config_file", dest="config", required=True, help="training YAML")
    p.add_argument("--resume", help="checkpoint to continue from (<name>_<N>steps.safetensors or its .state.pt)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_train)


def _train(args) -> int:
    import sys
    from pathlib import Path

    from spm_rt.cli_common import CLIError
    from spm_rt.train.config import ConfigError, load_config

    if not Path(args.config).is_file():
        raise CLIError(f"--config {args.config}: no such file")
    if args.resume and not Path(args.resume).exists():
        raise CLIError(f"--resume {args.resume}: no such file")
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        raise CLIError(f"--config {exc}") from exc
    for note in config.notes:
        print(f"note: {note}", file=sys.stderr)
    config.notes = []  # printed once here, not again as warnings

    from spm_rt.train.trainer import train

    path = train(config, resume=args.resume, progress=not args.no_progress)
    print(path)
    return 0
