"""Ahead-of-time build of the gated-projection kernels for libspm_kernels (run by CMakeLists.txt).

Two commands:

    python native/aot.py header --out DIR/spm_kernel_args.h      (also writes DIR/spm_tile_table.h)
    python native/aot.py variants --arch 90 --dtype fp16 --ranks 1 --out DIR/spm_variants_sm90_fp16.c

One source of truth: the tiles come from ``kernels/tiles.py``, the table the Triton JIT launcher
plans every forward with. ``header`` writes the kernels' argument lists as C enums (from the
``@triton.jit`` signatures in kernels/gated_linear_kernels.py) and ``spm_tile_table.h``: FWD_TABLE and the
planning constants as C data, which the C picker (native/src/spm_kernels.c) walks with the same
rule as ``tiles.plan_forward``. ``variants`` compiles, for one (architecture, dtype), every kernel
that table can ask for, with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))``
-- no GPU needed -- and writes a C file holding the cubins as byte arrays plus a table of
``spm_kernel_variant`` rows (constexprs, launch parameters, runtime argument order). The C
runtime loads the cubins with the CUDA driver (cuModuleLoadData) in ``spm_plan_prepare``.
tests/test_native.py checks that the library plans the kernel the JIT launcher runs for every
shape of the GPU check.

Why not triton.tools.compile/link: its generated C links libcuda and calls exit() on a CUDA error;
the library must reach the driver through dlopen and report errors as codes.

The variant set (per arch and dtype), from the arch's table (tiles.table_for: FWD_TABLE from sm_90
on, FWD_TABLE_SM80 below):

* fwd fused   (FUSED_SHRINK), per table config: combine x rank x BLOCK_R (16 .. the config's
  fused_max_rank) x bias; N_PER_PROG is a runtime argument (one binary loops over any count);
* fwd split   (c read from the workspace, BLOCK_R = LOAD_BLOCK_R chunks), per table config: bias;
* shrink      (writes c for the split pattern): combine x rank x BLOCK_R {64, 128};
* generic     (masked, 8 warps, the catch-all row's tile): split forward x bias and the shrinks,
  for shapes the "aligned" variants cannot take (the JIT would compile a specialisation there).

"aligned" variants assume what SD shapes give: in % 64 == 0 (EVEN_K), out % 16 == 0, row strides
% 16 == 0 and 16-byte aligned pointers (Triton's divisibility specialisation, as the JIT would
pick it), and the split-pattern ones also K*r % 16 == 0. Strides of contiguous dimensions are
compiled as the constant 1 (as the JIT specialises them), so weight, down, up, bias and scale
must be contiguous, gates need a contiguous last dimension (any row stride, 0 included) and
x / y a contiguous last dimension. The grouped q/k/v launch (groups=3) is a grid dimension.
"""
from __future__ import annotations

import argparse
import importlib
import os
import re
import sys
import time
import types

# Kernel arguments that are strides of contiguous dimensions: compiled as the constant 1.
ONE_STRIDES = {
    "_gated_spm_fwd_kernel": ("stride_xk", "stride_wk", "stride_dk", "stride_ur", "stride_gk", "stride_cr",
                              "stride_yn"),
    "_gated_shrink_kernel": ("stride_ak", "stride_bk", "stride_gk", "stride_cr"),
}
# Integer arguments marked divisible by 16 in the "aligned" variants (the C picker checks them).
ALIGNED_INTS = {
    "_gated_spm_fwd_kernel": ("N", "IN", "stride_xm", "stride_wn", "stride_dr", "stride_ym", "stride_cm"),
    "_gated_shrink_kernel": ("KRED", "stride_am", "stride_br", "stride_cm"),
}
# ... and, in the aligned split-pattern kernels only, K*r (and the strides made of it): without it
# their masked K*r loops spill (cuobjdump: 600-3000 byte stacks at BLOCK_R 128, 700 at the split
# forward's M128 tile); the fused forward is spill-free either way, so it serves any K*r.
ALIGNED_KR_INTS = {
    "_gated_spm_fwd_kernel": ("KR", "stride_un"),
    "_gated_shrink_kernel": ("KR", "stride_bg"),
}
# The masked "generic" variants run 8 warps: with 4 their per-element address arithmetic spilled
# (128-3000 byte stacks); with 8, none on sm_90 and 8 bytes in one sm_80 variant.
GENERIC_NUM_WARPS = 8
GENERIC_NUM_STAGES = 3
FP32_POINTERS = ("scale_ptr", "gates_ptr")
KERNELS = {"_gated_spm_fwd_kernel": "SPM_KERNEL_FWD", "_gated_shrink_kernel": "SPM_KERNEL_SHRINK"}
SHORT = {"_gated_spm_fwd_kernel": "FWD", "_gated_shrink_kernel": "SHRINK"}
DTYPES = {"fp16": "SPM_DTYPE_FLOAT16", "bf16": "SPM_DTYPE_BFLOAT16"}
# The split pattern's shrink widths: K*r up to 128 (the fused pattern takes K*r up to each table
# config's fused_max_rank, 64 today, so "auto" splits only above it).
SHRINK_BLOCK_R = (64, 128)


