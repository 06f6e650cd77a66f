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

This module holds :func:`export_onnx` and :func:`check_onnx` and re-exports the public names of
the modules beside it: ``onnx_graphs`` (the torch modules that are traced), ``onnx_proto``
(protobuf edits, saving, in-place initializer writes), ``onnx_manifest`` (``manifest.json``) and
``onnx_spms`` (swapping the SPM set of an exported folder).
"""
from __future__ import annotations

import copy
import os
import tempfile
from pathlib import Path

import torch
from torch import nn

from spm_rt.export.onnx_graphs import (_FoldedLayer, _GateInput, _is_sdxl, _padded, _SPMExportLayer, _swapped,
                                       _TextGraph, _Transport, _UNetGraph, _VAEDecoderGraph, _concept_tensors)
from spm_rt.export.onnx_manifest import (FORMAT_VERSION, MANIFEST, _dtype_name, _versions,  # noqa: F401
                                         _write_manifest, read_manifest)
from spm_rt.export.onnx_proto import _export_graph, _require_onnx
from spm_rt.export.onnx_spms import concept_initializers, set_onnx_spms, spm_initializers  # noqa: F401
from spm_rt.formats import adapted_modules, module_shape
from spm_rt.kernels.reference import COMBINES, merged_weight_ref  # noqa: F401 (COMBINES is re-exported)
from spm_rt.stack import stack_spms
from spm_rt.transport import METRICS, encode_prompts  # noqa: F401 (METRICS is re-exported)

GATES_MODES = ("input", "folded", "none")
COMPONENTS = ("text_encoder", "unet", "vae_decoder")
MIN_OPSET = 17


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


__all__ = ["export_onnx", "check_onnx", "read_manifest", "set_onnx_spms", "spm_initializers",
           "concept_initializers", "GATES_MODES", "COMPONENTS", "MANIFEST", "METRICS", "COMBINES"]
