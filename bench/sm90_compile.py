"""sm_90 compile table of every forward/shrink configuration the runtime can pick, without a GPU.

    python bench/sm90_compile.py --out bench/results/sm90_compile_table.md [--append]

The launches come from the real launchers (kernels/gated_linear.py) run on CPU tensors of every
layer shape of bench/bench_kernels.py (SD1.5 512 px, SDXL 1024 px, K in {1, 4, 16, 64}, fp16 /
bf16, plus fp32 at two shapes), with the kernels swapped for recorders; each distinct
configuration is compiled with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))``
as Triton's JIT would specialise it, and read back with the cuobjdump bundled in Triton: registers,
spill stack, shared memory, HGMMA (wgmma) instructions, TMA (UTMALDG/UBLKCP) and cp.async (LDGSTS)
instructions, and the tensor-core work per output tile (``tile_work``) against a bare GEMM tile.

tests/test_kernels_compile.py uses the same functions (on a reduced set, to stay fast) and checks
that the committed table lists exactly the configurations the runtime can pick today.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
KERNEL_NAMES = ("_gated_spm_fwd_kernel", "_gated_shrink_kernel", "_lowrank_grad_kernel")
_PTR = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def load_compiled():
    """A private copy of gated_linear built with TRITON_INTERPRET unset (real JITFunctions)."""
    import triton

    try:
        importlib.util.find_spec("spm_rt.kernels.gated_linear")
    except ModuleNotFoundError:  # an environment without spm_rt installed (e.g. another triton's venv)
        import types

        pkg, sub = types.ModuleType("spm_rt"), types.ModuleType("spm_rt.kernels")
        pkg.__path__, sub.__path__ = [], [str(ROOT / "kernels")]
        sys.modules.setdefault("spm_rt", pkg)
        sys.modules.setdefault("spm_rt.kernels", sub)
    from spm_rt.kernels.gated_linear import _load_copy

    mod = _load_copy("_gated_linear_sm90", interpret=False)  # the launchers and their kernels
    assert all(isinstance(getattr(mod, n), triton.runtime.JITFunction) for n in KERNEL_NAMES)
    return mod


def tools():
    import triton

    bindir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    return os.path.join(bindir, "cuobjdump")


class _Recorder:
    def __init__(self, name, log):
        self.name, self.log = name, log

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.log.append((self.name, args, kwargs))


def record(gl, fn):
    """Run a launcher with recorders in place of the kernels; returns [(kernel name, args, kwargs)]."""
    log, saved = [], {n: getattr(gl, n) for n in KERNEL_NAMES}
    try:
        for n in KERNEL_NAMES:
            setattr(gl, n, _Recorder(n, log))
        fn()
    finally:
        for n, k in saved.items():
            setattr(gl, n, k)
    return log


def specialise(gl, name, args, kwargs):
    """(kernel, signature, constexprs, attrs, options) as Triton's JIT would specialise the launch."""
    kernel = getattr(gl, name)
    kwargs = dict(kwargs)
    options = {"num_warps": kwargs.pop("num_warps"), "num_stages": kwargs.pop("num_stages")}
    kwargs["UPCAST_DOT"] = False  # interpreter-only workaround; recorders look like the interpreter
    signature, constexprs, attrs = {}, {}, {}
    for i, arg_name in enumerate(kernel.arg_names):
        if arg_name in kwargs:
            signature[arg_name], constexprs[arg_name] = "constexpr", kwargs[arg_name]
            continue
        a = args[i]
        if kernel.params[i].do_not_specialize:  # e.g. N_PER_PROG: one binary for every value
            signature[arg_name] = "i32" if -(2**31) <= a < 2**31 else "i64"
            continue
        if isinstance(a, torch.Tensor):
            signature[arg_name] = "*" + _PTR[a.dtype]
            if a.data_ptr() % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif a == 1:
            signature[arg_name], constexprs[arg_name] = "constexpr", 1
        else:
            signature[arg_name] = "i32" if -(2**31) <= a < 2**31 else "i64"
            if a % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    return kernel, signature, constexprs, attrs, options


def _t(*shape, dtype=torch.float16):
    return torch.empty(*shape, dtype=dtype)