def load_kernels(repo: str):
    """Import kernels/gated_linear.py as spm_rt.kernels.gated_linear without spm_rt/__init__.

    The real spm_rt package imports diffusers; the kernels import only torch, triton and
    spm_rt.kernels.reference, so a namespace stub is enough (bench/gpu_check.sh does the same).
    """
    os.environ.pop("TRITON_INTERPRET", None)  # real JITFunctions, not the interpreter
    pkg = types.ModuleType("spm_rt")
    pkg.__path__ = []
    sub = types.ModuleType("spm_rt.kernels")
    sub.__path__ = [os.path.join(repo, "kernels")]
    sys.modules["spm_rt"], sys.modules["spm_rt.kernels"] = pkg, sub
    return importlib.import_module("spm_rt.kernels.gated_linear")


def table_configs(tiles, arch):
    """The distinct 16-bit forward configurations of the arch's table, in table order."""
    return list(dict.fromkeys(cfg for _, _, cfg in tiles.table_for(arch)))


def generic_config(tiles):
    """The masked fallback's tile: the catch-all (last) row's, with GENERIC_NUM_WARPS warps."""
    return tiles.FWD_TABLE[-1][2]._replace(num_warps=GENERIC_NUM_WARPS, num_stages=GENERIC_NUM_STAGES)


def fused_block_rs(cfg):
    """BLOCK_R values (pad16(K*r)) the fused pattern can take under this config."""
    out, r = [], 16
    while r <= cfg.fused_max_rank:
        out.append(r)
        r *= 2
    return out


def variant_specs(gl, ranks, arch):
    """Every variant to build for one arch/dtype: dicts of kernel, constexprs, aligned, warps, stages."""
    tiles = gl.tiles
    common = dict(DOT_PRECISION="tf32", UPCAST_DOT=False)  # tf32 is ignored for 16-bit inputs
    specs = []

    def fwd(cfg, aligned, **kw):
        specs.append(dict(kernel="_gated_spm_fwd_kernel", aligned=aligned, num_warps=cfg.num_warps,
                          num_stages=cfg.num_stages, constexprs=dict(
                              BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, STORE_C=False,
                              SAMPLE_TILES=False, EVEN_K=aligned, **common, **kw)))

    for cfg in table_configs(tiles, arch):
        for official in (False, True):
            for rank in ranks:
                for block_r in fused_block_rs(cfg):
                    for has_bias in (False, True):
                        fwd(cfg, True, BLOCK_R=block_r, RANK=rank, HAS_BIAS=has_bias, OFFICIAL=official,
                            FUSED_SHRINK=True)
        for has_bias in (False, True):
            # OFFICIAL and RANK are unused when c is loaded: compiled once with the defaults
            fwd(cfg, True, BLOCK_R=tiles.LOAD_BLOCK_R, RANK=1, HAS_BIAS=has_bias, OFFICIAL=False, FUSED_SHRINK=False)
    gen = generic_config(tiles)
    for has_bias in (False, True):
        fwd(gen, False, BLOCK_R=tiles.LOAD_BLOCK_R, RANK=1, HAS_BIAS=has_bias, OFFICIAL=False, FUSED_SHRINK=False)
    for official in (False, True):
        for rank in ranks:
            for block_r in SHRINK_BLOCK_R:
                for aligned in (True, False):
                    specs.append(dict(
                        kernel="_gated_shrink_kernel", aligned=aligned,
                        num_warps=tiles.SHRINK_NUM_WARPS if aligned else GENERIC_NUM_WARPS,
                        num_stages=tiles.SHRINK_NUM_STAGES, constexprs=dict(
                            BLOCK_M=tiles.shrink_block_m(block_r), BLOCK_K=tiles.SHRINK_BLOCK_K, BLOCK_R=block_r,
                            RANK=rank, OFFICIAL=official, SAMPLE_TILES=False, EVEN_K=aligned, **common)))
    return specs


