"""Compile every Triton kernel variant for Hopper (sm_90) and Ampere (sm_80) without a GPU.

The launch arguments come from the real launchers: the kernels are swapped for recorders, the
launchers run on CPU tensors of SD1.5 sizes (never touched), and each recorded launch is compiled
with the specialisation Triton's JIT would use (unit ints as constexpr 1, ints and pointers
divisible by 16 marked so). Checks per variant:

* no register spills: cuobjdump's STACK is 0, no ``.local`` in the PTX, no LDL/STL in the SASS;
* fp16/bf16 dots on tensor cores, in the main loop: on sm_90 every 16-bit ``tt.dot`` became a
  ``ttng.warp_group_dot`` (the first ``scf.for`` holds one) and the SASS has HGMMA; on sm_80 the
  PTX has ``mma.sync`` in the loop and the SASS has HMMA.
  fp32 variants use exact ("ieee") dots, which run on FMA units by design: spill check only.

Run with ``-s`` to print the REG / STACK / SHARED table.
"""
from __future__ import annotations

import os
import re
import subprocess

import pytest
import torch

triton = pytest.importorskip("triton")

_BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
CUOBJDUMP = os.path.join(_BIN, "cuobjdump")
PTXAS = os.path.join(_BIN, "ptxas")
if not (os.access(CUOBJDUMP, os.X_OK) and os.access(PTXAS, os.X_OK)):
    pytest.skip(f"Triton's bundled cuobjdump/ptxas not found in {_BIN}", allow_module_level=True)

from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

import sys  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import sm90_compile as sc  # noqa: E402  (the one implementation of load / record / specialise)

KERNEL_NAMES = sc.KERNEL_NAMES
gl = sc.load_compiled()  # a private copy with real JITFunctions (TRITON_INTERPRET unset)
_t = sc._t


def _record(fn, arch=90):
    """Run a launcher with recorders in place of the kernels, planning as on a device of ``arch``
    (its tile table: tiles.table_for); returns [(kernel, args, kwargs)]."""
    saved = gl.tiles.device_arch
    gl.tiles.device_arch = lambda device=None: arch
    try:
        return sc.record(gl, fn)
    finally:
        gl.tiles.device_arch = saved


def _specialise(name, args, kwargs):
    return sc.specialise(gl, name, args, kwargs)


def _linear(m, in_f, out, k, r=1, dtype=torch.float16, bias=True, groups=1, combine="linear", pattern="auto"):
    def run():
        gl.gated_spm_linear_triton(
            _t(m, in_f, dtype=dtype), _t(groups * out, in_f, dtype=dtype),
            _t(groups * out, dtype=dtype) if bias else None, _t(groups * k * r, in_f, dtype=dtype),
            _t(groups * out, k * r, dtype=dtype), torch.ones(k), torch.ones(2, k), m // 2, combine, r, groups,
            pattern=pattern)
    return run


def _conv(dtype=torch.float16):
    def run():
        gl.gated_spm_conv1x1_triton(_t(2, 320, 64, 64, dtype=dtype), _t(320, 320, dtype=dtype), _t(320, dtype=dtype),
                                    _t(16, 320, dtype=dtype), _t(320, 16, dtype=dtype), torch.ones(16),
                                    torch.ones(2, 16))
    return run


