"""What strategy="auto" costs when half precision sends layers to the gated path (CPU, shipped
shapes model and circle SPM): whole 20-step generations, auto vs merged, alternating order,
medians and per-pair ratios; plus each dtype's precision report. Ratios, not asserts.

    taskset -c 1 python bench/bench_precision.py [--pairs 5] [--out bench/results/precision_cpu.json]
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

import spm_rt
from spm_rt.formats import load_spm
from spm_rt.world import load_shapes_pipeline, shipped_spms


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=5)
    ap.add_argument("--images", type=int, default=4)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--dtypes", default="bfloat16,float32")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    circle = load_spm(next(p for p in shipped_spms() if p.name == "circle.safetensors"))
    results = {"versions": {"torch": torch.__version__, "spm_rt": spm_rt.__version__},
               "hardware": {"cpu": platform.processor() or platform.machine(), "threads": 1},
               "settings": vars(args), "dtypes": {}}
    for name in args.dtypes.split(","):
        dtype = getattr(torch, name)
        pipe = load_shapes_pipeline(dtype)
        rt = spm_rt.compile(pipe, [circle], transport="fixed")
        report = rt.precision_report()["summary"]
        latents = torch.randn(args.images, 4, 16, 16, generator=torch.Generator().manual_seed(0)).to(dtype)

        def run(strategy):
            rt.layer_config.strategy = strategy
            t0 = time.perf_counter()
            with torch.no_grad():
                rt(["a red circle"] * args.images, num_inference_steps=args.steps, guidance_scale=4.0,
                   output_type="pt", latents=latents)
            return time.perf_counter() - t0

        run("auto"), run("merged")  # warm-up
        times = {"auto": [], "merged": []}
        for i in range(args.pairs):  # alternate which runs first
            for s in (("merged", "auto") if i % 2 == 0 else ("auto", "merged")):
                times[s].append(run(s))
        ratios = [a / m for a, m in zip(times["auto"], times["merged"])]
        gated = report["over_limit"]  # the layers auto runs gated (merge_gated is per call)
        results["dtypes"][name] = {
            "report": report, "layers_gated_under_auto": gated,
            "median_s": {k: statistics.median(v) for k, v in times.items()}, "times_s": times,
            "ratio_auto_over_merged_median": statistics.median(ratios), "ratios": ratios,
        }
        print(name, f"{gated}/{report['layers']} layers gated under auto,",
              f"auto/merged median ratio {statistics.median(ratios):.3f} (pairs {min(ratios):.3f}-{max(ratios):.3f}),",
              f"merged {statistics.median(times['merged']):.2f} s, auto {statistics.median(times['auto']):.2f} s")
        rt.remove()
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