def runtime_launches(gl):
    """(label, in_features, launcher thunk) for every layer shape of the GPU check, K and dtype."""
    sys.path.insert(0, str(ROOT / "bench"))
    import bench_kernels as bk

    out = []
    combos = [(c, k, dt) for c in bk.sd15_cases() + bk.sdxl_cases() for k in bk.KS
              for dt in (torch.float16, torch.bfloat16)]
    combos += [(c, k, torch.float32) for c in bk.sd15_cases()[:2] for k in (16, 64)]
    for case, k, dtype in combos:
        def run(case=case, k=k, dtype=dtype):
            w, b = _t(case.n_total, case.in_f, dtype=dtype), _t(case.n_total, dtype=dtype)
            d, u = _t(case.groups * k, case.in_f, dtype=dtype), _t(case.n_total, k, dtype=dtype)
            if case.conv:
                side = int(round(case.rows_per_sample ** 0.5))
                gl.gated_spm_conv1x1_triton(_t(2, case.in_f, side, side, dtype=dtype), w, b, d, u, torch.ones(k),
                                            torch.ones(2, k))
            else:
                gl.gated_spm_linear_triton(_t(case.m, case.in_f, dtype=dtype), w, b, d, u, torch.ones(k),
                                           torch.ones(2, k), case.rows_per_sample, groups=case.groups)
        out.append((f"{case.key} K{k} {str(dtype).replace('torch.', '')}", case.in_f, run))
    return out


def launch_arg(gl, name, args, kwargs, arg_name, default=None):
    """The value a recorded launch passed for ``arg_name`` (positional or keyword)."""
    if arg_name in kwargs:
        return kwargs[arg_name]
    names = getattr(gl, name).arg_names
    i = names.index(arg_name) if arg_name in names else len(args)
    return args[i] if i < len(args) else default


def n_per_prog_of(gl, launch) -> int:
    name, args, kwargs = launch
    return launch_arg(gl, name, args, kwargs, "N_PER_PROG", 1) if name == "_gated_spm_fwd_kernel" else 1


def config_key(name, kwargs, dtype, reduced=False, npp=1):
    """What makes a different kernel binary (reduced: fp16 stands for bf16, N_PER_PROG > 1 for all
    values above 1, and the NCHW variant of one tile for all). N_PER_PROG is a runtime argument
    (one binary for every value) but changes the work per tile, so the table lists it."""
    key = (name.strip("_").replace("_kernel", ""), kwargs["BLOCK_M"], kwargs.get("BLOCK_N", 0), kwargs["BLOCK_K"],
           kwargs.get("BLOCK_R", 0), kwargs.get("FUSED_SHRINK"), kwargs["num_warps"], kwargs["num_stages"])
    if reduced:
        return key + (npp > 1, "fp32" if dtype == torch.float32 else "16-bit")
    return key + (npp, bool(kwargs.get("SAMPLE_TILES")), _PTR[dtype])


def runtime_configs(gl, reduced=False):
    """{config key: (label, in_features, (name, args, kwargs))}: first launch seen per configuration."""
    seen = {}
    for label, in_f, fn in runtime_launches(gl):
        for name, args, kwargs in record(gl, fn):
            dtype = args[0].dtype
            key = config_key(name, kwargs, dtype, reduced, n_per_prog_of(gl, (name, args, kwargs)))
            if reduced and (kwargs.get("SAMPLE_TILES") or dtype == torch.bfloat16):
                # the NCHW / bf16 variants compile from the same tile code: covered by the full table
                if any(k[:8] == key[:8] for k in seen):
                    continue
            seen.setdefault(key, (label, in_f, (name, args, kwargs)))
    return seen


# ---------------------------------------------------------------------------------------------
# A bare GEMM tile, for the tensor-core work comparison

def bare_gemm_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def _bare_gemm_kernel(x_ptr, w_ptr, y_ptr, M, N, IN, stride_xm, stride_wn, stride_ym,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        pid_n = tl.program_id(0)
        pid_m = tl.program_id(1)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        x_ptrs = x_ptr + (offs_m % M).to(tl.int64)[:, None] * stride_xm + offs_k[None, :]
        w_ptrs = w_ptr + (offs_n % N).to(tl.int64)[None, :] * stride_wn + offs_k[:, None]
        acc = tl.full([BLOCK_M, BLOCK_N], 0, dtype=tl.float32)
        for k0 in range(0, IN, BLOCK_K):
            acc = tl.dot(tl.load(x_ptrs), tl.load(w_ptrs), acc)
            x_ptrs += BLOCK_K
            w_ptrs += BLOCK_K
        y_ptrs = y_ptr + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :]
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=(offs_m < M)[:, None] & (offs_n < N)[None, :])

    return _bare_gemm_kernel


