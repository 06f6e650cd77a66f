"""ONNX graphs of an SPM-patched Stable Diffusion pipeline, and the manifest that describes them.

``export_onnx(rt, out_dir)`` writes, in the layout diffusers' ONNX exporter uses::

    out_dir/manifest.json             concepts in gate order, combine mode, IO names/shapes, versions
    out_dir/unet/model.onnx           sample, timestep, encoder_hidden_states[, text_embeds, time_ids][, gates]
                                      -> out_sample
    out_dir/text_encoder/model.onnx   input_ids[, input_ids_2] -> prompt_embeds, gates[, pooled_prompt_embeds]
    out_dir/vae_decoder/model.onnx    latent_sample -> sample
    out_dir/scheduler/, tokenizer/[, tokenizer_2/]   so a runner needs only the folder

UNet graph modes (``gates=``):

* ``"input"``: the graph takes ``gates [batch, k_max]`` float32, **one row per UNet batch row**
  (with classifier-free guidance the runner passes ``[g; g]``: the prompt's gates on its
  unconditional and its conditional row, as the PyTorch runtime does). Every adapted module's
  stacked SPM tensors (the one layout of ``spm_rt.stack``) are initializers with stable names::

      spm.<module path>.down    [k_max*r, in]
      spm.<module path>.up      [out, k_max*r]
      spm.<module path>.scale   [k_max] float32

  They feed Gemm (transB=1), MatMul and Mul nodes directly, never through a Transpose or a folded
  constant, so they can be swapped in the file (:func:`set_onnx_spms`) or refit in a TensorRT engine
  by name without re-export. Gate columns >= the number of SPMs are padding (zero tensors): any
  value there has no effect.
* ``"folded"``: the SPMs merged into the adapted weights for one fixed gate vector; same structure
  (and initializer names) as the base UNet.
* ``"none"``: the base UNet without SPMs (the reference for benchmarks).

Base-model initializers keep the diffusers state-dict names (``down_blocks.0...to_q.weight``);
constant folding is off at export so no weight hides behind an anonymous folded constant (ONNX
Runtime and TensorRT fold constants themselves when they load the graph).

The text-encoder graph computes Facilitated Transport (``spm_rt.transport``) itself: clipcos
(cosine of the flattened ``[77, d]`` prompt embeddings with each concept's, in float32),
tokenuni (share of each concept's token set present in the ids, by equality broadcasting),
their max, and the max over each SPM's concepts; gates of padding SPM slots are 0. Its concept
tensors are initializers too (``transport.concept_embeddings [c_max, 77*d]``,
``transport.concept_tokens [c_max, 77]`` int32 padded with -1, ``transport.concept_token_counts
[c_max]``, ``transport.concept_owner [k_max, c_max]``, ``transport.fixed_gates [k_max]``).
"""
from __future__ import annotations

import contextlib
import copy
import json
import os
import tempfile
import types
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from spm_rt.compile import load_spms
from spm_rt.formats import SPM, SPMFormatError, adapted_modules, module_shape, resolve
from spm_rt.kernels.reference import COMBINES, gate_coefficients, merged_weight_ref
from spm_rt.stack import Stack, stack_spms
from spm_rt.transport import METRICS, encode_prompts, token_sets

GATES_MODES = ("input", "folded", "none")
COMPONENTS = ("text_encoder", "unet", "vae_decoder")
MANIFEST = "manifest.json"
FORMAT_VERSION = 1
MIN_OPSET = 17
# protobuf cannot serialize a message over 2 GiB; keep a margin for the graph itself
_EXTERNAL_DATA_BYTES = 1_900_000_000
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_ONNX_ELEM = {1: "float32", 10: "float16", 16: "bfloat16", 6: "int32", 7: "int64", 11: "float64", 9: "bool"}


def _require_onnx():
    try:
        import onnx  # noqa: F401
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("ONNX export needs onnx (and onnxruntime to run the graphs): "
                          "pip install 'spm_rt[export]'") from exc
    return onnx


def _is_sdxl(pipe) -> bool:
    return getattr(pipe, "text_encoder_2", None) is not None


def _dtype_name(dtype: torch.dtype) -> str:
    for name, d in _DTYPES.items():
        if d == dtype:
            return name
    raise ValueError(f"dtype must be one of {list(_DTYPES)}, got {dtype}")


