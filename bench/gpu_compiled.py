"""Whole SD1.5 generations on a GPU: eager base vs CUDA-graphed base vs CUDA-graphed erased.

Run by ``bench/gpu_check.sh`` (needs diffusers; random SD1.5-architecture weights, no download).
Cases, each timed as whole ``num_inference_steps`` generations with classifier-free guidance
(``output_type="latent"``), after warm-up, median of ``--runs`` with CUDA synchronisation:

* 1 prompt:  eager base, graphed base, graphed erased (merged, FT gates; a new gate vector each
  generation, so the merge is inside the timed call), graphed erased with the gate vector held;
* 4 prompts: graphed base, graphed erased (gated branch: distinct FT gates per prompt).

"Graphed" = ``torch.compile(unet, mode=--mode, fullgraph=True, dynamic=False)`` (``reduce-overhead``
= CUDA graphs). Targets (issue: graph-ready runtime): erased graphed <= 1.03x graphed base; erased
graphed >= 1.5x faster than eager base. Recompiles during timed runs are counted and reported.

    python3 bench/gpu_compiled.py --json out.json            # on the GPU machine
    python3 bench/gpu_compiled.py --device cpu --tiny --backend aot_eager --steps 2 --runs 1   # smoke test
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

PROMPTS = ["a photo of a cat", "a watercolor of a lighthouse", "an astronaut riding a horse", "a bowl of soup"]
WORDS = ["cat", "lighthouse", "astronaut", "soup", "horse", "watercolor"]


def _graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def _pipe(args):
    from spm_rt.testing import tiny_pipeline

    if args.tiny:
        return tiny_pipeline(0, sample_size=args.size // 2).to(args.device)
    from conftest import sd15_pipeline

    return sd15_pipeline(args.size // 8, getattr(torch, args.dtype), seed=0).to(args.device)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    ap.add_argument("--size", type=int, default=512, help="image side in pixels")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--k", type=int, default=16, help="number of SPMs")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--mode", default="reduce-overhead", help="torch.compile mode (reduce-overhead = CUDA graphs)")
    ap.add_argument("--backend", default="inductor")
    ap.add_argument("--tiny", action="store_true", help="the tiny test pipeline instead of SD1.5 (smoke test)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)

    import diffusers

    import spm_rt
    from spm_rt.testing import random_spm

    torch.set_grad_enabled(False)
    dev = torch.device(args.device)
    pipe = _pipe(args)
    if args.tiny:
        args.size = 2 * pipe.unet.config.sample_size
    pipe.set_progress_bar_config(disable=True)
    opts = dict(fullgraph=True, dynamic=False, backend=args.backend)
    if args.backend == "inductor":
        opts["mode"] = args.mode
    dtype = pipe.unet.dtype
    spms = [replace(random_spm(pipe.unet, "x", seed=1000 + i, dtype=dtype), concepts=[WORDS[i % len(WORDS)]])
            for i in range(args.k)]
    graphed = diffusers.StableDiffusionPipeline(**{**pipe.components, "unet": torch.compile(pipe.unet, **opts)})
    erased_pipe = diffusers.StableDiffusionPipeline(**{**pipe.components, "unet": copy.deepcopy(pipe.unet)})
    for p in (graphed, erased_pipe):
        p.set_progress_bar_config(disable=True)
    rt = spm_rt.compile(erased_pipe, spms).compile_unet(**opts)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def gen(p, prompts):
        gens = [torch.Generator(dev).manual_seed(i) for i in range(len(prompts))]
        return p(prompts, num_inference_steps=args.steps, guidance_scale=7.5, height=args.size, width=args.size,
                 output_type="latent", generator=gens).images

    def forget():
        for layer in rt.layers.values():
            layer.restore_weight()  # (every merged call merges; restoring is a no-op between calls)

    cases = [("eager base", pipe, 1, None), ("graphed base", graphed, 1, None),
             ("graphed erased merged (merge in call)", rt, 1, forget),
             ("graphed erased merged (gates held)", rt, 1, None),
             ("graphed base", graphed, 4, None), ("graphed erased gated", rt, 4, None)]
    results = []
    for name, p, n, setup in cases:
        prompts = PROMPTS[:n]
        t0 = time.perf_counter()
        for _ in range(2):  # warm-up: compile, capture CUDA graphs, merge
            gen(p, prompts)
        sync()
        warm = time.perf_counter() - t0
        before = _graphs()
        times = []
        for _ in range(args.runs):
            if setup is not None:
                setup()
            sync()
            t = time.perf_counter()
            gen(p, prompts)
            sync()
            times.append(time.perf_counter() - t)
        results.append({"case": name, "prompts": n, "median_s": statistics.median(times), "times_s": times,
                        "warmup_s": warm, "recompiles_timed": _graphs() - before,
                        "mode": rt._state.last_mode if p is rt else None})
        print(f"  {name:40s} {n}p  {statistics.median(times) * 1e3:9.1f} ms  (warm-up {warm:.1f} s)", flush=True)

    by = {(r["case"], r["prompts"]): r["median_s"] for r in results}
    ratios = {
        "merged_vs_graphed_base": by[("graphed erased merged (merge in call)", 1)] / by[("graphed base", 1)],
        "merged_held_vs_graphed_base": by[("graphed erased merged (gates held)", 1)] / by[("graphed base", 1)],
        "gated4_vs_graphed_base4": by[("graphed erased gated", 4)] / by[("graphed base", 4)],
        "eager_base_over_graphed_erased": by[("eager base", 1)] / by[("graphed erased merged (merge in call)", 1)],
        "graphed_base_speedup": by[("eager base", 1)] / by[("graphed base", 1)],
    }
    targets = {"merged_vs_graphed_base": ("<=", 1.03), "gated4_vs_graphed_base4": ("<=", 1.03),
               "eager_base_over_graphed_erased": (">=", 1.5)}
    device_name = torch.cuda.get_device_name(0) if dev.type == "cuda" else "cpu"
    report = {"device": device_name, "torch": torch.__version__, "diffusers": diffusers.__version__,
              "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              "results": results, "ratios": ratios,
              "targets": {k: {"op": op, "value": v, "hit": (ratios[k] <= v if op == "<=" else ratios[k] >= v)}
                          for k, (op, v) in targets.items()}}
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    print(f"\ncompiled generations ({device_name}, {args.dtype}, {args.size} px, {args.steps} steps, K={args.k}, "
          f"mode={args.mode}):")
    for k, v in ratios.items():
        t = report["targets"].get(k)
        verdict = "" if t is None else f"   target {t['op']} {t['value']}: {'hit' if t['hit'] else 'MISSED'}"
        print(f"  {k:34s} {v:6.3f}{verdict}")
    return 0 if all(r["recompiles_timed"] == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
