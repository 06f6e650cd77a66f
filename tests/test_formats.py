"""SPM file format: reference layout, metadata, and every malformed-file error."""
import json
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

import spm_rt
from spm_rt import SPMFormatError, load_spm, save_spm
from spm_rt.formats import adapted_modules, lora_key
from spm_rt.testing import random_spm, tiny_pipeline


def test_sd15_module_discovery_matches_reference_layout(pipe):
    mods = adapted_modules(pipe.unet)
    # 3 Transformer2DModels in the tiny UNet (1 down, 2 up at the cross-attn level... by config)
    names = {p.rsplit(".", 1)[-1] if "transformer_blocks" not in p else p.split("transformer_blocks.0.")[1]
             for p in mods}
    assert names == {"proj_in", "proj_out", "attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
                     "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0", "ff.net.0.proj", "ff.net.2"}
    n_transformers = sum(type(m).__name__ == "Transformer2DModel" for m in pipe.unet.modules())
    assert len(mods) == 12 * n_transformers
    assert isinstance(mods[next(p for p in mods if p.endswith("proj_in"))], torch.nn.Conv2d)
    assert not any("resnets" in p or "text" in p for p in mods)


def test_real_sd15_counts_from_config():
    """SD1.x: 16 transformers x 12 modules = 192 modules, 423,936 parameters at rank 1."""
    from diffusers import UNet2DConditionModel

    cfg = dict(sample_size=8, cross_attention_dim=768, block_out_channels=(320, 640, 1280, 1280),
               attention_head_dim=8, layers_per_block=2)
    with torch.device("meta"):
        unet = UNet2DConditionModel(**cfg)
    mods = adapted_modules(unet)
    assert len(mods) == 192
    assert sum(sum(m.weight.shape[:2]) for m in mods.values()) == 423_936


def test_roundtrip_keys_metadata_and_commas(tmp_path, pipe):
    spm = random_spm(pipe.unet, ["mickey, the mouse", "snoopy"], seed=1)
    path = save_spm(spm, tmp_path / "a.safetensors")
    tensors = load_file(str(path))
    key = lora_key("down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k")
    assert key == "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    assert tensors[key + ".alpha"].dim() == 0
    assert tensors["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"].dim() == 4  # 1x1 conv
    from safetensors import safe_open
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert meta["rank"] == "1" and float(meta["alpha"]) == 1.0
    assert meta["prompts"] == "mickey, the mouse,snoopy"  # what other tools read
    assert json.loads(meta["spm_rt.concepts"]) == ["mickey, the mouse", "snoopy"]
    back = load_spm(path)
    assert back.concepts == ["mickey, the mouse", "snoopy"]
    for k, w in spm.weights.items():
        assert torch.equal(back.weights[k].down, w.down) and torch.equal(back.weights[k].up, w.up)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_and_rank2(tmp_path, pipe, dtype):
    spm = random_spm(pipe.unet, "x", rank=2, alpha=4.0)
    path = save_spm(spm, tmp_path / "h.safetensors", dtype=dtype)
    back = load_spm(path)
    w = next(iter(back.weights.values()))
    assert w.down.dtype == dtype and w.rank == 2 and w.alpha == 4.0 and back.rank == 2


def test_reference_style_file_without_project_key(tmp_path, pipe):
    """A file as the reference writes it: prompts metadata only; another without metadata."""
    spm = random_spm(pipe.unet, "x")
    tensors = {}
    for k, w in spm.weights.items():
        tensors[k + ".lora_down.weight"] = w.down[:, :, None, None] if w.conv else w.down
        tensors[k + ".lora_up.weight"] = w.up[:, :, None, None] if w.conv else w.up
        tensors[k + ".alpha"] = torch.tensor(1.0)
    save_file(tensors, str(tmp_path / "ref.safetensors"), metadata={"prompts": "mickey,snoopy,spongebob",
                                                                      "rank": "1", "alpha": "1.0"})
    assert load_spm(tmp_path / "ref.safetensors").concepts == ["mickey", "snoopy", "spongebob"]
    save_file(tensors, str(tmp_path / "bare.safetensors"))
    bare = load_spm(tmp_path / "bare.safetensors")
    assert bare.concepts is None
    assert load_spm(tmp_path / "bare.safetensors", concepts="snoopy").concepts == ["snoopy"]


