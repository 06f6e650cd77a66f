"""What can be checked of TensorRT without a GPU: every exported graph through TensorRT's ONNX parser,
the parsed network's inputs, outputs and dynamic axes against the manifest, and the engine
configuration ``spm-rt export engine`` would build with (optimization profile, per-weight refit:
exactly the SPM tensors marked refittable, the gates an engine input). Only the engine build and
anything run on the engine need a GPU.

TensorRT itself is imported by :mod:`spm_rt.export.trt` only (``tensorrt``, or TensorRT for RTX's
``tensorrt_rtx``, whose builder and parser work without a GPU).
"""
from __future__ import annotations

import os
from pathlib import Path

from spm_rt.export.onnx import read_manifest
from spm_rt.export.trt import (Shapes, default_shapes, engine_config, graph_profiles, import_tensorrt, parse_shapes,
                               parse_onnx, refittable_names)

# manifest dtype names -> TensorRT DataType member names
_TRT_TYPES = {"float32": "FLOAT", "float16": "HALF", "bfloat16": "BF16", "int32": "INT32", "int64": "INT64",
              "bool": "BOOL"}


def _tensor_spec(tensor) -> dict:
    return {"name": tensor.name, "shape": [int(d) for d in tensor.shape], "dtype": tensor.dtype.name}


def network_io(network) -> tuple[list[dict], list[dict]]:
    """Inputs and outputs of a TensorRT network definition: name, shape (-1 = dynamic), dtype name."""
    return ([_tensor_spec(network.get_input(i)) for i in range(network.num_inputs)],
            [_tensor_spec(network.get_output(i)) for i in range(network.num_outputs)])


def _compare(kind: str, expected: list[dict], got: list[dict]) -> list[str]:
    """Mismatches between the manifest's specs and the network's. A symbolic manifest axis must be
    dynamic (-1) in the network; a fixed one must be that size (or -1 for an output whose size
    TensorRT only knows at run time)."""
    problems = []
    if [e["name"] for e in expected] != [g["name"] for g in got]:
        return [f"{kind} names: manifest {[e['name'] for e in expected]}, network {[g['name'] for g in got]}"]
    for e, g in zip(expected, got):
        if len(e["shape"]) != len(g["shape"]):
            problems.append(f"{kind} {e['name']}: manifest shape {e['shape']}, network {g['shape']}")
            continue
        for axis, (want, have) in enumerate(zip(e["shape"], g["shape"])):
            if isinstance(want, str) and have != -1:
                problems.append(f"{kind} {e['name']} axis {axis} ({want!r}) should be dynamic, network has {have}")
            elif isinstance(want, int) and have != want and not (kind == "output" and have == -1):
                problems.append(f"{kind} {e['name']} axis {axis}: manifest {want}, network {have}")
        trt_type = _TRT_TYPES.get(e["dtype"])
        if trt_type is not None and g["dtype"] != trt_type:
            problems.append(f"{kind} {e['name']}: manifest dtype {e['dtype']}, network {g['dtype']}")
    return problems


def _initializer_names(onnx_path: Path) -> list[str]:
    import onnx

    return [i.name for i in onnx.load(str(onnx_path), load_external_data=False).graph.initializer]


def check_tensorrt(onnx_dir: str | os.PathLike, *, shapes: Shapes | str | None = None,
                   graphs: tuple[str, ...] | None = None, refittable: bool = True,
                   preferred: str | None = None) -> dict[str, dict]:
    """Parse every graph of an exported folder with TensorRT's ONNX parser (no GPU needed) and check:

    * the parser reports no error (every node and shape supported);
    * the network's inputs and outputs are the manifest's, in order, with the manifest's dtypes, and
      exactly the manifest's symbolic axes dynamic (-1);
    * the engine configuration builds: the optimization profile of ``shapes`` (default
      :func:`~spm_rt.export.trt.default_shapes`) is accepted for every input; with ``refittable``
      (as ``spm-rt export engine --refittable``), per-weight refit marks exactly the SPM
      initializers (``spm.*`` of a gates-input UNet, ``transport.*`` of the text encoder) and no
      base weight.

    Returns per graph: inputs, outputs, layer count, the marked weights and the TensorRT module.
    Raises ``RuntimeError`` listing every problem.

    Example::

        >>> report = check_tensorrt("out/onnx")  # doctest: +SKIP
        >>> report["unet"]["inputs"][-1]  # doctest: +SKIP
        {'name': 'gates', 'shape': [-1, 4], 'dtype': 'FLOAT'}
    """
    trt = import_tensorrt(preferred)
    root = Path(onnx_dir)
    manifest = read_manifest(root)
    if isinstance(shapes, str):
        shapes = parse_shapes(shapes)
    shapes = shapes or default_shapes(manifest)
    report, problems = {}, []
    for name in graphs or tuple(manifest["graphs"]):
        spec = manifest["graphs"].get(name)
        if spec is None:
            raise ValueError(f"{onnx_dir} has no {name} graph (it has {list(manifest['graphs'])})")
        path = root / spec["file"]
        try:
            builder, network, parser, _ = parse_onnx(path, trt=trt)
        except RuntimeError as exc:
            problems.append(str(exc))
            continue
        inputs, outputs = network_io(network)
        found = _compare("input", spec["inputs"], inputs) + _compare("output", spec["outputs"], outputs)
        wanted = refittable_names(manifest, name) if refittable else []
        initializers = _initializer_names(path)
        present = set(initializers)
        wanted = [n for n in wanted if n in present]  # e.g. token tensors a clipcos-only graph dropped
        marked: list[str] = []
        try:
            engine_config(builder, network, graph_profiles(manifest, name, shapes), refittable=bool(wanted),
                          refit_names=wanted, trt=trt)
        except (RuntimeError, ValueError, TypeError) as exc:
            found.append(f"engine configuration: {exc}")
        else:
            if wanted:
                marked = [n for n in initializers if network.are_weights_marked_refittable(n)]
                if sorted(marked) != sorted(wanted):
                    extra = sorted(set(marked) - set(wanted))
                    missing = sorted(set(wanted) - set(marked))
                    found.append(f"refittable weights: {len(marked)} marked, {len(wanted)} wanted "
                                 f"(extra {extra[:3]}, missing {missing[:3]})")
        if name == "unet" and manifest["gates_mode"] == "input" and "gates" not in [i["name"] for i in inputs]:
            found.append("the gates-input UNet network has no gates input")
        problems += [f"{spec['file']}: {p}" for p in found]
        report[name] = {"file": spec["file"], "inputs": inputs, "outputs": outputs, "layers": network.num_layers,
                        "refittable": marked, "tensorrt": f"{trt.__name__} {trt.__version__}"}
        del parser, network, builder
    if problems:
        raise RuntimeError(f"{onnx_dir}: TensorRT check failed:\n  " + "\n  ".join(problems))
    return report


__all__ = ["check_tensorrt", "network_io"]
