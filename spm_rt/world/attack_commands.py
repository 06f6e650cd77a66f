"""``spm-rt attack``: erasure under attack on the shapes world (:mod:`spm_rt.world.attack`)."""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace


def add_subcommands(sub) -> None:
    from spm_rt.cli_common import add_spm_argument, add_threads_argument
    from spm_rt.world.attack import ATTACKS, MODES, AttackSettings

    d = AttackSettings()
    b = d.budget
    p = sub.add_parser("attack", help="attack success rate of erasure on held-out prompts, with controls and intervals",
                       description="Attack SPM erasure on the shapes world (held-out prompts and seeds only): "
                                   "soft and hard (real-token) prefix attacks at UnlearnDiffAtk's budget, the "
                                   "gate-aware two-stage attack per gate mode, a held-out prompt suite, non-target "
                                   "preservation; controls (base / erased unattacked, random 0-step prefix, chance "
                                   "floor) and Wilson 95%% intervals beside every rate. Writes OUT/summary.json and "
                                   "OUT/grid.png.")
    p.add_argument("--model", default="shapes", help="shapes (the only model with a classifier to judge images)")
    add_spm_argument(p, help="SPM files whose concepts are shapes-world concepts (default: the shipped ones)")
    p.add_argument("--label", action="append", default=None,
                   help="report name of each --spm, in order (e.g. circle_hardened); default: its concepts")
    p.add_argument("--out", required=True, help="output folder (summary.json, grid.png)")
    p.add_argument("--quick", action="store_true", help="a small deterministic run (CI): 2 prompts, 6 attack steps")
    p.add_argument("--n", type=int, default=None, help=f"images per attacked prompt (default {d.n})")
    p.add_argument("--prompts", type=int, default=None, help=f"held-out prompts attacked per concept ({d.prompts})")
    p.add_argument("--steps", type=int, default=None, help=f"DDIM steps per generation ({d.steps})")
    p.add_argument("--attack-steps", type=int, default=None, help=f"Adam steps per prompt ({b.steps})")
    p.add_argument("--restarts", type=int, default=None, help=f"restarts per prompt ({b.restarts})")
    p.add_argument("--hard-restarts", type=int, default=None,
                   help=f"restarts of the hard (real-token) attack ({d.hard_restarts})")
    p.add_argument("--attack-tokens", type=int, default=None, help=f"prefix positions ({b.tokens})")
    p.add_argument("--check-every", type=int, default=None, help=f"classifier check / early stop every N steps ({b.check_every})")
    p.add_argument("--attacks", nargs="+", choices=ATTACKS, default=None, help="attacks to run (default: all)")
    p.add_argument("--modes", nargs="+", default=None, choices=MODES, help="gate modes (default: all)")
    p.add_argument("--no-suite", action="store_true", help="skip the held-out prompt suite")
    p.add_argument("--split", choices=("heldout", "dev"), default="heldout",
                   help="heldout (default; every reported figure) or dev: fitting-split prompts and seeds, for "
                        "choosing a recipe (e.g. a hardening config) without touching held-out data")
    p.add_argument("--together", action="store_true", help="compile every SPM at once (default: each SPM alone)")
    p.add_argument("--combine", choices=("linear", "official"), default="linear")
    p.add_argument("--seed", type=int, default=0, help="the attacker's seed")
    add_threads_argument(p)
    p.set_defaults(func=_attack)


def _attack(args: argparse.Namespace) -> int:
    from spm_rt.cli_common import CLIError, apply_threads, load_spm_files
    from spm_rt.world import CONCEPTS, shipped_spms

    if args.model != "shapes":
        raise CLIError(f"--model {args.model!r}: attack needs the shapes world (its classifier judges the images); use shapes")
    for flag, v in (("--n", args.n), ("--prompts", args.prompts), ("--steps", args.steps),
                    ("--attack-tokens", args.attack_tokens), ("--restarts", args.restarts),
                    ("--check-every", args.check_every), ("--hard-restarts", args.hard_restarts)):
        if v is not None and v < 1:
            raise CLIError(f"{flag} {v}: must be >= 1")
    if args.attack_steps is not None and args.attack_steps < 1:
        raise CLIError(f"--attack-steps {args.attack_steps}: must be >= 1")
    most = 16 if args.split == "heldout" else 8
    if args.prompts is not None and args.prompts > most:
        raise CLIError(f"--prompts {args.prompts}: the {args.split} split has {most} named prompts per concept")
    files = args.spm or [str(p) for p in shipped_spms()]
    if args.label is not None and len(args.label) != len(files):
        raise CLIError(f"--label given {len(args.label)} times for {len(files)} SPM files: give one per --spm")
    spms = load_spm_files(files)
    for f, s in zip(files, spms):
        if not any(c in CONCEPTS for c in s.concepts):
            raise CLIError(f"--spm {f}: concepts {s.concepts} are not shapes-world concepts ({', '.join(CONCEPTS)})")
    threads = apply_threads(args)
    from spm_rt.world import load_shapes_pipeline
    from spm_rt.world.attack import AttackSettings, run_attack
    from spm_rt.world.attack_report import format_summary

    s = AttackSettings.quick() if args.quick else AttackSettings()
    budget = replace(s.budget, **{k: v for k, v in (("steps", args.attack_steps), ("restarts", args.restarts),
                                                    ("tokens", args.attack_tokens), ("check_every", args.check_every))
                                  if v is not None})
    over = {k: v for k, v in (("n", args.n), ("prompts", args.prompts), ("steps", args.steps),
                              ("hard_restarts", args.hard_restarts)) if v is not None}
    if args.attacks:
        over["attacks"] = tuple(args.attacks)
    if args.modes:
        over["modes"] = tuple(args.modes)
    if args.no_suite:
        over["suite"] = False
    over["split"] = args.split
    s = replace(s, budget=budget, combine=args.combine, seed=args.seed, **over)
    start = time.time()
    print(f"attack: SPMs {[sp.concepts for sp in spms]}; modes {list(s.modes)}; attacks {list(s.attacks)}; "
          f"{threads} torch thread{'s' if threads > 1 else ''}")
    summary = run_attack(load_shapes_pipeline(), spms, args.out, s, together=args.together, progress=True,
                         labels=args.label)
    print(format_summary(summary))
    print(json.dumps({c: {m: e["max"]["rate"] for m, e in r["embedding"].items()}
                      for c, r in summary["by_concept"].items()}))
    print(f"wrote {args.out}/summary.json and {args.out}/grid.png in {time.time() - start:.0f} s")
    return 0
