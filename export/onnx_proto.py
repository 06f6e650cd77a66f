"""ONNX protobuf plumbing of the export: ``torch.onnx.export`` into a graph whose initializers
keep stable names, graph edits (renames, output shapes, Gemm for transposed SPM weights), saving
with streamed external data, and overwriting initializers in place.

Split from ``spm_rt.export.onnx``; onnx itself is imported only when a function here runs.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

from spm_rt.formats import SPMFormatError

# protobuf cannot serialize a message over 2 GiB; keep a margin for the graph itself
_EXTERNAL_DATA_BYTES = 1_900_000_000
_ONNX_ELEM = {1: "float32", 10: "float16", 16: "bfloat16", 6: "int32", 7: "int64", 11: "float64", 9: "bool"}


def _require_onnx():
    try:
        import onnx  # noqa: F401
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("ONNX export needs onnx (and onnxruntime to run the graphs): "
                          "pip install 'spm_rt[export]'") from exc
    return onnx


def _rename_in_graph(graph, mapping: dict[str, str]) -> None:
    for init in graph.initializer:
        if init.name in mapping:
            init.name = mapping[init.name]
    for vi in list(graph.input) + list(graph.output) + list(graph.value_info):
        if vi.name in mapping:
            vi.name = mapping[vi.name]
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in mapping:
                node.input[i] = mapping[name]
        for i, name in enumerate(node.output):  # the exporter emits a few parameters as Constant nodes
            if name in mapping:
                node.output[i] = mapping[name]
        for attr in node.attribute:  # subgraphs (If/Loop) see outer names too
            if attr.g is not None and attr.g.ByteSize():
                _rename_in_graph(attr.g, mapping)
            for g in attr.graphs:
                _rename_in_graph(g, mapping)


def _gemm_for_transposed_weights(graph, prefix: str) -> int:
    """Rewrite ``MatMul(A, Transpose(W))`` into ``Gemm(A, W, transB=1)`` for initializers named
    ``prefix*``. The TorchScript exporter lowers ``F.linear`` to an explicit Transpose of the
    weight; with constant folding off that node would sit between the named SPM tensor and its
    consumer (TensorRT refits a weight by name most reliably when it feeds the op directly).
    Only the SPM branch is rewritten, where ``_SPMExportLayer`` guarantees A is 2-D."""
    from onnx import helper

    inits = {i.name for i in graph.initializer}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    drop, rewrites = [], 0
    for node in graph.node:
        if node.op_type != "Transpose" or not node.input[0].startswith(prefix) or node.input[0] not in inits:
            continue
        perm = [list(a.ints) for a in node.attribute if a.name == "perm"]
        if perm and perm[0] != [1, 0]:
            continue
        users = consumers.get(node.output[0], [])

        def plain_b(u):  # the transposed weight is B of a MatMul, or of a Gemm without transB
            if list(u.input).index(node.output[0]) != 1:
                return False
            if u.op_type == "MatMul":
                return True
            attrs = {a.name: a for a in u.attribute}
            return (u.op_type == "Gemm" and "transA" not in attrs or attrs["transA"].i == 0) and \
                ("transB" not in attrs or attrs["transB"].i == 0)

        if not users or not all(plain_b(u) for u in users):
            continue
        for mm in users:
            attrs = {a.name: helper.get_attribute_value(a) for a in mm.attribute if a.name in ("alpha", "beta")}
            gemm = helper.make_node("Gemm", [mm.input[0], node.input[0], *mm.input[2:]], list(mm.output),
                                    name=mm.name + "_gemm", transB=1, **attrs)
            mm.CopyFrom(gemm)
            rewrites += 1
        drop.append(node)
    for node in drop:
        graph.node.remove(node)
    return rewrites


def _io_spec(graph) -> tuple[list[dict], list[dict]]:
    inits = {i.name for i in graph.initializer}

    def spec(vi):
        dims = [d.dim_param if d.dim_param else int(d.dim_value) for d in vi.type.tensor_type.shape.dim]
        return {"name": vi.name, "shape": dims, "dtype": _ONNX_ELEM.get(vi.type.tensor_type.elem_type, "?")}

    return [spec(v) for v in graph.input if v.name not in inits], [spec(v) for v in graph.output]


def _tensor_bytes(init, src_dir: Path) -> bytes | None:
    """The raw bytes of an initializer, inline or in an external file (None: typed fields)."""
    if init.data_location == 1:  # TensorProto.EXTERNAL
        info = {e.key: e.value for e in init.external_data}
        with open(src_dir / info["location"], "rb") as fh:
            fh.seek(int(info.get("offset", 0)))
            length = info.get("length")
            return fh.read(int(length)) if length is not None else fh.read()
    return init.raw_data if init.HasField("raw_data") else None


def _save_with_external_data(model, src_dir: Path, path: Path, threshold: int = 1024) -> str:
    """Save ``model`` with every tensor of ``threshold`` bytes or more in one data file beside it,
    streaming tensor by tensor (from ``src_dir`` where they are external already), so a graph of any
    size is written without holding all its weights in memory. Offsets are page-aligned (mmap)."""
    onnx = _require_onnx()
    location = path.name + "_data"
    align = 4096
    offset = 0
    with open(path.with_name(location), "wb") as out:
        for init in model.graph.initializer:
            data = _tensor_bytes(init, src_dir)
            if data is None or (init.data_location != 1 and len(data) < threshold):
                continue
            pad = -offset % align
            out.write(b"\0" * pad)
            offset += pad
            out.write(data)
            del init.external_data[:]
            init.ClearField("raw_data")
            init.data_location = onnx.TensorProto.EXTERNAL
            for key, value in (("location", location), ("offset", str(offset)), ("length", str(len(data)))):
                entry = init.external_data.add()
                entry.key, entry.value = key, value
            offset += len(data)
    onnx.save_model(model, str(path))
    return location


def _export_graph(module: nn.Module, args: tuple, path: Path, *, input_names, output_names, dynamic_axes,
                  opset: int, rename: dict[str, str], external_data: bool | None,
                  output_shapes: dict[str, list] | None = None) -> dict:
    """torch.onnx (TorchScript exporter) -> graph edits (names, inputs, output shapes, Gemm) ->
    save, with one external data file when the weights pass 2 GB (as diffusers does) or when asked
    -> graph spec for the manifest. Weights are never loaded into the ONNX proto as a whole: for
    large graphs they stream from the exporter's files into the final data file."""
    onnx = _require_onnx()
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in (path, path.with_name(path.name + "_data")):
        stale.unlink(missing_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        tmp_dir = Path(tmp)
        tmp_path = tmp_dir / "model.onnx"
        with torch.no_grad():
            torch.onnx.export(
                module, args, str(tmp_path), input_names=input_names, output_names=output_names,
                dynamic_axes=dynamic_axes, opset_version=opset, do_constant_folding=False, dynamo=False,
                # True skips the exporter's value-based de-duplication of initializers, which would
                # merge equal tensors (e.g. every module's SPM scale) under one name
                keep_initializers_as_inputs=True,
            )
        model = onnx.load(str(tmp_path), load_external_data=False)
        # ...but initializers listed as graph inputs read as overridable to runtimes, which then
        # skip constant folding: drop them from the inputs again
        init_names = {i.name for i in model.graph.initializer}
        kept = [v for v in model.graph.input if v.name not in init_names]
        del model.graph.input[:]
        model.graph.input.extend(kept)
        _rename_in_graph(model.graph, rename)
        for out in model.graph.output:  # the exporter invents names like "Castprompt_embeds_dim_1"
            dims = (output_shapes or {}).get(out.name)
            if dims is not None:
                shape = out.type.tensor_type.shape
                del shape.dim[:]
                for d in dims:
                    if isinstance(d, str):
                        shape.dim.add().dim_param = d
                    else:
                        shape.dim.add().dim_value = int(d)
        _gemm_for_transposed_weights(model.graph, "spm.")
        exported_external = any(i.data_location == onnx.TensorProto.EXTERNAL for i in model.graph.initializer)
        weight_bytes = sum(int({e.key: e.value for e in i.external_data}.get("length", 0)) or len(i.raw_data)
                           for i in model.graph.initializer)
        if exported_external and external_data is False:
            raise ValueError(f"{path}: the weights ({weight_bytes / 1e9:.1f} GB) pass protobuf's 2 GB limit; "
                             "they need external data (external_data=None or True)")
        use_external = external_data if external_data is not None else (
            exported_external or weight_bytes > _EXTERNAL_DATA_BYTES)
        if use_external:
            _save_with_external_data(model, tmp_dir, path)
        else:
            onnx.save_model(model, str(path))
    inputs, outputs = _io_spec(model.graph)
    return {"file": path.name, "external_data": (path.name + "_data") if use_external else None,
            "inputs": inputs, "outputs": outputs, "initializer_bytes": weight_bytes}


def _replace_initializers(path: Path, arrays: dict[str, np.ndarray], *, skip_absent: bool = False) -> None:
    """Overwrite initializers of the graph at ``path`` with same-shaped data: in place in the
    external data file for external tensors (no full load, whatever the graph's size), in the graph
    proto for inline ones."""
    onnx = _require_onnx()
    from onnx import helper, numpy_helper

    model = onnx.load(str(path), load_external_data=False)
    by_name = {init.name: init for init in model.graph.initializer}
    if skip_absent:  # e.g. the token tensors of a clipcos-only graph: the exporter dropped them as unused
        arrays = {n: a for n, a in arrays.items() if n in by_name}
    missing = [n for n in arrays if n not in by_name]
    if missing:
        raise SPMFormatError(f"{path}: no initializer named {missing[:3]} (was the graph exported by this version?)")
    graph_changed = False
    for name, arr in arrays.items():
        init = by_name[name]
        if tuple(init.dims) != tuple(arr.shape):
            raise SPMFormatError(f"{path}: initializer {name} has shape {list(init.dims)}, new data {list(arr.shape)}")
        data = np.ascontiguousarray(np.asarray(arr).astype(helper.tensor_dtype_to_np_dtype(init.data_type)))
        if init.data_location == onnx.TensorProto.EXTERNAL:
            info = {e.key: e.value for e in init.external_data}
            raw = data.tobytes()
            if int(info.get("length", len(raw))) != len(raw):
                raise SPMFormatError(f"{path}: initializer {name} holds {info['length']} bytes, new data {len(raw)}")
            with open(path.parent / info["location"], "r+b") as fh:
                fh.seek(int(info.get("offset", 0)))
                fh.write(raw)
        else:
            init.CopyFrom(numpy_helper.from_array(data, name))
            graph_changed = True
    if graph_changed:
        tmp = path.with_name(path.name + ".tmp")
        onnx.save_model(model, str(tmp))
        os.replace(tmp, path)