def _backward(dtype=torch.float16, m=8192, in_f=320, out=320, k=16, combine="official"):
    def run():
        gl._backward_triton(_t(m, out, dtype=dtype), _t(m, in_f, dtype=dtype), _t(out, in_f, dtype=dtype),
                            _t(k, in_f, dtype=dtype), _t(out, k, dtype=dtype), torch.ones(k), torch.ones(2, k),
                            _t(m, k, dtype=dtype), m // 2, combine, 1, 1, True, True, True)
    return run


# SD1.5 shapes: 8192 x 320 self-attention projections (K = 16 fused, K = 64 split), 154 x 768
# cross-attention k/v, q/k/v as one grouped launch, NCHW proj_in, and the backward.
SM90_LAUNCHES = {
    "fwd fused fp16 linear bias": _linear(8192, 320, 320, 16),
    "fwd fused fp16 official r2": _linear(8192, 320, 320, 8, r=2, bias=False, combine="official"),
    "fwd fused bf16 linear": _linear(8192, 320, 320, 16, dtype=torch.bfloat16, bias=False),
    "fwd fused bf16 official bias": _linear(8192, 320, 320, 16, dtype=torch.bfloat16, combine="official"),
    "fwd fused fp16 qkv groups=3": _linear(8192, 320, 320, 16, bias=False, groups=3),
    "fwd fused fp16 cross-attn kv": _linear(154, 768, 640, 4, bias=False),
    "fwd fused fp16 K*r=32": _linear(8192, 320, 320, 32),
    "fwd fused fp32 (ieee, FMA)": _linear(2048, 640, 640, 16, dtype=torch.float32),
    "fwd fused fp16 K*r=64": _linear(8192, 320, 320, 64),
    "fwd split fp16 K=96": _linear(8192, 320, 320, 96),
    "fwd fused fp16 ff in (128x128, N loop)": _linear(8192, 320, 2560, 16),
    "fwd conv1x1 NCHW fp16": _conv(),
    "bwd fp16": _backward(),
    "bwd bf16 linear": _backward(dtype=torch.bfloat16, combine="linear"),
}
SM80_LAUNCHES = ("fwd fused fp16 linear bias", "fwd fused fp16 official r2", "fwd fused fp16 K*r=32",
                 "fwd split fp16 K=96", "fwd fused fp16 ff in (128x128, N loop)", "bwd fp16")  # sm_80's table


def _variants():
    seen, out = set(), []
    for arch, names in ((90, tuple(SM90_LAUNCHES)), (80, SM80_LAUNCHES)):
        for launch in names:
            for i, (name, args, kwargs) in enumerate(_record(SM90_LAUNCHES[launch], arch)):
                spec = _specialise(name, args, kwargs)
                key = (arch, name, tuple(sorted(spec[1].items())), tuple(sorted(map(str, spec[2].items()))))
                if key in seen:
                    continue
                seen.add(key)
                out.append(pytest.param(arch, launch, name, spec, id=f"sm{arch}-{launch}-{i}-{name.strip('_')}"))
    return out


def _first_loop(ttgir: str) -> str:
    """Text of the first scf.for body: the lines after it, up to the "}" at the loop's indentation."""
    lines = ttgir.splitlines()
    start = next(i for i, ln in enumerate(lines) if re.search(r"= scf\.for |^\s*scf\.for ", ln))
    indent = len(lines[start]) - len(lines[start].lstrip())
    body = []
    for ln in lines[start + 1:]:
        if ln.strip().startswith("}") and len(ln) - len(ln.lstrip()) == indent:
            return "\n".join(body)
        body.append(ln)
    raise AssertionError("scf.for body not closed")


RESULTS = []


@pytest.mark.parametrize("arch,launch,name,spec", _variants())
def test_compiles_without_spills_on_tensor_cores(arch, launch, name, spec, tmp_path):
    kernel, signature, constexprs, attrs, options = spec
    compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs),
                              target=GPUTarget("cuda", arch, 32), options=options)
    cubin = tmp_path / "k.cubin"
    cubin.write_bytes(compiled.asm["cubin"])
    usage = subprocess.run([CUOBJDUMP, "--dump-resource-usage", str(cubin)], capture_output=True, text=True,
                           check=True).stdout
    sass = subprocess.run([CUOBJDUMP, "--dump-sass", str(cubin)], capture_output=True, text=True, check=True).stdout
    res = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", usage))
    ptx, ttgir = compiled.asm["ptx"], compiled.asm["ttgir"]
    sixteen_bit = any(sig in ("*fp16", "*bf16") for sig in signature.values())
    RESULTS.append(f"sm{arch} {launch:32s} {name:24s} REG {res['REG']:>3s} STACK {res['STACK']} "
                   f"SHARED(dyn) {compiled.metadata.shared:>6d} "
                   f"HGMMA {sass.count('HGMMA'):>2d} HMMA {sass.count('HMMA'):>3d}")
    print("\n" + RESULTS[-1])

    assert res["STACK"] == "0", f"register spill: {usage}"
    assert ".local" not in ptx and "LDL" not in sass and "STL" not in sass, "local memory used"
    if not sixteen_bit:
        return
    loop = _first_loop(ttgir)
    if arch == 90:
        plain_16bit_dots = [ln for ln in ttgir.splitlines() if re.search(r"= tt\.dot .*x(b)?f16", ln)]
        assert not plain_16bit_dots, f"16-bit dot not lowered to wgmma: {plain_16bit_dots[0]}"
        assert "ttng.warp_group_dot " in loop, "main loop has no warpgroup MMA"
        assert "HGMMA" in sass
    else:
        assert re.search(r"= tt\.dot .*#mma", loop), "main loop dot is not on the mma layout"
        assert "mma.sync.aligned" in ptx and "HMMA" in sass


def test_every_kernel_is_covered():
    names = {v.values[2] for v in _variants()}
    assert names == set(KERNEL_NAMES)


def test_cuobjdump_sees_spills_when_there_are_some(tmp_path):
    """The spill check can fail: a 256x256 fp16 tile with 4 warps does spill on sm_90."""
    log = _record(_linear(8192, 320, 320, 16))
    kernel, signature, constexprs, attrs, options = _specialise(*log[0])
    constexprs.update(BLOCK_M=256, BLOCK_N=256)
    compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs),
                              target=GPUTarget("cuda", 90, 32), options=options)
    cubin = tmp_path / "k.cubin"
    cubin.write_bytes(compiled.asm["cubin"])
    usage = subprocess.run([CUOBJDUMP, "--dump-resource-usage", str(cubin)], capture_output=True, text=True,
                           check=True).stdout
    assert re.search(r"STACK:(\d+)", usage).group(1) != "0"


# ---------------------------------------------------------------------------------------------
# Every configuration the runtime can pick (bench/sm90_compile.py enumerates them from the real
# launchers over the GPU check's shapes), and the tensor-core work of the fused tile at K = 16.

