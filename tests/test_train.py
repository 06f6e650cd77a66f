"""spm_rt.train: the reference training algorithm on spm_rt layers (CPU, tiny pipelines)."""
import json
import math
import shutil
import textwrap
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import spm_rt
from spm_rt import load_spm, use_gates
from spm_rt.formats import adapted_modules, lora_key
from spm_rt.testing import random_spm, tiny_pipeline
from spm_rt.train import ConfigError, TrainConfig, load_config
from spm_rt.train.anchors import sample_anchors
from spm_rt.train.trainer import Trainer, TrainableSPM, build_optimizer

SHORT_ITERS, SHORT_CKPT, RESUME_AT = 20, 5, 15


def run_config(out, **train):
    """A CPU-sized run on the tiny SD1.5 pipeline (16 px images = 8x8 latents)."""
    t = {"iterations": SHORT_ITERS, "max_denoising_steps": 3, "optimizer_type": "AdamW", "lr": 1e-2,
         "lr_scheduler": "cosine", "lr_warmup_steps": 2, "seed": 7}
    t.update(train)
    return {
        "prompts": [{"target": "a red circle", "action": "erase_with_la", "resolution": 16,
                     "sampling_batch_size": 2, "la_strength": 100}],
        "pretrained_model": {"name_or_path": "tiny"},
        "train": t,
        "save": {"name": "circle", "path": str(out), "per_steps": SHORT_CKPT},
    }


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("short_run")
    trainer = Trainer(TrainConfig.from_dict(run_config(out)), progress=False)
    before = trainer.evaluate(3)
    path = trainer.run()
    after = trainer.evaluate(3)
    final = trainer.membrane.to_spm()
    trainer.close()
    print("\nshort run: eval before", before, "after", after)
    for rec in trainer.history:
        print(f"  step {rec['step']:2d} t_to {rec['t_to']} lr {rec['lr']:.2e} erase {rec['erase']:.3e} "
              f"anchoring {rec['anchoring']:.3e}")
    return SimpleNamespace(out=out, path=path, before=before, after=after, final=final, history=trainer.history)


def test_short_run_lowers_erase_loss_and_keeps_anchoring_small(short_run):
    before, after = short_run.before, short_run.after
    assert before["anchoring"] < 1e-10  # a fresh SPM is a no-op (up = 0)
    assert after["erase"] < 0.5 * before["erase"], (before, after)
    # anchors move far less than the erased concept does
    assert after["anchoring"] < 0.05 * before["erase"], (before, after)
    assert after["anchoring"] > 0  # the membrane did change the UNet
    assert [r["step"] for r in short_run.history] == list(range(1, SHORT_ITERS + 1))
    assert all(math.isfinite(r["erase"]) and math.isfinite(r["anchoring"]) for r in short_run.history)
    names = sorted(p.name for p in short_run.out.iterdir())
    assert names == sorted([f"circle_{n}steps.{ext}" for n in (5, 10, 15) for ext in ("safetensors", "state.pt")]
                           + ["circle_last.safetensors", "circle_losses.csv"])


