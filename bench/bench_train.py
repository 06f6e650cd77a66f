"""One SPM training iteration: spm_rt's layers vs the reference's per-module LoRA, each paired
with the frozen UNet's own forward+backward of the same shapes.

* ``spm_rt``: :class:`spm_rt.train.Trainer` as shipped: the membrane is spm_rt's gated layers
  (torch autograd on CPU, the fused Triton op on CUDA when installed).
* ``reference``: the same :class:`~spm_rt.train.Trainer` iteration with the membrane the reference
  trainer builds: one ``nn.Module`` per adapted layer with ``lora_down``/``lora_up`` (``nn.Linear``
  or 1x1 ``nn.Conv2d``), installed by replacing the original module's ``forward`` with
  ``org_forward(x) + lora_up(lora_down(x)) * multiplier * scale``, switched on and off by the
  multiplier (so its "off" passes still compute the branch, times 0, as the reference's do).
* base (paired with every round, ``ratio`` in ``extra_info``): the same iteration on the bare UNet,
  gradients taken through the whole frozen UNet via one scalar on its input: what any adapter's
  iteration costs at least.

The iteration is the reference's: ``erase_with_la``, batch 1, 4 anchors, ``max_denoising_steps``
2 (so ``t_to`` is always 1: every round does the same work).

    pytest bench/bench_train.py --benchmark-json bench/results/train.json
"""
from __future__ import annotations

import contextlib
import math

import pytest

pytest.importorskip("pytest_benchmark")

import torch  # noqa: E402
from torch import nn  # noqa: E402

from baselines import ReferenceSPMLayer, bare  # noqa: E402
from conftest import ARCHS, DEVICE, Case, run_paired  # noqa: E402
from spm_rt.formats import adapted_modules  # noqa: E402

ANCHORS = 4  # the reference's sampling_batch_size default


def _config(arch, out_dir):
    from spm_rt.train import TrainConfig

    return TrainConfig.from_dict({
        "prompts": [{"target": "a photo of snoopy", "action": "erase_with_la", "resolution": arch.image,
                     "sampling_batch_size": ANCHORS, "la_strength": 1000}],
        "pretrained_model": {"name_or_path": "tiny"},  # not loaded: the session's pipeline is passed
        "train": {"iterations": 10**6, "max_denoising_steps": 2, "optimizer_type": "AdamW", "lr": 1e-4,
                  "lr_scheduler": "constant", "lr_warmup_steps": 0, "device": DEVICE,
                  "precision": str(arch.dtype).replace("torch.", "")},
        "save": {"path": str(out_dir), "per_steps": 10**6},
    })


class ReferenceTrainingNetwork:
    """The reference trainer's network: a ReferenceSPMLayer per adapted module, reference init
    (down Kaiming-uniform a=sqrt(5), up zeros), multiplier 1 inside ``on()`` and 0 outside."""

    def __init__(self, unet: nn.Module, rank: int = 1, alpha: float = 1.0):
        self.layers = [ReferenceSPMLayer(m, rank, alpha, multiplier=0.0) for m in adapted_modules(unet).values()]
        for layer in self.layers:
            nn.init.kaiming_uniform_(layer.lora_down.weight, a=math.sqrt(5))
            nn.init.zeros_(layer.lora_up.weight)
            # kept in the UNet's dtype, as the reference moves its network to weight_dtype
            layer.apply_to()

    def parameters(self):
        return [p for layer in self.layers for p in layer.parameters()]

    @contextlib.contextmanager
    def on(self):
        for layer in self.layers:
            layer.multiplier = 1.0
        try:
            yield
        finally:
            for layer in self.layers:
                layer.multiplier = 0.0

    def remove(self):
        for layer in self.layers:
            layer.restore()


class FrozenUNetMembrane:
    """No adapter: one scalar (1.0) multiplies the UNet input inside ``on()``, so backward runs
    through the whole frozen UNet for the same rows an adapter's backward would."""

    def __init__(self, unet: nn.Module):
        self.unet = unet
        self.scalar = nn.Parameter(torch.ones((), device=next(unet.parameters()).device))

    def parameters(self):
        return [self.scalar]

    @contextlib.contextmanager
    def on(self):
        dtype = next(self.unet.parameters()).dtype
        hook = self.unet.register_forward_pre_hook(
            lambda m, args: (args[0] * self.scalar.to(dtype),) + tuple(args[1:]))
        try:
            yield
        finally:
            hook.remove()


CASES = [(a.name, m) for a in ARCHS for m in ("spm_rt", "reference")]


@pytest.mark.parametrize("case", CASES, ids=[f"{a}-{m}" for a, m in CASES])
def test_train_step(benchmark, models, tmp_path, case):
    from spm_rt.train import Trainer

    arch_name, method = case
    arch = next(a for a in ARCHS if a.name == arch_name)
    pipe = models.pipe(arch)
    cfg = _config(arch, tmp_path)
    with torch.enable_grad():  # the session's model cache turns grad off globally
        base = Trainer(cfg, pipe, membrane=FrozenUNetMembrane(pipe.unet), progress=False)
        membrane = ReferenceTrainingNetwork(pipe.unet) if method == "reference" else None
        trainer = Trainer(cfg, pipe, membrane=membrane, progress=False)
        try:
            def base_fn():
                with torch.enable_grad(), bare(pipe):
                    base.step()

            def step():
                with torch.enable_grad():
                    trainer.step()

            n_params = sum(p.numel() for p in trainer.membrane.parameters())
            unet = pipe.unet
            lat = [1, unet.config.in_channels, arch.latent, arch.latent]
            info = run_paired(
                benchmark,
                Case(arch=arch.name, scenario="train_step", method=method, k=1, prompts=1,
                     unet_batch=2 + 2 + ANCHORS + 1 + ANCHORS, latent=lat, image=[arch.image, arch.image],
                     dtype=str(arch.dtype).replace("torch.", ""), steps=1,
                     notes="base = the same iteration on the bare frozen UNet (grad through its input)",
                     options={"anchors": ANCHORS, "t_to": 1, "trainable_parameters": n_params,
                              "adapted_modules": len(adapted_modules(unet)),
                              "passes": {"trajectory_cfg3_no_grad": 2, "spm_off_no_grad": 2 + ANCHORS,
                                         "spm_on_grad": 1 + ANCHORS},
                              "backend": "torch" if DEVICE == "cpu" else "auto"}),
                step, base_fn, rounds=arch.rounds * 2 if arch.name == "tiny" else arch.rounds, warmup_rounds=1)
            assert math.isfinite(trainer.history[-1]["loss"])
            assert info["ratio"] > 0
        finally:
            trainer.close()
            base.close()
