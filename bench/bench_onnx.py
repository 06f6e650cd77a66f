"""ONNX Runtime latency of the exported UNet: the base graph vs ``gates="input"`` (the SPM branch
in the graph, gates per row) vs ``gates="folded"`` (SPMs merged into the weights), one CFG step.

Every variant round follows a base-graph round of the same run (paired, interleaved); ``ratio`` in
``extra_info`` is the median of the per-round variant/base ratios. The graphs are exported once per
(architecture, K) into a temporary folder and checked (untimed) before timing: the input graph with
closed gates must equal the base graph, and the folded graph must differ from it.

Default architecture: the tiny model. ``SPM_RT_BENCH_ONNX_ARCHS=tiny,sd15`` adds SD1.5's
architecture (random weights): on a CPU that needs ~16 GB of free memory (three 3.4 GB fp32
graphs in ONNX Runtime next to the PyTorch model) and several minutes of export.
``SPM_RT_BENCH_ONNX_KS`` (default: the suite's KS) sets the numbers of SPMs of the input graph;
the folded graph is measured once per architecture (its cost does not depend on K).

    SPM_RT_BENCH_THREADS=1 pytest bench/bench_onnx.py --benchmark-json bench/results/onnx_cpu.json
"""
from __future__ import annotations

import os
import platform

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

import spm_rt  # noqa: E402
from conftest import KS, Case, _all_archs, hardware, run_paired, versions  # noqa: E402

from spm_rt.export.onnx import export_onnx  # noqa: E402

ONNX_ARCHS = [a.strip() for a in os.environ.get("SPM_RT_BENCH_ONNX_ARCHS", "tiny").split(",") if a.strip()]
ONNX_KS = tuple(int(k) for k in os.environ.get("SPM_RT_BENCH_ONNX_KS", ",".join(map(str, KS))).split(",")
                if k.strip())
THREADS = torch.get_num_threads()  # ORT uses the same count (SPM_RT_BENCH_THREADS sets torch's)

CASES = ([(a, "base", 0) for a in ONNX_ARCHS] + [(a, "input", k) for a in ONNX_ARCHS for k in ONNX_KS]
         + [(a, "folded", max(ONNX_KS)) for a in ONNX_ARCHS])


def _arch(name):
    archs = _all_archs()
    arch = archs[name]
    if name == "sd15":  # the ONNX suite always runs SD1.5 in float32 on the CPU (ORT's CPU kernels)
        from dataclasses import replace

        arch = replace(arch, dtype=torch.float32)
    return arch


class Graphs:
    """Exported graphs and ONNX Runtime sessions, one set per architecture (built lazily)."""

    def __init__(self, tmp):
        self.tmp = tmp
        self.pipes, self.sessions, self.inputs = {}, {}, {}

    def pipe(self, arch):
        if arch.name not in self.pipes:
            from conftest import build_pipeline

            torch.set_grad_enabled(False)
            self.pipes[arch.name] = build_pipeline(arch)
        return self.pipes[arch.name]

    def session(self, arch, mode, k):
        key = (arch.name, mode, k)
        if key not in self.sessions:
            pipe = self.pipe(arch)
            from spm_rt.testing import random_spm

            spms = [random_spm(pipe.unet, f"concept {i}", seed=1000 + i) for i in range(max(k, 1))]
            rt = spm_rt.compile(pipe, spms, transport="fixed")
            out = self.tmp / f"{arch.name}-{mode}-{k}"
            try:
                export_onnx(rt, out, gates=mode, components=("unet",), check=False)
            finally:
                rt.remove()
            so = ort.SessionOptions()
            so.intra_op_num_threads = THREADS
            so.inter_op_num_threads = 1
            self.sessions[key] = ort.InferenceSession(str(out / "unet" / "model.onnx"), so,
                                                      providers=["CPUExecutionProvider"])
        return self.sessions[key]

    def feeds(self, arch, k):
        unet = self.pipe(arch).unet
        gen = torch.Generator().manual_seed(0)
        rows = 2  # one prompt with classifier-free guidance
        x = {"sample": torch.randn(rows, unet.config.in_channels, arch.latent, arch.latent, generator=gen).numpy(),
             "timestep": np.full(rows, 500.0, np.float32),
             "encoder_hidden_states": torch.randn(rows, 77, unet.config.cross_attention_dim, generator=gen).numpy()}
        if k:
            base = torch.linspace(1.0, 0.2, k) if k > 1 else torch.ones(1)
            x["gates"] = np.repeat(base.numpy()[None], rows, axis=0).astype(np.float32)  # non-zero: full cost
        return x


@pytest.fixture(scope="module")
def graphs(tmp_path_factory):
    return Graphs(tmp_path_factory.mktemp("onnx_bench"))


@pytest.mark.parametrize("case", CASES, ids=[f"{a}-{m}-K{k}" for a, m, k in CASES])
def test_onnx_unet_latency(benchmark, graphs, case):
    arch_name, mode, k = case
    arch = _arch(arch_name)
    base = graphs.session(arch, "none", 0)
    base_feeds = graphs.feeds(arch, 0)
    variant = base if mode == "base" else graphs.session(arch, mode, k)
    feeds = graphs.feeds(arch, k if mode == "input" else 0)

    # untimed sanity: the graphs compute what they claim
    ref = base.run(None, base_feeds)[0]
    if mode == "input":
        closed = dict(feeds, gates=np.zeros_like(feeds["gates"]))
        assert np.abs(variant.run(None, closed)[0] - ref).max() < 1e-4
        assert np.abs(variant.run(None, feeds)[0] - ref).max() > 1e-3
    elif mode == "folded":
        assert np.abs(variant.run(None, feeds)[0] - ref).max() > 1e-3

    def run_variant():
        variant.run(None, feeds)

    def run_base():
        base.run(None, base_feeds)

    unet = graphs.pipe(arch).unet
    c = Case(arch=arch.name, scenario="onnx-step", method=f"onnx-{mode}", k=k, prompts=1, unet_batch=2,
             latent=[2, unet.config.in_channels, arch.latent, arch.latent], image=[arch.image, arch.image],
             dtype="float32", options={"gates_mode": mode, "k_max": k, "runtime": "onnxruntime",
                                       "provider": "CPUExecutionProvider", "ort_threads": THREADS,
                                       "opset": 17})
    run_variant(), run_base()  # warm-up outside the timed rounds (first-run allocations)
    # a tiny-model step takes milliseconds: many rounds for a stable median on a shared CPU
    rounds = max(arch.step_rounds, 30 if arch.name == "tiny" else 3)
    info = run_paired(benchmark, c, run_variant, None if mode == "base" else run_base, rounds=rounds)
    if mode == "base":
        info["ratio"] = 1.0
    info["versions"] = dict(versions(), onnx=onnx.__version__, onnxruntime=ort.__version__)
    info["hardware"] = dict(hardware(), platform=platform.platform())