def kr_aligned(kernel_name, constexprs, aligned) -> bool:
    """Whether this variant also assumes K*r % 16 == 0 (aligned split-pattern kernels)."""
    return aligned and not constexprs.get("FUSED_SHRINK", False)


def signature_of(fn, kernel_name, constexprs, dtype, aligned):
    """Triton signature, constexprs and divisibility attrs; plus the runtime argument order."""
    sig, consts, attrs, runtime = {}, dict(constexprs), {}, []
    divisible = ALIGNED_INTS[kernel_name] if aligned else ()
    if kr_aligned(kernel_name, constexprs, aligned):
        divisible += ALIGNED_KR_INTS[kernel_name]
    for i, arg in enumerate(fn.arg_names):
        if arg in constexprs:
            sig[arg] = "constexpr"
        elif fn.params[i].do_not_specialize:  # N_PER_PROG: a plain i32, as the JIT passes it
            sig[arg] = "i32"
            runtime.append(arg)
        elif arg in ONE_STRIDES[kernel_name]:
            sig[arg], consts[arg] = "constexpr", 1
        elif arg.endswith("_ptr"):
            sig[arg] = "*fp32" if arg in FP32_POINTERS else "*" + dtype
            runtime.append(arg)
            if aligned:
                attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            sig[arg] = "i32"
            runtime.append(arg)
            if arg in divisible:
                attrs[(i,)] = [["tt.divisibility", 16]]
    missing = set(constexprs) - set(fn.arg_names)
    if missing:
        raise SystemExit(f"aot.py: {kernel_name} has no argument(s) {sorted(missing)}: update native/aot.py")
    return sig, consts, attrs, runtime


def _c_bytes(data: bytes) -> str:
    hexes = [f"0x{b:02x}" for b in data]
    return ",\n".join(",".join(hexes[i:i + 24]) for i in range(0, len(hexes), 24))


def cmd_header(args):
    gl = load_kernels(args.repo)
    tiles = gl.tiles
    import triton
    out = ["/* Generated by native/aot.py header: do not edit. */", "#ifndef SPM_KERNEL_ARGS_H",
           "#define SPM_KERNEL_ARGS_H", ""]
    for name, short in SHORT.items():
        fn = getattr(gl, name)
        out.append(f"/* {name}: every argument, runtime and constexpr, in signature order */")
        out.append("enum {")
        out += [f"    SPM_{short}_ARG_{a}," for a in fn.arg_names]
        out += [f"    SPM_{short}_NUM_ARGS", "};", ""]
    out.append(f'#define SPM_TRITON_VERSION "{triton.__version__}"')
    out += ["", "#endif", ""]
    _write(args.out, "\n".join(out))
    _write(os.path.join(os.path.dirname(os.path.abspath(args.out)), "spm_tile_table.h"), tile_table_c(tiles))