def test_saved_file_round_trips_through_load_spm_and_diffusers(short_run):
    spm = load_spm(short_run.path)
    assert spm.concepts == ["a red circle"] and spm.rank == 1 and spm.alpha == 1.0
    assert spm.metadata["prompts"] == "a red circle"
    assert json.loads(spm.metadata["spm_rt.train"])["step"] == SHORT_ITERS
    pipe = tiny_pipeline(0)
    assert set(spm.weights) == {lora_key(p) for p in adapted_modules(pipe.unet)}
    for key, w in short_run.final.weights.items():
        assert torch.equal(spm.weights[key].down, w.down) and torch.equal(spm.weights[key].up, w.up)
        assert spm.weights[key].conv == w.conv

    pytest.importorskip("peft")
    g = torch.Generator().manual_seed(3)
    sample = torch.randn(2, 4, 8, 8, generator=g)
    emb = torch.randn(2, 77, pipe.unet.config.cross_attention_dim, generator=g)
    t = torch.tensor(400)
    ref = tiny_pipeline(0)
    ref.load_lora_weights(str(short_run.path), adapter_name="spm")
    with torch.no_grad():
        base = pipe.unet(sample, t, emb).sample
        expected = ref.unet(sample, t, emb).sample
        rt = spm_rt.compile(pipe, [short_run.path], transport="fixed")
        with use_gates(rt, torch.ones(1, 1)):
            got = pipe.unet(sample, t, emb).sample
    rt.remove()
    assert (expected - base).abs().max() > 1e-4  # the trained membrane changes the output
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_resume_reproduces_the_uninterrupted_run(short_run, tmp_path):
    for ext in ("safetensors", "state.pt"):
        shutil.copy(short_run.out / f"circle_{RESUME_AT}steps.{ext}", tmp_path)
    trainer = Trainer(TrainConfig.from_dict(run_config(tmp_path)), progress=False)
    path = trainer.run(resume=tmp_path / f"circle_{RESUME_AT}steps.safetensors")
    trainer.close()
    assert trainer.history == short_run.history  # every loss of every step, bit for bit
    resumed, uninterrupted = load_spm(path), load_spm(short_run.path)
    for key, w in uninterrupted.weights.items():
        assert torch.equal(resumed.weights[key].down, w.down)
        assert torch.equal(resumed.weights[key].up, w.up)


# ---------------------------------------------------------------------------------------------
# gradients: spm_rt layers vs an independently written per-module LoRA

class PlainLoRA(nn.Module):
    """A per-module LoRA as LoRA trainers usually build it: lora_down/lora_up modules and
    ``forward = org_forward(x) + lora_up(lora_down(x)) * scale``, installed by replacing forward."""

    def __init__(self, org: nn.Module, down: torch.Tensor, up: torch.Tensor, scale: float):
        super().__init__()
        if isinstance(org, nn.Conv2d):
            self.lora_down = nn.Conv2d(down.shape[1], down.shape[0], 1, bias=False)
            self.lora_up = nn.Conv2d(up.shape[1], up.shape[0], 1, bias=False)
            down, up = down[:, :, None, None], up[:, :, None, None]
        else:
            self.lora_down = nn.Linear(down.shape[1], down.shape[0], bias=False)
            self.lora_up = nn.Linear(up.shape[1], up.shape[0], bias=False)
        with torch.no_grad():
            self.lora_down.weight.copy_(down)
            self.lora_up.weight.copy_(up)
        self.scale = scale
        self.org = org
        self.org_forward = org.forward
        org.forward = self.forward

    def forward(self, x):
        return self.org_forward(x) + self.lora_up(self.lora_down(x)) * self.scale

    def remove(self):
        del self.org.forward


