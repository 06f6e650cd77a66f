"""``spm-rt eval`` and ``spm-rt demo`` (the README's main job)."""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def shipped_spms() -> list[Path]:
    """The shipped shapes-world SPM files (:func:`spm_rt.world.shipped_spms`; imported lazily)."""
    from spm_rt.world import shipped_spms as files

    return files()


def add_subcommands(sub) -> None:
    from spm_rt.cli_common import MODEL_HELP, add_spm_argument, add_threads_argument

    p = sub.add_parser("eval", help="measure erasure and preservation on the shapes world")
    p.add_argument("--model", default="shapes", help=MODEL_HELP + " (default shapes; the judge is the shapes classifier)")
    add_spm_argument(p, help="SPM files (--spm A B or --spm A --spm B; default: the shipped ones)")
    # --samples is the spelling to use under torchrun, whose own parser claims abbreviations of --n
    p.add_argument("--n", "--samples", dest="n", type=int, default=32, help="samples per prompt")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=4.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prompts", nargs="+", default=None, help="prompts (default: every 'a {colour} {shape}')")
    p.add_argument("--no-combined", action="store_true", help="skip the all-SPMs-at-once groups")
    p.add_argument("--out", required=True, help="output folder (summary.json, per-group records and grids)")
    add_threads_argument(p)
    p.set_defaults(func=_eval)

    t = sub.add_parser("train-spms", help="train the shipped shapes-world SPMs from spm_rt/world/configs")
    t.add_argument("--concept", action="append", default=None, help="concept (repeatable; default: circle, red)")
    t.add_argument("--out", required=True, help="output folder for <concept>.safetensors")
    t.add_argument("--hardened", action="store_true",
                   help="train from configs/<concept>_hardened.yaml (adversarial Latent Anchoring) into "
                        "<concept>_hardened.safetensors")
    t.set_defaults(func=_train_spms)

    d = sub.add_parser("demo", help="before/after grid on the shipped model and SPMs, with summary figures")
    d.add_argument("--out", default="spm_demo.png",
                   help="the grid (default spm_demo.png); the summary figures go to a folder beside it "
                        "named after it (spm_demo_eval/)")
    d.add_argument("--n", type=int, default=4, help="samples per prompt for the quick summary figures")
    d.add_argument("--steps", type=int, default=20)
    add_threads_argument(d)
    d.set_defaults(func=_demo)


def _train_spms(args: argparse.Namespace) -> int:
    from spm_rt.world.spms import SHIPPED_CONCEPTS, build_spm

    for concept in args.concept or SHIPPED_CONCEPTS:
        print(f"wrote {build_spm(concept, args.out, hardened=args.hardened)}")
    return 0


def _groups(spms: list, combined: bool) -> dict:
    groups = {f"{','.join(s.concepts)}": ([s], "linear") for s in spms}
    if combined and len(spms) > 1:
        groups["all-linear"] = (spms, "linear")
        groups["all-official"] = (spms, "official")
    return groups


def _init_distributed() -> bool:
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("gloo")
        return True
    return False


def _eval(args: argparse.Namespace) -> int:
    from spm_rt.world.evaluate import EvalSettings, format_summary, run_eval

    from spm_rt.cli_common import (CLIError, apply_threads, check_at_least, check_guidance, check_steps, load_model,
                                   load_spm_files, resolve_spm_names, warn_outside_world)

    check_at_least(args.n, "--n")
    check_steps(args.steps, args.model)
    check_guidance(args.guidance)
    files = resolve_spm_names(args.spm, args.model) or shipped_spms()
    if not files:
        raise CLIError("no --spm files given and none shipped")
    spms = load_spm_files(files)  # before the model and the process group
    apply_threads(args)
    warn_outside_world(args.prompts, args.model, "--prompts")
    distributed = _init_distributed()
    pipe = load_model(args.model)
    settings = EvalSettings(n=args.n, steps=args.steps, guidance_scale=args.guidance, seed=args.seed)
    summary = run_eval(pipe, _groups(spms, not args.no_combined), args.out, args.prompts, settings)
    if "groups" in summary and summary["groups"]:
        print(format_summary(summary))
        print(f"wrote {Path(args.out) / 'summary.json'}")
    if distributed:
        import torch.distributed as dist

        dist.destroy_process_group()
    return 0