def tile_table_c(tiles) -> str:
    """kernels/tiles.py as C data: the tables and the planning constants (spm_kernels.c only)."""
    gen = generic_config(tiles)
    out = ["/* Generated by native/aot.py header from kernels/tiles.py: do not edit. The C picker",
           " * (spm_kernels.c) applies tiles.plan_forward's rule to these rows. */",
           "#ifndef SPM_TILE_TABLE_H", "#define SPM_TILE_TABLE_H", "", '#include "spm_internal.h"', ""]
    for name, table in (("sm90", tiles.FWD_TABLE), ("sm80", tiles.FWD_TABLE_SM80)):
        out += [f"/* tiles.table_for({name[2:]}): (min rows, max out per group, block_m, block_n, block_k, num_warps,",
                " * num_stages, fused_max_rank, n_loop); the first row with rows >= min rows and out <= max out wins */",
                f"static const spm_tile_rule spm_fwd_table_{name}[] = {{"]
        for min_rows, max_out, cfg in table:
            out.append(f"    {{{min_rows}, {max_out}, {cfg.block_m}, {cfg.block_n}, {cfg.block_k}, {cfg.num_warps}, "
                       f"{cfg.num_stages}, {cfg.fused_max_rank}, {int(cfg.n_loop)}}},")
        out += ["};", f"#define SPM_FWD_TABLE_{name.upper()}_ROWS {len(table)}", ""]
    out += ["/* the masked fallback (\"generic\") variants' tile */",
            f"static const spm_tile_rule spm_generic_tile = {{0, 0, {gen.block_m}, {gen.block_n}, {gen.block_k}, "
            f"{gen.num_warps}, {gen.num_stages}, 0, 0}};"]
    for const in ("DEFAULT_SM_COUNT", "PROGRAMS_PER_SM", "LOAD_BLOCK_R", "SHRINK_BLOCK_K", "SHRINK_BLOCK_M",
                  "SHRINK_ACC_ELEMS", "SHRINK_NUM_WARPS", "SHRINK_NUM_STAGES", "MAX_ROW_BLOCKS"):
        out.append(f"#define SPM_{const} {int(getattr(tiles, const))}")
    out.append(f"#define SPM_MAX_SPLIT_BLOCK_R {max(SHRINK_BLOCK_R)}")
    out += ["", "#endif", ""]
    return "\n".join(out)


