"""Evaluation figures, and sharding across processes with torch.distributed (gloo, 2 CPU ranks)."""
import json
import os
import sys

import pytest
import torch

from subproc import run_python
from spm_rt.world.evaluate import calibration_sets, psnr, summarize


def _rec(prompt, is_target, base_correct, by):
    return {"prompt": prompt, "is_target": is_target, "n": 2, "base": {"correct": base_correct, "still_target": 1.0 if is_target else None},
            "by_transport": by}


def test_summary_figures_from_records():
    entry = lambda correct, still, gates, p: {"correct": correct, "still_target": still, "gates": gates, "psnr": p}
    records = [
        _rec("a red circle", True, 1.0, {"reference": entry(0.5, 0.5, [0.9], [10, 12]), "gates1": entry(0.0, 0.0, [1.0], [9, 9])}),
        _rec("a red square", False, 1.0, {"reference": entry(0.5, None, [0.7], [20, 30]), "gates1": entry(0.0, None, [1.0], [15, 16])}),
        _rec("a blue square", False, 0.5, {"reference": entry(0.5, None, [0.6], [40, 50]), "gates1": entry(0.5, None, [1.0], [17, 18])}),
    ]
    s = summarize(records)
    assert s["base_accuracy"] == pytest.approx(2.5 / 3)
    assert s["target_still_recognized"] == 0.5
    assert s["nontarget_accuracy_delta"] == pytest.approx(0.5 - 0.75)
    assert s["nontarget_psnr_median"] == 35.0  # median of 20, 30, 40, 50
    assert s["nontarget_psnr_median_gates1"] == 16.5
    assert s["by_transport"]["reference"]["gates_nontarget"]["mean"] == pytest.approx(0.65)


def test_psnr_and_calibration_sets_are_disjoint_from_eval_prompts():
    a = torch.zeros(2, 3, 4, 4)
    b = a.clone(); b[1] += 0.1
    p = psnr(b, a)
    assert p[0] == 100.0 and p[1] == pytest.approx(20.0, abs=1e-3)
    from spm_rt.world import prompts
    pos, neg = calibration_sets("circle")
    assert pos == ["a circle"] and "" in neg and "a red shape" in neg
    assert not set(pos + neg) & set(prompts())


def _cli(args, env_extra=None, n_proc=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", **(env_extra or {})}
    if n_proc:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n_proc), "--master_port", "29517",
               "-m", "spm_rt.cli"] + args
    else:
        cmd = [sys.executable, "-m", "spm_rt.cli"] + args
    return run_python(cmd[1:], env=env, timeout=600)


@pytest.mark.slow
def test_torchrun_two_gloo_ranks_match_one_process(tmp_path):
    from spm_rt import save_spm
    from spm_rt.testing import random_spm, tiny_pipeline

    spm = save_spm(random_spm(tiny_pipeline(0).unet, "circle", std=1.0), tmp_path / "circle.safetensors")
    common = ["eval", "--model", "tiny", "--spm", str(spm), "--samples", "2", "--steps", "2",
              "--prompts", "a red circle", "a blue square", "a green triangle"]
    one = _cli(common + ["--out", str(tmp_path / "one")])
    assert one.returncode == 0, one.stderr[-3000:]
    two = _cli(common + ["--out", str(tmp_path / "two")], n_proc=2)
    assert two.returncode == 0, two.stderr[-3000:]
    shards = sorted(p.name for p in (tmp_path / "two" / "circle" / "shards").iterdir())
    assert shards == ["rank0.json", "rank1.json"]
    r1 = json.loads((tmp_path / "one" / "circle" / "records.json").read_text())
    r2 = json.loads((tmp_path / "two" / "circle" / "records.json").read_text())
    assert [r["prompt"] for r in r2] == ["a red circle", "a blue square", "a green triangle"]
    for a, b in zip(r1, r2):
        assert a["base"]["shapes"] == b["base"]["shapes"]
        for t in a["by_transport"]:
            assert a["by_transport"][t]["gates"] == pytest.approx(b["by_transport"][t]["gates"], abs=1e-6)
            assert a["by_transport"][t]["psnr"] == pytest.approx(b["by_transport"][t]["psnr"], abs=1e-3)
    s1 = json.loads((tmp_path / "one" / "summary.json").read_text())
    s2 = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert s2["world_size"] == 2 and s1["world_size"] == 1
    assert s1["base_accuracy"] == s2["base_accuracy"]
    assert (tmp_path / "two" / "circle" / "grid.png").stat().st_size > 0