@pytest.mark.parametrize("arch", ["sd15", "sd2"])
def test_gradients_match_a_plain_per_module_lora(arch):
    pipe = tiny_pipeline(0, arch=arch)
    unet = pipe.unet.requires_grad_(False)
    init = random_spm(unet, "circle", seed=5, alpha=2.0)  # non-zero up, so D gets gradients too
    g = torch.Generator().manual_seed(0)
    sample = torch.randn(2, 4, 8, 8, generator=g)
    emb = torch.randn(2, 77, unet.config.cross_attention_dim, generator=g)
    goal = torch.randn(2, 4, 8, 8, generator=g)

    membrane = TrainableSPM(unet, ["circle"], init=init)
    with membrane.on():
        out = unet(sample, torch.tensor(300), emb).sample
    ((out - goal) ** 2).mean().backward()
    got = {p: (membrane.down[p].grad, membrane.up[p].grad) for p in membrane.down}
    membrane.remove()

    modules = adapted_modules(unet)
    assert not any(getattr(m, "_spm_wrapper", False) for _, m in unet.named_modules())
    plain = {p: PlainLoRA(m, init.weights[lora_key(p)].down, init.weights[lora_key(p)].up, 2.0)
             for p, m in modules.items()}
    out_ref = unet(sample, torch.tensor(300), emb).sample
    ((out_ref - goal) ** 2).mean().backward()
    torch.testing.assert_close(out, out_ref, rtol=1e-5, atol=1e-5)
    for path, lora in plain.items():
        d_ref = lora.lora_down.weight.grad.reshape(lora.lora_down.weight.shape[:2])
        u_ref = lora.lora_up.weight.grad.reshape(lora.lora_up.weight.shape[:2])
        assert d_ref.abs().max() > 0 and u_ref.abs().max() > 0, path
        torch.testing.assert_close(got[path][0], d_ref, rtol=1e-4, atol=1e-7, msg=lambda m: f"{path} down: {m}")
        torch.testing.assert_close(got[path][1], u_ref, rtol=1e-4, atol=1e-7, msg=lambda m: f"{path} up: {m}")
        lora.remove()
    assert all(p.grad is None for p in unet.parameters())  # the UNet stays frozen


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.gpu
def test_gradients_through_the_triton_op_match_a_plain_lora_on_cuda():
    pytest.importorskip("triton")
    pipe = tiny_pipeline(0).to("cuda")
    unet = pipe.unet.requires_grad_(False)
    init = random_spm(unet, "circle", seed=5)
    g = torch.Generator().manual_seed(0)
    sample, emb = torch.randn(2, 4, 8, 8, generator=g).cuda(), torch.randn(2, 77, 32, generator=g).cuda()
    membrane = TrainableSPM(unet, ["circle"], init=init, backend="triton")
    with membrane.on():
        unet(sample, torch.tensor(300), emb).sample.square().mean().backward()
    got = {p: (membrane.down[p].grad, membrane.up[p].grad) for p in membrane.down}
    membrane.remove()
    plain = {p: PlainLoRA(m, init.weights[lora_key(p)].down.cuda(), init.weights[lora_key(p)].up.cuda(), 1.0)
             for p, m in adapted_modules(unet).items()}
    unet(sample, torch.tensor(300), emb).sample.square().mean().backward()
    for path, lora in plain.items():
        torch.testing.assert_close(got[path][0], lora.lora_down.weight.grad.reshape(got[path][0].shape),
                                   rtol=2e-3, atol=1e-6)
        torch.testing.assert_close(got[path][1], lora.lora_up.weight.grad.reshape(got[path][1].shape),
                                   rtol=2e-3, atol=1e-6)


def test_other_noise_schedulers_v_prediction_and_bf16_train():
    pipe = tiny_pipeline(0)
    for sched, precision, v_pred in [("ddpm", "float32", False), ("euler_a", "float32", False),
                                     ("lms", "float32", True), ("ddim", "bf16", False)]:
        cfg = TrainConfig.from_dict({
            "prompts": [{"target": "c", "action": "erase_with_la", "resolution": 16, "sampling_batch_size": 2}],
            "pretrained_model": {"name_or_path": "tiny", "v_pred": v_pred},
            "train": {"iterations": 1, "max_denoising_steps": 4, "optimizer_type": "AdamW", "lr": 1e-2,
                      "lr_warmup_steps": 0, "lr_scheduler": "constant", "noise_scheduler": sched,
                      "precision": precision},
            "save": {"path": "unused"}})
        trainer = Trainer(cfg, pipe, progress=False)
        assert trainer.scheduler.config.prediction_type == ("v_prediction" if v_pred else "epsilon")
        before = [p.detach().clone() for p in trainer.membrane.parameters()]
        rec = trainer.step()
        layer = next(iter(trainer.membrane.layers.values()))
        assert layer.stack.down.dtype == trainer.unet.dtype  # membranes run in the UNet's dtype ...
        assert all(p.dtype == torch.float32 for p in trainer.membrane.parameters())  # ... fp32 masters
        assert math.isfinite(rec["loss"]) and rec["anchoring"] is not None, sched
        assert any(not torch.equal(a, p) for a, p in zip(before, trainer.membrane.parameters())), sched
        trainer.close()
    assert pipe.unet.dtype == torch.bfloat16


# ---------------------------------------------------------------------------------------------
# Latent Anchoring layout (the reference's defect fixed)