# ---------------------------------------------------------------------------------------------
# SPM tensors in the stacked layout, padded to (k_max, rank)

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


# ---------------------------------------------------------------------------------------------
# graph modules

class _SPMExportLayer(nn.Module):
    """Stands in for one adapted module during export: the original module plus the padded stack
    as parameters (so they leave the exporter as named initializers). Computes exactly
    ``spm_rt.functional``'s gated op, written so the SPM tensors feed Gemm/MatMul/Mul directly."""

    def __init__(self, base: nn.Module, stack: Stack, combine: str, gate_input: "_GateInput"):
        super().__init__()
        self.base = base
        self.gate_input = gate_input  # the graph's ``gates`` input, set by _UNetGraph.forward
        self.down = nn.Parameter(stack.down.detach().clone(), requires_grad=False)  # [K*r, in]
        self.up = nn.Parameter(stack.up.detach().clone(), requires_grad=False)  # [out, K*r]
        self.scale = nn.Parameter(stack.scale.detach().clone(), requires_grad=False)  # [K] float32
        self.rank = stack.rank
        self.k = stack.num_spms
        self.combine = combine
        self.conv = isinstance(base, nn.Conv2d)
        self.out_features, self.in_features = int(stack.up.shape[0]), int(stack.down.shape[1])

    def _coefficients(self, z: torch.Tensor, gates: torch.Tensor, k_axis: int) -> torch.Tensor:
        # z: K on axis k_axis, rank on k_axis + 1; gates [N, K] float32. The runtime's own gating
        # function (elementwise Mul/ReduceSum only: the scale initializer feeds a Mul directly)
        return gate_coefficients(z, gates, self.scale, self.combine, k_axis)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        gates = self.gate_input.gates  # [N, K] float32: the graph input, one row per UNet batch row
        n, kr = x.shape[0], self.k * self.rank
        if self.conv:  # x [N, in, H, W]
            z = torch.matmul(self.down, x.flatten(2))  # [N, K*r, HW]
            c = self._coefficients(z.unflatten(1, (self.k, self.rank)), gates, 1).flatten(1, 2)
            return y + torch.matmul(self.up, c).reshape_as(y)  # [N, out, HW] -> NCHW
        # feature sizes as Python ints: constant Reshape targets, no Shape/Gather/Concat per module
        z = F.linear(x.reshape(-1, self.in_features), self.down)  # [M, K*r] (Gemm, transB)
        c = self._coefficients(z.reshape(n, -1, self.k, self.rank), gates, 2).reshape(-1, kr)
        # one Gemm (transB) adds the branch to the base output in place of a separate Add pass over
        # [M, out]; reshape_as exports as Reshape(.., Shape(y)) instead of rebuilding y's shape
        # from gathered dims (8 small nodes per module)
        return torch.addmm(y.reshape(-1, self.out_features), c, self.up.t()).reshape_as(y)  # [M, out] -> y's shape


def _padded(gates: torch.Tensor, k: int) -> torch.Tensor:
    """A gate vector [K] padded with zeros to the runtime's k slots."""
    return torch.cat([gates, gates.new_zeros(k - gates.shape[0])])


