"""The GPU check's CPU side: its case list, its per-step arithmetic, and a --dry-run end to end
(every provider of tiny versions of each layer kind against float64, the Triton kernels in the
interpreter; the summary and table on roofline stand-ins, which must say they are estimates)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import bench_kernels as bk  # noqa: E402


def test_sd15_case_list_covers_the_192_adapted_modules():
    """16 transformer blocks x 12 adapted modules: 10 run every step, attn2 k/v once per generation."""
    cases = bk.sd15_cases()
    per_step = sum(c.count * c.groups for c in cases if "/gen" not in c.layer)
    per_gen = sum(c.count * bk.STEPS * c.groups for c in cases if "/gen" in c.layer)
    assert per_step == 160 and per_gen == 32
    assert {(c.m, c.in_f) for c in cases if c.layer == "attn out, attn2 q"} == {
        (8192, 320), (2048, 640), (512, 1280), (128, 1280)}
    assert {c.out for c in cases if c.layer == "ff GEGLU in"} == {2560, 5120, 10240}
    assert all(c.m % bk.SAMPLES == 0 for c in cases)


def test_sdxl_case_list():
    """70 blocks x 10 linear modules + 11 transformer models x linear proj_in/out = 722 modules."""
    cases = bk.sdxl_cases()
    total = sum(c.count * c.groups * (bk.STEPS if "/gen" in c.layer else 1) for c in cases)
    assert round(total) == 722
    assert {(c.m, c.in_f) for c in cases if c.layer.startswith("attn2 k/v")} == {(154, 2048)}


def test_step_ratio_weights_by_count_and_reuses_bare_across_k():
    a = bk.Case("sd15", "a", 8, 4, 4, count=3)
    b = bk.Case("sd15", "b", 8, 4, 4, count=1)

    def row(case, k, warm):
        return {"key": case.key, "model": "sd15", "dtype": "float16", "k": k, "count": case.count,
                "warm": {n: {"median_us": t} for n, t in warm.items()}}

    rows = [row(a, 16, {"bare": 10.0, "triton": 11.0}), row(b, 16, {"bare": 20.0, "triton": 30.0}),
            row(a, 1, {"triton": 10.0}), row(b, 1, {"triton": 20.0})]
    r16 = bk.step_ratios(rows, "sd15", "float16", 16)["triton"]
    assert r16["x_bare"] == pytest.approx((3 * 11 + 30) / (3 * 10 + 20))
    assert bk.step_ratios(rows, "sd15", "float16", 1)["triton"]["x_bare"] == pytest.approx(1.0)


def test_dry_run_end_to_end(tmp_path):
    out = tmp_path / "dry.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_kernels.py"), "--dry-run", "--json", str(out)],
                          capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["dry_run"] and result["timings"] == "roofline estimates, not measured"
    assert result["ok"]
    kinds = {(c["model"], c["layer"]) for c in result["cases"]}
    assert len(kinds) == len({(c.model, c.layer) for c in bk.sd15_cases() + bk.sdxl_cases()})
    for row in result["cases"]:
        assert row["checks"]["triton"]["ok"], row
        assert set(row["checks"]) >= {"bare", "triton", "merged", "concat"}
        assert row["checks"]["merged"]["rel_err"] < 1e-2  # the merged-weights baseline computes the same op
        assert row["checks"]["concat"]["rel_err"] < 1e-2
    assert {r["k"] for r in result["cases"]} >= {4, 16, 64}  # fused and split patterns both ran
    assert all(t["hit"] is None for t in result["targets"].values())  # no verdict on estimates
    assert "ROOFLINE ESTIMATES, NOT MEASURED" in proc.stdout
    assert len(result["case_list"]["sd15"]) == len(bk.sd15_cases())
    # every tile candidate (and the one-tile-per-program variant) checked in the interpreter
    assert len(result["candidates"]) >= 3 * 5 and all(c["ok"] for c in result["candidates"])
