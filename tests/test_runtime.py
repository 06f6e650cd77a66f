"""spm_rt.compile: combine modes against independent dense math, strategies, lifecycle, errors."""
import copy
import threading

import numpy as np
import pytest
import torch

import spm_rt
from spm_rt import SPMFormatError, load_spm, use_gates
from spm_rt.formats import adapted_modules, lora_key
from spm_rt.testing import random_spm, tiny_pipeline

from dense import dense_unet


def unet_inputs(pipe, batch, seed=0):
    g = torch.Generator().manual_seed(seed)
    unet = pipe.unet
    size = unet.config.sample_size
    sample = torch.randn(batch, 4, size, size, generator=g)
    emb = torch.randn(batch, 77, unet.config.cross_attention_dim, generator=g)
    return sample, torch.tensor(500), emb


GATES = torch.tensor([[1.0, 0.5, 0.25], [0.2, 1.0, 0.7], [0.0, 0.0, 0.0], [0.9, 0.0, 1.3]])


@pytest.mark.parametrize("combine", ["linear", "official"])
@pytest.mark.parametrize("strategy", ["gated", "auto"])
def test_combine_modes_per_sample_match_dense_math(pipe, combine, strategy):
    spms = [random_spm(pipe.unet, c, seed=i, alpha=1.0 + i) for i, c in enumerate(["a", "b", "c"])]
    sample, t, emb = unet_inputs(pipe, len(GATES))
    with torch.no_grad():
        expected = torch.cat([dense_unet(pipe.unet, spms, GATES[b], combine)(sample[b:b + 1], t, emb[b:b + 1]).sample
                              for b in range(len(GATES))])
        base = pipe.unet(sample, t, emb).sample
        rt = spm_rt.compile(pipe, spms, combine=combine, strategy=strategy, transport="fixed")
        with use_gates(rt, GATES):
            got = pipe.unet(sample, t, emb).sample
    assert (expected - base).abs().max() > 1e-2  # the SPMs really change the output
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    rt.remove()