def bare_spec(block_m, block_n, block_k, num_warps, num_stages, dtype="fp16"):
    kernel = bare_gemm_kernel()
    sig = {"x_ptr": f"*{dtype}", "w_ptr": f"*{dtype}", "y_ptr": f"*{dtype}", "M": "i32", "N": "i32", "IN": "i32",
           "stride_xm": "i32", "stride_wn": "i32", "stride_ym": "i32", "BLOCK_M": "constexpr",
           "BLOCK_N": "constexpr", "BLOCK_K": "constexpr"}
    attrs = {(i,): [["tt.divisibility", 16]] for i in range(9)}
    return kernel, sig, dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k), attrs, {
        "num_warps": num_warps, "num_stages": num_stages}


# ---------------------------------------------------------------------------------------------
# Compile and read back

_CACHE: dict = {}


def compile_spec(spec, arch=90):
    """Compile and inspect; returns a dict (cached per process)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel, signature, constexprs, attrs, options = spec
    key = (kernel.fn.__name__ if hasattr(kernel, "fn") else str(kernel), arch, tuple(sorted(signature.items())),
           tuple(sorted(map(str, constexprs.items()))), tuple(sorted(map(str, attrs.items()))),
           tuple(sorted(options.items())))
    if key in _CACHE:
        return _CACHE[key]
    compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs),
                              target=GPUTarget("cuda", arch, 32), options=options)
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "k.cubin")
        with open(cubin, "wb") as f:
            f.write(compiled.asm["cubin"])
        cuobjdump = tools()
        usage = subprocess.run([cuobjdump, "--dump-resource-usage", cubin], capture_output=True, text=True,
                               check=True).stdout
        sass = subprocess.run([cuobjdump, "--dump-sass", cubin], capture_output=True, text=True, check=True).stdout
    res = {k: int(v) for k, v in re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", usage)}
    out = {"reg": res["REG"], "stack": res["STACK"], "local": res.get("LOCAL", 0),
           "shared": compiled.metadata.shared, "sass": sass, "ptx": compiled.asm["ptx"],
           "ttgir": compiled.asm["ttgir"], "hgmma": len(re.findall(r"\bHGMMA\.", sass)),
           "hmma": len(re.findall(r"\bHMMA\.", sass)), "tma": len(re.findall(r"\bUTMA\w*|\bUBLKCP\b", sass)),
           "ldgsts": len(re.findall(r"\bLDGSTS\b", sass)), "ldl_stl": len(re.findall(r"\b(LDL|STL)\b", sass)),
           "num_warps": options["num_warps"], "num_stages": options["num_stages"]}
    _CACHE[key] = out
    return out


_INSTR = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")


def tile_work(sass: str, k_trips: int, n_per_prog: int = 1) -> dict:
    """Dynamic tensor-core work of one program, from its SASS: every HGMMA weighted by its
    M x N x K and by the trip counts of the loops around it (backward branches). A loop holding
    another loop is the forward kernel's loop over its other N tiles (n_per_prog - 1 trips); an
    innermost loop is a reduction loop (k_trips). Returns {"instructions", "work"} per output tile
    (the program's totals / n_per_prog), work in units of one m64n64k16 HGMMA."""
    instrs = [(int(a, 16), text) for a, text in _INSTR.findall(sass)]
    loops = []
    for addr, text in instrs:
        m = re.search(r"\bBRA\s+(?:`\()?\s*0x([0-9a-f]+)", text)
        if m and int(m.group(1), 16) < addr:
            loops.append((int(m.group(1), 16), addr))
    inner = {lp for lp in loops if not any(o != lp and lp[0] <= o[0] and o[1] <= lp[1] for o in loops)}
    count = work = 0.0
    for addr, text in instrs:
        m = re.match(r"HGMMA\.(\d+)x(\d+)x(\d+)", text)
        if not m:
            continue
        mult = 1
        for lp in loops:
            if lp[0] <= addr <= lp[1]:
                mult *= k_trips if lp in inner else max(n_per_prog - 1, 0)
        mm, nn, kk = (int(v) for v in m.groups())
        count += mult
        work += mult * mm * nn * kk / (64 * 64 * 16)
    return {"instructions": count / n_per_prog, "work": work / n_per_prog}


def work_ratio(gl, launch, in_f):
    """(fused / bare) tensor-core work and instruction count per output tile for one fused launch."""
    name, args, kwargs = launch
    got = compile_spec(specialise(gl, name, args, kwargs))
    k_trips = -(-in_f // kwargs["BLOCK_K"])
    fused = tile_work(got["sass"], k_trips, n_per_prog_of(gl, launch))
    bare = compile_spec(bare_spec(kwargs["BLOCK_M"], kwargs["BLOCK_N"], kwargs["BLOCK_K"], kwargs["num_warps"],
                                  kwargs["num_stages"], _PTR[args[0].dtype]))
    base = tile_work(bare["sass"], k_trips)
    return {"work": fused["work"] / base["work"], "instructions": fused["instructions"] / base["instructions"],
            "fused": fused, "bare": base}


# ---------------------------------------------------------------------------------------------
# The table


def table_rows(gl, reduced=False):
    rows = []
    for key, (label, in_f, launch) in runtime_configs(gl, reduced).items():
        name, args, kwargs = launch
        got = compile_spec(specialise(gl, name, args, kwargs))
        row = {"key": key, "label": label, **{k: got[k] for k in ("reg", "stack", "local", "shared", "hgmma", "hmma",
                                                                  "tma", "ldgsts", "ldl_stl")}}
        if name == "_gated_spm_fwd_kernel" and kwargs["FUSED_SHRINK"] and args[0].dtype != torch.float32:
            row["tile"] = work_ratio(gl, launch, in_f)
        rows.append(row)
    return rows


def key_text(key) -> str:
    return " ".join(map(str, key))


def markdown(rows, triton_version: str) -> str:
    lines = [f"### triton {triton_version}, sm_90 (GPUTarget('cuda', 90, 32)), {len(rows)} configurations", "",
             "| configuration (kernel BM BN BK BR fused warps stages n_per_prog nchw dtype) | first shape | REG | "
             "STACK | SHARED B | HGMMA | TMA | LDGSTS | work/tile vs bare | HGMMA/tile vs bare |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        t = r.get("tile")
        work = "" if t is None else f"{t['work']:.3f}"
        count = "" if t is None else f"{t['instructions']:.3f}"
        lines.append(f"| `{key_text(r['key'])}` | {r['label']} | {r['reg']} | {r['stack']} | {r['shared']} | "
                     f"{r['hgmma']} | {r['tma']} | {r['ldgsts']} | {work} | {count} |")
    return "\n".join(lines) + "\n"


HEADER = """# sm_90 compile table of the runtime's kernel configurations (no GPU)

Generated by `python bench/sm90_compile.py --out bench/results/sm90_compile_table.md` (and
`--append` from a triton 3.6 environment). Every configuration `kernels/gated_linear.py` picks for
the GPU check's shapes (SD1.5 512 px, SDXL 1024 px, K in {1, 4, 16, 64}, fp16/bf16; fp32 at two
shapes), compiled for sm_90 as the JIT would and read back with Triton's cuobjdump. STACK 0 = no
spills. TMA = UTMALDG/UBLKCP instructions (none: the main loops use cp.async, LDGSTS).
"work/tile vs bare": tensor-core work per output tile (every HGMMA weighted by m x n x k and by its
loops' trip counts at that shape) over the same-tile bare GEMM's; the branch's arithmetic alone is
1 + K(in + out)/(in out) (1.10 at 320 x 320, K = 16). "HGMMA/tile" counts instructions instead
(an m64n16k16 counts as much as an m64n64k16 there). n_per_prog (N tiles per program, a runtime
argument: one binary per configuration whatever its value) is what the table picks with the
default SM count (132, tiles.DEFAULT_SM_COUNT: no GPU here); on a device it follows that device's
SM count. Nothing here was run on a GPU.

"""


def main(argv=None):
    import triton

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "sm90_compile_table.md"))
    ap.add_argument("--append", action="store_true", help="add this triton's section to an existing table")
    args = ap.parse_args(argv)
    gl = load_compiled()
    rows = table_rows(gl)
    text = markdown(rows, triton.__version__)
    if args.append and os.path.exists(args.out):
        with open(args.out) as f:
            old = f.read()
        old = re.sub(rf"### triton {re.escape(triton.__version__)},.*?(?=\n### |\Z)", "", old, flags=re.S).rstrip()
        text = old + "\n\n" + text
    else:
        text = HEADER + text
    with open(args.out, "w") as f:
        f.write(text)
    bad = [r for r in rows if r["stack"] or r["ldl_stl"]]
    print(f"{len(rows)} configurations, {len(bad)} with spills -> {args.out}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
