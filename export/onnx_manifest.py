"""The manifest of an exported ONNX folder (``manifest.json``): reading and writing it, the
versions it records, and the dtype names it uses.

Split from ``spm_rt.export.onnx`` (which re-exports the public names); every module of the
ONNX export reads the manifest through here.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _dtype_name(dtype: torch.dtype) -> str:
    for name, d in _DTYPES.items():
        if d == dtype:
            return name
    raise ValueError(f"dtype must be one of {list(_DTYPES)}, got {dtype}")


def _versions() -> dict[str, str]:
    import diffusers
    import transformers

    import spm_rt

    out = {"spm_rt": spm_rt.__version__, "torch": torch.__version__, "diffusers": diffusers.__version__,
           "transformers": transformers.__version__}
    for name in ("onnx", "onnxruntime"):
        try:
            out[name] = __import__(name).__version__
        except ImportError:
            pass
    return out


def read_manifest(onnx_dir: str | os.PathLike) -> dict:
    """The manifest of an exported folder (``manifest.json``).

    Example::

        >>> read_manifest("out/onnx")["concepts"]  # doctest: +SKIP
        [['snoopy'], ['mickey']]
    """
    path = Path(onnx_dir) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{onnx_dir}: no {MANIFEST} (not a folder written by spm_rt.export.export_onnx)")
    return json.loads(path.read_text())


def _write_manifest(onnx_dir: Path, manifest: dict) -> None:
    (onnx_dir / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