def test_official_has_cross_terms_and_quadratic_gate(pipe):
    spms = [random_spm(pipe.unet, c, seed=i) for i, c in enumerate(["a", "b", "c"])]
    sample, t, emb = unet_inputs(pipe, 1)
    g = torch.tensor([[0.5, 0.8, 0.3]])
    with torch.no_grad():
        lin = dense_unet(pipe.unet, spms, g[0], "linear")(sample, t, emb).sample
        off = dense_unet(pipe.unet, spms, g[0], "official")(sample, t, emb).sample
        rt = spm_rt.compile(pipe, spms, combine="official", transport="fixed")
        with use_gates(rt, g):
            got = pipe.unet(sample, t, emb).sample
        rt.remove()
    assert (lin - off).abs().max() > 1e-3
    torch.testing.assert_close(got, off, rtol=1e-4, atol=1e-4)
    # one SPM: official = gamma^2 * linear-at-gate-1 update
    one = [spms[0]]
    with torch.no_grad():
        rt = spm_rt.compile(pipe, one, combine="official", transport="fixed")
        with use_gates(rt, torch.tensor([[0.5]])):
            off_half = pipe.unet(sample, t, emb).sample
        rt.remove()
        lin_quarter = dense_unet(pipe.unet, one, torch.tensor([0.25]), "linear")(sample, t, emb).sample
    torch.testing.assert_close(off_half, lin_quarter, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("combine", ["linear", "official"])
def test_merged_equals_gated(pipe, combine):
    spms = [random_spm(pipe.unet, c, seed=i) for i, c in enumerate(["a", "b"])]
    sample, t, emb = unet_inputs(pipe, 2)
    g = torch.tensor([[0.7, 0.4]])
    outs = {}
    rt = spm_rt.compile(pipe, spms, combine=combine, transport="fixed")
    with torch.no_grad():
        for strategy in ("merged", "gated", "auto"):
            rt.layer_config.strategy = strategy
            with use_gates(rt, g):
                outs[strategy] = pipe.unet(sample, t, emb).sample
    torch.testing.assert_close(outs["merged"], outs["gated"], rtol=1e-5, atol=1e-5)
    assert torch.equal(outs["auto"], outs["merged"])  # auto merges when all rows share gates
    rt.remove()


def _images(pipe_or_rt, prompts, seeds, **kw):
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    return pipe_or_rt(prompts, generator=gens, num_inference_steps=3, output_type="np", **kw).images


def test_gates_zero_is_bit_identical_to_base(pipe, spm_files):
    prompts = ["a red circle", "a blue square"]
    base = _images(pipe, prompts, [1, 2])
    rt = spm_rt.compile(pipe, spm_files)
    for strategy in ("auto", "merged", "gated"):
        rt.layer_config.strategy = strategy
        assert np.array_equal(_images(rt, prompts, [1, 2], gates=[0.0, 0.0, 0.0]), base)
    assert not np.array_equal(_images(rt, prompts, [1, 2], gates=[1.0, 0.0, 0.0]), base)


def test_batch_of_prompts_equals_each_alone(pipe, spm_files):
    rt = spm_rt.compile(pipe, spm_files)
    prompts = ["a red circle", "a blue square", "a green triangle"]
    gates = rt.gates(prompts)
    assert not torch.allclose(gates[0], gates[1])  # distinct gates: the batch takes the gated path
    batch = _images(rt, prompts, [3, 4, 5])
    for i, p in enumerate(prompts):
        alone = _images(rt, [p], [3 + i])
        np.testing.assert_allclose(batch[i], alone[0], atol=2e-5)
    # two images per prompt: each prompt's gates reach its two images in both CFG halves, seen by
    # the layers as UNet rows [uncond p0 p0 p1 p1 | cond p0 p0 p1 p1], and every image equals a
    # single-prompt run of the same seeds
    seen = []
    layer = next(iter(rt.layers.values()))
    hook = layer.register_forward_pre_hook(lambda m, args: seen.append(
        m.spm_state.row_gates[: args[0].shape[0]].clone()))
    two = rt(prompts[:2], num_images_per_prompt=2, num_inference_steps=2, output_type="np",
             generator=[torch.Generator().manual_seed(s) for s in range(4)]).images
    hook.remove()
    g0, g1 = gates[0].tolist(), gates[1].tolist()
    want_rows = torch.tensor([g0, g0, g1, g1, g0, g0, g1, g1])
    assert seen and all(torch.equal(r[:, : want_rows.shape[1]], want_rows) for r in seen)
    for i, p in enumerate(prompts[:2]):
        alone = rt([p], num_images_per_prompt=2, num_inference_steps=2, output_type="np",
                   generator=[torch.Generator().manual_seed(s) for s in (2 * i, 2 * i + 1)]).images
        np.testing.assert_allclose(two[2 * i:2 * i + 2], alone, atol=2e-5)


def test_remove_is_bit_exact_after_many_cycles(pipe, spm_files):
    sd_before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    modules_before = dict(pipe.unet.named_modules())
    base = _images(pipe, ["a red circle"], [7])
    for i in range(6):
        rt = spm_rt.compile(pipe, spm_files, combine=["linear", "official"][i % 2],
                            strategy=["auto", "merged", "gated"][i % 3])
        _images(rt, ["a red circle", "a blue square"], [7, 8])
        rt.set_spms(spm_files[:2][::-1] + spm_files[2:])
        rt.remove()
    after = pipe.unet.state_dict()
    assert sd_before.keys() == after.keys()
    assert all(torch.equal(sd_before[k], after[k]) for k in after)
    assert all(modules_before[n] is m for n, m in pipe.unet.named_modules())
    assert not any("forward" in vars(m) for m in pipe.unet.modules())  # no instance forward left behind
    assert np.array_equal(_images(pipe, ["a red circle"], [7]), base)
    assert not hasattr(pipe, "_spm_rt")


def test_set_spms_swaps_concepts(pipe, spm_files):
    rt = spm_rt.compile(pipe, spm_files[:1])
    assert rt.concepts == [["circle"]]
    rt.set_spms(spm_files[1:])
    assert rt.concepts == [["red"], ["blue", "green"]]
    assert rt.gates("a red circle").shape == (1, 2)
    with pytest.raises(SPMFormatError):
        rt.set_spms([spm_files[0], spm_files[0].parent / "missing.safetensors"])
    assert rt.concepts == [["red"], ["blue", "green"]]  # unchanged after the failed swap
    rt.remove()


def _assert_untouched(pipe, sd_before):
    assert not hasattr(pipe, "_spm_rt")
    assert not any(getattr(m, "_spm_wrapper", False) for m in pipe.unet.modules())
    after = pipe.unet.state_dict()
    assert all(torch.equal(sd_before[k], after[k]) for k in after)


def test_every_error_leaves_the_pipe_untouched(pipe, spm_files, tmp_path):
    from safetensors.torch import load_file, save_file

    sd_before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    bad = tmp_path / "bad.safetensors"
    t = load_file(str(spm_files[0]))
    t[next(iter(t))] = torch.full_like(t[next(iter(t))], float("inf"))
    save_file(t, str(bad))
    nameless = tmp_path / "nameless.safetensors"
    save_file(load_file(str(spm_files[0])), str(nameless))
    cases = [
        ([spm_files[0], bad], {}, SPMFormatError),
        ([spm_files[0], tmp_path / "nope.safetensors"], {}, SPMFormatError),
        ([nameless], {}, ValueError),  # no concept names and a transport that needs them
        ([spm_files[0]], {"combine": "quadratic"}, ValueError),
        ([spm_files[0]], {"strategy": "fast"}, ValueError),
        ([], {}, SPMFormatError),
        ([random_spm(tiny_pipeline(0, "sdxl").unet, "x")], {}, SPMFormatError),  # another architecture
    ]
    for spms, kw, exc in cases:
        with pytest.raises(exc):
            spm_rt.compile(pipe, spms, **kw)
        _assert_untouched(pipe, sd_before)
    rt = spm_rt.compile(pipe, [nameless], concepts=["snoopy"])  # naming the concept fixes it
    assert rt.concepts == [["snoopy"]]
    with pytest.raises(RuntimeError, match="already compiled"):
        spm_rt.compile(pipe, spm_files)
    with pytest.raises(ValueError, match="gates must be"):
        rt("a cat", gates=[1.0, 2.0], num_inference_steps=1)
    rt.remove()
    _assert_untouched(pipe, sd_before)


def test_transport_against_hand_computed_scores(pipe, spm_files):
    rt = spm_rt.compile(pipe, spm_files)
    prompts = ["a red circle", "a photo of a blue cat", "", "green green snoopy"]
    tok, te = pipe.tokenizer, pipe.text_encoder
    special = {tok.bos_token_id, tok.eos_token_id, tok.pad_token_id}

    def emb(text):
        ids = tok(text, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        with torch.no_grad():
            return te(ids)[0][0].double().flatten()

    def toks(text):
        return set(tok(text).input_ids) - special

    concepts = [["circle"], ["red"], ["blue", "green"]]
    expected = torch.zeros(len(prompts), 3, dtype=torch.float64)
    for i, p in enumerate(prompts):
        for k, names in enumerate(concepts):
            vals = []
            for c in names:
                cos = torch.nn.functional.cosine_similarity(emb(p), emb(c), dim=0).item()
                uni = len(toks(p) & toks(c)) / len(toks(c))
                vals.append(max(cos, uni))
            expected[i, k] = max(vals)
    got = rt.gates(prompts)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)
    assert got[0, 0] == 1.0 and got[0, 1] == 1.0 and got[3, 2] == 1.0  # token union hits
    rt.remove()
    for metric in ("clipcos", "tokenuni"):
        rt = spm_rt.compile(pipe, spm_files, transport=metric)
        g = rt.gates(prompts)
        if metric == "tokenuni":
            assert g[1].tolist() == [0.0, 0.0, 1.0] and g[2].tolist() == [0.0, 0.0, 0.0]
        else:
            assert (g < 1.0 + 1e-6).all() and g[0, 0] < 1.0
        rt.remove()


def test_fixed_transport_and_gate_override(pipe, spm_files):
    rt = spm_rt.compile(pipe, spm_files, transport="fixed", fixed_gates=[2.0, 0.0, 1.0])
    assert rt.gates(["x", "y"]).tolist() == [[2.0, 0.0, 1.0]] * 2
    a = _images(rt, ["a red circle"], [1])
    b = _images(rt, ["a red circle"], [1], gates=[2.0, 0.0, 1.0])
    assert np.array_equal(a, b)
    rt.remove()


def test_single_spm_equals_diffusers_load_lora_weights(pipe, spm_files):
    pytest.importorskip("peft")
    sample, t, emb = unet_inputs(pipe, 2)
    ref_pipe = tiny_pipeline(0)
    ref_pipe.load_lora_weights(str(spm_files[1]), adapter_name="spm")
    with torch.no_grad():
        expected = ref_pipe.unet(sample, t, emb).sample
        base = pipe.unet(sample, t, emb).sample
        rt = spm_rt.compile(pipe, [spm_files[1]])
        with use_gates(rt, torch.ones(1, 1)):
            got = pipe.unet(sample, t, emb).sample
    assert (expected - base).abs().max() > 1e-2
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    rt.remove()


def test_two_threads_see_their_own_gates(pipe, spm_files):
    rt = spm_rt.compile(pipe, spm_files)
    jobs = {"a red circle": 11, "a blue square": 12}
    expected = {p: _images(rt, [p], [s]) for p, s in jobs.items()}
    results, errors = {}, []
    barrier = threading.Barrier(2)

    def worker(prompt, seed):
        try:
            barrier.wait()
            for _ in range(3):
                out = _images(rt, [prompt], [seed])
                results.setdefault(prompt, []).append(out)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=item) for item in jobs.items()]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors
    for p in jobs:
        for out in results[p]:
            np.testing.assert_allclose(out, expected[p], atol=1e-6)
    assert not np.allclose(expected["a red circle"], expected["a blue square"])
    rt.remove()


