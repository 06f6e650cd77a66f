"""Native (libspm_kernels, AOT) vs Triton JIT forward at one SD1.5 shape, on a GPU.

    python3 bench/bench_native.py [--lib build/libspm_kernels.so] [--json OUT.json]

Shape: the SD1.5 64x64 self-attention projection, x [8192, 320] (2 images x 4096 tokens),
W [320, 320] + bias, K = 16 rank-1 SPMs, fp16, linear combine. Reports the first call of each path
(the JIT compiles into an empty cache; the native library loads a cubin), then do_bench medians
with the 20-80% spread; checks both against a float64 reference, and the q/k/v (groups=3), official
bf16, ff GEGLU-in (N loop), split (K = 96) and broadcast-gates cases against the Triton path. Both
paths plan from one table (kernels/tiles.py): each check also records whether the native plan is
the JIT launcher's kernel (tile, warps, stages, pattern, N tiles per program, grid); a difference
fails the run. Exit 1 on a mismatch; 0 with a message where there is no GPU or no library. Run by
bench/gpu_check.sh (which sets up the import shim).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time

import torch


def _sync_time(fn):
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return out, time.perf_counter() - t0


def _case(m, in_f, out, k, groups=1, dtype=torch.float16, bias=True, seed=0, bcast=False):
    g = torch.Generator(device="cuda").manual_seed(seed)
    kw = dict(device="cuda", dtype=dtype)
    x = torch.randn(m, in_f, generator=g, **kw)
    w = torch.randn(groups * out, in_f, generator=g, **kw) / in_f ** 0.5
    b = torch.randn(groups * out, generator=g, **kw) if bias else None
    d = torch.randn(groups * k, in_f, generator=g, **kw) / in_f ** 0.5
    u = torch.randn(groups * out, k, generator=g, **kw) / k ** 0.5
    scale = torch.rand(k, generator=g, device="cuda") + 0.5
    gates = torch.rand(2, k, generator=g, device="cuda")
    if bcast:
        gates = gates[:1].expand(2, k)  # one gate row for both samples: row stride 0
    return x, w, b, d, u, scale, gates, m // 2


def _same_kernel(native, gl, x, w, d, k, groups, dtype, combine, rows):
    """The native plan's forward vs the JIT launcher's plan for this call (tiles.plan_forward)."""
    m, in_f = x.shape
    out = w.shape[0] // groups
    cc = torch.cuda.get_device_capability()
    arch = native._load().spm_kernels_arch_for_cc(cc[0] * 10 + cc[1])
    from spm_rt.kernels import tiles

    nat = native.plan(m, in_f, out, k, 1, groups, rows_per_sample=rows, dtype=dtype, combine=combine, arch=arch,
                      sm_count=tiles.device_sm_count(x.device))
    jit = gl.forward_plan(m, in_f, out, k, groups, dtype, rows, device=x.device)
    v = nat["variants"]["forward"]
    return (v["block_m"], v["block_n"], v["block_k"], v["num_warps"], v["num_stages"], nat["fused"],
            nat["n_per_prog"], nat["forward_grid"][:2]) == (
        jit.block_m, jit.block_n, jit.block_k, jit.config.num_warps, jit.config.num_stages, jit.fused,
        jit.n_per_prog, jit.grid)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--lib", help="libspm_kernels.so (default: $SPM_KERNELS_LIB, then build/)")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    if args.lib:
        os.environ["SPM_KERNELS_LIB"] = os.path.abspath(args.lib)
    if not torch.cuda.is_available():
        print("bench_native: SKIPPED (no CUDA device)")
        return 0
    # an empty Triton cache: the JIT path's first call pays its real compile, as in a fresh deployment
    os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="spm-bench-native-")
    import triton
    from triton.testing import do_bench

    from spm_rt.kernels import gated_linear as gl
    from spm_rt.kernels import native
    from spm_rt.kernels.gated_linear import gated_spm_linear_torch, gated_spm_linear_triton

    reason = native.unavailable_reason()
    if reason:
        print(f"bench_native: SKIPPED ({reason})")
        return 0
    lib_info = native.info()
    results = {"library": lib_info["library"], "library_triton": lib_info["triton_version"],
               "torch": torch.__version__, "triton": triton.__version__, "gpu": torch.cuda.get_device_name(0),
               "capability": list(torch.cuda.get_device_capability(0)), "python": platform.python_version(),
               "checks": [], "timing": {}}
    failed = False

    # first calls at the SD1.5 shape, before anything else compiles or loads these kernels
    x, w, b, d, u, scale, gates, rows = _case(8192, 320, 320, 16, seed=1)
    run_nat = lambda: native.gated_spm_linear_native(x, w, b, d, u, scale, gates, rows)  # noqa: E731
    run_tri = lambda: gated_spm_linear_triton(x, w, b, d, u, scale, gates, rows)  # noqa: E731
    bare = lambda: torch.nn.functional.linear(x, w, b)  # noqa: E731
    first = {label: _sync_time(fn)[1] for label, fn in (("native", run_nat), ("triton_jit", run_tri),
                                                         ("bare_gemm", bare))}

    # correctness: native vs Triton JIT vs float64 reference
    checks = [
        ("sd15 self-attn 8192x320->320 K=16 fp16 linear bias", dict(m=8192, in_f=320, out=320, k=16), "linear"),
        ("q/k/v groups=3 K=16 fp16 linear", dict(m=8192, in_f=320, out=320, k=16, groups=3, bias=False), "linear"),
        ("8192x320->320 K=16 bf16 official bias", dict(m=8192, in_f=320, out=320, k=16, dtype=torch.bfloat16),
         "official"),
        ("ff GEGLU in 8192x320->2560 K=16 fp16 (N loop)", dict(m=8192, in_f=320, out=2560, k=16), "linear"),
        ("split K=96 4096x640->640 fp16 official", dict(m=4096, in_f=640, out=640, k=96), "official"),
        ("broadcast gates (stride 0) 8192x320->320 K=16", dict(m=8192, in_f=320, out=320, k=16, bcast=True),
         "linear"),
        ("cross-attn k/v 154x768->320 K=4", dict(m=154, in_f=768, out=320, k=4, bias=False), "linear"),
    ]
    for name, shape, combine in checks:
        groups = shape.get("groups", 1)
        x, w, b, d, u, scale, gates, rows = _case(**shape)
        same = _same_kernel(native, gl, x, w, d, shape["k"], groups, x.dtype, combine, rows)
        y_nat = native.gated_spm_linear_native(x, w, b, d, u, scale, gates, rows, combine, 1, groups)
        y_tri = gated_spm_linear_triton(x, w, b, d, u, scale, gates, rows, combine, 1, groups)
        ref, _ = gated_spm_linear_torch(x.double(), w.double(), None if b is None else b.double(), d.double(),
                                        u.double(), scale.double(), gates.double(), rows, combine, 1, groups)
        ref_max = ref.abs().max().item()
        err_nat = (y_nat.double() - ref).abs().max().item() / ref_max
        err_tri = (y_tri.double() - ref).abs().max().item() / ref_max
        diff = (y_nat.double() - y_tri.double()).abs().max().item() / ref_max
        # the rule of docs/style.md: native error at most ~2x the Triton path's (+ one output ulp)
        ulp = 2.0 ** -10 if x.dtype == torch.float16 else 2.0 ** -7
        ok = bool(torch.isfinite(y_nat).all()) and err_nat <= 2 * err_tri + ulp and same
        failed |= not ok
        results["checks"].append({"case": name, "native_rel_err": err_nat, "triton_rel_err": err_tri,
                                  "native_vs_triton": diff, "same_kernel": same, "ok": ok})
        print(f"{'ok  ' if ok else 'FAIL'} {name:52s} native {err_nat:.2e}  triton {err_tri:.2e}  "
              f"native-triton {diff:.2e}  same kernel {same}")

    # steady-state timing at the SD1.5 shape (host launch overhead included: both are Python calls)
    for label, fn in (("native", run_nat), ("triton_jit", run_tri), ("bare_gemm", bare)):
        med, lo, hi = do_bench(fn, warmup=25, rep=200, quantiles=[0.5, 0.2, 0.8])
        results["timing"][label] = {"first_call_s": first[label], "median_ms": med, "p20_ms": lo, "p80_ms": hi}
        print(f"time {label:10s} median {med * 1000:7.1f} us  (p20 {lo * 1000:.1f}, p80 {hi * 1000:.1f})  "
              f"first call {first[label] * 1000:.1f} ms")
    t = results["timing"]
    print(f"native / triton_jit median: {t['native']['median_ms'] / t['triton_jit']['median_ms']:.3f}")
    results["fallbacks"] = native.fallbacks()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
        print(f"wrote {args.json}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