def test_every_anchor_is_predicted_as_its_own_condition(tmp_path):
    cfg = run_config(tmp_path, iterations=1)
    cfg["prompts"][0]["sampling_batch_size"] = 3
    trainer = Trainer(TrainConfig.from_dict(cfg), progress=False)
    calls = []
    hook = trainer.unet.register_forward_pre_hook(
        lambda m, args, kwargs: calls.append(kwargs["encoder_hidden_states"].detach().clone()), with_kwargs=True)
    rec = trainer.step()
    hook.remove()
    trainer.close()
    traj, off, on = calls[:-2], calls[-2], calls[-1]
    assert len(traj) == rec["t_to"] and all(c.shape[0] == 2 for c in traj)
    assert off.shape[0] == 2 + 3 and on.shape[0] == 1 + 3  # [positive, neutral, a1..a3] / [target, a1..a3]
    anchors = on[1:]
    assert torch.equal(off[2:], anchors)
    uncond = trainer.embeds[0]["unconditional"].emb[0]
    target = trainer.embeds[0]["target"].emb[0]
    for i, a in enumerate(anchors):
        assert not torch.allclose(a, uncond)
        assert 0.8 - 1e-4 <= float(a.norm() / target.norm()) <= 1.2 + 1e-4
        for b in anchors[i + 1:]:
            assert not torch.allclose(a, b)
    torch.testing.assert_close(on[0], target)


def test_sample_anchors_is_seeded_and_scaled():
    target = torch.randn(1, 77, 16)
    a = sample_anchors(target, 5, torch.Generator().manual_seed(1))
    b = sample_anchors(target, 5, torch.Generator().manual_seed(1))
    assert a.shape == (5, 77, 16) and torch.equal(a, b)
    ratio = a.flatten(1).norm(dim=1) / target.norm()
    assert ((ratio >= 0.8 - 1e-5) & (ratio <= 1.2 + 1e-5)).all()


# ---------------------------------------------------------------------------------------------
# SDXL and the CLI

def test_sdxl_tiny_run_through_the_cli(tmp_path, capsys):
    (tmp_path / "prompts.yaml").write_text(textwrap.dedent("""\
        - target: "a red circle"
          action: "erase_with_la"
          guidance_scale: "2.0"
          resolution: 32
          dynamic_resolution: true
          dynamic_crops: true
          sampling_batch_size: 2
          la_strength: 100
        - target: "snoopy, the dog"
          action: "erase"
          resolution: 16
        """))
    (tmp_path / "run.yaml").write_text(textwrap.dedent(f"""\
        prompts_file: prompts.yaml
        pretrained_model: {{name_or_path: tiny-sdxl}}
        train: {{iterations: 2, max_denoising_steps: 3, optimizer_type: AdamW, lr: 0.01, seed: 1}}
        save: {{name: xl, path: "{tmp_path / 'out'}", per_steps: 1}}
        """))
    from spm_rt.cli import main

    assert main(["train", "--config", str(tmp_path / "run.yaml"), "--no-progress"]) == 0
    path = capsys.readouterr().out.strip().splitlines()[-1]
    spm = load_spm(path)
    # both concepts in one SPM; the "," inside a concept survives through the JSON metadata
    assert spm.concepts == ["a red circle", "snoopy, the dog"]
    assert len(spm.weights) == len(adapted_modules(tiny_pipeline(0, arch="sdxl").unet))
    assert any(w.up.abs().max() > 0 for w in spm.weights.values())
    assert (tmp_path / "out" / "xl_1steps.state.pt").is_file()


# ---------------------------------------------------------------------------------------------
# config validation

BASE = {"prompts": [{"target": "circle"}], "pretrained_model": {"name_or_path": "tiny"}}


def with_(**sections):
    d = json.loads(json.dumps(BASE))
    for k, v in sections.items():
        d[k] = v
    return d


@pytest.mark.parametrize("data, needle", [
    (with_(trian={"iterations": 5}), "trian"),
    (with_(train={"iteratons": 5}), "train.iteratons"),
    (with_(prompts=[{"target": "c", "la_strenght": 3}]), "prompts[0].la_strenght"),
    (with_(logging={"use_wandb": False, "intervall": 3}), "logging.intervall"),
    (with_(network={"rank": 1, "dim": 4}), "network.dim"),
    (with_(prompts=[{"target": "c", "action": "forget"}]), "prompts[0].action"),
    (with_(prompts=[{"positive": "c"}]), "prompts[0].target is required"),
    (with_(train={"iterations": "many"}), "train.iterations must be an integer"),
    (with_(train={"precision": "fp8"}), "train.precision"),
    (with_(prompts=[{"target": "c", "batch_size": 3, "sampling_batch_size": 4}]), "multiple of batch_size"),
    (with_(prompts_file="p.yaml"), "exactly one of"),
    ({"prompts": [{"target": "c"}]}, "pretrained_model"),
])
def test_config_errors_name_the_field(data, needle):
    with pytest.raises(ConfigError, match=None) as info:
        TrainConfig.from_dict(data)
    assert needle in str(info.value)


