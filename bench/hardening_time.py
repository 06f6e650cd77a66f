"""Adversarial training time against plain SPM training, for one shapes-world concept.

Times, in one process with one torch thread and the process CPU clock (robust to other jobs on a
shared machine; the wall clock is stored beside it), ``--steps`` iterations of the plain recipe
(``configs/<concept>.yaml``) and of the hardening recipe (``configs/<concept>_hardened.yaml``,
population refreshes included at their configured rate), after one warm-up iteration each. The
whole hardened SPM costs the plain training plus the hardening run:

    ratio = (plain_iterations * t_plain + hardening_iterations * t_hard) / (plain_iterations * t_plain)

    python bench/hardening_time.py --concept circle --out bench/results/attack/circle_hardened/training_timing.json
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path


def _time(config_path: Path, steps: int) -> dict:
    from spm_rt.train import Trainer, load_config

    cfg = load_config(config_path)
    trainer = Trainer(cfg, progress=False)
    try:
        trainer.step()  # warm-up (first-call allocations); the population's first refresh comes later
        cpu, wall = time.process_time(), time.perf_counter()
        for _ in range(steps):
            trainer.step()
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        refreshes = len(trainer.adversarial.log) if trainer.adversarial is not None else 0
    finally:
        trainer.close()
    return {"config": config_path.name, "iterations_total": cfg.train.iterations, "timed_steps": steps,
            "cpu_seconds_per_iteration": cpu / steps, "wall_seconds_per_iteration": wall / steps,
            "population_refreshes_timed": refreshes}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--concept", default="circle")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    import torch

    torch.set_num_threads(1)
    from spm_rt.world.spms import config_path

    plain = _time(config_path(args.concept), args.steps)
    hard = _time(config_path(f"{args.concept}_hardened"), args.steps)
    plain_total = plain["iterations_total"] * plain["cpu_seconds_per_iteration"]
    hard_total = hard["iterations_total"] * hard["cpu_seconds_per_iteration"]
    out = {"concept": args.concept, "torch_threads": 1, "clock": "process CPU time",
           "load_average_at_start": os.getloadavg()[0], "plain": plain, "hardening": hard,
           "plain_seconds_estimated": plain_total, "hardening_seconds_estimated": hard_total,
           "hardened_total_vs_plain": (plain_total + hard_total) / plain_total,
           "hardening_alone_vs_plain": hard_total / plain_total}
    text = json.dumps(out, indent=1)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
