"""Gated multi-SPM projection: Triton kernel vs torch paths vs the bare GEMM (GPU only).

Two ways in:

* pytest-benchmark suite: ``pytest bench/bench_kernels.py --benchmark-only`` (skipped without a
  CUDA GPU or without pytest-benchmark). Versions, hardware, dtype, shapes and K go to
  ``benchmark.extra_info``.
* plain python: ``python -m bench.bench_kernels --json OUT.json`` (or ``python
  bench/bench_kernels.py``, which bench/gpu_check.sh uses): correctness against a float64
  reference at real sizes (forward of every provider, fp16/bf16/fp32, groups, 1x1 conv, backward),
  then timings with ``triton.testing.do_bench`` after warm-up (median, 20th/80th percentiles of
  fresh random inputs), a short table, and the JSON. Exit status 1 if a correctness check fails.

Providers (SD1.5 at 512 px with CFG, fp16, combine="linear", rank 1):

* ``bare``: the projection alone, ``F.linear(x, W, b)``: the floor.
* ``torch_unfused``: one shrink/expand pair per SPM (what K separate LoRA adapters cost).
* ``torch_concat``: the stacked torch path: ``y = F.linear(x, W, b); z = F.linear(x, D);
  c = coefficients(z); y.addmm_(c, U^T)``.
* ``triton``: ``gated_spm_linear_triton`` (pattern "auto"); the python entry also times the forced
  ``triton_fused`` / ``triton_split`` patterns to re-check FUSED_MAX_RANK.

Targets to report, not assert: fused forward <= 1.10x bare at K=16 for 8192x320, and >= 2x faster
than torch_unfused at K=16.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys

import torch
import torch.nn.functional as F

from spm_rt.kernels.reference import gated_spm_linear_ref, spm_coefficients

# (M rows, in, out): self-attention / proj at 64x64, 32x32, 16x16 latents (2 samples with CFG)
# and cross-attention k/v over 2 x 77 text tokens.
SHAPES = [
    (8192, 320, 320),
    (2048, 640, 640),
    (512, 1280, 1280),
    (154, 768, 320),
    (154, 768, 640),
    (154, 768, 1280),
]
KS = (1, 4, 16, 64)
SAMPLES = 2  # CFG batch: rows_per_sample = M // 2
PROVIDERS = ("bare", "torch_unfused", "torch_concat", "triton")
TRAIN_CASES = (((8192, 320, 320), 16), ((2048, 640, 640), 16), ((154, 768, 640), 4))  # ((M, in, out), K)
DTYPE = torch.float16
DEVICE = "cuda"


def _inputs(m, in_f, out, k, dtype=DTYPE, rank=1, groups=1, seed=0):
    """Fresh random inputs (never zeros) at realistic scales: y stays O(1)."""
    gen = torch.Generator(device=DEVICE).manual_seed(seed)

    def randn(*shape, std=1.0):
        return (torch.randn(*shape, device=DEVICE, generator=gen) * std).to(dtype)

    x = randn(m, in_f)
    w = randn(groups * out, in_f, std=in_f**-0.5)
    b = randn(groups * out, std=0.1)
    d = randn(groups * k * rank, in_f, std=in_f**-0.5)
    u = randn(groups * out, k * rank, std=(k * rank) ** -0.5)
    scale = torch.rand(k, device=DEVICE, generator=gen) + 0.5
    gates = torch.rand(SAMPLES, k, device=DEVICE, generator=gen)
    return x, w, b, d, u, scale, gates, m // SAMPLES


def _providers(x, w, b, d, u, scale, gates, rps):
    from spm_rt.kernels.gated_linear import gated_spm_linear_triton

    m, k = x.shape[0], gates.shape[1]

    def bare():
        return F.linear(x, w, b)

    def torch_unfused():
        y = F.linear(x, w, b)
        gs = (gates * scale).to(x.dtype)  # [B, K]
        for i in range(k):
            z = F.linear(x, d[i:i + 1]).view(SAMPLES, rps, 1) * gs[:, i].view(SAMPLES, 1, 1)
            y.addmm_(z.view(m, 1), u[:, i:i + 1].t())
        return y

    def torch_concat():
        y = F.linear(x, w, b)
        c = spm_coefficients(F.linear(x, d), scale, gates, rps, "linear", 1)
        return y.addmm_(c, u.t())

    def triton_auto():
        return gated_spm_linear_triton(x, w, b, d, u, scale, gates, rps)

    def triton_fused():
        return gated_spm_linear_triton(x, w, b, d, u, scale, gates, rps, pattern="fused")

    def triton_split():
        return gated_spm_linear_triton(x, w, b, d, u, scale, gates, rps, pattern="split")

    return {"bare": bare, "torch_unfused": torch_unfused, "torch_concat": torch_concat, "triton": triton_auto,
            "triton_fused": triton_fused, "triton_split": triton_split}


def _rel(a, ref):
    return ((a.double() - ref).norm() / ref.norm()).item()


def environment() -> dict:
    import triton

    import spm_rt

    info = {"torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda,
            "spm_rt_from": os.path.dirname(spm_rt.__file__),
            "python": platform.python_version(), "dtype": str(DTYPE).replace("torch.", ""),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(device=p.name, capability=f"{p.major}.{p.minor}", sm_count=p.multi_processor_count,
                    memory_gib=round(p.total_memory / 2**30, 1))
    return info


# ---------------------------------------------------------------------------------------------
# pytest-benchmark suite

try:
    import pytest
except ImportError:  # plain-python use on a machine without pytest
    pytest = None

if pytest is not None:
    try:
        import pytest_benchmark  # noqa: F401

        _HAVE_PB = True
    except ImportError:
        _HAVE_PB = False
    pytestmark = [
        pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU benchmark: no CUDA device"),
        pytest.mark.skipif(not _HAVE_PB, reason="needs pytest-benchmark (pip install 'spm_rt[bench]')"),
        pytest.mark.gpu,
    ]

    @pytest.mark.parametrize("provider", PROVIDERS)
    @pytest.mark.parametrize("k", KS)
    @pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
    def test_forward(benchmark, shape, k, provider):
        args = _inputs(*shape, k)
        fn = _providers(*args)[provider]
        ref = gated_spm_linear_ref(*args[:7], args[7], upcast=True) if provider != "bare" else None
        out = fn()
        torch.cuda.synchronize()
        if ref is not None:
            torch_err = _rel(_providers(*args)["torch_concat"](), ref)
            assert _rel(out, ref) <= max(2 * torch_err, 1e-3)

        def run():
            fn()
            torch.cuda.synchronize()

        benchmark.extra_info.update(environment())
        benchmark.extra_info.update(m=shape[0], in_features=shape[1], out_features=shape[2], k=k,
                                    rows_per_sample=args[7], provider=provider)
        benchmark(run)


# ---------------------------------------------------------------------------------------------
# Plain-python entry: correctness at real sizes, then timings


def _check(results, name, err, torch_err, dtype):
    limit = 1e-5 if dtype == torch.float32 else 2 * torch_err
    ok = err < limit
    results.append({"check": name, "rel_err": err, "torch_rel_err": torch_err, "limit": limit, "ok": ok})
    print(f"  {'ok  ' if ok else 'FAIL'} {name:58s} err {err:.2e}  torch {torch_err:.2e}  limit {limit:.2e}")
    return ok


def correctness() -> list[dict]:
    """Forward (dtypes, combines, rank 2, groups, 1x1 conv) and backward vs float64, at real sizes."""
    from spm_rt.kernels.gated_linear import (GatedSPMLinearFunction, gated_spm_conv1x1_triton,
                                             gated_spm_linear_torch, gated_spm_linear_triton)

    out = []
    print("correctness vs float64 (fp32 < 1e-5; fp16/bf16 <= 2x torch's own error at that dtype)")
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        for combine, rank, k in (("linear", 1, 16), ("official", 2, 8), ("linear", 1, 64)):
            args = _inputs(2048, 640, 640, k, dtype=dtype, rank=rank, seed=1)
            x, w, b, d, u, s, g, rps = args
            ref = gated_spm_linear_ref(x, w, b, d, u, s, g, rps, combine, rank, upcast=True)
            torch_err = _rel(gated_spm_linear_ref(x, w, b, d, u, s, g, rps, combine, rank), ref)
            for pattern in ("fused", "split"):
                y = gated_spm_linear_triton(x, w, b, d, u, s, g, rps, combine, rank, pattern=pattern)
                _check(out, f"fwd 2048x640->640 {dtype} {combine} r{rank} K{k} {pattern}", _rel(y, ref), torch_err,
                       dtype)
    # q/k/v as one grouped launch, per-projection scales
    x, w, b, d, u, s, g, rps = _inputs(8192, 320, 320, 16, groups=3, seed=2)
    s3 = torch.rand(48, device=DEVICE) + 0.5
    ref = gated_spm_linear_torch(*(t.double() for t in (x, w, b, d, u)), s3.double(), g.double(), rps, "official", 1,
                                 3)[0]
    torch_err = _rel(gated_spm_linear_torch(x, w, b, d, u, s3, g, rps, "official", 1, 3)[0], ref)
    y = gated_spm_linear_triton(x, w, b, d, u, s3, g, rps, "official", 1, 3)
    _check(out, "fwd qkv groups=3 8192x320->3x320 fp16 official K16", _rel(y, ref), torch_err, DTYPE)
    # 1x1 conv read in NCHW (proj_in at 64x64 latents)
    x, w, b, d, u, s, g, _ = _inputs(8192, 320, 320, 16, seed=3)
    x_nchw = x.view(2, 64, 64, 320).permute(0, 3, 1, 2).contiguous()
    y = gated_spm_conv1x1_triton(x_nchw, w, b, d, u, s, g)
    ref = gated_spm_linear_ref(x, w, b, d, u, s, g, 4096, upcast=True)
    torch_err = _rel(gated_spm_linear_ref(x, w, b, d, u, s, g, 4096), ref)
    _check(out, "fwd conv1x1 NCHW 2x320x64x64 fp16 K16", _rel(y.permute(0, 2, 3, 1).reshape(8192, 320), ref),
           torch_err, DTYPE)
    # backward: every gradient of the autograd Function
    for shape, k in (((8192, 320, 320), 16), ((154, 768, 640), 4)):
        for dtype in (torch.float16, torch.bfloat16, torch.float32):
            for combine in ("linear", "official"):
                x, w, b, d, u, s, g, rps = _inputs(*shape, k, dtype=dtype, seed=4)
                dy = torch.randn(shape[0], shape[2], device=DEVICE, dtype=torch.float64)

                def grads(fn, dt):
                    xs, ds, us = (t.detach().to(dt).clone().requires_grad_() for t in (x, d, u))
                    fn(xs, w.to(dt), b.to(dt), ds, us).backward(dy.to(dt))
                    return xs.grad, ds.grad, us.grad

                def ref_fn(xs, w_, b_, ds, us):
                    return gated_spm_linear_ref(xs, w_, b_, ds, us, s, g, rps, combine, 1)

                def fused(xs, w_, b_, ds, us):
                    return GatedSPMLinearFunction.apply(xs, w_, b_, ds, us, s, g, rps, combine, 1)

                want, lo, got = grads(ref_fn, torch.float64), grads(ref_fn, dtype), grads(fused, dtype)
                for name, a, r, t in zip(("dx", "d_down", "d_up"), got, want, lo):
                    _check(out, f"bwd {shape[0]}x{shape[1]}->{shape[2]} {dtype} {combine} K{k} {name}",
                           _rel(a, r), _rel(t, r), dtype)
    return out


def timings(shapes=SHAPES, ks=KS) -> list[dict]:
    from triton.testing import do_bench

    rows = []
    for shape in shapes:
        for k in ks:
            args = _inputs(*shape, k, seed=5)
            fns = _providers(*args)
            names = list(PROVIDERS) + (["triton_fused", "triton_split"] if k >= 16 else [])
            ref = gated_spm_linear_ref(*args, upcast=True)
            row = {"m": shape[0], "in": shape[1], "out": shape[2], "k": k, "rows_per_sample": args[7]}
            for name in names:
                y = fns[name]()  # compile / warm caches outside the timed region
                torch.cuda.synchronize()
                p20, p50, p80 = do_bench(fns[name], warmup=25, rep=100, quantiles=[0.2, 0.5, 0.8])
                row[name] = {"median_ms": p50, "p20_ms": p20, "p80_ms": p80,
                             "rel_err": None if name == "bare" else _rel(y, ref)}
            for name in names:
                row[name]["x_bare"] = row[name]["median_ms"] / row["bare"]["median_ms"]
            rows.append(row)
    return rows


# (M, in, out per projection, G): attn1 q/k/v at 64x64 latents and attn2 k/v over 2 x 77 tokens
GROUP_CASES = (((8192, 320, 320), 3), ((154, 768, 320), 2))


def grouped_timings(k: int = 16) -> list[dict]:
    """Projections sharing x: one grouped launch (what the runtime runs for attn1 q/k/v and attn2
    k/v) against one launch per projection, and against the bare GEMMs (separate, and concatenated
    as a fused-qkv base model would run them)."""
    from triton.testing import do_bench

    from spm_rt.kernels.gated_linear import gated_spm_linear_triton

    rows = []
    for (m, in_f, out), g in GROUP_CASES:
        x, w, b, d, u, s, gates, rps = _inputs(m, in_f, out, k, groups=g, seed=7)
        kr = d.shape[0] // g
        parts = [(w[i * out:(i + 1) * out], b[i * out:(i + 1) * out], d[i * kr:(i + 1) * kr],
                  u[i * out:(i + 1) * out]) for i in range(g)]
        fns = {
            "bare_concat": lambda: F.linear(x, w, b),
            "bare_separate": lambda: [F.linear(x, wi, bi) for wi, bi, _, _ in parts],
            "triton_grouped": lambda: gated_spm_linear_triton(x, w, b, d, u, s, gates, rps, groups=g),
            "triton_separate": lambda: [gated_spm_linear_triton(x, wi, bi, di, ui, s, gates, rps)
                                        for wi, bi, di, ui in parts],
        }
        row = {"m": m, "in": in_f, "out": out, "groups": g, "k": k}
        for name, fn in fns.items():
            fn()
            torch.cuda.synchronize()
            p20, p50, p80 = do_bench(fn, warmup=25, rep=100, quantiles=[0.2, 0.5, 0.8])
            row[name] = {"median_ms": p50, "p20_ms": p20, "p80_ms": p80}
        rows.append(row)
    return rows


def training_timings() -> list[dict]:
    """Forward + backward (grads for x, D, U): fused Function vs torch autograd of the stacked path."""
    from triton.testing import do_bench

    from spm_rt.kernels.gated_linear import GatedSPMLinearFunction

    rows = []
    for shape, k in TRAIN_CASES:
        x, w, b, d, u, s, g, rps = _inputs(*shape, k, seed=6)
        x, d, u = (t.requires_grad_() for t in (x, d, u))
        dy = torch.randn(shape[0], shape[2], device=DEVICE, dtype=DTYPE)

        def torch_step():
            gated_spm_linear_ref(x, w, b, d, u, s, g, rps).backward(dy)

        def triton_step():
            GatedSPMLinearFunction.apply(x, w, b, d, u, s, g, rps, "linear", 1).backward(dy)

        def bare_step():
            F.linear(x, w, b).backward(dy)

        row = {"m": shape[0], "in": shape[1], "out": shape[2], "k": k}
        for name, fn in (("bare", bare_step), ("torch_concat", torch_step), ("triton", triton_step)):
            fn()
            torch.cuda.synchronize()
            p20, p50, p80 = do_bench(fn, warmup=25, rep=100, quantiles=[0.2, 0.5, 0.8], grad_to_none=[x, d, u])
            row[name] = {"median_ms": p50, "p20_ms": p20, "p80_ms": p80}
        rows.append(row)
    return rows


def _table(rows, training, grouped=()):
    lines = ["forward, fp16, median us (x bare GEMM); rel err vs float64 in the last column",
             f"{'M x in -> out':>20s} {'K':>3s} {'bare':>8s} {'triton':>15s} {'concat':>15s} {'unfused':>15s} "
             f"{'fused/split':>17s} {'err':>8s}"]
    for r in rows:
        def cell(name):
            return f"{r[name]['median_ms'] * 1e3:7.1f} ({r[name]['x_bare']:4.2f})" if name in r else ""
        fs = (f"{r['triton_fused']['median_ms'] * 1e3:7.1f}/{r['triton_split']['median_ms'] * 1e3:.1f}"
              if "triton_fused" in r else "")
        lines.append(f"{r['m']:>8d} x {r['in']:>4d} -> {r['out']:>4d} {r['k']:>3d} {r['bare']['median_ms'] * 1e3:8.1f} "
                     f"{cell('triton'):>15s} {cell('torch_concat'):>15s} {cell('torch_unfused'):>15s} {fs:>17s} "
                     f"{r['triton']['rel_err']:8.1e}")
    if training:
        lines.append("training step (fwd + bwd for x, D, U), fp16, median us (x bare)")
        for r in training:
            bare, concat, fused = (r[n]["median_ms"] for n in ("bare", "torch_concat", "triton"))
            lines.append(f"{r['m']:>8d} x {r['in']:>4d} -> {r['out']:>4d} {r['k']:>3d} bare {bare * 1e3:7.1f}  "
                         f"torch_concat {concat * 1e3:7.1f} ({concat / bare:.2f})  "
                         f"triton {fused * 1e3:7.1f} ({fused / bare:.2f})")
    if grouped:
        lines.append("shared-input projections, fp16, median us (x bare concatenated GEMM)")
        for r in grouped:
            bare = r["bare_concat"]["median_ms"]
            cells = "  ".join(f"{n} {r[n]['median_ms'] * 1e3:7.1f} ({r[n]['median_ms'] / bare:.2f})"
                              for n in ("bare_concat", "bare_separate", "triton_grouped", "triton_separate"))
            lines.append(f"{r['m']:>8d} x {r['in']:>4d} -> {r['groups']}x{r['out']:<4d} K{r['k']:<3d} {cells}")
    return "\n".join(lines)


def _targets(rows):
    r = next((r for r in rows if (r["m"], r["in"], r["k"]) == (8192, 320, 16)), None)
    if r is None:
        return {}
    return {"fused_fwd_x_bare_8192x320_K16": r["triton"]["x_bare"], "target_x_bare": 1.10,
            "speedup_vs_unfused_8192x320_K16": r["torch_unfused"]["median_ms"] / r["triton"]["median_ms"],
            "target_speedup_vs_unfused": 2.0}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="write results here (default: bench/results/kernels-<date>.json)")
    ap.add_argument("--quick", action="store_true", help="8192x320 and 154x768->640 only, K in {1, 16}")
    ap.add_argument("--skip-correctness", action="store_true")
    args = ap.parse_args(argv)
    path = args.json or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                      f"kernels-{datetime.date.today().isoformat()}.json")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if not torch.cuda.is_available():
        msg = "no CUDA GPU (torch.cuda.is_available() is False): nothing checked or timed"
        with open(path, "w") as f:
            json.dump({"skipped": msg, "environment": environment()}, f, indent=2)
        print(f"SKIPPED: {msg}; wrote {path}")
        return 0
    result = {"environment": environment()}
    print(json.dumps(result["environment"]))
    checks = [] if args.skip_correctness else correctness()
    result["correctness"] = checks
    shapes, ks = ((SHAPES[0], SHAPES[4]), (1, 16)) if args.quick else (SHAPES, KS)
    result["forward"] = timings(shapes, ks)
    result["training"] = training_timings()
    result["grouped"] = grouped_timings()
    result["targets"] = _targets(result["forward"])
    result["ok"] = all(c["ok"] for c in checks)
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {path}")
    print(f"correctness: {sum(c['ok'] for c in checks)}/{len(checks)} checks passed")
    print(json.dumps(result["targets"]))
    print(_table(result["forward"], result["training"], result["grouped"]))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