def test_config_coerces_like_the_reference_and_fills_defaults():
    cfg = TrainConfig.from_dict(with_(
        prompts=[{"target": "snoopy", "guidance_scale": "1.0", "dynamic_resolution": "true"},
                 {"target": "mickey", "unconditional": "blurry", "action": "erase_with_la"}],
        train={"text_encoder_lr": "5e-05", "precision": "fp16", "iterations": 10.0}))
    a, b = cfg.prompts
    assert (a.positive, a.unconditional, a.neutral, a.guidance_scale, a.dynamic_resolution) == \
        ("snoopy", "", "", 1.0, True)
    assert (b.neutral, b.la_strength, b.sampling_batch_size, b.action) == ("blurry", 1000.0, 4, "erase_with_la")
    assert cfg.train.precision == "float16" and cfg.train.iterations == 10 and cfg.train.text_encoder_lr == 5e-5
    assert (cfg.network.rank, cfg.network.alpha, cfg.train.max_denoising_steps, cfg.train.lr) == (1, 1.0, 30, 1e-4)
    assert cfg.concepts == ["snoopy", "mickey"]
    assert any("text_encoder_lr" in n for n in cfg.notes)


def test_shipped_reference_config_loads_unchanged(tmp_path, monkeypatch):
    from importlib.resources import files

    src = files("spm_rt.train") / "configs"
    cfg = load_config(src / "snoopy.yaml")  # prompts_file found next to the config
    assert cfg.concepts == ["snoopy"] and cfg.prompts[0].action == "erase_with_la"
    assert cfg.train.optimizer_type == "AdamW8bit" and cfg.save.per_steps == 500
    assert any("logging" in n for n in cfg.notes) and any("other" in n for n in cfg.notes)
    # the reference resolves prompts_file from the working directory
    (tmp_path / "configs" / "snoopy").mkdir(parents=True)
    shutil.copy(src / "snoopy_prompts.yaml", tmp_path / "configs" / "snoopy" / "prompt.yaml")
    text = (src / "snoopy.yaml").read_text().replace('"snoopy_prompts.yaml"', '"configs/snoopy/prompt.yaml"')
    (tmp_path / "configs" / "snoopy" / "config.yaml").write_text(text)
    monkeypatch.chdir(tmp_path)
    assert load_config("configs/snoopy/config.yaml").concepts == ["snoopy"]
    assert load_config(src / "tiny_circle.yaml").pretrained_model.name_or_path == "tiny"


def test_adamw8bit_falls_back_to_adamw_with_a_warning():
    cfg = TrainConfig.from_dict(with_(train={"optimizer_type": "AdamW8bit", "optimizer_args": ["weight_decay=0.1"]}))
    p = nn.Parameter(torch.zeros(3))
    with pytest.warns(UserWarning, match="AdamW8bit"):
        opt = build_optimizer([p], cfg)
    assert type(opt) is torch.optim.AdamW and opt.param_groups[0]["weight_decay"] == 0.1


def _adv_config(tmp_path, **adv):
    return TrainConfig.from_dict({
        "prompts": [{"target": "circle", "action": "erase_with_la", "resolution": 32, "sampling_batch_size": 2}],
        "pretrained_model": {"name_or_path": "tiny"},
        "train": {"iterations": 6, "max_denoising_steps": 3, "optimizer_type": "AdamW", "lr_scheduler": "constant",
                  "lr": 1e-3},
        "save": {"name": "c", "path": str(tmp_path), "per_steps": 3},
        "adversarial": {"population": 4, "refresh_every": 2, "attack_steps": 2, "per_step": 2, "buffer": 4, **adv},
    })


