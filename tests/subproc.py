"""Child Python processes for the tests, started outside the repository root.

``python -c`` and ``python -m`` put the working directory first on ``sys.path``; started in the
repository root, the top-level ``kernels/`` folder would stand in front of PyPI's ``kernels`` (which
transformers imports). Children run where a user's would: in a folder of their own.
"""
from __future__ import annotations

import subprocess
import sys
import tempfile


def run_python(args: list[str], **kwargs) -> subprocess.CompletedProcess:
    """``subprocess.run([sys.executable, *args], capture_output=True, text=True)`` outside the repo."""
    kwargs.setdefault("cwd", tempfile.gettempdir())
    kwargs.setdefault("capture_output", True)
    kwargs.setdefault("text", True)
    return subprocess.run([sys.executable, *args], **kwargs)
