"""Swapping the SPM set of an exported ONNX folder without re-export: the UNet's ``spm.*``
initializers for new SPMs, the text encoder's ``transport.*`` initializers for new concepts,
and :func:`set_onnx_spms`, which writes both and the manifest in place.

Split from ``spm_rt.export.onnx``, which re-exports the public names.
"""
from __future__ import annotations

import os
import types
from pathlib import Path

import numpy as np
import torch
from torch import nn

from spm_rt.compile import load_spms
from spm_rt.export.onnx_graphs import _concept_tensors
from spm_rt.export.onnx_manifest import _DTYPES, _write_manifest, read_manifest
from spm_rt.export.onnx_proto import _replace_initializers
from spm_rt.stack import stack_spms


def _shape_only_modules(table: dict[str, list[int]], dtype: torch.dtype) -> dict[str, nn.Module]:
    """Stand-ins carrying only ``weight.shape``/``dtype`` (a stride-0 view, no memory), so the
    stacking code can run from a manifest without the UNet."""
    return {p: types.SimpleNamespace(weight=torch.empty(1, 1, dtype=dtype).expand(o, i))
            for p, (o, i) in table.items()}


def spm_initializers(manifest: dict, spms, *, concepts=None) -> dict[str, np.ndarray]:
    """The UNet initializers (``spm.<path>.down/up/scale``) that put ``spms`` into a graph exported
    with ``gates="input"`` (or an engine built from it), padded to its ``k_max`` and rank.

    Example::

        >>> manifest = read_manifest("out/onnx")  # doctest: +SKIP
        >>> arrays = spm_initializers(manifest, ["snoopy.safetensors"])  # doctest: +SKIP
        >>> arrays["spm.down_blocks.0.attentions.0.proj_in.down"].shape  # doctest: +SKIP
        (4, 320)
    """
    if manifest.get("gates_mode") != "input":
        raise ValueError(f"only graphs exported with gates='input' carry swappable SPM tensors "
                         f"(this one: gates={manifest.get('gates_mode')!r}); re-export instead")
    spms = load_spms(spms, concepts)
    dtype = _DTYPES[manifest["dtype"]]
    modules = _shape_only_modules(manifest["spm_modules"], dtype)
    stacks = stack_spms(modules, spms, manifest["k_max"], manifest["rank"], manifest.get("combine", "linear"))
    out = {}
    for path, s in stacks.items():
        out[f"spm.{path}.down"] = s.down.numpy()
        out[f"spm.{path}.up"] = s.up.numpy()
        out[f"spm.{path}.scale"] = s.scale.numpy()
    return out


def concept_initializers(onnx_dir: str | os.PathLike, concepts: list[list[str]], *,
                         providers: list[str] | None = None) -> dict[str, np.ndarray]:
    """The text-encoder initializers (``transport.*``) for a new concept list, with the concept
    embeddings computed by the exported text-encoder graph itself (ONNX Runtime).

    Example::

        >>> arrays = concept_initializers("out/onnx", [["snoopy"], ["mickey", "minnie"]])  # doctest: +SKIP
    """
    from spm_rt.export.ort import ONNXPipeline

    manifest = read_manifest(onnx_dir)
    runner = ONNXPipeline(onnx_dir, providers=providers, components=("text_encoder",))

    def emb_fn(names):
        return torch.from_numpy(runner.encode(names)["prompt_embeds"].astype(np.float32))

    t = _concept_tensors(runner.tokenizer, concepts, manifest["k_max"], manifest["concepts_max"],
                         emb_fn)
    out = {f"transport.{name}": v.numpy() for name, v in t.items() if v is not None}
    return out


def set_onnx_spms(onnx_dir: str | os.PathLike, spms, *, concepts=None, fixed_gates=None,
                  providers: list[str] | None = None) -> dict:
    """Swap the SPM set of an exported folder in place, without re-export: rewrites the UNet's
    ``spm.*`` initializers, the text-encoder graph's ``transport.*`` initializers and the manifest.
    The graphs' structure is unchanged, so a TensorRT engine built from them can be refit with the
    same tensors (:func:`spm_rt.export.trt.refit_engines`). Needs ``gates="input"``, at most k_max
    SPMs of at most the exported rank, and at most ``concepts_max`` concepts in all.

    Example::

        >>> set_onnx_spms("out/onnx", ["mickey.safetensors", "snoopy.safetensors"])  # doctest: +SKIP
    """
    root = Path(onnx_dir)
    manifest = read_manifest(root)
    spms = load_spms(spms, concepts)
    arrays = spm_initializers(manifest, spms)  # validates mode, k_max, rank and modules first
    transport = manifest["transport"]
    new_concepts = [list(s.concepts or []) for s in spms]
    if transport != "fixed" and not all(new_concepts):
        raise ValueError("every SPM needs concept names for Facilitated Transport: pass concepts=...")
    k, k_max = len(spms), manifest["k_max"]
    te = manifest["graphs"].get("text_encoder")
    te_arrays = None
    if te is not None:
        te_arrays = (concept_initializers(root, new_concepts, providers=providers)
                     if transport != "fixed" else {})
        fixed = np.zeros(k_max, dtype=np.float32)
        fixed[:k] = fixed_gates if fixed_gates is not None else 1.0
        te_arrays["transport.fixed_gates"] = fixed
    unet = manifest["graphs"].get("unet")
    if unet is not None:
        _replace_initializers(root / unet["file"], arrays)
    if te_arrays is not None:
        _replace_initializers(root / te["file"], te_arrays, skip_absent=True)
    manifest.update({
        "concepts": new_concepts, "spm_names": [s.name for s in spms], "num_spms": k,
        "fixed_gates": (None if transport != "fixed" else
                        [float(v) for v in (fixed_gates if fixed_gates is not None else [1.0] * k)]),
    })
    _write_manifest(root, manifest)
    return manifest