SC_GL = gl
_REDUCED = sc.runtime_configs(SC_GL, reduced=True)


@pytest.mark.parametrize("key", list(_REDUCED), ids=sc.key_text)
def test_runtime_config_compiles_without_spills(key):
    """fp16 stands for bf16 and one N_PER_PROG > 1 for all (the full table in bench/results/ has each)."""
    label, in_f, (name, args, kwargs) = _REDUCED[key]
    got = sc.compile_spec(sc.specialise(SC_GL, name, args, kwargs))
    print(f"\n{sc.key_text(key)} ({label}): REG {got['reg']} STACK {got['stack']} SHARED {got['shared']} "
          f"HGMMA {got['hgmma']} TMA {got['tma']} LDGSTS {got['ldgsts']}")
    assert got["stack"] == 0 and got["local"] == 0 and got["ldl_stl"] == 0, f"spills: {got['stack']} B stack"
    assert ".local" not in got["ptx"]
    if args[0].dtype != torch.float32:
        assert got["hgmma"] > 0 and got["hmma"] == 0, "16-bit dots not on wgmma"


def _k16_launch(m, in_f, out, groups=1):
    t = sc._t
    log = sc.record(SC_GL, lambda: SC_GL.gated_spm_linear_triton(
        t(m, in_f), t(groups * out, in_f), t(groups * out), t(groups * 16, in_f), t(groups * out, 16),
        torch.ones(16), torch.ones(2, 16), m // 2, groups=groups))
    assert len(log) == 1 and log[0][2]["FUSED_SHRINK"], "K = 16 should run fused"
    return log[0]


# (M, in, out, groups): SD1.5 attention projections at 64x64 latents (single and q/k/v), ff in / out
@pytest.mark.parametrize("m,in_f,out,groups", [(8192, 320, 320, 1), (8192, 320, 320, 3), (8192, 320, 2560, 1),
                                               (8192, 1280, 320, 1)])
def test_fused_tile_tensor_work_is_what_the_tiling_predicts(m, in_f, out, groups):
    """From the SASS: HGMMA work per output tile (m x n x k of each instruction times its loops' trips)
    of the table's fused kernel at K = 16 vs a bare GEMM of the same tile. The branch's own arithmetic
    is 1 + K(in + out)/(in out) (1.10 at 320 x 320); the tiling adds the shrink recomputed per program,
    pad16(K) / (BLOCK_N * n_per_prog), and the expand, pad16(K) / in. Programs that loop over N tiles
    (the 128x128 ff tiles) stay within 10% of the bare GEMM; one-tile programs (out <= 640) pay the
    shrink per tile (1.30 at 320 x 320), a cost under the memory floor of those shapes (issue 24)."""
    launch = _k16_launch(m, in_f, out, groups)
    npp = sc.n_per_prog_of(SC_GL, launch)
    r = sc.work_ratio(SC_GL, launch, in_f)
    floor = 1 + 16 * (in_f + out) / (in_f * out)
    predicted = 1 + 16 / (launch[2]["BLOCK_N"] * npp) + 16 / in_f
    print(f"\n{m}x{in_f}->{groups}x{out} K16 n_per_prog {npp}: work {r['work']:.4f} (predicted {predicted:.4f}, "
          f"arithmetic floor {floor:.4f}), HGMMA count {r['instructions']:.3f} x bare")
    assert floor - 1e-9 <= r["work"] <= predicted + 1e-9
    if out > 640:
        assert npp > 1 and r["work"] <= 1.10 + 1e-9
    else:
        assert npp == 1


def test_tile_work_counts_the_redundant_shrink():
    """The parser sees the shrink repeated per N tile when a program owns one tile (n_per_prog = 1)."""
    with SC_GL.forced_config(SC_GL.CFG_64x64, n_per_prog=1):
        launch = _k16_launch(8192, 320, 320)
    assert sc.n_per_prog_of(SC_GL, launch) == 1
    r = sc.work_ratio(SC_GL, launch, 320)
    assert abs(r["work"] - 1.30) < 1e-9  # base 20 + shrink 5 + expand 1 (m64n64k16 units)


def test_committed_compile_table_lists_the_runtime_configs():
    """bench/results/sm90_compile_table.md (regenerate with bench/sm90_compile.py) has a row for every
    configuration the runtime can pick today, and none with spills."""
    path = Path(__file__).resolve().parents[1] / "bench" / "results" / "sm90_compile_table.md"
    text = path.read_text()
    sections = dict(re.findall(r"### triton (\S+?), sm_90.*?\n(.*?)(?=\n### |\Z)", text, flags=re.S))
    assert sections, "no triton section in the table"
    body = sections.get(triton.__version__) or next(iter(sections.values()))
    listed = set(re.findall(r"^\| `([^`]+)` \|", body, flags=re.M))
    want = {sc.key_text(k) for k in sc.runtime_configs(SC_GL)}
    assert want == listed, f"missing {sorted(want - listed)}, stale {sorted(listed - want)}"
    stacks = re.findall(r"^\| `[^`]+` \| [^|]+ \| \d+ \| (\d+) \|", body, flags=re.M)
    assert stacks and all(s == "0" for s in stacks)
