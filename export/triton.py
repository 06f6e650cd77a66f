"""A Triton Inference Server model repository from an exported ONNX folder: one model per graph
(``text_encoder``, ``unet``, ``vae_decoder``) on Triton's ONNX Runtime backend, with dynamic
batching, and the UNet's ``gates`` a per-request input (one row per UNet row, batched with the
request's other inputs: requests with different concepts share a batch).

Layout written::

    repo/<graph>/config.pbtxt
    repo/<graph>/1/model.onnx          (+ model.onnx_data beside it when the graph has external data)
    repo/spm_manifest.json             the export manifest (concepts in gate order, k_max, ...)

Triton batches along a leading batch axis it adds itself (``max_batch_size > 0``): every ``dims``
below leaves the graph's ``batch`` axis out, other symbolic axes are -1. ``timestep`` ([batch] in
the graph) is sent as ``[batch, 1]`` and reshaped to ``[batch]`` (``reshape { shape: [] }``).
The denoising loop, classifier-free guidance and the scheduler stay in the client (Triton's
Python/BLS backends could host them; not written here). Checked by parsing every ``config.pbtxt``
with the ``ModelConfig`` protobuf of ``tritonclient`` (tests); no Triton server was run.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from spm_rt.export.onnx import MANIFEST, read_manifest

# manifest dtype names -> Triton data types
_TRITON_TYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "bfloat16": "TYPE_BF16", "int32": "TYPE_INT32",
                 "int64": "TYPE_INT64", "bool": "TYPE_BOOL"}


def _tensor_block(spec: dict, graph: str) -> str:
    shape = spec["shape"]
    if not shape or shape[0] != "batch":
        raise ValueError(f"{graph} tensor {spec['name']} has no leading 'batch' axis ({shape}): Triton's dynamic "
                         "batching needs one")
    dims = [-1 if isinstance(d, str) else int(d) for d in shape[1:]]
    lines = [f'    name: "{spec["name"]}"', f'    data_type: {_TRITON_TYPES[spec["dtype"]]}']
    if dims:
        lines.append(f"    dims: [ {', '.join(str(d) for d in dims)} ]")
    else:  # a [batch] tensor: sent as [batch, 1], the graph sees [batch]
        lines += ["    dims: [ 1 ]", "    reshape: { shape: [ ] }"]
    return "  {\n" + "\n".join(lines) + "\n  }"


def triton_config(manifest: dict, graph: str, *, max_batch_size: int = 8, max_queue_delay_us: int = 2000,
                  instances: int = 1, kind: str = "KIND_AUTO") -> str:
    """``config.pbtxt`` text for one exported graph (protobuf text format of Triton's ModelConfig).

    Example::

        >>> print(triton_config(read_manifest("out/onnx"), "unet"))  # doctest: +SKIP
        name: "unet"
        backend: "onnxruntime"
        max_batch_size: 8
        ...
    """
    spec = manifest["graphs"].get(graph)
    if spec is None:
        raise ValueError(f"the export has no {graph} graph (it has {list(manifest['graphs'])})")
    if max_batch_size < 1:
        raise ValueError(f"max_batch_size must be >= 1 (dynamic batching), got {max_batch_size}")
    inputs = ",\n".join(_tensor_block(s, graph) for s in spec["inputs"])
    outputs = ",\n".join(_tensor_block(s, graph) for s in spec["outputs"])
    preferred = sorted({b for b in (1, 2, 4, 8, 16, 32) if b <= max_batch_size} | {max_batch_size})
    return (f'name: "{graph}"\nbackend: "onnxruntime"\nmax_batch_size: {max_batch_size}\n'
            f"input [\n{inputs}\n]\noutput [\n{outputs}\n]\n"
            f"dynamic_batching {{\n  preferred_batch_size: [ {', '.join(map(str, preferred))} ]\n"
            f"  max_queue_delay_microseconds: {max_queue_delay_us}\n}}\n"
            f"instance_group [ {{ count: {instances} kind: {kind} }} ]\n")


def export_triton(onnx_dir: str | os.PathLike, repo_dir: str | os.PathLike, *, max_batch_size: int = 8,
                  max_queue_delay_us: int = 2000, link: bool = False) -> dict[str, Path]:
    """Write a Triton model repository for every graph of an exported folder; returns
    ``{graph: config path}``. ``link=True`` symlinks the ONNX files instead of copying them.

    Example::

        >>> export_triton("out/onnx", "out/triton", max_batch_size=8)  # doctest: +SKIP
        {'text_encoder': PosixPath('out/triton/text_encoder/config.pbtxt'), ...}
    """
    root, repo = Path(onnx_dir), Path(repo_dir)
    manifest = read_manifest(root)
    repo.mkdir(parents=True, exist_ok=True)
    written = {}
    for graph, spec in manifest["graphs"].items():
        config = triton_config(manifest, graph, max_batch_size=max_batch_size, max_queue_delay_us=max_queue_delay_us)
        version = repo / graph / "1"
        version.mkdir(parents=True, exist_ok=True)
        sources = [root / spec["file"]]
        if spec.get("external_data"):
            sources.append((root / spec["file"]).with_name(spec["external_data"]))
        for src in sources:
            dst = version / src.name
            dst.unlink(missing_ok=True)
            if link:
                dst.symlink_to(src.resolve())
            else:
                shutil.copyfile(src, dst)
        (repo / graph / "config.pbtxt").write_text(config)
        written[graph] = repo / graph / "config.pbtxt"
    (repo / "spm_manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return written


def parse_triton_config(path: str | os.PathLike):
    """Parse a ``config.pbtxt`` with Triton's ModelConfig protobuf (from ``tritonclient``); raises on
    any field Triton would not accept."""
    try:
        from google.protobuf import text_format
        from tritonclient.grpc import model_config_pb2
    except ImportError as exc:
        raise ImportError("checking Triton configs needs tritonclient: pip install 'tritonclient[grpc]'") from exc
    return text_format.Parse(Path(path).read_text(), model_config_pb2.ModelConfig())


__all__ = ["export_triton", "triton_config", "parse_triton_config", "MANIFEST"]
