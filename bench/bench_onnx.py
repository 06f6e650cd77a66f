"""ONNX Runtime (CPU) cost of the exported SPM UNets against the base UNet graph: the gates-input
graph (``gates="input"``: the gated SPM branch in the graph, gates per UNet row) at K = 1/4/16/64,
and the folded graph (``gates="folded"``: SPMs merged into the weights), on Stable Diffusion 1.5's
UNet architecture with random weights at the real shapes.

One UNet step with classifier-free guidance (batch 2) at 128 px (16x16 latents) by default. Every
variant is timed against the base graph in the same process, same session options (one intra-op
thread, sequential execution, all graph optimizations), in alternating rounds (base first in even
rounds, variant first in odd ones), by process CPU time (on a shared machine the wall clock also
counts time spent waiting for a core; both are stored). Reported: the median of the per-round
variant/base ratios and their spread. A control row times the base graph against a second session
of itself: the measurement's own noise floor. Only two sessions live at a time (each SD1.5 fp32
session holds ~4.6 GB).

Beside the timings: ONNX Runtime's optimized node count of each graph, whether the folded graph's
optimized node list equals the base graph's (``optimized_graph_signature``: same kernels on
same-shaped weights), and the branch's share of the UNet's FLOPs (a floor for the gates-input ratio:
``2*M*K*(in+out)`` per adapted module against the base UNet's FLOPs counted by torch).

Run from the repository root (``-P``: the repo's ``kernels/`` folder must not shadow the
``kernels`` package transformers imports)::

    OMP_NUM_THREADS=1 python -P bench/bench_onnx.py --out bench/results/onnx
    OMP_NUM_THREADS=1 python -P bench/bench_onnx.py --arch tiny --rounds 20 --out /tmp/onnx_quick

Writes ``onnx_cpu.json``, ``onnx_cpu.md`` and ``onnx_cpu.png`` into ``--out``. Exported graphs are
kept in ``--work`` (default a folder under the system temp dir) and reused by later runs.
Not a pytest suite: ``pytest bench/`` collects nothing here.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))  # conftest (model builders), runinfo

from runinfo import cpu_model  # noqa: E402

TARGETS = {"input": {16: 1.03, 64: 1.06}, "folded": 1.01}  # issue 23


def _build(arch: str, latent: int):
    import torch

    sys.path.insert(0, str(BENCH_DIR))
    if arch == "sd15":
        from conftest import sd15_pipeline

        return sd15_pipeline(latent)
    from spm_rt.testing import tiny_pipeline

    return tiny_pipeline(0, "sd15", sample_size=latent, dtype=torch.float32)


def _flops(pipe, latent: int, ks) -> dict:
    """Base UNet FLOPs (torch's counter) and the gated branch's extra FLOPs per K."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from spm_rt.formats import adapted_modules

    unet = pipe.unet
    rows, hooks = {}, []
    for path, module in adapted_modules(unet).items():
        def hook(mod, inp, out, path=path):
            x = inp[0]  # [N, L, in] (linear) or [N, in, H, W] (1x1 conv): M rows of `in` features
            m = x.numel() // (x.shape[1] if x.dim() == 4 else x.shape[-1])
            rows[path] = (m, mod.weight.shape[1], mod.weight.shape[0])
        hooks.append(module.register_forward_hook(hook))
    x = _feeds({"in_channels": unet.config.in_channels, "cross_attention_dim": unet.config.cross_attention_dim},
               latent, 0)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        unet(torch.from_numpy(x["sample"]), torch.from_numpy(x["timestep"]),
             torch.from_numpy(x["encoder_hidden_states"]))
    for h in hooks:
        h.remove()
    total = counter.get_total_flops()
    return {"unet_gflop": total / 1e9, "adapted_modules": len(rows),
            "branch_share": {k: sum(2 * m * k * (i + o) for m, i, o in rows.values()) / total for k in ks}}


def _feeds(config: dict, latent: int, k: int) -> dict:
    import numpy as np

    rng = np.random.default_rng(0)
    rows = 2  # one prompt with classifier-free guidance
    x = {"sample": rng.standard_normal((rows, config["in_channels"], latent, latent), dtype=np.float32),
         "timestep": np.full(rows, 500.0, np.float32),
         "encoder_hidden_states": rng.standard_normal((rows, 77, config["cross_attention_dim"]), dtype=np.float32)}
    if k:  # open, distinct gates: the full cost (closed gates compute the same)
        g = np.linspace(1.0, 0.2, k, dtype=np.float32) if k > 1 else np.ones(1, np.float32)
        x["gates"] = np.repeat(g[None], rows, axis=0)
    return x


def export_all(arch: str, latent: int, ks, work: Path) -> dict:
    """Export base, folded (max K SPMs) and gates-input graphs (k_max = K) unless already in ``work``."""
    import torch

    import spm_rt
    from spm_rt.export.onnx import export_onnx
    from spm_rt.testing import random_spm

    torch.set_grad_enabled(False)
    plan = [("base", "none", 0), ("folded", "folded", max(ks))] + [(f"input-K{k}", "input", k) for k in ks]
    todo = [p for p in plan if not (work / p[0] / "manifest.json").is_file()]
    pipe = _build(arch, latent)
    flops = _flops(pipe, latent, ks)
    spms = [random_spm(pipe.unet, f"concept {i}", seed=1000 + i) for i in range(max(ks))]
    for name, mode, k in todo:
        t0 = time.perf_counter()
        rt = spm_rt.compile(pipe, spms[: max(k, 1)], transport="fixed")
        try:
            export_onnx(rt, work / name, gates=mode, components=("unet",), check=False)
        finally:
            rt.remove()
        print(f"exported {name} in {time.perf_counter() - t0:.0f} s", flush=True)
    config = {"in_channels": pipe.unet.config.in_channels,
              "cross_attention_dim": pipe.unet.config.cross_attention_dim}
    del pipe, spms
    gc.collect()
    return {"graphs": {name: str(work / name / "unet" / "model.onnx") for name, _, _ in plan},
            "ks": {name: k for name, _, k in plan}, "flops": flops, "unet": config}


def _session(path: str, threads: int):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def time_pair(base_path: str, variant_path: str, base_feeds: dict, feeds: dict, rounds: int, threads: int) -> dict:
    """Alternating rounds of base and variant; per-round CPU-time ratios (wall clock stored too)."""
    base, variant = _session(base_path, threads), _session(variant_path, threads)
    for _ in range(2):  # warm-up: first-run allocations and caches
        base.run(None, base_feeds)
        variant.run(None, feeds)
    t = {"base": [], "variant": [], "base_wall": [], "variant_wall": []}

    def one(name, sess, x):
        w0, c0 = time.perf_counter(), time.process_time()
        sess.run(None, x)
        t[name].append(time.process_time() - c0)
        t[name + "_wall"].append(time.perf_counter() - w0)

    load = [round(os.getloadavg()[0], 2)]
    for r in range(rounds):
        order = [("base", base, base_feeds), ("variant", variant, feeds)]
        for name, sess, x in (order if r % 2 == 0 else order[::-1]):
            one(name, sess, x)
    load.append(round(os.getloadavg()[0], 2))
    ratios = [v / b for v, b in zip(t["variant"], t["base"])]
    wall = [v / b for v, b in zip(t["variant_wall"], t["base_wall"])]
    del base, variant
    gc.collect()
    return dict(t, ratios=ratios, ratio=statistics.median(ratios), spread=[min(ratios), max(ratios)],
                wall_ratios=wall, wall_ratio=statistics.median(wall), loadavg_1min=load)


def _versions() -> dict:
    import numpy
    import onnx
    import onnxruntime
    import torch

    import spm_rt

    return {"spm_rt": spm_rt.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
            "torch": torch.__version__, "numpy": numpy.__version__, "python": platform.python_version()}


def _median_ci(ratios: list[float], n: int = 2000) -> tuple[float, float]:
    """Percentile-bootstrap 95% interval of the median per-round ratio (fixed seed)."""
    import numpy as np

    rng = np.random.default_rng(0)
    medians = np.median(rng.choice(np.asarray(ratios), size=(n, len(ratios))), axis=1)
    return float(np.percentile(medians, 2.5)), float(np.percentile(medians, 97.5))


def report(result: dict, out: Path) -> None:
    """Markdown table and PNG (ratio to base vs K) from the JSON result."""
    rows = result["rows"]
    flops = result["flops"]
    lines = [f"# ONNX Runtime CPU: exported SPM UNets vs the base UNet graph ({result['arch']})", "",
             f"UNet step with CFG (batch {result['batch']}), {result['image']} px ({result['latent']}x"
             f"{result['latent']} latents), float32, {result['threads']} intra-op thread(s), "
             f"{result['rounds']} alternating rounds per row, process CPU time. "
             f"Load average before/after each row in the last column ({result['hardware']['cpu_count']} cores, "
             f"shared). Ratio = median of per-round variant/base ratios; spread = min-max of those ratios; CI = percentile "
             f"bootstrap of that median.", "",
             "| graph | K | ratio to base | 95% CI of the median | spread | wall-clock ratio | target | ORT nodes "
             "| branch FLOPs | load |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        target = r.get("target")
        share = r.get("branch_share")
        lo, hi = _median_ci(r["ratios"])
        lines.append(f"| {r['name']} | {r['k'] or '-'} | {r['ratio']:.3f} | {lo:.3f}-{hi:.3f} "
                     f"| {r['spread'][0]:.3f}-{r['spread'][1]:.3f} "
                     f"| {r['wall_ratio']:.3f} | {'<= %.2f' % target if target else '-'} | {r['ort_nodes']} "
                     f"| {'%.1f%%' % (100 * share) if share is not None else '-'} "
                     f"| {r['loadavg_1min'][0]}/{r['loadavg_1min'][1]} |")
    lines += ["", f"Base UNet: {flops['unet_gflop']:.1f} GFLOP per step, {flops['adapted_modules']} adapted modules. "
              "\"branch FLOPs\": the gated branch's extra work, sum of 2*M*K*(in+out) over adapted modules, as a "
              "share of the base UNet's FLOPs: the ratio a gates-input graph cannot go below at this size "
              "(unless its branch ran faster per FLOP than the UNet's own convolutions and GEMMs).", "",
              f"Folded graph == base graph after ONNX Runtime's optimizations (same node list, ops, attributes, "
              f"initializer shapes; `optimized_graph_signature`): **{result['folded_equals_base']}**.", "",
              f"Versions: {json.dumps(result['versions'])}. CPU: {result['hardware']['cpu']}.", ""]
    (out / "onnx_cpu.md").write_text("\n".join(lines))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    inp = [r for r in rows if r["name"].startswith("input")]
    ks = [r["k"] for r in inp]
    ax.errorbar(ks, [r["ratio"] for r in inp],
                yerr=[[r["ratio"] - r["spread"][0] for r in inp], [r["spread"][1] - r["ratio"] for r in inp]],
                marker="o", capsize=4, label="gates-input graph (median, min-max)")
    ax.plot(ks, [1 + flops["branch_share"][str(k)] for k in ks], "k:", label="1 + branch FLOP share")
    for r in rows:
        if r["name"] in ("folded", "base-vs-base"):
            ax.errorbar([max(ks) * (1.15 if r["name"] == "folded" else 1.3)], [r["ratio"]],
                        yerr=[[r["ratio"] - r["spread"][0]], [r["spread"][1] - r["ratio"]]], marker="s", capsize=4,
                        linestyle="none", label=f"{r['name']} (any K)" if r["name"] == "folded" else "base vs base")
    for k, target in TARGETS["input"].items():
        ax.plot([k], [target], "rv", markersize=8)
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.set_xlabel("K (SPMs in the graph)")
    ax.set_ylabel("UNet step time / base graph")
    ax.set_title(f"ONNX Runtime CPU, {result['arch']} UNet, {result['image']} px, batch {result['batch']}\n"
                 f"red triangles: targets; load {rows[0]['loadavg_1min'][0]} on {result['hardware']['cpu_count']} cores")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "onnx_cpu.png", dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", choices=("sd15", "tiny"), default="sd15")
    p.add_argument("--latent", type=int, default=16, help="latent side (image = 8x for sd15)")
    p.add_argument("--ks", default="1,4,16,64")
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads")
    p.add_argument("--out", default=str(BENCH_DIR / "results" / "onnx"))
    p.add_argument("--work", help="folder for the exported graphs (reused when present)")
    p.add_argument("--only", help="comma-separated rows to time (e.g. folded,input-K64); default all")
    p.add_argument("--report", help="only rewrite the Markdown and PNG from this JSON result")
    args = p.parse_args(argv)
    if args.report:
        report(json.loads(Path(args.report).read_text()), Path(args.report).parent)
        return 0

    import torch

    torch.set_num_threads(args.threads)
    from spm_rt.export.ort import optimized_graph_signature

    ks = [int(k) for k in args.ks.split(",")]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work or Path(tempfile.gettempdir()) / f"spm_rt_bench_onnx_{args.arch}_{args.latent}")
    work.mkdir(parents=True, exist_ok=True)
    load_start = os.getloadavg()[0]
    print(f"load average {load_start:.2f} on {os.cpu_count()} cores", flush=True)
    info = export_all(args.arch, args.latent, ks, work)
    graphs = info["graphs"]
    base_feeds = _feeds(info["unet"], args.latent, 0)
    plan = [("base-vs-base", "base", 0), ("folded", "folded", 0)] + [(f"input-K{k}", f"input-K{k}", k) for k in ks]
    if args.only:
        keep = set(args.only.split(","))
        plan = [p for p in plan if p[0] in keep]
    signatures = {name: optimized_graph_signature(graphs[name])
                  for name in dict.fromkeys(["base", "folded"] + [g for _, g, _ in plan])}
    folded_equals_base = signatures["folded"] == signatures["base"]
    print(f"folded graph == base graph after ORT optimization: {folded_equals_base}", flush=True)
    rows = []
    for name, graph, k in plan:
        feeds = _feeds(info["unet"], args.latent, k)
        r = time_pair(graphs["base"], graphs[graph], base_feeds, feeds, args.rounds, args.threads)
        target = TARGETS["input"].get(k) if graph.startswith("input") else TARGETS["folded"] if graph == "folded" else None
        r.update(name=name, k=k, target=target, ort_nodes=len(signatures[graph]),
                 branch_share=info["flops"]["branch_share"][k] if k else None)
        rows.append(r)
        print(f"{name}: ratio {r['ratio']:.3f} (spread {r['spread'][0]:.3f}-{r['spread'][1]:.3f}, wall "
              f"{r['wall_ratio']:.3f}, load {r['loadavg_1min']})", flush=True)
    flops = dict(info["flops"], branch_share={str(k): v for k, v in info["flops"]["branch_share"].items()})
    scale = 8 if args.arch == "sd15" else 2
    result = {"arch": args.arch, "latent": args.latent, "image": args.latent * scale, "batch": 2,
              "threads": args.threads, "rounds": args.rounds, "clock": "process CPU time",
              "rows": rows, "flops": flops, "folded_equals_base": folded_equals_base,
              "targets": {"input": {str(k): v for k, v in TARGETS["input"].items()}, "folded": TARGETS["folded"]},
              "versions": _versions(),
              "hardware": {"cpu": cpu_model(), "cpu_count": os.cpu_count(), "platform": platform.platform(),
                           "loadavg_1min_at_start": round(load_start, 2)}}
    (out / "onnx_cpu.json").write_text(json.dumps(result, indent=1) + "\n")
    report(result, out)
    print(f"wrote {out / 'onnx_cpu.json'}, .md, .png", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