class _FoldedLayer(nn.Module):
    """An adapted module with the merged weight (base weight + SPM update for fixed gates)."""

    def __init__(self, base: nn.Module, merged: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(merged, requires_grad=False)
        self.bias = base.bias
        self.conv = isinstance(base, nn.Conv2d)

    def forward(self, x):
        return F.conv2d(x, self.weight, self.bias) if self.conv else F.linear(x, self.weight, self.bias)


class _GateInput:
    """Hands the UNet graph's ``gates`` input to every _SPMExportLayer during tracing."""

    gates: torch.Tensor | None = None


class _UNetGraph(nn.Module):
    def __init__(self, unet: nn.Module, sdxl: bool, gate_input: _GateInput | None):
        super().__init__()
        self.unet = unet
        self.sdxl = sdxl
        self.gate_input = gate_input

    def forward(self, sample, timestep, encoder_hidden_states, *rest):
        added = None
        if self.sdxl:
            added = {"text_embeds": rest[0], "time_ids": rest[1]}
            rest = rest[2:]
        if self.gate_input is not None:
            self.gate_input.gates = rest[0]
        try:
            return self.unet(sample, timestep, encoder_hidden_states, added_cond_kwargs=added, return_dict=False)[0]
        finally:
            if self.gate_input is not None:
                self.gate_input.gates = None


class _Transport(nn.Module):
    """Facilitated Transport on tensors, with the concepts as buffers."""

    def __init__(self, metric: str, concept_embeddings, concept_tokens, counts, owner, fixed_gates):
        super().__init__()
        self.metric = metric  # one of METRICS, or "fixed"
        self.register_buffer("concept_embeddings", concept_embeddings)  # [C, 77*d] normalized
        self.register_buffer("concept_tokens", concept_tokens)  # [C, T] int32, -1 = padding
        self.register_buffer("concept_token_counts", counts)  # [C] float32, |T_c|
        self.register_buffer("concept_owner", owner)  # [K, C] float32 one-hot: SPM k owns concept c
        self.register_buffer("fixed_gates", fixed_gates)  # [K] float32

    def forward(self, prompt_embeds, input_ids):
        b = input_ids.shape[0]
        if self.metric == "fixed":
            return self.fixed_gates.unsqueeze(0).expand(b, -1) + 0.0
        scores = None
        if self.metric in ("clipcos", "clipcos_tokenuni"):
            e = prompt_embeds.float().reshape(b, -1)
            e = e / torch.linalg.vector_norm(e, dim=1, keepdim=True).clamp_min(1e-12)
            scores = F.linear(e, self.concept_embeddings.float())  # [B, C]
        if self.metric in ("tokenuni", "clipcos_tokenuni"):
            hit = input_ids[:, None, None, :] == self.concept_tokens[None, :, :, None]  # [B, C, T, 77]
            present = hit.to(torch.float32).amax(dim=3)  # [B, C, T]
            uni = present.sum(dim=2) / self.concept_token_counts.clamp_min(1.0)  # [B, C]
            scores = uni if scores is None else torch.maximum(scores, uni)
        owned = self.concept_owner[None] > 0  # [1, K, C]
        per_spm = torch.where(owned, scores[:, None, :], torch.full_like(scores[:, None, :], float("-inf")))
        gates = per_spm.amax(dim=2)  # [B, K]
        active = self.concept_owner.amax(dim=1) > 0  # [K]: padding slots own no concept
        return torch.where(active[None], gates, torch.zeros_like(gates))


class _TextGraph(nn.Module):
    def __init__(self, pipe, transport: _Transport):
        super().__init__()
        self.sdxl = _is_sdxl(pipe)
        self.text_encoder = pipe.text_encoder
        if self.sdxl:
            self.text_encoder_2 = pipe.text_encoder_2
        self.transport = transport

    def forward(self, input_ids, input_ids_2=None):
        if not self.sdxl:  # StableDiffusionPipeline.encode_prompt: the last hidden state
            emb = self.text_encoder(input_ids)[0]
            return emb, self.transport(emb, input_ids)
        # StableDiffusionXLPipeline.encode_prompt: penultimate hidden states of both encoders,
        # concatenated; pooled output of encoder 2
        h1 = self.text_encoder(input_ids, output_hidden_states=True).hidden_states[-2]
        out2 = self.text_encoder_2(input_ids_2, output_hidden_states=True)
        emb = torch.cat([h1, out2.hidden_states[-2].to(h1.dtype)], dim=-1)
        return emb, self.transport(emb, input_ids), out2[0]


class _VAEDecoderGraph(nn.Module):
    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, latent_sample):
        return self.vae.decode(latent_sample, return_dict=False)[0]


# ---------------------------------------------------------------------------------------------
# export plumbing

@contextlib.contextmanager
def _swapped(root: nn.Module, replacements: dict[str, nn.Module]):
    """Temporarily set root.<path> = module for each entry; always restored."""
    old = {}
    try:
        for path, mod in replacements.items():
            parent_path, _, name = path.rpartition(".")
            parent = root.get_submodule(parent_path) if parent_path else root
            old[path] = (parent, name, getattr(parent, name))
            setattr(parent, name, mod)
        yield
    finally:
        for parent, name, mod in old.values():
            setattr(parent, name, mod)


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