def _write(tmp_path, tensors, name="bad.safetensors"):
    p = tmp_path / name
    save_file(tensors, str(p))
    return p


def test_malformed_files_raise_naming_file_and_key(tmp_path, pipe):
    spm = random_spm(pipe.unet, "x")
    good = save_spm(spm, tmp_path / "good.safetensors")
    tensors = load_file(str(good))
    k0 = next(iter(spm.weights))

    t = dict(tensors); del t[k0 + ".lora_up.weight"]
    with pytest.raises(SPMFormatError, match=rf"bad.safetensors.*{k0}\.lora_up\.weight"):
        load_spm(_write(tmp_path, t))

    t = dict(tensors); t[k0 + ".lora_down.weight"] = t[k0 + ".lora_down.weight"].clone(); t[k0 + ".lora_down.weight"].view(-1)[0] = float("nan")
    with pytest.raises(SPMFormatError, match="non-finite"):
        load_spm(_write(tmp_path, t))

    t = dict(tensors); t["lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight"] = torch.zeros(1, 4)
    with pytest.raises(SPMFormatError, match="unknown key 'lora_te_"):
        load_spm(_write(tmp_path, t))

    t = dict(tensors); t[k0 + ".lora_up.weight"] = torch.zeros(3, 2)
    with pytest.raises(SPMFormatError, match=rf"{k0}: (rank mismatch|conv SPM weights must be 1x1)"):
        load_spm(_write(tmp_path, t))

    raw = good.read_bytes()
    trunc = tmp_path / "trunc.safetensors"
    trunc.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(SPMFormatError, match="trunc.safetensors"):
        load_spm(trunc)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(struct.pack("<Q", 10) + b"not json!!")
    with pytest.raises(SPMFormatError, match="garbage.safetensors"):
        load_spm(garbage)


def test_pickle_refused(tmp_path, pipe):
    p = tmp_path / "spm.pt"
    torch.save({"a": torch.zeros(1)}, p)
    with pytest.raises(SPMFormatError, match="pickle"):
        load_spm(p)
    disguised = tmp_path / "spm.safetensors"
    disguised.write_bytes(p.read_bytes())
    with pytest.raises(SPMFormatError, match="pickle"):
        load_spm(disguised)


def test_other_architecture_lists_mismatches(tmp_path):
    sd15, sdxl = tiny_pipeline(0), tiny_pipeline(0, "sdxl")
    path = save_spm(random_spm(sd15.unet, "x"), tmp_path / "sd15.safetensors")
    with pytest.raises(SPMFormatError, match=r"sd15.safetensors.*(name no adapted module|wrong shape).*lora_unet_"):
        spm_rt.compile(sdxl, [path])
    assert not hasattr(sdxl, "_spm_rt")
    assert not any(getattr(m, "_spm_wrapper", False) for m in sdxl.unet.modules())


def test_safetensors_whose_header_length_starts_with_0x80_is_not_taken_for_a_pickle(tmp_path):
    path = tmp_path / "x.safetensors"
    tensors = {"lora_unet_a.lora_down.weight": torch.zeros(1, 4), "lora_unet_a.lora_up.weight": torch.zeros(4, 1),
               "lora_unet_a.alpha": torch.tensor(1.0)}
    for pad in range(300):  # metadata length that puts 0x80 in the header length's first byte
        save_file(tensors, str(path), metadata={"pad": "x" * pad})
        if path.read_bytes()[0] == 0x80:
            break
    assert path.read_bytes()[0] == 0x80
    try:
        load_spm(path, concepts=["a"])
    except SPMFormatError as exc:  # the layout may be refused for other reasons, never as a pickle
        assert "pickle" not in str(exc)
