"""spm_rt.export: ONNX graphs against the PyTorch runtime (the oracle), the ONNX Runtime runner,
swapping SPM initializers, the manifest and CLI; TensorRT tests are marked and need a GPU.

Exports are module-scoped fixtures: each tiny graph is exported once and shared."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

import spm_rt  # noqa: E402
from spm_rt import gates_off, use_gates  # noqa: E402
from spm_rt.formats import adapted_modules  # noqa: E402
from spm_rt.testing import random_spm, tiny_pipeline  # noqa: E402
from spm_rt.transport import encode_prompts  # noqa: E402

from dense import dense_unet  # noqa: E402

from spm_rt.export.onnx import check_onnx, export_onnx, read_manifest, set_onnx_spms  # noqa: E402
from spm_rt.export.ort import ONNXPipeline, run_onnx_pipeline  # noqa: E402

# 4 UNet rows with different gate vectors (K = 2): mixed, swapped, closed, above 1
ROW_GATES = torch.tensor([[1.0, 0.5], [0.2, 1.0], [0.0, 0.0], [0.9, 1.3]])
PROMPTS = ["a red circle", "a blue square", "", "a green and blue triangle"]
CONCEPTS_A = ["circle", ["red", "blue"]]
CONCEPTS_B = [["square"], ["green", "triangle"], ["yellow"]]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # 2 threads on 2 shared, busy cores spend most of their time waiting for each other
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def session_options():
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    return so


def ort_pipeline(onnx_dir, **kw):
    return ONNXPipeline(onnx_dir, session_options=session_options(), **kw)


def spms_for(unet, concepts, seed0=0):
    return [random_spm(unet, c, seed=seed0 + i, alpha=1.0 + i) for i, c in enumerate(concepts)]


def unet_inputs(pipe, rows, seed=0):
    g = torch.Generator().manual_seed(seed)
    unet = pipe.unet
    size = unet.config.sample_size
    x = {"sample": torch.randn(rows, 4, size, size, generator=g),
         "timestep": torch.tensor([999.0, 500.0, 20.0, 500.0][:rows]),
         "encoder_hidden_states": torch.randn(rows, 77, unet.config.cross_attention_dim, generator=g)}
    kwargs = {}
    if getattr(pipe, "text_encoder_2", None) is not None:
        x["text_embeds"] = torch.randn(rows, 32, generator=g)
        x["time_ids"] = torch.tensor([[32.0, 32.0, 0.0, 0.0, 32.0, 32.0]] * rows)
        kwargs = {"added_cond_kwargs": {"text_embeds": x["text_embeds"], "time_ids": x["time_ids"]}}
    return x, kwargs


def torch_unet(pipe, x, kwargs, row_gates=None):
    with torch.no_grad():
        if row_gates is None:  # the base UNet: asked for (outside a call a patched UNet erases, gates 1)
            with gates_off(pipe):
                return pipe.unet(x["sample"], x["timestep"], x["encoder_hidden_states"], **kwargs).sample.numpy()
        with use_gates(pipe, row_gates, rows=True):
            return pipe.unet(x["sample"], x["timestep"], x["encoder_hidden_states"], **kwargs).sample.numpy()


def ort_unet(onnx_dir, x, gates=None, k_max=None):
    sess = ort.InferenceSession(str(Path(onnx_dir) / "unet" / "model.onnx"), session_options(),
                                providers=["CPUExecutionProvider"])
    feeds = {k: v.numpy() for k, v in x.items()}
    if gates is not None:
        g = gates.numpy()
        if k_max is not None and k_max > g.shape[1]:  # padding slots get junk: it must not matter
            g = np.concatenate([g, np.full((g.shape[0], k_max - g.shape[1]), 5.0, np.float32)], axis=1)
        feeds["gates"] = g
    return sess.run(None, feeds)[0]


def _export(tmp_path_factory, name, arch, concepts, combine, **kw):
    pipe = tiny_pipeline(0, arch)
    rt = spm_rt.compile(pipe, spms_for(pipe.unet, concepts), combine=combine)
    out = tmp_path_factory.mktemp(name)
    manifest = export_onnx(rt, out, **kw)
    return {"pipe": pipe, "rt": rt, "dir": out, "manifest": manifest}


@pytest.fixture(scope="module")
def sd15(tmp_path_factory):
    """Full SD1.5-architecture export, linear combine, K=2 padded to k_max=3."""
    return _export(tmp_path_factory, "sd15", "sd15", CONCEPTS_A, "linear", k_max=3, concepts_max=4)


@pytest.fixture(scope="module")
def sd15_official(tmp_path_factory):
    """UNet only, official combine, weights in an external data file."""
    return _export(tmp_path_factory, "sd15_official", "sd15", CONCEPTS_A, "official", components=("unet",),
                   external_data=True)


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    """Full SDXL export (two text encoders, text_embeds/time_ids), official combine, k_max=3."""
    return _export(tmp_path_factory, "sdxl", "sdxl", CONCEPTS_A, "official", k_max=3)


@pytest.fixture(scope="module")
def sdxl_linear(tmp_path_factory):
    return _export(tmp_path_factory, "sdxl_linear", "sdxl", CONCEPTS_A, "linear", components=("unet",))


# ---------------------------------------------------------------------------------------------
# UNet graphs

@pytest.mark.parametrize("which", ["sd15", "sd15_official", "sdxl", "sdxl_linear"])
def test_unet_graph_matches_pytorch_per_row_gates(request, which):
    ex = request.getfixturevalue(which)
    pipe, manifest = ex["pipe"], ex["manifest"]
    x, kwargs = unet_inputs(pipe, len(ROW_GATES))
    expected = torch_unet(pipe, x, kwargs, ROW_GATES)
    base = torch_unet(pipe, x, kwargs)
    got = ort_unet(ex["dir"], x, ROW_GATES, manifest["k_max"])
    err = np.abs(got - expected).max()
    assert err < 1e-4, err
    effect = np.abs(expected - base).reshape(len(ROW_GATES), -1).max(axis=1)
    assert (effect[[0, 1, 3]] > 1e-2).all(), effect  # the SPMs really act on the gated rows
    np.testing.assert_allclose(got[2], base[2], atol=1e-4)  # closed membranes: the base UNet


def test_unet_graph_dynamic_batch_and_size(sd15):
    pipe = sd15["pipe"]
    g = torch.Generator().manual_seed(5)
    x = {"sample": torch.randn(3, 4, 24, 32, generator=g), "timestep": torch.tensor([900.0, 10.0, 3.0]),
         "encoder_hidden_states": torch.randn(3, 77, 32, generator=g)}
    gates = torch.rand(3, 2, generator=g)
    got = ort_unet(sd15["dir"], x, gates, 3)  # traced at 2 rows of 16x16
    assert got.shape == (3, 4, 24, 32)
    assert np.abs(got - torch_unet(pipe, x, {}, gates)).max() < 1e-4


def test_unet_graph_spm_initializers_are_named_and_feed_matmuls_directly(sd15):
    model = onnx.load(str(sd15["dir"] / "unet" / "model.onnx"))
    inits = {i.name: i for i in model.graph.initializer}
    k_max, rank = 3, 1
    for path, module in adapted_modules(sd15["pipe"].unet).items():
        out_f, in_f = module.weight.shape[:2]
        assert list(inits[f"spm.{path}.down"].dims) == [k_max * rank, in_f]
        assert list(inits[f"spm.{path}.up"].dims) == [out_f, k_max * rank]
        assert list(inits[f"spm.{path}.scale"].dims) == [k_max]
    consumers = {}
    for node in model.graph.node:
        for i, name in enumerate(node.input):
            if name.startswith("spm."):
                consumers.setdefault(name, []).append((node.op_type, i, node))
    assert len(consumers) == 3 * len(adapted_modules(sd15["pipe"].unet))
    for name, uses in consumers.items():
        for op, idx, node in uses:
            if op == "Gemm":  # the tensor as stored ([K*r, in] / [out, K*r]) with transB
                assert idx == 1 and any(a.name == "transB" and a.i == 1 for a in node.attribute), name
            else:
                assert op in ("MatMul", "Mul"), (name, op)
    # base weights keep the diffusers state-dict names
    state = set(sd15["pipe"].unet.state_dict())
    named = [n for n in inits if not n.startswith(("spm.", "onnx::", "/"))]
    assert named and set(named) <= {n.replace(".base.", ".") for n in state}, set(named) - state
    assert [i.name for i in model.graph.input] == ["sample", "timestep", "encoder_hidden_states", "gates"]
    assert [o.name for o in model.graph.output] == ["out_sample"]


def test_folded_graph_equals_merged_pytorch(tmp_path):
    pipe = tiny_pipeline(0)
    fixed = [0.8, 1.0]
    rt = spm_rt.compile(pipe, spms_for(pipe.unet, CONCEPTS_A), combine="official", strategy="merged",
                        transport="fixed", fixed_gates=fixed)
    manifest = export_onnx(rt, tmp_path, gates="folded", components=("unet",))
    x, kwargs = unet_inputs(pipe, 2)
    base = torch_unet(pipe, x, kwargs)
    # independent dense math (explicit per-SPM loops in float64, tests/dense.py), not the runtime's merge
    dense = dense_unet(rt.remove().unet, spms_for(pipe.unet, CONCEPTS_A), fixed, "official")
    with torch.no_grad():
        expected = dense(x["sample"], x["timestep"], x["encoder_hidden_states"]).sample.numpy()
    got = ort_unet(tmp_path, x)
    assert np.abs(got - expected).max() < 1e-4, np.abs(got - expected).max()
    assert np.abs(expected - base).max() > 1e-2
    model = onnx.load(str(tmp_path / "unet" / "model.onnx"))
    assert [i.name for i in model.graph.input] == ["sample", "timestep", "encoder_hidden_states"]
    names = {i.name for i in model.graph.initializer if not i.name.startswith(("onnx::", "/"))}
    assert names <= set(pipe.unet.state_dict())  # the base UNet's structure and names
    assert manifest["gates_mode"] == "folded" and manifest["fixed_gates"] == fixed
    with pytest.raises(ValueError, match="gates='input'"):
        set_onnx_spms(tmp_path, spms_for(pipe.unet, CONCEPTS_A))


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_folded_graph_runs_the_base_graph_with_other_weights(arch, tmp_path):
    """The graph ONNX Runtime runs for a folded export (after all its optimizations) is node for
    node the base graph's: same ops, attributes and initializer shapes/types, same initializer
    names in the file; only weight values differ. So a folded UNet costs what the base UNet costs."""
    from spm_rt.export.ort import optimized_graph_signature

    pipe = tiny_pipeline(0, arch)
    rt = spm_rt.compile(pipe, spms_for(pipe.unet, CONCEPTS_A), transport="fixed")
    try:
        for mode in ("none", "folded"):
            export_onnx(rt, tmp_path / mode, gates=mode, components=("unet",), check=False)
    finally:
        rt.remove()
    graphs = {m: onnx.load(str(tmp_path / m / "unet" / "model.onnx")) for m in ("none", "folded")}
    inits = {m: {i.name: (list(i.dims), i.data_type) for i in g.graph.initializer} for m, g in graphs.items()}
    assert inits["folded"] == inits["none"]
    values = {m: {i.name: onnx.numpy_helper.to_array(i) for i in g.graph.initializer} for m, g in graphs.items()}
    changed = [n for n in values["none"] if not np.array_equal(values["none"][n], values["folded"][n])]
    assert changed and all(n.endswith(".weight") for n in changed)  # the merged weights, nothing else
    assert len(changed) == len(adapted_modules(pipe.unet))
    base = optimized_graph_signature(tmp_path / "none" / "unet" / "model.onnx")
    folded = optimized_graph_signature(tmp_path / "folded" / "unet" / "model.onnx")
    assert len(base) > 100 and folded == base


def test_float16_unet_graph_runs_close_to_float32(tmp_path):
    pipe = tiny_pipeline(0)
    rt = spm_rt.compile(pipe, spms_for(pipe.unet, CONCEPTS_A))
    manifest = export_onnx(rt, tmp_path, dtype=torch.float16, components=("unet",))
    assert manifest["graphs"]["unet"]["inputs"][0]["dtype"] == "float16"
    x, kwargs = unet_inputs(pipe, len(ROW_GATES))
    expected = torch_unet(pipe, x, kwargs, ROW_GATES)
    x16 = {k: (v.half() if k in ("sample", "encoder_hidden_states") else v) for k, v in x.items()}
    got = ort_unet(tmp_path, x16, ROW_GATES).astype(np.float32)
    # house rule: at most ~2x PyTorch's own float16 error against the float32 oracle
    pipe16 = tiny_pipeline(0, dtype=torch.float16)
    spm_rt.compile(pipe16, spms_for(pipe16.unet, CONCEPTS_A))
    torch16 = torch_unet(pipe16, x16, kwargs, ROW_GATES).astype(np.float32)
    err, torch_err = np.abs(got - expected).max(), np.abs(torch16 - expected).max()
    assert err <= 2 * torch_err + 1e-4, (err, torch_err)


# ---------------------------------------------------------------------------------------------
# text encoder with Facilitated Transport

@pytest.mark.parametrize("which", ["sd15", "sdxl"])
def test_text_encoder_graph_gates_equal_rt_gates(request, which):
    ex = request.getfixturevalue(which)
    pipe, rt = ex["pipe"], ex["rt"]
    enc = ort_pipeline(ex["dir"], components=("text_encoder",)).encode(PROMPTS)
    expected = rt.gates(PROMPTS).numpy()
    assert enc["gates"].shape == (len(PROMPTS), 3)
    np.testing.assert_allclose(enc["gates"][:, :2], expected, atol=1e-5)
    assert (enc["gates"][:, 2] == 0).all()  # padding slot
    np.testing.assert_allclose(enc["prompt_embeds"], encode_prompts(pipe, PROMPTS).numpy(), atol=1e-5)
    if which == "sdxl":
        with torch.no_grad():
            pooled = pipe.encode_prompt(prompt=PROMPTS, device="cpu", num_images_per_prompt=1,
                                        do_classifier_free_guidance=False)[2]
        np.testing.assert_allclose(enc["pooled_prompt_embeds"], pooled.numpy(), atol=1e-5)


@pytest.mark.parametrize("metric", ["tokenuni", "clipcos", "fixed"])
def test_text_encoder_graph_metrics(tmp_path, metric):
    pipe = tiny_pipeline(0)
    rt = spm_rt.compile(pipe, spms_for(pipe.unet, CONCEPTS_A), transport=metric)
    export_onnx(rt, tmp_path, components=("text_encoder",))
    gates = ort_pipeline(tmp_path).encode(PROMPTS)["gates"]
    expected = rt.gates(PROMPTS).numpy()
    np.testing.assert_allclose(gates, expected, atol=1e-5)
    if metric == "tokenuni":  # |T_P ∩ T_c| / |T_c|, max over an SPM's concepts
        np.testing.assert_allclose(gates, [[1, 1], [0, 1], [0, 0], [0, 1]])
    elif metric == "fixed":
        np.testing.assert_array_equal(gates, np.ones((len(PROMPTS), 2)))
    else:
        assert len(np.unique(np.round(gates, 4))) > 4


# ---------------------------------------------------------------------------------------------
# the whole pipeline on ONNX Runtime

def test_runner_image_matches_pytorch_sd15(sd15):
    rt = sd15["rt"]
    prompts = ["a red circle", "a blue square"]
    got = run_onnx_pipeline(sd15["dir"], prompts, steps=3, guidance_scale=7.5, seed=0, output_type="np",
                            session_options=session_options())
    expected = rt(prompts, num_inference_steps=3, guidance_scale=7.5, generator=torch.Generator().manual_seed(0),
                  output_type="np").images
    closed = rt(prompts, num_inference_steps=3, guidance_scale=7.5, generator=torch.Generator().manual_seed(0),
                output_type="np", gates=[0.0, 0.0]).images
    assert got.shape == expected.shape == (2, 32, 32, 3)
    assert np.abs(got - expected).max() < 1e-4, np.abs(got - expected).max()
    assert np.abs(expected - closed).max() > 1e-3  # the gates reached the UNet
    pil = run_onnx_pipeline(sd15["dir"], "a red circle", steps=2, seed=1, session_options=session_options())
    assert pil[0].size == (32, 32)


def test_runner_image_matches_pytorch_sdxl_with_negative_prompt(sdxl):
    rt = sdxl["rt"]
    for negative in (None, "a yellow square"):  # zeroed negative embeddings, then an encoded one
        got = run_onnx_pipeline(sdxl["dir"], ["a red circle"], steps=2, guidance_scale=5.0, seed=3,
                                negative_prompt=negative, output_type="np", session_options=session_options())
        expected = rt(["a red circle"], num_inference_steps=2, guidance_scale=5.0, negative_prompt=negative,
                      generator=torch.Generator().manual_seed(3), output_type="np").images
        assert np.abs(got - expected).max() < 1e-4, (negative, np.abs(got - expected).max())


# ---------------------------------------------------------------------------------------------
# swapping SPMs without re-export

def test_swapping_initializers_equals_reexport(sd15, tmp_path):
    swapped = tmp_path / "swapped"
    shutil.copytree(sd15["dir"], swapped)
    pipe_b = tiny_pipeline(0)
    spms_b = spms_for(pipe_b.unet, CONCEPTS_B, seed0=20)
    manifest = set_onnx_spms(swapped, spms_b)
    assert manifest["concepts"] == [["square"], ["green", "triangle"], ["yellow"]] and manifest["num_spms"] == 3
    rt_b = spm_rt.compile(pipe_b, spms_b, combine="linear")
    export_onnx(rt_b, tmp_path / "reexport", k_max=3, concepts_max=4, components=("unet", "text_encoder"))

    g3 = torch.tensor([[1.0, 0.5, 0.25], [0.2, 1.0, 0.7], [0.0, 0.0, 0.0], [0.9, 0.0, 1.3]])
    x, kwargs = unet_inputs(pipe_b, 4)
    got = ort_unet(swapped, x, g3)
    again = ort_unet(tmp_path / "reexport", x, g3)
    expected = torch_unet(pipe_b, x, kwargs, g3)
    before = ort_unet(sd15["dir"], x, g3)
    assert np.abs(got - again).max() < 1e-6, np.abs(got - again).max()
    assert np.abs(got - expected).max() < 1e-4
    assert np.abs(got - before).max() > 1e-2  # the swap changed the graph's SPMs

    gates = ort_pipeline(swapped, components=("text_encoder",)).encode(PROMPTS)["gates"]
    gates_again = ort_pipeline(tmp_path / "reexport", components=("text_encoder",)).encode(PROMPTS)["gates"]
    np.testing.assert_allclose(gates, rt_b.gates(PROMPTS).numpy(), atol=1e-5)
    np.testing.assert_allclose(gates, gates_again, atol=1e-5)
    assert read_manifest(swapped)["concepts"] == manifest["concepts"]
    check_onnx(swapped)

    with pytest.raises(ValueError, match="k_max"):
        set_onnx_spms(swapped, spms_for(pipe_b.unet, ["a", "b", "c", "d"]))
    with pytest.raises(ValueError, match="concepts_max"):
        set_onnx_spms(swapped, spms_for(pipe_b.unet, [["a", "b"], ["c", "d"], ["e"]]))


def test_swap_in_external_data_and_streamed_save(sd15_official, tmp_path):
    """Swapping writes in place into the external data file; large exports stream the exporter's
    per-tensor files into one data file (both paths are what >2 GB graphs go through)."""
    from spm_rt.export.onnx_proto import _save_with_external_data

    swapped = tmp_path / "swapped"
    shutil.copytree(sd15_official["dir"], swapped)
    pipe = tiny_pipeline(0)
    spms = spms_for(pipe.unet, [["square"], ["green"]], seed0=40)
    set_onnx_spms(swapped, spms)
    spm_rt.compile(pipe, spms, combine="official")
    x, kwargs = unet_inputs(pipe, len(ROW_GATES))
    got = ort_unet(swapped, x, ROW_GATES)
    assert np.abs(got - torch_unet(pipe, x, kwargs, ROW_GATES)).max() < 1e-4

    # the exporter writes one file per tensor when a graph passes 2 GB: simulate that layout
    per_tensor = tmp_path / "per_tensor"
    per_tensor.mkdir()
    model = onnx.load(str(swapped / "unet" / "model.onnx"))
    onnx.save_model(model, str(per_tensor / "model.onnx"), save_as_external_data=True,
                    all_tensors_to_one_file=False, size_threshold=1024)
    assert len(list(per_tensor.iterdir())) > 50
    streamed = tmp_path / "streamed" / "unet"
    streamed.mkdir(parents=True)
    graph = onnx.load(str(per_tensor / "model.onnx"), load_external_data=False)
    _save_with_external_data(graph, per_tensor, streamed / "model.onnx")
    assert sorted(p.name for p in streamed.iterdir()) == ["model.onnx", "model.onnx_data"]
    onnx.checker.check_model(str(streamed / "model.onnx"), full_check=True)
    np.testing.assert_array_equal(ort_unet(tmp_path / "streamed", x, ROW_GATES), got)


# ---------------------------------------------------------------------------------------------
# manifest, checker, external data, errors

def test_checker_and_manifest(sd15, sd15_official):
    assert check_onnx(sd15["dir"]) == ["unet/model.onnx", "text_encoder/model.onnx", "vae_decoder/model.onnx"]
    m = json.loads((sd15["dir"] / "manifest.json").read_text())
    assert m["concepts"] == [["circle"], ["red", "blue"]] and m["combine"] == "linear"
    assert m["transport"] == "clipcos_tokenuni" and m["num_spms"] == 2 and m["k_max"] == 3 and m["opset"] == 17
    assert m["graphs"]["text_encoder"]["inputs"] == [{"name": "input_ids", "shape": ["batch", 77], "dtype": "int32"}]
    assert [o["name"] for o in m["graphs"]["text_encoder"]["outputs"]] == ["prompt_embeds", "gates"]
    assert m["graphs"]["unet"]["inputs"][-1] == {"name": "gates", "shape": ["batch", 3], "dtype": "float32"}
    assert m["graphs"]["vae_decoder"]["inputs"][0]["name"] == "latent_sample"
    assert {"torch", "diffusers", "onnx", "spm_rt"} <= set(m["versions"])
    for part in ("scheduler/scheduler_config.json", "tokenizer/tokenizer_config.json"):
        assert (sd15["dir"] / part).is_file()
    # external data: one weights file beside a small graph, and the checker reads it
    unet_dir = sd15_official["dir"] / "unet"
    graph = onnx.load(str(unet_dir / "model.onnx"), load_external_data=False)
    external = [i for i in graph.graph.initializer if i.data_location == onnx.TensorProto.EXTERNAL]
    inline = [i for i in graph.graph.initializer if i.data_location != onnx.TensorProto.EXTERNAL]
    assert {e.value for i in external for e in i.external_data if e.key == "location"} == {"model.onnx_data"}
    assert len(external) > 50 and all(len(i.raw_data) <= 1024 for i in inline)
    assert sd15_official["manifest"]["graphs"]["unet"]["external_data"] == "model.onnx_data"
    assert check_onnx(sd15_official["dir"]) == ["unet/model.onnx"]


def test_export_argument_errors(sd15, tmp_path):
    rt = sd15["rt"]
    with pytest.raises(ValueError, match="gates"):
        export_onnx(rt, tmp_path, gates="maybe")
    with pytest.raises(ValueError, match="opset"):
        export_onnx(rt, tmp_path, opset=16)
    with pytest.raises(ValueError, match="k_max"):
        export_onnx(rt, tmp_path, k_max=1)
    with pytest.raises(ValueError, match="components"):
        export_onnx(rt, tmp_path, components=("safety_checker",))
    with pytest.raises(ValueError, match="bfloat16"):
        export_onnx(rt, tmp_path, dtype=torch.bfloat16)


# ---------------------------------------------------------------------------------------------
# CLI

def test_cli_export_and_run(sd15, tmp_path):
    from spm_rt import save_spm
    from spm_rt.cli import main

    files = []
    for spm, name in zip(sd15["rt"].spms, ("a", "b")):
        files.append(str(save_spm(spm, tmp_path / f"{name}.safetensors")))
    out = tmp_path / "onnx"
    assert main(["export", "onnx", "--model", "tiny:sd15", "--spm", *files, "--out", str(out),
                 "--components", "text_encoder", "--k-max", "3", "--concepts-max", "4"]) == 0
    gates = ort_pipeline(out).encode(PROMPTS)["gates"]
    np.testing.assert_allclose(gates[:, :2], sd15["rt"].gates(PROMPTS).numpy(), atol=1e-5)
    png = tmp_path / "img" / "x.png"
    assert main(["export", "run", "--onnx", str(sd15["dir"]), "--prompt", "a red circle", "--out", str(png),
                 "--steps", "2"]) == 0
    from PIL import Image

    assert Image.open(png).size == (32, 32)


# ---------------------------------------------------------------------------------------------
# TensorRT: the plain-Python parts here, the engine itself only with tensorrt and a GPU

def test_trt_profiles_follow_the_manifest(sd15):
    from spm_rt.export.trt import graph_profiles, parse_shapes

    shapes = parse_shapes("1x32x32/2x32x32/3x64x64")
    m = sd15["manifest"]
    unet = graph_profiles(m, "unet", shapes)
    assert set(unet) == {"sample", "timestep", "encoder_hidden_states", "gates"}
    assert unet["sample"] == ((1, 4, 16, 16), (4, 4, 16, 16), (6, 4, 32, 32))  # rows: CFG doubles opt/max
    assert unet["gates"] == ((1, 3), (4, 3), (6, 3))
    assert graph_profiles(m, "text_encoder", shapes)["input_ids"] == ((1, 77), (2, 77), (3, 77))
    assert graph_profiles(m, "vae_decoder", shapes)["latent_sample"][2] == (3, 4, 32, 32)
    # the graph accepts the max profile shapes
    x = {n: np.zeros(s[2], np.float32) for n, s in unet.items()}
    sess = ort.InferenceSession(str(sd15["dir"] / "unet" / "model.onnx"), session_options(),
                                providers=["CPUExecutionProvider"])
    assert sess.run(None, x)[0].shape == (6, 4, 32, 32)
    for bad in ("1x32x32/2x32x32", "2x32x32/1x32x32/3x32x32", "1x33x32/1x33x32/1x33x32"):
        with pytest.raises(ValueError):
            graph_profiles(m, "unet", parse_shapes(bad))


def test_trt_missing_is_a_clear_error(sd15, tmp_path, capsys):
    from spm_rt.cli import main
    from spm_rt.export.trt import is_tensorrt_available

    if is_tensorrt_available() and torch.cuda.is_available():
        pytest.skip("tensorrt and a GPU are present")
    assert main(["export", "engine", "--onnx", str(sd15["dir"]), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert ("tensorrt" in err and "spm_rt[trt]" in err) or "GPU" in err


def _has_trt():
    from spm_rt.export.trt import is_tensorrt_available

    return is_tensorrt_available()


needs_trt_parser = pytest.mark.skipif(not _has_trt(), reason="needs tensorrt or tensorrt-rtx-cu12 (the test extra "
                                                             "installs tensorrt-rtx on Linux x86_64)")


@pytest.fixture(scope="module")
def sd15_folded(tmp_path_factory):
    return _export(tmp_path_factory, "sd15_folded", "sd15", CONCEPTS_A, "linear", gates="folded")


@pytest.fixture(scope="module")
def sdxl_folded(tmp_path_factory):
    return _export(tmp_path_factory, "sdxl_folded", "sdxl", CONCEPTS_A, "official", gates="folded",
                   components=("unet",))


@needs_trt_parser
@pytest.mark.parametrize("which", ["sd15", "sd15_official", "sdxl", "sd15_folded", "sdxl_folded"])
def test_tensorrt_parses_every_exported_graph(request, which):
    """TensorRT's ONNX parser (no GPU needed) takes every exported graph, text encoder with
    Facilitated Transport, gates-input and folded UNets, VAE decoder, external data included, with
    the manifest's inputs, outputs and dynamic axes; with per-weight refit exactly the SPM tensors
    are marked."""
    from spm_rt.export.trt_check import check_tensorrt

    ex = request.getfixturevalue(which)
    manifest = ex["manifest"]
    report = check_tensorrt(ex["dir"])
    assert set(report) == set(manifest["graphs"])
    n_modules = len(adapted_modules(ex["pipe"].unet))
    for name, r in report.items():
        spec = manifest["graphs"][name]
        assert [i["name"] for i in r["inputs"]] == [i["name"] for i in spec["inputs"]]
        assert [o["name"] for o in r["outputs"]] == [o["name"] for o in spec["outputs"]]
        assert r["layers"] > 50
    unet = report["unet"]
    assert unet["inputs"][0]["shape"] == [-1, 4, -1, -1]  # batch, height, width dynamic
    if manifest["gates_mode"] == "input":
        assert unet["inputs"][-1] == {"name": "gates", "shape": [-1, manifest["k_max"]], "dtype": "FLOAT"}
        assert len(unet["refittable"]) == 3 * n_modules
        assert all(n.startswith("spm.") for n in unet["refittable"])
    else:
        assert "gates" not in [i["name"] for i in unet["inputs"]] and unet["refittable"] == []
    if "text_encoder" in report:
        te = report["text_encoder"]
        assert te["outputs"][1] == {"name": "gates", "shape": [-1, manifest["k_max"]], "dtype": "FLOAT"}
        assert te["refittable"] and all(n.startswith("transport.") for n in te["refittable"])
        if manifest["transport"] == "fixed":  # the folded export's text graph reports its fixed gates
            assert te["refittable"] == ["transport.fixed_gates"]


@needs_trt_parser
def test_tensorrt_check_catches_manifest_mismatches(sd15, tmp_path, capsys):
    from spm_rt.cli import main
    from spm_rt.export.trt_check import check_tensorrt

    assert main(["export", "check", "--onnx", str(sd15["dir"]), "--tensorrt"]) == 0
    out = capsys.readouterr().out
    assert out.count("ok (TensorRT parser") == 3 and "refittable weights: 144" in out
    copy = tmp_path / "copy"
    shutil.copytree(sd15["dir"], copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["graphs"]["unet"]["inputs"][0]["shape"][2] = 16  # 'height' claimed fixed
    manifest["graphs"]["vae_decoder"]["outputs"][0]["name"] = "image"
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(RuntimeError) as err:
        check_tensorrt(copy)
    assert "sample axis 2: manifest 16, network -1" in str(err.value)
    assert "output names" in str(err.value) and "image" in str(err.value)
    assert main(["export", "check", "--onnx", str(copy), "--tensorrt"]) == 2
    (copy / "unet" / "model.onnx").write_bytes(b"not a graph")
    with pytest.raises(RuntimeError, match="could not parse"):
        check_tensorrt(copy, graphs=("unet",))


@needs_trt_parser
def test_engine_network_keeps_gates_and_marks_only_spm_weights(sd15):
    """What ``spm-rt export engine --refittable`` builds from, short of the GPU build: the parsed
    network takes the gates as an input, and per-weight refit (REFIT_INDIVIDUAL) marks every
    ``spm.*`` tensor and no base weight, so a new SPM set is a refit of the SPM weights alone."""
    from spm_rt.export.trt import (default_shapes, engine_config, graph_profiles, import_tensorrt, parse_onnx,
                                   refittable_names)

    trt = import_tensorrt()
    manifest = sd15["manifest"]
    path = sd15["dir"] / "unet" / "model.onnx"
    builder, network, parser, _ = parse_onnx(path)
    assert "gates" in [network.get_input(i).name for i in range(network.num_inputs)]
    names = refittable_names(manifest, "unet")
    config = engine_config(builder, network, graph_profiles(manifest, "unet", default_shapes(manifest)),
                           refittable=True, refit_names=names)
    assert config.get_flag(trt.BuilderFlag.REFIT_INDIVIDUAL) and not config.get_flag(trt.BuilderFlag.REFIT)
    inits = [i.name for i in onnx.load(str(path), load_external_data=False).graph.initializer]
    marked = {n for n in inits if network.are_weights_marked_refittable(n)}
    assert marked == set(names) and len(names) == 3 * len(adapted_modules(sd15["pipe"].unet))
    base = [n for n in inits if n.endswith(".to_q.weight")]
    assert base and not any(network.are_weights_marked_refittable(n) for n in base)
    with pytest.raises(RuntimeError, match="did not find weights"):
        engine_config(builder, network, graph_profiles(manifest, "unet", default_shapes(manifest)),
                      refittable=True, refit_names=["spm.no.such.module.down"])
    del parser


def test_triton_repository_configs_parse_and_match_the_graphs(sdxl, tmp_path, capsys):
    """``spm-rt export triton``: one model per graph with dynamic batching and gates a per-request
    input; every config.pbtxt parses with Triton's ModelConfig protobuf and names the graph's own
    inputs/outputs, with the batch axis left to Triton and the other dims as ONNX Runtime sees them."""
    from spm_rt.cli import main

    pytest.importorskip("tritonclient.grpc.model_config_pb2", reason="needs tritonclient[grpc] (the test extra)")
    from spm_rt.export.triton import parse_triton_config, triton_config

    repo = tmp_path / "repo"
    assert main(["export", "triton", "--onnx", str(sdxl["dir"]), "--out", str(repo), "--max-batch-size", "6"]) == 0
    assert capsys.readouterr().out.count("config.pbtxt") == 3
    for graph in ("text_encoder", "unet", "vae_decoder"):
        config = parse_triton_config(repo / graph / "config.pbtxt")
        assert config.name == graph and config.backend == "onnxruntime" and config.max_batch_size == 6
        assert list(config.dynamic_batching.preferred_batch_size) == [1, 2, 4, 6]
        sess = ort.InferenceSession(str(repo / graph / "1" / "model.onnx"), session_options(),
                                    providers=["CPUExecutionProvider"])
        for declared, actual in ((config.input, sess.get_inputs()), (config.output, sess.get_outputs())):
            assert [t.name for t in declared] == [t.name for t in actual]
            for t, a in zip(declared, actual):
                want = [-1 if isinstance(d, str) else d for d in a.shape[1:]]
                assert (list(t.dims) or None) == (want or None) or (list(t.dims) == [1] and not want
                                                                    and t.HasField("reshape")), (graph, t.name)
    unet = parse_triton_config(repo / "unet" / "config.pbtxt")
    gates = [t for t in unet.input if t.name == "gates"][0]
    assert list(gates.dims) == [sdxl["manifest"]["k_max"]]  # [rows, k_max]: batched per request
    with pytest.raises(ValueError, match="max_batch_size"):
        triton_config(sdxl["manifest"], "unet", max_batch_size=0)


def _has_trt_gpu():
    from spm_rt.export.trt import is_tensorrt_available

    return is_tensorrt_available() and torch.cuda.is_available()


@pytest.fixture(scope="module")
def sd15_engines(sd15, tmp_path_factory):
    from spm_rt.export.trt import build_engines

    out = tmp_path_factory.mktemp("engines")
    build_engines(sd15["dir"], out, refittable=True, shapes="1x32x32/2x32x32/2x32x32", progress=False)
    return out


@pytest.mark.tensorrt
@pytest.mark.skipif(not _has_trt_gpu(), reason="needs tensorrt and a CUDA GPU")
def test_trt_engines_match_onnxruntime(sd15, sd15_engines):
    from spm_rt.export.trt import TRTEngine

    x, _ = unet_inputs(sd15["pipe"], len(ROW_GATES))
    feeds = {k: v.numpy() for k, v in x.items()}
    feeds["gates"] = np.concatenate([ROW_GATES.numpy(), np.zeros((4, 1), np.float32)], axis=1)
    got = TRTEngine(sd15_engines / "unet.plan")(feeds)["out_sample"]
    expected = ort_unet(sd15["dir"], x, ROW_GATES, 3)
    assert np.abs(got - expected).max() < 5e-3  # TensorRT may use TF32 for fp32 GEMMs
    te_runner = ort_pipeline(sd15["dir"], components=("text_encoder",))
    ids = te_runner._ids(te_runner.tokenizer, PROMPTS)
    te = TRTEngine(sd15_engines / "text_encoder.plan")({"input_ids": ids})
    np.testing.assert_allclose(te["gates"], te_runner.encode(PROMPTS)["gates"], atol=5e-3)


@pytest.mark.tensorrt
@pytest.mark.skipif(not _has_trt_gpu(), reason="needs tensorrt and a CUDA GPU")
def test_trt_refit_equals_swapped_onnx(sd15, sd15_engines, tmp_path):
    from spm_rt.export.trt import TRTEngine, refit_engines

    swapped = tmp_path / "swapped"
    shutil.copytree(sd15["dir"], swapped)
    spms_b = spms_for(tiny_pipeline(0).unet, CONCEPTS_B, seed0=20)
    set_onnx_spms(swapped, spms_b)
    engines = tmp_path / "engines"
    shutil.copytree(sd15_engines, engines)
    counts = refit_engines(engines, spms_b, onnx_dir=sd15["dir"])
    assert counts["unet"] == 3 * len(read_manifest(engines)["spm_modules"])
    g3 = torch.tensor([[1.0, 0.5, 0.25], [0.2, 1.0, 0.7], [0.0, 0.0, 0.0], [0.9, 0.0, 1.3]])
    x, _ = unet_inputs(sd15["pipe"], 4)
    feeds = {k: v.numpy() for k, v in x.items()}
    feeds["gates"] = g3.numpy()
    got = TRTEngine(engines / "unet.plan")(feeds)["out_sample"]
    expected = ort_unet(swapped, x, g3)
    assert np.abs(got - expected).max() < 5e-3
    runner = ort_pipeline(swapped, components=("text_encoder",))
    te = TRTEngine(engines / "text_encoder.plan")({"input_ids": runner._ids(runner.tokenizer, PROMPTS)})
    np.testing.assert_allclose(te["gates"], runner.encode(PROMPTS)["gates"], atol=5e-3)
