"""What a hardened SPM costs at inference: rank 4 (configs/<concept>_hardened.yaml) against the plain
rank-1 SPM, paired round by round (``ratio`` in ``extra_info`` = hardened / plain).

* ``shapes-generation``: what a user of the shipped model runs: ``rt(prompts)`` on the shapes world,
  4 prompts in one batch, 20 DDIM steps, CFG 4, Facilitated Transport on (the calibrated gate), the
  gated strategy (per-prompt gates in one batch), the shipped ``circle`` against the shipped
  ``circle_hardened``. Text encoding and the VAE decode are inside the timed call.
* ``sd15-step``: one UNet step with CFG on Stable Diffusion 1.5's architecture (random weights),
  4 prompts in one batch with per-prompt gates, one random SPM of rank 1 against one of rank 4 on
  every adapted module: the rank's price where the layers are the real ones.

Merged calls (uniform gates) fold the update into the weights, so their per-step cost does not
depend on the rank; only the merge itself does (a rank-4 product instead of rank-1 per module).

    pytest bench/bench_hardened.py --benchmark-json bench/results/hardened.json
"""
from __future__ import annotations

import contextlib

import pytest

pytest.importorskip("pytest_benchmark")

import torch  # noqa: E402

import spm_rt  # noqa: E402
from conftest import DEVICE, Case, run_paired, sd15_pipeline  # noqa: E402

PROMPTS = ["a red circle", "a blue square", "a photograph of a green circle", "a yellow triangle"]


class _Swap:
    """The hardened SPM compiled on the pipeline; ``base()`` swaps the plain one in around the paired
    base round (compile and remove are outside the timed calls)."""

    def __init__(self, pipe, plain, hard, **compile_kw):
        self.pipe, self.plain, self.hard, self.kw = pipe, plain, hard, compile_kw
        self.rt = spm_rt.compile(pipe, [hard], **compile_kw)

    @contextlib.contextmanager
    def base(self):
        self.rt.remove()
        self.rt = spm_rt.compile(self.pipe, [self.plain], **self.kw)
        try:
            yield
        finally:
            self.rt.remove()
            self.rt = spm_rt.compile(self.pipe, [self.hard], **self.kw)

    def close(self):
        self.rt.remove()


def test_shapes_generation_hardened_vs_plain(benchmark):
    from spm_rt.world import hardened_spms, load_shapes_pipeline, shipped_spms

    pipe = load_shapes_pipeline()
    plain = spm_rt.load_spm(shipped_spms()[0])
    hard = spm_rt.load_spm(next(p for p in hardened_spms() if p.stem == "circle_hardened"))
    swap = _Swap(pipe, plain, hard, transport="calibrated", strategy="gated")

    def generate():
        swap.rt(PROMPTS, num_inference_steps=20, guidance_scale=4.0, output_type="pt",
                generator=torch.Generator().manual_seed(0))

    case = Case(arch="shapes", scenario="generation", method="gated", k=1, prompts=len(PROMPTS),
                unet_batch=2 * len(PROMPTS), latent=[4, 16, 16], image=[3, 32, 32], dtype=str(pipe.unet.dtype),
                steps=20, notes=f"hardened circle (rank {hard.rank}) vs the plain circle (rank {plain.rank}) = base")
    try:
        run_paired(benchmark, case, generate, generate, rounds=5, warmup_rounds=1, base_context=swap.base)
    finally:
        swap.close()


def test_sd15_step_rank4_vs_rank1(benchmark):
    from spm_rt.testing import random_spm

    torch.set_grad_enabled(False)
    pipe = sd15_pipeline(16)
    r1 = random_spm(pipe.unet, "concept", seed=1, rank=1)
    r4 = random_spm(pipe.unet, "concept", seed=1, rank=4)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, pipe.unet.config.in_channels, 16, 16, generator=g)
    emb = torch.randn(8, 77, pipe.text_encoder.config.hidden_size, generator=g)
    gates = torch.tensor([1.0, 0.5, 0.8, 0.3]).repeat(2).view(8, 1)  # per-row gates: the gated path
    backend = "auto" if DEVICE == "cuda" else "torch"
    swap = _Swap(pipe, r1, r4, transport="fixed", strategy="gated", backend=backend)

    def step():
        with spm_rt.use_gates(swap.rt, gates, rows=True):
            pipe.unet(x, 500, encoder_hidden_states=emb)

    case = Case(arch="sd15", scenario="step", method="gated", k=1, prompts=4, unet_batch=8, latent=[4, 16, 16],
                image=[3, 128, 128], dtype="torch.float32",
                notes="one random SPM of rank 4 vs the same of rank 1 (= base), per-row gates")
    try:
        run_paired(benchmark, case, step, step, rounds=3, warmup_rounds=1, base_context=swap.base)
    finally:
        swap.close()