def test_sdxl_end_to_end(tmp_path):
    pipe = tiny_pipeline(0, "sdxl")
    spms = [random_spm(pipe.unet, c, seed=i) for i, c in enumerate(["circle", "red"])]
    base = _images(pipe, ["a red circle", "a blue square"], [1, 2])
    rt = spm_rt.compile(pipe, spms)
    g = rt.gates(["a red circle", "a blue square"])
    assert g.shape == (2, 2) and g[0].tolist() == [1.0, 1.0]
    got = _images(rt, ["a red circle", "a blue square"], [1, 2])
    assert np.abs(got - base).max() > 1e-3
    assert np.array_equal(_images(rt, ["a red circle", "a blue square"], [1, 2], gates=[0.0, 0.0]), base)
    # sample-level check against dense math for the per-sample path
    sample, t, emb = unet_inputs(pipe, 2)
    added = {"text_embeds": torch.randn(2, 32), "time_ids": torch.randn(2, 6)}
    gates = torch.tensor([[1.0, 0.3], [0.0, 0.8]])
    with torch.no_grad():
        with use_gates(rt, gates):
            out = pipe.unet(sample, t, emb, added_cond_kwargs=added).sample
        rt.remove()
        for b in range(2):
            ref = dense_unet(pipe.unet, spms, gates[b], "linear")(
                sample[b:b + 1], t, emb[b:b + 1], added_cond_kwargs={k: v[b:b + 1] for k, v in added.items()}).sample
            torch.testing.assert_close(out[b:b + 1], ref, rtol=1e-4, atol=1e-4)
    assert np.array_equal(_images(pipe, ["a red circle", "a blue square"], [1, 2]), base)


