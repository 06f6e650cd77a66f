"""The forward's tile table and launch plan: the one place both kernel paths take their tiles from.

``kernels/gated_linear.py`` (the Triton JIT launcher) calls ``plan_forward`` for every forward
launch; ``native/aot.py`` compiles libspm_kernels' cubins for the configurations of the tables
(``FWD_TABLE`` from sm_90 on, ``FWD_TABLE_SM80`` below) and writes the same tables (and the constants below) into the C picker's generated header, so the
native library picks the kernel the JIT launcher would (tests/test_native.py checks it for every
shape of the GPU check). This module imports only the standard library (torch lazily, for the
SM count of a device).

Nothing here was timed on a GPU: the tiles come from the arithmetic in docs/performance.md and
from the no-GPU sm_90 compile check (bench/results/sm90_compile_table.md).

Example::

    >>> p = plan_forward(8192, 320, 320, kr=16, groups=1, dtype="fp16", rows_per_sample=4096)
    >>> (p.config.block_m, p.config.block_n, p.fused, p.n_per_prog, p.grid)
    (64, 64, True, 1, (5, 128))
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import NamedTuple


class FwdConfig(NamedTuple):
    """One forward tiling.

    ``fused_max_rank``: pad16(K*r) up to which the shrink is fused (pattern A), else split.
    ``n_loop``: a program may loop over several N tiles of its row block (the shrink computed once);
    how many is decided per launch from the device's SM count (``n_per_prog``).
    """

    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    fused_max_rank: int
    n_loop: bool = False


# Hopper candidates (issue 15), none timed yet: bench/bench_kernels.py times each at K = 16 (its
# "tile candidates" section) so that FWD_TABLE can be set from measurements.
CFG_128x64 = FwdConfig(128, 64, 64, 4, 3, 64)  # the first kernels' tile
CFG_64x64 = FwdConfig(64, 64, 64, 4, 4, 64)  # small M (more programs) and narrow outputs
# compute-bound: two warpgroups, half the W re-reads; loops over N tiles (ff GEGLU-in: the shrink
# it saves is ~10% of the tile's MMA work at K = 16)
CFG_128x128 = FwdConfig(128, 128, 64, 8, 3, 64, n_loop=True)
# wide ff outputs: 128 fp32 acc registers per thread. A candidate only, not in FWD_TABLE: with 2 N
# tiles per program it spilled (712 B stack, sm_90, triton 3.9); with 5 it did not (248 registers)
CFG_128x256 = FwdConfig(128, 256, 64, 8, 3, 32, n_loop=True)
# exact fp32 dots run on FMA units: small tiles; fused only up to K*r 16; one N tile per program
# (with 2, its 64x64x32 tile spilled 88 B on sm_90)
CFG_FP32 = FwdConfig(64, 64, 32, 4, 3, 16)
FWD_CANDIDATES = (CFG_128x64, CFG_64x64, CFG_128x128, CFG_128x256)

# The per-shape table for 16-bit inputs: the first row with rows >= its min rows and out (per
# group) <= its max out wins (fp32 always takes CFG_FP32). Why each row (docs/performance.md):
# * out <= 640 (SD1.5 64x64 / 32x32 attention, memory-bound or nearly) and M < 2048 (16x16 / 8x8
#   latents, 154 text rows): 64x64 tiles, one N tile per program. At 8192x320->320 the shrink a
#   loop over N tiles would save is ~0.4 us of tensor time under a 2.2-3.2 us memory floor, while
#   the loop would cut the grid from 640 programs to 128 (one 4-warp CTA per SM);
# * out > 640 at M >= 2048 (attention at 1280, ff GEGLU in 2560..10240 wide): 128x128, 8 warps
#   (compute-bound), looping over N tiles while the grid stays at one program per SM or more.
FWD_TABLE = (  # (min rows, max out per group, config): sm_90 (Hopper, wgmma) and newer
    (2048, 640, CFG_64x64),
    (2048, 1 << 30, CFG_128x128),
    (0, 1 << 30, CFG_64x64),
)
# sm_80 / sm_86 / sm_89 (mma.sync: the accumulators live in the issuing warps' registers): compiled
# for sm_80, the 128x128 8-warp tile spilled 24-120 B at every BLOCK_R, and the 64x64 tile fused at
# BLOCK_R 64 spilled 8 B (official, bias); 64x64 fused up to K*r 32 did not. So: 64x64 everywhere,
# split above K*r 32.
CFG_64x64_SM80 = CFG_64x64._replace(fused_max_rank=32)
FWD_TABLE_SM80 = (
    (0, 1 << 30, CFG_64x64_SM80),
)
DEFAULT_ARCH = 90  # planning without a device (CPU): the Hopper table
# Programs per SM a looping launch keeps at least (one 4- or 8-warp CTA per SM: the grid fills the
# device once); the SM count comes from the device (device_sm_count), DEFAULT_SM_COUNT without one.
PROGRAMS_PER_SM = 1
DEFAULT_SM_COUNT = 132  # H100 SXM / H200

# Split pattern: the GEMM reads c [M, G*K*r] in LOAD_BLOCK_R-wide chunks (fp32: 32).
LOAD_BLOCK_R = 64
LOAD_BLOCK_R_FP32 = 32
# Shrink kernel (split pattern, backward dz): full pad16(K*r) per program (the official combine
# needs every SPM of a row in one program); rows per program shrink as K*r grows to cap registers.
SHRINK_BLOCK_M = 64
SHRINK_BLOCK_K = 64
SHRINK_ACC_ELEMS = 64 * 128  # BLOCK_M * BLOCK_R budget: 64 fp32 accumulator regs/thread at 4 warps
SHRINK_NUM_WARPS = 4
SHRINK_NUM_STAGES = 3
# Backward dx ("load c" mode of the forward kernel): 128x64x64 (64 rows below 2048), fp32 64x64x32.
FWD_BLOCK_M = 128
FWD_BLOCK_M_SMALL = 64  # used when M < FWD_SMALL_M_BELOW
FWD_SMALL_M_BELOW = 2048
FWD_BLOCK_N = 64
FWD_BLOCK_K = 64
FWD_BLOCK_M_FP32 = 64
FWD_BLOCK_K_FP32 = 32
FWD_NUM_WARPS = 4
FWD_NUM_STAGES = 3
# Low-rank gradients (dU = dy^T c, dD = dz^T x): split over M so that about this many programs run.
LOWRANK_BLOCK_M = 64
LOWRANK_BLOCK_PQ = 64
LOWRANK_TARGET_PROGRAMS = 264
# CUDA's limit on grid dimensions 1 and 2: row blocks run on axis 1 (N tiles on axis 0).
MAX_ROW_BLOCKS = 65535

DTYPES = ("fp16", "bf16", "fp32")


def pad16(n: int) -> int:
    """The next power of two, at least 16 (tl.dot's smallest side)."""
    p = 16
    while p < n:
        p *= 2
    return p


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def table_for(arch: int) -> tuple:
    """The 16-bit table of a compute capability (x 10): FWD_TABLE from sm_90 on, else FWD_TABLE_SM80."""
    return FWD_TABLE if arch >= 90 else FWD_TABLE_SM80


def fwd_config(rows: int, n: int, dtype: str, arch: int = DEFAULT_ARCH) -> FwdConfig:
    """The table's tiling for (rows per launch, out per group, "fp16"/"bf16"/"fp32", arch)."""
    if dtype == "fp32":
        return CFG_FP32
    return next(cfg for min_rows, max_out, cfg in table_for(arch) if rows >= min_rows and n <= max_out)


def fused_for(kr: int, cfg: FwdConfig) -> bool:
    """The "auto" pattern: the shrink is fused when pad16(K*r) <= the config's fused_max_rank."""
    return pad16(kr) <= cfg.fused_max_rank


@functools.lru_cache(maxsize=None)
def _cuda_sm_count(index: int) -> int:
    import torch

    return int(torch.cuda.get_device_properties(index).multi_processor_count)


@functools.lru_cache(maxsize=None)
def _cuda_arch(index: int) -> int:
    import torch

    major, minor = torch.cuda.get_device_capability(index)
    return major * 10 + minor


def _cuda_index(device):
    import torch

    dev = torch.device(device) if device is not None else None
    if (dev is None or dev.type == "cuda") and torch.cuda.is_available():
        return dev.index if dev is not None and dev.index is not None else torch.cuda.current_device()
    return None


def device_arch(device=None) -> int:
    """Compute capability x 10 of a CUDA device, DEFAULT_ARCH (90) without one.

    Example::

        >>> device_arch("cpu")
        90
    """
    return _cuda_query(device, _cuda_arch, DEFAULT_ARCH)


def device_sm_count(device=None) -> int:
    """SMs of a CUDA device (torch.cuda.get_device_properties), DEFAULT_SM_COUNT without one.

    Example::

        >>> device_sm_count("cpu")
        132
    """
    return _cuda_query(device, _cuda_sm_count, DEFAULT_SM_COUNT)


def _cuda_query(device, query, default: int) -> int:
    """``query(cuda index)`` for a CUDA device, ``default`` without one (or without torch.cuda)."""
    try:
        index = _cuda_index(device)
        if index is not None:
            return query(index)
    except (ImportError, RuntimeError, AssertionError):
        pass
    return default


def n_per_prog(tiles_n: int, other_programs: int, sm_count: int, forced: int | None = None) -> int:
    """N tiles per program: the largest divisor of tiles_n that keeps the grid at
    ``sm_count * PROGRAMS_PER_SM`` programs or more (other_programs = groups * row blocks), 1 if
    none does; ``forced`` (tests, benchmarks) takes the largest divisor not above it instead."""
    min_programs = max(1, sm_count * PROGRAMS_PER_SM)
    best = 1
    for d in range(1, min(forced or tiles_n, tiles_n) + 1):
        if tiles_n % d == 0 and (forced or other_programs * (tiles_n // d) >= min_programs):
            best = d
    return best


def shrink_block_m(block_r: int) -> int:
    return max(16, min(SHRINK_BLOCK_M, SHRINK_ACC_ELEMS // block_r))


@dataclass(frozen=True)
class ShrinkPlan:
    """The split pattern's shrink launch: c [M, G*K*r] = coefficients(x D_g^T)."""

    block_m: int
    block_k: int
    block_r: int
    tiles_per_sample: int
    grid: tuple
    even_k: bool


@dataclass(frozen=True)
class ForwardPlan:
    """One forward launch (and the shrink before it for the split pattern), as both paths run it."""

    config: FwdConfig  # the table row (tiles below are clamped to the problem)
    fused: bool
    block_m: int
    block_n: int
    block_k: int
    block_r: int
    n_per_prog: int
    tiles_per_sample: int
    grid: tuple  # (groups * N tiles / n_per_prog, row blocks)
    even_k: bool
    shrink: ShrinkPlan | None  # None when fused


def plan_shrink(m_rows: int, kred: int, kr: int, groups: int, dtype: str, *, rows_per_sample: int,
                sample_tiles: bool = False, num_samples: int = 1) -> ShrinkPlan:
    """The shrink kernel's tiles and grid (split forward; the backward's dz uses it too)."""
    block_r = pad16(kr)
    block_m = min(shrink_block_m(block_r), pad16(rows_per_sample if sample_tiles else m_rows))
    block_k = min(SHRINK_BLOCK_K if dtype != "fp32" else FWD_BLOCK_K_FP32, pad16(kred))
    tiles_per_sample = cdiv(rows_per_sample, block_m)
    m_tiles = num_samples * tiles_per_sample if sample_tiles else cdiv(m_rows, block_m)
    return ShrinkPlan(block_m, block_k, block_r, tiles_per_sample, (m_tiles, groups), kred % block_k == 0)


def plan_forward(m_rows: int, in_f: int, n: int, *, kr: int, groups: int, dtype: str, rows_per_sample: int,
                 sample_tiles: bool = False, num_samples: int | None = None, fused: bool | None = None,
                 sm_count: int | None = None, arch: int = DEFAULT_ARCH, config: FwdConfig | None = None,
                 forced_n_per_prog: int | None = None) -> ForwardPlan:
    """Tiles, pattern, N tiles per program and grid of one forward (the JIT launcher's and the
    native library's rule).

    m_rows: rows of the launch; n: outputs per group; kr: K*r per group; fused: None = "auto"
    (the config's fused_max_rank decides); sample_tiles: NCHW 1x1 conv (rows tiled per image, the
    table looked up with the rows of one image); sm_count: the device's SMs (DEFAULT_SM_COUNT when
    None); arch: its compute capability x 10 (the table, table_for); config / forced_n_per_prog:
    overrides (``gated_linear.forced_config``).
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    num_samples = num_samples if num_samples is not None else max(1, m_rows // max(1, rows_per_sample))
    table_rows = rows_per_sample if sample_tiles else m_rows
    cfg = config if config is not None else fwd_config(table_rows, n, dtype, arch)
    if fused is None:
        fused = fused_for(kr, cfg)
    # tiles never larger than the (power-of-two rounded) problem, and at least 16 for tl.dot
    bm = min(cfg.block_m, pad16(table_rows))
    bn, bk = min(cfg.block_n, pad16(n)), min(cfg.block_k, pad16(in_f))
    shrink = None
    if fused:
        block_r = pad16(kr)
    else:
        shrink = plan_shrink(m_rows, in_f, kr, groups, dtype, rows_per_sample=rows_per_sample,
                             sample_tiles=sample_tiles, num_samples=num_samples)
        block_r = min(LOAD_BLOCK_R if dtype != "fp32" else LOAD_BLOCK_R_FP32, pad16(kr))
    tiles_per_sample = cdiv(rows_per_sample, bm)
    m_tiles = num_samples * tiles_per_sample if sample_tiles else cdiv(m_rows, bm)
    tiles_n = cdiv(n, bn)
    npp = 1
    if fused and dtype != "fp32" and (cfg.n_loop or forced_n_per_prog):
        npp = n_per_prog(tiles_n, groups * m_tiles, sm_count or DEFAULT_SM_COUNT, forced_n_per_prog)
    grid = (groups * tiles_n // npp, m_tiles)
    return ForwardPlan(cfg, fused, bm, bn, bk, block_r, npp, tiles_per_sample, grid, in_f % bk == 0, shrink)
