"""``spm-rt attack``: erasure under attack on the shapes world (:mod:`spm_rt.world.attack`)."""
from __future__ import annotations

import argparse
import json
import time


def add_subcommands(sub) -> None:
    from spm_rt.cli_common import add_spm_argument, add_threads_argument
    from spm_rt.world.attack import MODES, SUITE_CATEGORIES, AttackSettings

    d = AttackSettings()
    p = sub.add_parser("attack", help="attack success rate of erasure per gate mode (prompt suite + embedding attack)",
                       description="Attack SPM erasure on the shapes world: a prompt-level suite (word order, "
                                   "repetition, filler, misspellings, split words, unseen synonyms, implied "
                                   "concepts) and an UnlearnDiffAtk-style embedding attack, for each gate mode "
                                   f"({', '.join(MODES)}); writes OUT/summary.json and OUT/grid.png.")
    p.add_argument("--model", default="shapes", help="shapes (the only model with a classifier to judge images)")
    add_spm_argument(p, help="SPM files whose concepts are shapes-world concepts (default: the shipped ones)")
    p.add_argument("--out", required=True, help="output folder (summary.json, grid.png)")
    p.add_argument("--n", type=int, default=d.n, help=f"images per attack prompt (default {d.n})")
    p.add_argument("--nontarget-n", type=int, default=d.nontarget_n, help=f"images per non-target prompt ({d.nontarget_n})")
    p.add_argument("--steps", type=int, default=d.steps, help=f"DDIM steps per generation ({d.steps})")
    p.add_argument("--attack-steps", type=int, default=d.attack_steps, help=f"embedding attack: Adam steps ({d.attack_steps})")
    p.add_argument("--attack-tokens", type=int, default=d.attack_tokens, help=f"embedding attack: prefix embeddings ({d.attack_tokens})")
    p.add_argument("--attack-lr", type=float, default=d.attack_lr, help=f"Adam step, relative to the mean token-embedding norm ({d.attack_lr})")
    p.add_argument("--gate-weight", type=float, default=d.gate_weight, help=f"adaptive term weight, 0 = gate-unaware ({d.gate_weight})")
    p.add_argument("--embedding-prompts", type=int, default=d.embedding_prompts, help=f"attacked prompts per concept ({d.embedding_prompts})")
    p.add_argument("--suite-limit", type=int, default=d.suite_limit, help=f"first N suite prompts per category, 0 = all ({d.suite_limit})")
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES, help="gate modes (default: all)")
    p.add_argument("--categories", nargs="+", default=list(SUITE_CATEGORIES), choices=SUITE_CATEGORIES)
    p.add_argument("--together", action="store_true", help="compile every SPM at once (default: each SPM alone)")
    p.add_argument("--combine", choices=("linear", "official"), default="linear")
    p.add_argument("--seed", type=int, default=0)
    add_threads_argument(p)
    p.set_defaults(func=_attack)


def _attack(args: argparse.Namespace) -> int:
    from spm_rt.cli_common import CLIError, apply_threads, load_spm_files
    from spm_rt.world import shipped_spms

    if args.model != "shapes":
        raise CLIError(f"--model {args.model!r}: attack needs the shapes world (its classifier judges the images); use shapes")
    for flag, v in (("--n", args.n), ("--nontarget-n", args.nontarget_n), ("--steps", args.steps),
                    ("--attack-tokens", args.attack_tokens), ("--embedding-prompts", args.embedding_prompts)):
        if v < 1:
            raise CLIError(f"{flag} {v}: must be >= 1")
    if args.attack_steps < 0:
        raise CLIError(f"--attack-steps {args.attack_steps}: must be >= 0")
    files = args.spm or [str(p) for p in shipped_spms()]
    spms = load_spm_files(files)
    from spm_rt.world import CONCEPTS

    for f, s in zip(files, spms):
        if not any(c in CONCEPTS for c in s.concepts):
            raise CLIError(f"--spm {f}: concepts {s.concepts} are not shapes-world concepts ({', '.join(CONCEPTS)})")
    threads = apply_threads(args)
    from spm_rt.world import load_shapes_pipeline
    from spm_rt.world.attack import AttackSettings, format_summary, run_attack

    settings = AttackSettings(n=args.n, steps=args.steps, seed=args.seed, combine=args.combine, modes=tuple(args.modes),
                              nontarget_n=args.nontarget_n, attack_steps=args.attack_steps,
                              attack_tokens=args.attack_tokens, attack_lr=args.attack_lr, gate_weight=args.gate_weight,
                              embedding_prompts=args.embedding_prompts, suite_limit=args.suite_limit or None,
                              categories=tuple(args.categories))
    start = time.time()
    print(f"attack: SPMs {[s.concepts for s in spms]}; modes {list(settings.modes)}; {threads} torch thread"
          f"{'s' if threads > 1 else ''}")
    summary = run_attack(load_shapes_pipeline(), spms, args.out, settings, together=args.together, progress=True)
    print(format_summary(summary))
    print(json.dumps({c: {m: {"suite_asr": e["suite"]["asr"], "embedding_asr": e["embedding"]["asr"]}
                          for m, e in r["modes"].items()} for c, r in summary["by_concept"].items()}))
    print(f"wrote {args.out}/summary.json and {args.out}/grid.png in {time.time() - start:.0f} s")
    return 0
