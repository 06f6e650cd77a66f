"""What every ``spm-rt`` subcommand shares: the error type, ``--spm`` / ``--model`` / ``--threads``
and their checks, per-prompt seeds and printed gates. Light imports only (torch inside functions).

User errors raise :class:`CLIError` (or a library ``ValueError`` / ``FileNotFoundError`` /
``ImportError``); ``spm_rt.cli.main`` prints them as one line ``spm-rt: error: ...`` and exits 2,
with the traceback only under ``spm-rt --debug``.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path


class CLIError(Exception):
    """A user error the CLI reports as one line naming the flag, exit code 2.

    Example::

        >>> raise CLIError("--spm red.safetensors: no such file")  # doctest: +SKIP
        spm-rt: error: --spm red.safetensors: no such file
    """


# ---------------------------------------------------------------------------------------------
# --spm: one convention everywhere

def add_spm_argument(p: argparse.ArgumentParser, *, required: bool = False, help: str = "") -> None:
    """``--spm`` for a subcommand: ``--spm A B`` and ``--spm A --spm B`` both give ``[A, B]``
    (argparse ``extend``), so no spelling silently drops a file."""
    p.add_argument("--spm", action="extend", nargs="+", default=None, required=required,
                   metavar="FILE", help=help or "SPM .safetensors files, in gate order (--spm A B or --spm A --spm B)")


def load_spm_files(files: list[str], concepts: list[list[str]] | None = None, flag: str = "--spm") -> list:
    """Load SPM files for a command, before any model is loaded: a missing or malformed file is a
    one-line error naming ``flag`` (if any) and the file."""
    from spm_rt.formats import SPMFormatError, load_spm

    where = f"{flag} " if flag else ""
    out = []
    for i, f in enumerate(files):
        path = Path(f)
        if not path.exists():
            raise CLIError(f"{where}{f}: no such file")
        if not path.is_file():
            raise CLIError(f"{where}{f}: not a file")
        try:
            out.append(load_spm(path, concepts=None if concepts is None else concepts[i]))
        except SPMFormatError as exc:
            raise CLIError(f"{where}{exc}") from exc
    return out


def parse_concepts(values: list[str] | None, n_spms: int, flag: str = "--concepts") -> list[list[str]] | None:
    """``--concepts`` once per SPM, in ``--spm`` order: a JSON list (keeps commas in names), or
    names separated by ``|`` or ``,``."""
    if not values:
        return None
    if len(values) != n_spms:
        raise CLIError(f"{flag} given {len(values)} times for {n_spms} SPMs (once per --spm file, in order)")
    out = []
    for v in values:
        v = v.strip()
        if v.startswith("["):
            try:
                names = json.loads(v)
            except json.JSONDecodeError as exc:
                raise CLIError(f"{flag} {v!r}: not a JSON list ({exc})") from exc
        else:
            names = [c.strip() for c in v.split("|" if "|" in v else ",") if c.strip()]
        out.append(names)
    return out


def check_gates(gates: list[float] | None, n_spms: int, flag: str = "--gates") -> None:
    """Fixed gates must give one value per SPM."""
    if gates is not None and len(gates) != n_spms:
        raise CLIError(f"{flag}: {len(gates)} value{'s' if len(gates) != 1 else ''} for {n_spms} SPM"
                       f"{'s' if n_spms != 1 else ''} (one per --spm file, in order)")


# ---------------------------------------------------------------------------------------------
# --model: one resolver for every command

# the export command's earlier spellings of the embedded test models
_ALIASES = {"tiny:sd15": "tiny", "tiny:sd2": "tiny-sd2", "tiny:sdxl": "tiny-sdxl"}
MODEL_HELP = "shapes (the shipped model) | tiny | tiny-sd2 | tiny-sdxl (random test models) | a local diffusers folder"


def load_model(value: str, *, dtype=None, flag: str = "--model"):
    """The pipeline for a ``--model`` value (:func:`spm_rt.models.load_pipeline`: embedded names
    or a local diffusers folder); an unknown name is a one-line error naming the flag."""
    import torch

    from spm_rt.models import EMBEDDED, load_pipeline

    name = _ALIASES.get(value, value)
    if name not in EMBEDDED and not os.path.isdir(name):
        raise CLIError(f"{flag} {value!r}: neither one of {', '.join(EMBEDDED)} nor a local diffusers folder")
    if name not in EMBEDDED and not (Path(name) / "model_index.json").is_file():
        raise CLIError(f"{flag} {value!r}: no model_index.json in that folder (not a diffusers pipeline)")
    return load_pipeline(name, dtype=dtype or torch.float32)


# ---------------------------------------------------------------------------------------------
# --threads

def physical_cores() -> int:
    """Physical cores this process may run on (hyperthread siblings counted once)."""
    try:
        allowed = os.sched_getaffinity(0)
    except AttributeError:  # not Linux
        return os.cpu_count() or 1
    cores = set()
    try:
        for cpu in allowed:
            siblings = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list").read_text().strip()
            cores.add(siblings)
    except OSError:
        return len(allowed) or 1
    return max(1, len(cores))


def default_threads() -> int:
    """Torch CPU threads for a command that was not given ``--threads``:
    ``min(physical cores, allowed cores - round(1-min load average))``, at least 1, divided
    among the ranks of a ``torchrun`` launch on this node.

    Why not torch's default (one thread per physical core): torch's intra-op threads spin-wait
    and synchronize at every op; when another process holds one of the cores, the thread that
    shares it stalls all the others. ``spm-rt demo`` took 62 s on 2 idle cores and 870 s with one
    other CPU-bound process running (2 torch threads). Measured for this default (2-core AMD
    EPYC, torch 2.13 CPU, shapes world, 6 prompts x 20 DDIM steps, wall time, 2 runs each, cores
    also shared with other users' jobs):

    ======================================  ===========  ===========
    machine                                 1 thread     2 threads
    ======================================  ===========  ===========
    idle                                    2.08, 2.04 s 1.47, 1.51 s
    one ``while True: pass`` process beside 2.31, 4.25 s 5.53, 30.4 s
    ======================================  ===========  ===========

    So a busy core costs 2 threads up to 7x over 1 thread, while an idle second core saves ~28%:
    the default gives up the second thread as soon as the load average says a core is taken.

    Example::

        >>> default_threads() >= 1
        True
    """
    try:
        allowed = len(os.sched_getaffinity(0))
    except AttributeError:
        allowed = os.cpu_count() or 1
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        load = 0.0
    free = allowed - round(load)
    ranks = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(1, min(physical_cores(), free) // ranks)


def add_threads_argument(p: argparse.ArgumentParser) -> None:
    """``--threads N`` (default: :func:`default_threads`)."""
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: physical cores not already busy by the 1-min load average, >= 1)")


def apply_threads(args: argparse.Namespace) -> int:
    """Set torch's intra-op threads from ``args.threads`` (or the default); returns the number."""
    import torch

    n = args.threads if getattr(args, "threads", None) is not None else default_threads()
    if n < 1:
        raise CLIError(f"--threads {n}: must be >= 1")
    torch.set_num_threads(n)
    return n


# ---------------------------------------------------------------------------------------------
# seeds and gates

def prompt_seeds(seed: int, n: int) -> list[int]:
    """The CLI's seed convention: prompt ``i`` of a batch gets its own generator seeded
    ``seed + i``, so an image does not depend on the other prompts of its batch (the same in
    ``generate``, ``generate --onnx`` and ``export run``)."""
    return [seed + i for i in range(n)]


def generators(seed: int, n: int) -> list:
    """CPU ``torch.Generator`` per prompt (:func:`prompt_seeds`)."""
    import torch

    return [torch.Generator().manual_seed(s) for s in prompt_seeds(seed, n)]


def print_gates(prompts: list[str], names: list[str], gates) -> None:
    """One line per prompt: ``'a red circle': red=1.000, circle=0.973``."""
    for p, g in zip(prompts, gates):
        print(f"{p!r}: " + ", ".join(f"{n}={float(v):.3f}" for n, v in zip(names, g)))


# ---------------------------------------------------------------------------------------------
# numbers and prompts, checked before any model loads

DEFAULT_TRAIN_TIMESTEPS = 1000  # diffusers' schedulers' num_train_timesteps (the shapes world's too)


def check_at_least(value: int | None, flag: str, minimum: int = 1) -> None:
    """``flag value`` must be an integer >= ``minimum`` (None: not given)."""
    if value is not None and value < minimum:
        raise CLIError(f"{flag} {value}: must be >= {minimum}")


def scheduler_limit(model: str) -> int:
    """The most denoising steps a ``--model``'s scheduler allows (its ``num_train_timesteps``),
    read from the folder's ``scheduler/scheduler_config.json`` without loading the model."""
    config = Path(_ALIASES.get(model, model)) / "scheduler" / "scheduler_config.json"
    if config.is_file():
        try:
            return int(json.loads(config.read_text()).get("num_train_timesteps", DEFAULT_TRAIN_TIMESTEPS))
        except (ValueError, TypeError):
            pass
    return DEFAULT_TRAIN_TIMESTEPS


def check_steps(steps: int, model: str = "shapes", flag: str = "--steps") -> None:
    """``1 <= steps <= the scheduler's limit``."""
    limit = scheduler_limit(model)
    if not 1 <= steps <= limit:
        raise CLIError(f"{flag} {steps}: must be between 1 and {limit} (the scheduler's training timesteps)")


def check_guidance(value: float, flag: str = "--guidance") -> None:
    import math

    if not math.isfinite(value):
        raise CLIError(f"{flag} {value}: must be a finite number")


_WORLD_WORDS = {"a", "an", "shape"}


def warn_outside_world(prompts: list[str] | None, model: str, flag: str = "--prompt") -> list[str]:
    """For ``--model shapes``: warn (stderr) about prompts the shapes world has no words for (it
    knows "a {colour} {shape}"); the classifier cannot judge them. Returns those prompts."""
    import sys

    if model != "shapes" or not prompts:
        return []
    from spm_rt.world.data import COLOURS, SHAPES

    known = _WORLD_WORDS | set(COLOURS) | set(SHAPES)
    outside = [p for p in prompts if any(w.strip(".,;:!?\"'").lower() not in known for w in p.split())]
    if outside:
        print(f"spm-rt: warning: {flag} {', '.join(repr(p) for p in outside)}: outside the shapes world (it knows "
              f"'a {{colour}} {{shape}}' with colours {', '.join(COLOURS)} and shapes {', '.join(SHAPES)}); the "
              "model draws something arbitrary and the classifier's verdict on it means nothing", file=sys.stderr)
    return outside


def resolve_spm_names(files: list[str] | None, model: str) -> list[str] | None:
    """``--spm circle`` with ``--model shapes``: a name that is not a file but is a shipped SPM's
    name (plain or hardened: ``circle_hardened``) resolves to that file
    (``spm_rt/world/assets/spms/circle.safetensors``)."""
    if not files or model != "shapes":
        return files
    out = []
    for f in files:
        if not Path(f).exists():
            from spm_rt.world import hardened_spms, shipped_spms

            shipped = {p.stem: p for p in shipped_spms() + hardened_spms()}
            stem = Path(f).name.removesuffix(".safetensors")
            if stem in shipped and Path(f).parent == Path("."):
                f = str(shipped[stem])
        out.append(f)
    return out


def missing_extra(module: str, extra: str, what: str) -> CLIError:
    """The one-line error for an optional dependency that is not installed."""
    return CLIError(f"{what} needs {module}, which is not installed: pip install 'spm_rt[{extra}]'")