def cmd_variants(args):
    os.environ.setdefault("TRITON_DISABLE_LINE_INFO", "1")  # no PTX text / line tables in the cubins
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # the JIT's default, stated (silences a warning)
    gl = load_kernels(args.repo)
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    ranks = [int(r) for r in args.ranks.split(",") if r]
    dtype, arch = args.dtype, args.arch
    target = GPUTarget("cuda", arch, 32)
    table = f"spm_variants_sm{arch}_{dtype}"
    blobs, rows, runtime_orders = [], [], {}
    t0 = time.time()
    specs = variant_specs(gl, ranks, arch)
    for idx, spec in enumerate(specs):
        kname, constexprs, aligned = spec["kernel"], spec["constexprs"], spec["aligned"]
        fn = getattr(gl, kname)
        sig, consts, attrs, runtime = signature_of(fn, kname, constexprs, dtype, aligned)
        if runtime_orders.setdefault(kname, runtime) != runtime:
            raise SystemExit(f"aot.py: {kname} variants disagree on runtime arguments")
        options = {"num_warps": spec["num_warps"], "num_stages": spec["num_stages"]}
        compiled = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs), target=target,
                                  options=options)
        md = compiled.metadata
        if md.global_scratch_size or md.num_ctas != 1 or md.launch_cooperative_grid or md.launch_pdl:
            raise SystemExit(f"aot.py: {kname} needs global scratch / clusters / cooperative or PDL launch, "
                             "which the C launcher does not implement")
        if getattr(md, "tensordesc_meta", None):
            raise SystemExit(f"aot.py: {kname} uses tensor descriptors (TMA); the C launcher does not")
        cubin = compiled.asm["cubin"]
        ptx = compiled.asm["ptx"]
        entry = re.search(r"\.entry\s+(\w+)\s*\(([^)]*)\)", ptx, re.S)
        # runtime args + Triton's global and profile scratch pointers (see triton's driver.c launcher);
        # the C launcher passes 8-byte pointers and 4-byte ints in this order
        ptx_types = re.findall(r"\.param\s+\.(\w+)", entry.group(2))
        want_types = ["u64" if a.endswith("_ptr") else "u32" for a in runtime] + ["u64", "u64"]
        if ptx_types != want_types:
            raise SystemExit(f"aot.py: {kname} PTX params {ptx_types} != expected {want_types} ({runtime} + scratch)")
        short = SHORT[kname]
        parts = [short.lower()]
        if kname == "_gated_spm_fwd_kernel":
            parts.append("fused" if constexprs["FUSED_SHRINK"] else "split")
        if kname == "_gated_shrink_kernel" or constexprs["FUSED_SHRINK"]:
            parts += ["official" if constexprs["OFFICIAL"] else "linear", f"r{constexprs['RANK']}"]
        parts += [f"R{constexprs['BLOCK_R']}"]
        if kname == "_gated_spm_fwd_kernel":
            parts += ["bias" if constexprs["HAS_BIAS"] else "nobias"]
        tile = f"M{constexprs['BLOCK_M']}"
        if kname == "_gated_spm_fwd_kernel":
            tile += f"N{constexprs['BLOCK_N']}w{md.num_warps}"
        parts += ["aligned" if aligned else "generic", tile, dtype, f"sm{arch}"]
        vname = "_".join(parts)
        uses_gating = kname == "_gated_shrink_kernel" or constexprs["FUSED_SHRINK"]
        # the split forward only reads c: it serves either combine and any rank
        combine = ("SPM_COMBINE_OFFICIAL" if constexprs["OFFICIAL"] else "SPM_COMBINE_LINEAR") if uses_gating \
            else "SPM_COMBINE_ANY"
        rank = constexprs["RANK"] if uses_gating else 0
        alignment = (2 if kr_aligned(kname, constexprs, aligned) else 1) if aligned else 0
        blobs.append(f"static const unsigned char {table}_{idx}_cubin[{len(cubin)}] = {{\n{_c_bytes(cubin)}\n}};")
        rows.append(
            f"    {{{{\"{vname}\", {KERNELS[kname]}, {arch}, {DTYPES[dtype]}, "
            f"{int(constexprs.get('FUSED_SHRINK', False))}, {combine}, {rank}, "
            f"{int(constexprs.get('HAS_BIAS', False))}, {alignment}, {constexprs['BLOCK_M']}, "
            f"{constexprs.get('BLOCK_N', 0)}, {constexprs['BLOCK_K']}, {constexprs['BLOCK_R']}, {md.num_warps}, "
            f"{md.num_stages}, {md.shared}, {len(cubin)}}}, \"{md.name}\", {table}_{idx}_cubin, "
            f"spm_{short.lower()}_params_{table}, {len(runtime)}}},")
        print(f"[aot sm{arch} {dtype}] {idx + 1}/{len(specs)} {vname}: shared {md.shared} B, cubin {len(cubin)} B",
              flush=True)
    out = [f"/* Generated by native/aot.py variants --arch {arch} --dtype {dtype} (triton {triton.__version__}): "
           "do not edit. */", '#include "spm_internal.h"', ""]
    for kname, runtime in runtime_orders.items():
        short = SHORT[kname]
        out.append(f"static const unsigned short spm_{short.lower()}_params_{table}[] = {{")
        out.append("    " + ", ".join(f"SPM_{short}_ARG_{a}" for a in runtime) + "};")
    out += [""] + blobs + ["", f"const spm_kernel_variant {table}[] = {{"] + rows + ["};"]
    out.append(f"const int {table}_count = {len(rows)};")
    _write(args.out, "\n".join(out) + "\n")
    print(f"[aot sm{arch} {dtype}] {len(rows)} variants in {time.time() - t0:.0f} s -> {args.out}", flush=True)


def _write(path, text):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)  # a failed run leaves no half-written file for the next build to trust


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repo", default=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    sub = p.add_subparsers(dest="cmd", required=True)
    h = sub.add_parser("header")
    h.add_argument("--out", required=True)
    v = sub.add_parser("variants")
    v.add_argument("--arch", type=int, required=True)
    v.add_argument("--dtype", choices=sorted(DTYPES), required=True)
    v.add_argument("--ranks", default="1")
    v.add_argument("--out", required=True)
    args = p.parse_args(argv)
    {"header": cmd_header, "variants": cmd_variants}[args.cmd](args)


if __name__ == "__main__":
    main()