def test_adversarial_population_is_refreshed_against_the_membrane_and_trained_under(tmp_path):
    torch.manual_seed(0)
    trainer = Trainer(_adv_config(tmp_path), progress=False)
    try:
        pop = trainer.adversarial
        before = pop.prefix.detach().clone()
        recs = [trainer.step() for _ in range(6)]
        # first refresh once the buffer holds a training latent (step 2), then every 2 steps
        assert [r["step"] for r in pop.log] == [2, 4]
        assert all(r["attack_loss_first"] is not None and r["seconds"] >= 0 for r in pop.log)
        assert not torch.equal(pop.prefix.detach(), before)  # the attack moved the prefixes
        assert recs[0]["adversarial"] is None and all(r["adversarial"] is not None for r in recs[2:])
        assert all(r["loss"] >= r["erase"] for r in recs)
        # the population's conditions are the prefixed target, encoded by the pipeline's text encoder
        from spm_rt.world.attack_optim import encode_prefixed

        emb, _ = encode_prefixed(trainer.pipe, pop.ids, pop.prefix.detach())
        assert pop.emb.shape == emb.shape
    finally:
        trainer.close()


def test_adversarial_config_validates_and_init_starts_from_a_trained_spm(tmp_path):
    with pytest.raises(ConfigError, match="adversarial.per_step"):
        _adv_config(tmp_path, per_step=9)
    with pytest.raises(ConfigError, match="adversarial"):
        _adv_config(tmp_path, bogus=1)
    first = Trainer(_adv_config(tmp_path), progress=False)
    try:
        path = first.save(tmp_path / "start.safetensors")
    finally:
        first.close()
    cfg = _adv_config(tmp_path, init=str(path))
    trainer = Trainer(cfg, progress=False)
    try:
        start = load_spm(path)
        key = next(iter(start.weights))
        path_ = next(iter(trainer.membrane.down))
        assert torch.equal(trainer.membrane.down[path_].detach().cpu(), start.weights[key].down.float())
        assert cfg.to_dict()["adversarial"]["init"] == str(path)
    finally:
        trainer.close()
    with pytest.raises(FileNotFoundError, match="adversarial.init"):
        Trainer(_adv_config(tmp_path, init="missing.safetensors"), progress=False)


def test_adversarial_retain_set_is_anchored_beside_the_random_anchors(tmp_path):
    torch.manual_seed(0)
    cfg = _adv_config(tmp_path, retain=["square", "a red square", "a blue triangle"], retain_per_step=2)
    trainer = Trainer(cfg, progress=False)
    try:
        pop = trainer.adversarial
        assert pop.retain.shape[0] == 3
        recs = [trainer.step() for _ in range(4)]
        # fresh membrane (up = 0) is a no-op at step 0: SPM on and off agree on the retain rows
        assert recs[0]["retain"] < 1e-10
        assert all(r["retain"] is not None for r in recs) and max(r["retain"] for r in recs[1:]) > 1e-9
        rows = pop.retain_conditions(5, torch.Generator().manual_seed(0))
        assert rows.shape == (5, *pop.retain.shape[1:])
        assert all(any(torch.equal(row, r) for r in pop.retain) for row in rows)
        torch.testing.assert_close(pop.retain[1:2], trainer._encode("a red square").emb)
    finally:
        trainer.close()


def test_adversarial_init_of_a_lower_rank_is_widened_keeping_its_update(tmp_path):
    first = Trainer(_adv_config(tmp_path), progress=False)
    try:
        for _ in range(2):
            first.step()
        path = first.save(tmp_path / "rank1.safetensors")
    finally:
        first.close()
    cfg = _adv_config(tmp_path, init=str(path))
    cfg.network.rank, cfg.network.alpha = 3, 1.0
    wide = Trainer(cfg, progress=False)
    try:
        start, got = load_spm(path), wide.membrane.to_spm()
        assert got.rank == 3 and start.rank == 1
        for key, w in start.weights.items():
            g = got.weights[key]
            assert g.down.shape[0] == 3 and g.up.shape[1] == 3
            before = (start.alpha / start.rank) * w.up.float().flatten(1) @ w.down.float().flatten(1)
            after = (got.alpha / got.rank) * g.up.float().flatten(1) @ g.down.float().flatten(1)
            torch.testing.assert_close(after, before)
    finally:
        wide.close()