def test_img2img_and_inpaint_variants(pipe, spm_files):
    spms = [load_spm(f) for f in spm_files]
    from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline
    from PIL import Image

    image = Image.fromarray((np.random.default_rng(0).random((32, 32, 3)) * 255).astype("uint8"))
    mask_arr = np.zeros((32, 32), dtype="uint8")
    mask_arr[:, :16] = 255  # repaint the left half
    mask = Image.fromarray(mask_arr)
    for cls, extra in ((StableDiffusionImg2ImgPipeline, {"image": image, "strength": 0.8}),
                       (StableDiffusionInpaintPipeline, {"image": image, "mask_image": mask})):
        p = cls(**pipe.components)
        p.set_progress_bar_config(disable=True)
        kw = dict(num_inference_steps=3, output_type="np", **extra)
        base = p(["a red circle", "a cat"], generator=[torch.Generator().manual_seed(s) for s in (0, 1)], **kw).images
        gates = torch.tensor([1.0, 0.5, 0.25])
        # dense math: the same pipeline class on a copy of the UNet holding W + update (tests/dense.py)
        dense = cls(**{**pipe.components, "unet": dense_unet(pipe.unet, spms, gates, "linear")})
        dense.set_progress_bar_config(disable=True)
        want = dense(["a red circle", "a cat"], generator=[torch.Generator().manual_seed(s) for s in (0, 1)],
                     **kw).images
        rt = spm_rt.compile(p, spm_files)
        for strategy in ("auto", "gated"):  # merged weights, then the per-row gated path
            rt.layer_config.strategy = strategy
            got = rt(["a red circle", "a cat"], gates=gates,
                     generator=[torch.Generator().manual_seed(s) for s in (0, 1)], **kw).images
            assert np.abs(got - base).max() > 1e-2  # the SPMs act
            np.testing.assert_allclose(got, want, atol=1e-4)
        rt.remove()


