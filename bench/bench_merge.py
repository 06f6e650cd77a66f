"""Per-prompt costs of spm_rt, each paired with a base UNet step (CFG, 1 prompt) of the same round:

* ``merge``: forming every adapted layer's merged weight for one new gate vector (what the merged
  strategy pays once per distinct prompt, before its denoising steps run at the base cost), vs K.
* ``transport``: Facilitated Transport's gates for one prompt (one extra text-encoder pass plus a
  cosine against the cached concept embeddings).
"""
from __future__ import annotations

import pytest
import torch

import spm_rt
from baselines import bare
from conftest import ARCHS, DEVICE, KS, PROMPTS, Case, gates_for, run_paired


def _transport_ks(arch) -> list[int]:
    # Compiling with transport encodes all K concept names; the per-prompt cost does not grow
    # with K beyond a [1, K] dot product, so the big model measures small K only.
    return sorted({KS[0], KS[-1]}) if arch.name == "tiny" else [KS[0]]


MERGE_CASES = [(a.name, k) for a in ARCHS for k in KS]
TRANSPORT_CASES = [(a.name, k) for a in ARCHS for k in _transport_ks(a)]


def _base_step(arch, pipe):
    unet = pipe.unet
    gen = torch.Generator().manual_seed(0)
    lat = torch.randn(2, unet.config.in_channels, arch.latent, arch.latent, generator=gen).to(DEVICE, unet.dtype)
    emb = torch.randn(2, 77, unet.config.cross_attention_dim, generator=gen).to(DEVICE, unet.dtype)
    t = torch.tensor(500, device=DEVICE)

    def base_fn():
        unet(lat, t, encoder_hidden_states=emb)

    return base_fn


def _case(arch, pipe, scenario, k, **options):
    unet = pipe.unet
    return Case(arch=arch.name, scenario=scenario, method="merged" if scenario == "merge" else "transport", k=k,
                prompts=1, unet_batch=2, latent=[2, unet.config.in_channels, arch.latent, arch.latent],
                image=[arch.image, arch.image], dtype=str(arch.dtype).replace("torch.", ""), options=options)


@pytest.mark.parametrize("case", MERGE_CASES, ids=[f"{a}-K{k}" for a, k in MERGE_CASES])
def test_merge_cost(benchmark, models, case):
    arch_name, k = case
    arch = next(a for a in ARCHS if a.name == arch_name)
    pipe = models.pipe(arch)
    rt = spm_rt.compile(pipe, models.spms(arch, k), transport="fixed", strategy="merged",
                        backend="auto" if DEVICE == "cuda" else "torch")
    try:
        g = gates_for(k, 1)[0].to(DEVICE)
        layers = list(rt.layers.values())
        g = g.cpu()

        def clear():
            for layer in layers:
                layer.restore_weight()  # the weights pristine again: the next merge() is a whole merge

        def merge():
            for layer in layers:
                layer.prepare_merged(g)  # merged in place into the weight (a host copy on the first call)

        merge()  # first-call allocations
        merged_bytes = sum(layer.weight.numel() * layer.weight.element_size() for layer in layers)
        c = _case(arch, pipe, "merge", k, layers=len(layers), merged_bytes=merged_bytes,
                  adapted_params=sum(layer.weight.numel() for layer in layers), combine="linear")
        run_paired(benchmark, c, merge, _base_step(arch, pipe), rounds=arch.step_rounds, setup=clear,
                   base_context=lambda: bare(pipe))
    finally:
        rt.remove()


@pytest.mark.parametrize("case", TRANSPORT_CASES, ids=[f"{a}-K{k}" for a, k in TRANSPORT_CASES])
def test_transport_cost(benchmark, models, case):
    arch_name, k = case
    arch = next(a for a in ARCHS if a.name == arch_name)
    pipe = models.pipe(arch)
    rt = spm_rt.compile(pipe, models.spms(arch, k), transport="clipcos_tokenuni")
    try:
        prompt = [PROMPTS[0]]
        rt.gates(prompt)
        c = _case(arch, pipe, "transport", k, metric="clipcos_tokenuni", concepts=k)
        run_paired(benchmark, c, lambda: rt.gates(prompt), _base_step(arch, pipe), rounds=arch.step_rounds,
                   base_context=lambda: bare(pipe))
    finally:
        rt.remove()
