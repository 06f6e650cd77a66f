"""Whole generations through ``torch.compile``: what a latency-minded user runs.

Every case times a complete text-to-image generation (text encoding, Facilitated Transport gates,
all denoising steps with classifier-free guidance; ``output_type="latent"``, so no VAE decode) and
pairs each timed round with a round of its baseline in the same process:

* ``compiled-base``  the unpatched UNet under ``torch.compile`` vs the same UNet eager;
* ``merged``         1 prompt, SPMs merged (FT gates on), a new gate vector every generation (the
                     merge is inside the timed call) vs compiled base;
* ``merged-steady``  the same with the gate vector the buffers already hold (repeat prompts);
* ``gated``          4 distinct prompts in one batch (per-prompt FT gates: the gated branch) vs
                     compiled base on the same 4 prompts.

UNets are compiled with ``fullgraph=True, dynamic=False`` (one static graph per batch shape, for
base and erased alike). The erased UNet is a copy of the base one patched by ``spm_rt.compile``;
K changes go through ``set_spms`` (more SPMs than slots: one recompile, outside the timed rounds).
Each case records the number of compiled graphs before and after its timed rounds and fails if a
recompile happened while timing.

    SPM_RT_BENCH_ARCHS=sd15 taskset -c 0 pytest bench/bench_compiled.py \\
        --benchmark-json bench/results/cpu_compiled.json

Knobs: SPM_RT_BENCH_COMPILED_KS (default 1,16,64), SPM_RT_BENCH_COMPILED_STEPS (default 20),
SPM_RT_BENCH_COMPILED_ROUNDS (default 3; the 4-prompt cases use one fewer, at least 2).
"""
from __future__ import annotations

import copy
import os

import pytest
import torch
from conftest import ARCHS, DEVICE, PROMPTS, Case, run_paired

KS = tuple(int(k) for k in os.environ.get("SPM_RT_BENCH_COMPILED_KS", "1,16,64").split(",") if k.strip())
STEPS = int(os.environ.get("SPM_RT_BENCH_COMPILED_STEPS", "20"))
ROUNDS = int(os.environ.get("SPM_RT_BENCH_COMPILED_ROUNDS", "3"))
GUIDANCE = 7.5
COMPILE = dict(fullgraph=True, dynamic=False)


def _graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


class CompiledModels:
    """Per architecture: an eager base pipeline, the same UNet compiled, and an erased copy."""

    def __init__(self, models):
        self.models = models
        self._state: dict[str, dict] = {}

    def get(self, arch, k: int) -> dict:
        import diffusers

        import spm_rt

        st = self._state.get(arch.name)
        if st is None:
            pipe = self.models.pipe(arch)
            compiled_base = diffusers.StableDiffusionPipeline(
                **{**pipe.components, "unet": torch.compile(pipe.unet, **COMPILE)})
            erased = diffusers.StableDiffusionPipeline(**{**pipe.components, "unet": copy.deepcopy(pipe.unet)})
            for p in (compiled_base, erased):
                p.set_progress_bar_config(disable=True)
            spms = self._named(arch, k)
            rt = spm_rt.compile(erased, spms, transport="clipcos_tokenuni")
            rt.compile_unet(**COMPILE)
            st = self._state[arch.name] = {"eager": pipe, "base": compiled_base, "rt": rt, "k": k}
        if st["k"] != k:
            import warnings

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # more SPMs than slots: reallocated, recompiled once
                st["rt"].set_spms(self._named(arch, k))
            st["k"] = k
        return st

    def _named(self, arch, k):
        from dataclasses import replace

        # concept names that the prompts below partly share, so FT gates differ per prompt
        words = ["cat", "lighthouse", "astronaut", "soup", "horse", "watercolor"]
        return [replace(s, concepts=[words[i % len(words)] + (f" {i}" if i >= len(words) else "")])
                for i, s in enumerate(self.models.spms(arch, k))]


@pytest.fixture(scope="session")
def compiled(models):
    return CompiledModels(models)


def _generate(pipe, prompts, arch):
    gens = [torch.Generator(DEVICE).manual_seed(i) for i in range(len(prompts))]
    return pipe(prompts, num_inference_steps=STEPS, guidance_scale=GUIDANCE, height=arch.image, width=arch.image,
                output_type="latent", generator=gens).images


CASES = [("compiled-base", 0)] + [(m, k) for k in KS for m in ("merged", "gated")] + \
    ([("merged-steady", 16)] if 16 in KS else [])


@pytest.mark.parametrize("arch", ARCHS, ids=[a.name for a in ARCHS])
@pytest.mark.parametrize("method,k", CASES, ids=[f"{m}-K{k}" for m, k in CASES])
def test_compiled_generation(benchmark, compiled, arch, method, k):
    if DEVICE != "cpu" and arch.name == "sd15" and arch.dtype == torch.float32:
        pytest.skip("GPU runs use bench/gpu_check.sh")
    st = compiled.get(arch, max(k, 1))
    rt = st["rt"]
    prompts = PROMPTS[:4] if method == "gated" else PROMPTS[:1]
    setup = None
    if method == "compiled-base":
        fn = lambda: _generate(st["base"], prompts, arch)  # noqa: E731
        base_fn = lambda: _generate(st["eager"], prompts, arch)  # noqa: E731
    else:
        fn = lambda: _generate(rt, prompts, arch)  # noqa: E731
        base_fn = lambda: _generate(st["base"], prompts, arch)  # noqa: E731
        if method == "merged":
            def setup():  # a new prompt every generation: the merge is part of the timed call
                for layer in rt.layers.values():
                    layer.restore_weight()  # (every merged call merges; restoring is a no-op between calls)
    gates = rt.gates(prompts)
    if method == "gated":
        assert not bool((gates == gates[:1]).all()), "the 4 prompts must have distinct gates (gated path)"
    # warm-up, not timed: compiles (first use of a batch shape / path / K), merges, allocations
    fn()
    base_fn()
    mode = rt._state.last_mode if method != "compiled-base" else None
    graphs_before = _graphs()
    rounds = max(2, ROUNDS - 1) if method == "gated" else ROUNDS
    case = Case(arch=arch.name, scenario="compiled-generation", method=method, k=k, prompts=len(prompts),
                unet_batch=2 * len(prompts), latent=[2 * len(prompts), 4, arch.latent, arch.latent],
                image=[arch.image, arch.image], dtype=str(arch.dtype).replace("torch.", ""), steps=STEPS,
                options={"compile": {**COMPILE, "backend": "inductor"}, "transport": "clipcos_tokenuni",
                         "gates": gates.tolist(), "guidance_scale": GUIDANCE,
                         "baseline": "eager base" if method == "compiled-base" else "compiled base",
                         "merge_in_timed_call": method == "merged", "vae_decode": False})
    info = run_paired(benchmark, case, fn, base_fn, rounds=rounds, setup=setup)
    recompiles = _graphs() - graphs_before
    info["compiled_graphs_total"] = _graphs()
    info["recompiles_during_timed_rounds"] = recompiles
    info["mode_after_warmup"] = mode
    assert recompiles == 0, f"{recompiles} graph(s) compiled during timed rounds"
