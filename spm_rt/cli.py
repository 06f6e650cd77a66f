"""The ``spm-rt`` console script. Thin: parse, call the library, print/save.

Subcommands register themselves: each module listed in ``_COMMAND_MODULES`` defines
``add_subcommands(subparsers)`` and sets ``func`` on its parsers (``parser.set_defaults(func=...)``);
``func(args)`` returns an exit code (or None for 0). Modules are imported only to build the
parser; heavy imports belong inside the ``func``.

One error style: a user error (a missing file, a wrong number of ``--gates``, an unknown
``--model``: :class:`spm_rt.cli_common.CLIError`, or a library ``ValueError`` /
``FileNotFoundError`` / ``ImportError``) is printed as one line ``spm-rt: error: ...`` and exits
with code 2; ``spm-rt --debug COMMAND ...`` shows the traceback instead.

Example::

    $ spm-rt --version
    spm-rt 0.1.0
    $ spm-rt inspect missing.safetensors
    spm-rt: error: missing.safetensors: no such file
"""
from __future__ import annotations

import argparse
import importlib
import sys

_COMMAND_MODULES = (
    "spm_rt.commands",  # generate, inspect
    "spm_rt.train.commands",  # train
    "spm_rt.world.commands",  # world train-base/train-classifier/sample
    "spm_rt.world.eval_commands",  # eval, demo
    "spm_rt.world.attack_commands",  # attack
    "spm_rt.export.commands",  # export onnx/engine/refit
    "spm_rt.bench_commands",  # bench report
    "spm_rt.serve.commands",  # serve
)


def build_parser() -> argparse.ArgumentParser:
    from spm_rt import __version__

    parser = argparse.ArgumentParser(prog="spm-rt", description="SPM concept erasure runtime for diffusers pipelines")
    parser.add_argument("--version", action="version", version=f"spm-rt {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:  # that room has no commands yet
                continue
            raise
        module.add_subcommands(sub)
    return parser


def quiet_third_party() -> None:
    """Silence third-party noise a CLI user cannot act on: transformers' torchvision fallback
    notices, accelerate / torchvision warnings and torch.jit's TracerWarning (ONNX export traces
    diffusers code that branches on shapes). Our own warnings still print."""
    import os
    import warnings

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # read by transformers when it is imported
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    for module in ("torchvision", "accelerate", "transformers", "diffusers", "torch.onnx", "onnxscript"):
        warnings.filterwarnings("ignore", module=module)
    warnings.filterwarnings("ignore", message=r".*TracerWarning.*")
    warnings.filterwarnings("ignore", message=r".*[Cc]onverting a tensor to a Python (boolean|integer|float|index).*")
    try:
        from torch.jit import TracerWarning
    except ImportError:  # pragma: no cover - torch always has it
        return
    warnings.filterwarnings("ignore", category=TracerWarning)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    from spm_rt.cli_common import CLIError

    quiet_third_party()

    try:
        code = args.func(args)
    except (CLIError, ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError,
            ImportError) as exc:
        if args.debug:
            raise
        message = " ".join(str(exc).split()) or type(exc).__name__
        hint = "" if isinstance(exc, CLIError) else " (spm-rt --debug ... for the traceback)"
        print(f"spm-rt: error: {message}{hint}", file=sys.stderr)
        return 2
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