def _concept_tensors(tokenizer, concepts: list[list[str]], k_max: int, c_max: int, emb_fn) -> dict[str, torch.Tensor]:
    """Concept initializers for the text-encoder graph (``emb_fn(names) -> [C, 77, d]``)."""
    flat = [c for names in concepts for c in names]
    if len(flat) > c_max:
        raise ValueError(f"{len(flat)} concepts do not fit concepts_max={c_max}")
    length = tokenizer.model_max_length
    tokens = torch.full((c_max, length), -1, dtype=torch.int32)
    counts = torch.zeros(c_max, dtype=torch.float32)
    for j, ids in enumerate(token_sets(tokenizer, flat) if flat else []):
        ids = sorted(ids)
        tokens[j, : len(ids)] = torch.tensor(ids, dtype=torch.int32)
        counts[j] = len(ids)
    owner = torch.zeros(k_max, c_max, dtype=torch.float32)
    j = 0
    for k, names in enumerate(concepts):
        for _ in names:
            owner[k, j] = 1.0
            j += 1
    emb = None
    if flat:
        e = emb_fn(flat).double().reshape(len(flat), -1)
        e = e / e.norm(dim=1, keepdim=True).clamp_min(1e-12)  # as spm_rt.transport normalizes
        emb = torch.zeros(c_max, e.shape[1], dtype=torch.float32)
        emb[: len(flat)] = e.float()
    return {"concept_embeddings": emb, "concept_tokens": tokens, "concept_token_counts": counts,
            "concept_owner": owner}


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


# ---------------------------------------------------------------------------------------------
# public API

