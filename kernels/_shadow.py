"""Guard for the repository's top-level ``kernels/`` and ``export/`` folders.

They are installed as ``spm_rt.kernels`` / ``spm_rt.export``, but a process started in the
repository root (``python -c``, ``python script.py`` there, ``python -m ...``) has the root on
``sys.path`` first, so a library that imports PyPI's ``kernels`` (transformers does, while diffusers
loads its pipelines) or ``export`` would get these folders instead. When a folder is imported under
its bare top-level name, :func:`defer_to_installed` loads the installed package of that name in its
place, or raises ImportError as if the folder were not there. Standard library only: it runs in the
middle of someone else's import and must not import spm_rt (which imports diffusers).
"""
from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys


def defer_to_installed(name: str, package_file: str) -> None:
    """Replace ``sys.modules[name]`` (this folder, imported by accident) by the installed package."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(package_file)))  # the repository root

    def elsewhere(entry: str) -> bool:
        return os.path.abspath(entry or os.getcwd()) != root

    spec = importlib.machinery.PathFinder.find_spec(name, [p for p in sys.path if elsewhere(p)])
    if spec is None or spec.loader is None:
        raise ImportError(f"No module named {name!r} (the folder {os.path.join(root, name)} is spm_rt.{name}: "
                          f"import it as spm_rt.{name})", name=name)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # the import system returns sys.modules[name] after this body runs
    spec.loader.exec_module(module)
