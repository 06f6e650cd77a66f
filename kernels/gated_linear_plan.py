"""Which tiles a launch of the fused gated SPM projection uses: ``tiles.plan_forward`` with the
Triton launcher's overrides (``forced_config``, for benchmarks and tests), the tiles of the
backward's launches, and the launch-size checks. Pure Python (no triton): the launchers in
``gated_linear.py`` call these and re-export the public names.
"""
from __future__ import annotations

import torch

from spm_rt.kernels import tiles
from spm_rt.kernels.tiles import FwdConfig


def _pad16(n: int) -> int:
    return tiles.pad16(n)


def _dtype_name(dtype: torch.dtype) -> str:
    return {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}[dtype]


def _pick_pattern(pattern: str | None, kr: int, cfg: FwdConfig | None = None) -> bool | None:
    """True for the fused shrink (pattern A), False for split; "auto" asks the tile config (the
    table's fused_max_rank), or returns None without one (tiles.plan_forward decides then)."""
    if pattern in (None, "auto"):
        return tiles.fused_for(kr, cfg) if cfg is not None else None
    if pattern not in ("fused", "split"):
        raise ValueError(f"pattern must be 'auto', 'fused' or 'split', got {pattern!r}")
    return pattern == "fused"


_FORCED_CONFIG: list = []  # forced_config's stack


class forced_config:  # noqa: N801 (a context manager used like a function)
    """``with forced_config(cfg):`` every forward launch uses ``cfg`` instead of FWD_TABLE's pick
    (benchmarks of the candidates, tests). ``n_per_prog`` forces the N tiles per program (the
    largest divisor of the N tiles not above it); None keeps the config's rule (the SM-count rule
    for configs with ``n_loop``, else 1)."""

    def __init__(self, cfg: FwdConfig, n_per_prog: int | None = None):
        self.entry = (cfg, n_per_prog)

    def __enter__(self):
        _FORCED_CONFIG.append(self.entry)
        return self.entry[0]

    def __exit__(self, *exc):
        _FORCED_CONFIG.remove(self.entry)
        return False

    def __str__(self):
        cfg, npp = self.entry
        return f"{cfg.block_m}x{cfg.block_n}x{cfg.block_k} w{cfg.num_warps} s{cfg.num_stages}" + (
            f" n_per_prog<={npp}" if npp else "")


def _fwd_config(m_rows: int, n: int, dtype: torch.dtype, arch: int = tiles.DEFAULT_ARCH) -> FwdConfig:
    """The table's tiling for (rows per launch, out per group, dtype, arch), or the forced one."""
    if _FORCED_CONFIG:
        return _FORCED_CONFIG[-1][0]
    return tiles.fwd_config(m_rows, n, _dtype_name(dtype), arch)


def _fwd_tiles(m_rows: int, n: int, in_f: int, dtype: torch.dtype):
    """Tiles of the backward's dx launch (the forward kernel in "load c" mode)."""
    if dtype == torch.float32:
        bm, bk = tiles.FWD_BLOCK_M_FP32, tiles.FWD_BLOCK_K_FP32
    else:
        bm = tiles.FWD_BLOCK_M if m_rows >= tiles.FWD_SMALL_M_BELOW else tiles.FWD_BLOCK_M_SMALL
        bk = tiles.FWD_BLOCK_K
    # tiles never larger than the (power-of-two rounded) problem, and at least 16 for tl.dot
    bm = min(bm, _pad16(m_rows))
    bn = min(tiles.FWD_BLOCK_N, _pad16(n))
    bk = min(bk, _pad16(in_f))
    return bm, bn, bk


def _check_row_blocks(m_tiles: int, m_rows: int, block_m: int) -> None:
    if m_tiles > tiles.MAX_ROW_BLOCKS:
        raise ValueError(f"{m_rows} rows need {m_tiles} row blocks of {block_m}; at most {tiles.MAX_ROW_BLOCKS} per "
                         "launch (CUDA grid limit): split x")


def forward_plan(m_rows, in_f, n, kr, groups, dtype, rows_per_sample, *, sample_tiles=False, num_samples=None,
                 fused=None, device=None) -> tiles.ForwardPlan:
    """tiles.plan_forward with this launcher's overrides (forced_config) and the architecture and
    SM count of ``device``: the plan _launch_forward runs (tests compare it with the native
    library's)."""
    forced = _FORCED_CONFIG[-1] if _FORCED_CONFIG else (None, None)
    return tiles.plan_forward(m_rows, in_f, n, kr=kr, groups=groups, dtype=_dtype_name(dtype),
                              rows_per_sample=rows_per_sample, sample_tiles=sample_tiles, num_samples=num_samples,
                              fused=fused, sm_count=tiles.device_sm_count(device), arch=tiles.device_arch(device),
                              config=forced[0], forced_n_per_prog=forced[1])