def export_onnx(
    rt,
    out_dir: str | os.PathLike,
    *,
    gates: str = "input",
    k_max: int | None = None,
    concepts_max: int | None = None,
    folded_gates=None,
    opset: int = MIN_OPSET,
    dtype: torch.dtype | None = None,
    components: tuple[str, ...] = COMPONENTS,
    external_data: bool | None = None,
    check: bool = True,
) -> dict:
    """Export a compiled pipeline (:func:`spm_rt.compile`) to ONNX graphs in ``out_dir``; returns the
    manifest (also written to ``out_dir/manifest.json``).

    gates:         "input" (gates [batch, k_max] are a graph input, one row per UNet batch row;
                   SPM tensors are named initializers), "folded" (SPMs merged into the weights for
                   ``folded_gates``, default the pipeline's fixed gates or ones) or "none" (base UNet).
    k_max:         pad K to this many SPM slots (default: the pipeline's K), so one graph serves
                   any set of up to k_max SPMs of the exported rank.
    concepts_max:  concept slots in the text-encoder graph (default max(#concepts, k_max)).
    opset:         >= 17. dtype: float32 or float16 (default: the UNet's; another dtype exports a
                   converted copy of each component, one at a time; the text encoder stays float32).
    components:    any of "text_encoder", "unet", "vae_decoder".
    external_data: None = only for graphs whose weights pass 2 GB; True/False forces it.

    Batch, height and width are symbolic axes (``batch``, ``height``, ``width``; ``sequence`` for
    the text length of the UNet's conditioning). The pipeline is patched back exactly as it was.
    Do not run the pipeline from another thread during the export (its modules are swapped).

    Example::

        >>> import spm_rt
        >>> from spm_rt.export import export_onnx
        >>> rt = spm_rt.compile(pipe, ["snoopy.safetensors"])  # doctest: +SKIP
        >>> manifest = export_onnx(rt, "out/onnx", gates="input", k_max=4)  # doctest: +SKIP
        >>> manifest["graphs"]["unet"]["inputs"][-1]  # doctest: +SKIP
        {'name': 'gates', 'shape': ['batch', 4], 'dtype': 'float32'}
    """
    _require_onnx()
    if gates not in GATES_MODES:
        raise ValueError(f"gates must be one of {GATES_MODES}, got {gates!r}")
    if opset < MIN_OPSET:
        raise ValueError(f"opset must be >= {MIN_OPSET}, got {opset}")
    unknown = set(components) - set(COMPONENTS)
    if unknown or not components:
        raise ValueError(f"components must be a non-empty subset of {COMPONENTS}, got {components}")
    if getattr(rt, "pipe", None) is None or not getattr(rt, "layers", None):
        raise ValueError("export_onnx needs a live SPMPipeline (spm_rt.compile(pipe, spms))")
    pipe = rt.pipe
    sdxl = _is_sdxl(pipe)
    unet = pipe.unet
    dtype = dtype or unet.dtype
    dtype_name = _dtype_name(dtype)
    if dtype == torch.bfloat16:
        raise ValueError("dtype=bfloat16 is not exported: ONNX Conv has no bfloat16 type at opset 17 (the checker "
                         "rejects the graph). Export float32 and build the TensorRT engine with --bf16 instead.")
    k = rt.num_spms
    k_max = k if k_max is None else int(k_max)
    if k_max < k:
        raise ValueError(f"k_max={k_max} is smaller than the pipeline's {k} SPMs")
    rank = max(layer.rank for layer in rt.layers.values())
    combine = rt.layer_config.combine
    transport_metric = rt.transport.metric if rt.transport is not None else "fixed"
    fixed = rt.config.fixed_gates
    if gates == "folded":
        fixed = list(folded_gates) if folded_gates is not None else (fixed or [1.0] * k)
        transport_metric = "fixed"  # the UNet ignores gates: the text graph reports the folded ones
    if transport_metric == "fixed" and fixed is None:
        fixed = [1.0] * k  # what SPMPipeline.gates uses without fixed_gates
    if fixed is not None and len(fixed) != k:
        raise ValueError(f"{len(fixed)} fixed gates for {k} SPMs")
    concepts = [list(c) if c else [] for c in rt.concepts]
    n_concepts = sum(len(c) for c in concepts)
    c_max = max(n_concepts, k_max) if concepts_max is None else int(concepts_max)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    graphs: dict[str, dict] = {}
    modules = adapted_modules(unet)  # path -> original module

    def converted(module: nn.Module) -> nn.Module:
        current = next(p.dtype for p in module.parameters() if p.is_floating_point())
        return module if current == dtype else copy.deepcopy(module).to(dtype)

    # -- UNet ----------------------------------------------------------------------------------
    if "unet" in components:
        size = unet.config.sample_size
        size = size if isinstance(size, int) else size[0]
        rows = 2
        gen = torch.Generator().manual_seed(0)
        dev = unet.device
        ehs_dim = unet.config.cross_attention_dim
        args = [torch.randn(rows, unet.config.in_channels, size, size, generator=gen),
                torch.tensor([999.0, 500.0]), torch.randn(rows, 77, ehs_dim, generator=gen)]
        names = ["sample", "timestep", "encoder_hidden_states"]
        axes = {"sample": {0: "batch", 2: "height", 3: "width"}, "timestep": {0: "batch"},
                "encoder_hidden_states": {0: "batch", 1: "sequence"},
                "out_sample": {0: "batch", 2: "height", 3: "width"}}
        if sdxl:
            n_time = 6
            text_dim = unet.config.projection_class_embeddings_input_dim - n_time * unet.config.addition_time_embed_dim
            args += [torch.randn(rows, text_dim, generator=gen), torch.tensor([[size * 8.0, size * 8.0, 0, 0, size * 8.0, size * 8.0]] * rows)]
            names += ["text_embeds", "time_ids"]
            axes.update({"text_embeds": {0: "batch"}, "time_ids": {0: "batch"}})
        rename: dict[str, str] = {}
        gate_input = None
        if gates == "input":
            stacks = stack_spms(modules, rt.spms, k_max, rank, combine)
            gate_input = _GateInput()
            replacements = {p: _SPMExportLayer(modules[p], stacks[p], combine, gate_input) for p in modules}
            args.append(torch.rand(rows, k_max, generator=gen))
            names.append("gates")
            axes["gates"] = {0: "batch"}
            for p in modules:
                for part in ("down", "up", "scale"):
                    rename[f"unet.{p}.{part}"] = f"spm.{p}.{part}"
                for part in ("weight", "bias"):
                    rename[f"unet.{p}.base.{part}"] = f"{p}.{part}"
        elif gates == "folded":
            g = torch.tensor(fixed, dtype=torch.float32)
            replacements = {}
            for p, layer in rt.layers.items():
                w = layer.weight
                merged = merged_weight_ref(w.reshape(w.shape[0], -1), layer.spm_down, layer.spm_up, layer.spm_scale,
                                           _padded(g, layer.spm_scale.shape[0]).to(w.device), combine,
                                           layer.rank).view_as(w)
                replacements[p] = _FoldedLayer(layer.base, merged)
        else:
            replacements = dict(modules)  # the original modules: the base UNet
        with _swapped(unet, replacements):
            graph_module = converted(_UNetGraph(unet, sdxl, gate_input).eval())
            for name, _ in graph_module.named_parameters():
                if name.startswith("unet.") and name not in rename:
                    rename[name] = name[len("unet."):]
            for name, _ in graph_module.named_buffers():
                if name.startswith("unet.") and name not in rename:
                    rename[name] = name[len("unet."):]
            # timestep and gates stay float32 whatever the graph's dtype (gate and time precision)
            targs = tuple(a.to(dev, dtype=a.dtype if n in ("timestep", "gates") else dtype)
                          for a, n in zip(args, names))
            graphs["unet"] = _export_graph(graph_module, targs, out / "unet" / "model.onnx", input_names=names,
                                           output_names=["out_sample"], dynamic_axes=axes, opset=opset,
                                           output_shapes={"out_sample": ["batch", unet.config.out_channels,
                                                                         "height", "width"]},
                                           rename=rename, external_data=external_data)
            graphs["unet"]["file"] = "unet/" + graphs["unet"]["file"]
            del graph_module

    # -- text encoder with Facilitated Transport -----------------------------------------------
    if "text_encoder" in components:
        length = pipe.tokenizer.model_max_length
        t = _concept_tensors(pipe.tokenizer, [] if transport_metric == "fixed" else concepts, k_max, c_max,
                             lambda names: encode_prompts(pipe, names))
        if t["concept_embeddings"] is None:  # fixed gates: unused by the graph, any width will do
            t["concept_embeddings"] = torch.zeros(c_max, length * unet.config.cross_attention_dim)
        fixed_t = torch.zeros(k_max)
        if fixed is not None:
            fixed_t[:k] = torch.tensor(fixed, dtype=torch.float32)
        dev = pipe.text_encoder.device
        transport = _Transport(transport_metric, t["concept_embeddings"], t["concept_tokens"],
                               t["concept_token_counts"], t["concept_owner"], fixed_t).to(dev)
        # The text encoder stays float32 whatever ``dtype``: transformers' CLIP upcasts its residual
        # stream, and the TorchScript exporter then emits float32/float16 mixes that fail the checker.
        # It is small next to the UNet; the runner casts its outputs to the UNet's input type.
        graph_module = _TextGraph(pipe, transport).eval()
        if next(graph_module.text_encoder.parameters()).dtype != torch.float32:
            graph_module = copy.deepcopy(graph_module).float()
        ids = torch.tensor(pipe.tokenizer(["a photo", "snoopy"], padding="max_length", max_length=length,
                                          truncation=True).input_ids, dtype=torch.int32, device=dev)
        args, names = (ids,), ["input_ids"]
        outputs = ["prompt_embeds", "gates"]
        out_shapes = {"prompt_embeds": ["batch", length, unet.config.cross_attention_dim], "gates": ["batch", k_max]}
        axes = {"input_ids": {0: "batch"}, "prompt_embeds": {0: "batch"}, "gates": {0: "batch"}}
        if sdxl:
            ids2 = torch.tensor(pipe.tokenizer_2(["a photo", "snoopy"], padding="max_length",
                                                 max_length=pipe.tokenizer_2.model_max_length,
                                                 truncation=True).input_ids, dtype=torch.int32, device=dev)
            args, names = (ids, ids2), ["input_ids", "input_ids_2"]
            outputs.append("pooled_prompt_embeds")
            out_shapes["pooled_prompt_embeds"] = ["batch", pipe.text_encoder_2.config.projection_dim]
            axes.update({"input_ids_2": {0: "batch"}, "pooled_prompt_embeds": {0: "batch"}})
        graphs["text_encoder"] = _export_graph(graph_module, args, out / "text_encoder" / "model.onnx",
                                               input_names=names, output_names=outputs, dynamic_axes=axes,
                                               opset=opset, rename={}, external_data=external_data,
                                               output_shapes=out_shapes)
        graphs["text_encoder"]["file"] = "text_encoder/" + graphs["text_encoder"]["file"]
        del graph_module

    # -- VAE decoder ---------------------------------------------------------------------------
    if "vae_decoder" in components:
        vae = pipe.vae
        graph_module = converted(_VAEDecoderGraph(vae).eval())
        size = unet.config.sample_size
        size = size if isinstance(size, int) else size[0]
        z = torch.randn(1, vae.config.latent_channels, size, size, generator=torch.Generator().manual_seed(1))
        graphs["vae_decoder"] = _export_graph(
            graph_module, (z.to(vae.device, dtype),), out / "vae_decoder" / "model.onnx",
            input_names=["latent_sample"], output_names=["sample"],
            output_shapes={"sample": ["batch", vae.config.out_channels, "image_height", "image_width"]},
            dynamic_axes={"latent_sample": {0: "batch", 2: "height", 3: "width"},
                          "sample": {0: "batch", 2: "height", 3: "width"}},
            opset=opset, rename={}, external_data=external_data)
        graphs["vae_decoder"]["file"] = "vae_decoder/" + graphs["vae_decoder"]["file"]
        del graph_module

    # -- what the runner needs beside the graphs ----------------------------------------------
    pipe.scheduler.save_pretrained(str(out / "scheduler"))
    pipe.tokenizer.save_pretrained(str(out / "tokenizer"))
    if sdxl:
        pipe.tokenizer_2.save_pretrained(str(out / "tokenizer_2"))
    vae_cfg = pipe.vae.config
    size = unet.config.sample_size
    size = size if isinstance(size, int) else size[0]
    manifest = {
        "format": "spm_rt.onnx",
        "format_version": FORMAT_VERSION,
        "arch": "sdxl" if sdxl else "sd",
        "gates_mode": gates,
        "combine": combine,
        "transport": transport_metric,
        "fixed_gates": None if fixed is None else [float(v) for v in fixed],
        "concepts": concepts,
        "spm_names": [s.name for s in rt.spms],
        "num_spms": k,
        "k_max": k_max,
        "rank": rank,
        "concepts_max": c_max,
        "dtype": dtype_name,
        "opset": opset,
        "gates_input": "gates [batch, k_max] float32: one row per UNet batch row; with classifier-free "
                       "guidance the rows are [unconditional; conditional] and both carry the prompt's gates",
        "graphs": graphs,
        "spm_modules": {p: list(module_shape(m)) for p, m in modules.items()},
        "spm_initializer_names": {"down": "spm.{module}.down", "up": "spm.{module}.up",
                                  "scale": "spm.{module}.scale"} if gates == "input" else None,
        "pipeline": {
            "class": type(pipe).__name__,
            "scheduler": "scheduler",
            "tokenizer": "tokenizer",
            "tokenizer_2": "tokenizer_2" if sdxl else None,
            "tokenizer_class": type(pipe.tokenizer).__name__,
            "model_max_length": pipe.tokenizer.model_max_length,
            "unet_sample_size": size,
            "unet_in_channels": unet.config.in_channels,
            "vae_scale_factor": 2 ** (len(vae_cfg.block_out_channels) - 1),
            "vae_scaling_factor": vae_cfg.scaling_factor,
            "vae_shift_factor": getattr(vae_cfg, "shift_factor", None),
            "latents_mean": getattr(vae_cfg, "latents_mean", None),
            "latents_std": getattr(vae_cfg, "latents_std", None),
            "force_zeros_for_empty_prompt": bool(getattr(pipe.config, "force_zeros_for_empty_prompt", False)) if sdxl else False,
            "time_cond_proj_dim": unet.config.time_cond_proj_dim,
        },
        "versions": _versions(),
    }
    _write_manifest(out, manifest)
    if check:
        check_onnx(out)
    return manifest


def check_onnx(onnx_dir: str | os.PathLike) -> list[str]:
    """Run ``onnx.checker`` (full check, by path so external data works) and strict shape
    inference on every graph of an exported folder; returns the checked files.

    Example::

        >>> check_onnx("out/onnx")  # doctest: +SKIP
        ['unet/model.onnx', 'text_encoder/model.onnx', 'vae_decoder/model.onnx']
    """
    onnx = _require_onnx()
    root = Path(onnx_dir)
    manifest = read_manifest(root)
    checked = []
    for spec in manifest["graphs"].values():
        path = root / spec["file"]
        onnx.checker.check_model(str(path), full_check=True)
        with tempfile.TemporaryDirectory() as tmp:
            # infer_shapes_path handles graphs with external data; strict mode raises on conflicts
            onnx.shape_inference.infer_shapes_path(str(path), str(Path(tmp) / "inferred.onnx"), strict_mode=True)
        checked.append(spec["file"])
    return checked


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


__all__ = ["export_onnx", "check_onnx", "read_manifest", "set_onnx_spms", "spm_initializers",
           "concept_initializers", "GATES_MODES", "COMPONENTS", "MANIFEST", "METRICS", "COMBINES"]