def test_sixty_four_spms(pipe):
    spms = [random_spm(pipe.unet, f"concept{i}", seed=i, std=0.05) for i in range(64)]
    sample, t, emb = unet_inputs(pipe, 2)
    gates = torch.rand(2, 64, generator=torch.Generator().manual_seed(0))
    rt = spm_rt.compile(pipe, spms, transport="fixed")
    assert next(iter(rt.layers.values())).stack.down.shape[0] == 64
    with torch.no_grad(), use_gates(rt, gates):
        got = pipe.unet(sample, t, emb).sample
    rt.remove()
    with torch.no_grad():
        ref = dense_unet(pipe.unet, spms, gates[1], "linear")(sample[1:], t, emb[1:]).sample
    torch.testing.assert_close(got[1:], ref, rtol=1e-4, atol=1e-4)


def test_calibrated_transport_closes_negatives_and_opens_token_hits(pipe, spm_files):
    calibration = {"circle": (["a red circle", "a green circle", "a circle"], ["a red square", "a blue triangle", ""])}
    rt = spm_rt.compile(pipe, spm_files, transport="calibrated", calibration=calibration)
    cal = rt.transport.calibration["circle"]
    assert cal["hi"] > cal["lo"] and "" in cal["negatives"]
    g = rt.gates(["a red square", "a blue triangle", "", "a yellow circle", "some red paint"])
    assert g[:3, 0].tolist() == [0.0, 0.0, 0.0]  # every calibration negative is closed
    assert g[3, 0] == 1.0 and g[4, 1] == 1.0  # the concept's tokens in the prompt open it fully
    assert ((g >= 0) & (g <= 1)).all()
    rt.remove()


@pytest.mark.parametrize("strategy", ["gated", "merged", "auto"])
def test_official_scale_is_the_first_spms_for_the_whole_network(pipe, strategy):
    """The reference runs the summed adapter with the first SPM's metadata alpha/rank everywhere:
    where SPM 0 does not adapt a module, SPM 1's update must still apply (it was dropped when the
    scale came from SPM 0's per-module entry, 0 there)."""
    first = random_spm(pipe.unet, "a", seed=0, alpha=1.0)
    keys = sorted(first.weights)
    first.weights = {k: v for i, (k, v) in enumerate(sorted(first.weights.items())) if i % 2}  # half the modules
    second = random_spm(pipe.unet, "b", seed=1, alpha=3.0)
    spms = [first, second]
    assert len(first.weights) < len(keys)
    sample, t, emb = unet_inputs(pipe, 2)
    gates = torch.tensor([[0.8, 1.0], [0.5, 0.9]]) if strategy == "gated" else torch.tensor([[0.8, 1.0]] * 2)
    with torch.no_grad():
        want = torch.cat([dense_unet(pipe.unet, spms, gates[b], "official")(sample[b:b + 1], t, emb[b:b + 1]).sample
                          for b in range(2)])
        rt = spm_rt.compile(pipe, spms, combine="official", strategy=strategy, transport="fixed")
        with use_gates(rt, gates):
            got = pipe.unet(sample, t, emb).sample
        rt.remove()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_compile_keywords_override_a_given_config(pipe):
    from spm_rt.compile import SPMConfig

    spm = random_spm(pipe.unet, "a")
    rt = spm_rt.compile(pipe, [spm], config=SPMConfig(), combine="official", strategy="gated", k_max=3)
    assert (rt.config.combine, rt.layer_config.combine, rt.layer_config.strategy, rt.k_max) == (
        "official", "official", "gated", 3)
    rt.remove()
    with pytest.raises(TypeError, match="merge_cache_size"):
        spm_rt.compile(pipe, [spm], config=SPMConfig(), merge_cache_size=7)
    assert getattr(pipe, "_spm_rt", None) is None


@pytest.mark.parametrize("change", [dict(stride=(2, 2)), dict(padding=(1, 1)), dict(dilation=(2, 2))])
def test_strided_padded_or_dilated_1x1_conv_is_refused(pipe, change):
    path = next(p for p, m in adapted_modules(pipe.unet).items() if isinstance(m, torch.nn.Conv2d))
    conv = pipe.unet.get_submodule(path)
    for name, value in change.items():
        setattr(conv, name, value)
    spm = random_spm(pipe.unet, "a")
    with pytest.raises(SPMFormatError, match="stride 1 and no padding/dilation"):
        spm_rt.compile(pipe, [spm])
    assert getattr(pipe, "_spm_rt", None) is None and pipe.unet.get_submodule(path) is conv