def demo_eval_dir(out: str | Path) -> Path:
    """Where ``spm-rt demo --out X.png`` writes its summary figures: ``X_eval/`` beside the PNG."""
    out = Path(out).with_suffix("")
    return out.parent / (out.name + "_eval")


DEMO_PROMPTS = ["a red circle", "a blue circle", "a red square", "a green triangle", "a yellow square",
                "a blue triangle"]


def demo_legend(names: list[str]) -> list[str]:
    """The demo picture's legend: what each column and each number means."""
    return [
        "base: the shipped shapes-world model without SPMs. Same noise seed along each row.",
        "reference gates: Facilitated Transport as in the SPM reference code (transport=\"clipcos_tokenuni\", "
        "the default);",
        "    on this 2-layer text encoder it opens every SPM to ~1 for any prompt.",
        "calibrated gates: opt-in transport=\"calibrated\": per-concept thresholds fitted on the concept's own "
        "prompts;",
        "    an SPM opens only for prompts that name its concept.",
        f"Under each image: its gate per SPM ({', '.join(names)}): 0 = SPM off, 1 = fully on.",
    ]


def _demo(args: argparse.Namespace) -> int:
    import torch

    import spm_rt
    from spm_rt.cli_common import CLIError, apply_threads, check_at_least, check_steps, load_spm_files
    from spm_rt.images import labelled_grid
    from spm_rt.world import load_shapes_pipeline
    from spm_rt.world.evaluate import EvalSettings, calibration_sets, format_summary, run_eval

    check_at_least(args.n, "--n")
    check_steps(args.steps)
    start = time.time()
    files = shipped_spms()
    if not files:
        raise CLIError("no shipped SPMs found in spm_rt/world/assets/spms (a broken install?)")
    threads = apply_threads(args)
    pipe = load_shapes_pipeline()
    spms = load_spm_files(files)
    names = [",".join(s.concepts) for s in spms]
    prompts = DEMO_PROMPTS
    kw = dict(num_inference_steps=args.steps, guidance_scale=4.0, output_type="np")
    seeds = list(range(len(prompts)))
    print(f"shapes world: SPMs {names}; prompts {prompts}; {threads} torch thread{'s' if threads > 1 else ''}")
    base = pipe(prompts, generator=[torch.Generator().manual_seed(s) for s in seeds], **kw).images
    calibration = {c: calibration_sets(c) for s in spms for c in s.concepts}
    columns, captions = [base], [[""] * len(prompts)]
    for transport in ("clipcos_tokenuni", "calibrated"):
        rt = spm_rt.compile(pipe, spms, transport=transport, calibration=calibration)
        gates = rt.gates(prompts)
        columns.append(rt(prompts, generator=[torch.Generator().manual_seed(s) for s in seeds], **kw).images)
        captions.append(["\n".join(f"{n} {v:.2f}" for n, v in zip(names, g)) for g in gates.tolist()])
        rt.remove()
    rows = [[col[i] for col in columns] for i in range(len(prompts))]
    cells = [[cap[i] for cap in captions] for i in range(len(prompts))]
    title = (f"spm_rt demo: the shipped SPMs {' + '.join(names)} (erase {' and '.join(repr(n) for n in names)}) "
             f"on the shapes world, linear combine, {args.steps} DDIM steps")
    labelled_grid(rows, row_labels=prompts, cell_labels=cells, upscale=4, title=title, legend=demo_legend(names),
                  col_labels=["base", "SPMs, reference gates", "SPMs, calibrated gates"]).save(args.out)
    print(f"wrote {args.out}")
    out_dir = demo_eval_dir(args.out)
    settings = EvalSettings(n=args.n, steps=args.steps)
    summary = run_eval(pipe, {"all-linear": (spms, "linear")}, out_dir, None, settings, progress=True)
    print(format_summary(summary))
    print(f"summary figures ({args.n} samples per prompt; `spm-rt eval` for the full run): "
          + json.dumps({k: summary[k] for k in ("base_accuracy", "target_still_recognized", "nontarget_accuracy_delta",
                                                "nontarget_psnr_median", "nontarget_psnr_median_gates1")}))
    print(f"wrote {out_dir}/ (summary.json, records and grid.png)")
    print(f"done in {time.time() - start:.0f} s")
    return 0
