"""``spm-rt eval`` and ``spm-rt demo`` (the README's main job)."""
from __future__ import annotations

import argparse
import json
import time
from importlib import resources
from pathlib import Path


def shipped_spms() -> list[Path]:
    """The SPM files shipped with the shapes world (trained with the project's training path)."""
    folder = Path(str(resources.files("spm_rt.world") / "assets" / "spms"))
    return sorted(folder.glob("*.safetensors")) if folder.is_dir() else []


def add_subcommands(sub) -> None:
    p = sub.add_parser("eval", help="measure erasure and preservation on the shapes world")
    p.add_argument("--model", default="shapes")
    p.add_argument("--spm", action="append", default=None, help="SPM file (repeatable; default: the shipped ones)")
    # --samples is the spelling to use under torchrun, whose own parser claims abbreviations of --n
    p.add_argument("--n", "--samples", dest="n", type=int, default=32, help="samples per prompt")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=4.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prompts", nargs="+", default=None, help="prompts (default: every 'a {colour} {shape}')")
    p.add_argument("--no-combined", action="store_true", help="skip the all-SPMs-at-once groups")
    p.add_argument("--out", required=True, help="output folder (summary.json, per-group records and grids)")
    p.set_defaults(func=_eval)

    t = sub.add_parser("train-spms", help="train the shipped shapes-world SPMs from spm_rt/world/configs")
    t.add_argument("--concept", action="append", default=None, help="concept (repeatable; default: circle, red)")
    t.add_argument("--out", required=True, help="output folder for <concept>.safetensors")
    t.set_defaults(func=_train_spms)

    d = sub.add_parser("demo", help="before/after grid on the shipped model and SPMs, with summary figures")
    d.add_argument("--out", default="spm_demo.png")
    d.add_argument("--n", type=int, default=4, help="samples per prompt for the quick summary figures")
    d.add_argument("--steps", type=int, default=20)
    d.set_defaults(func=_demo)


def _train_spms(args: argparse.Namespace) -> int:
    from spm_rt.world.spms import SHIPPED_CONCEPTS, build_spm

    for concept in args.concept or SHIPPED_CONCEPTS:
        print(f"wrote {build_spm(concept, args.out)}")
    return 0


def _groups(files: list, combined: bool) -> dict:
    from spm_rt.formats import load_spm

    spms = [load_spm(f) for f in files]
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
    from spm_rt.models import load_pipeline
    from spm_rt.world.evaluate import EvalSettings, format_summary, run_eval

    distributed = _init_distributed()
    files = args.spm or shipped_spms()
    if not files:
        raise SystemExit("no SPM files given and none shipped")
    pipe = load_pipeline(args.model)
    settings = EvalSettings(n=args.n, steps=args.steps, guidance_scale=args.guidance, seed=args.seed)
    summary = run_eval(pipe, _groups(files, not args.no_combined), args.out, args.prompts, settings)
    if "groups" in summary and summary["groups"]:
        print(format_summary(summary))
        print(f"wrote {Path(args.out) / 'summary.json'}")
    if distributed:
        import torch.distributed as dist

        dist.destroy_process_group()
    return 0


def _demo(args: argparse.Namespace) -> int:
    import torch

    import spm_rt
    from spm_rt.formats import load_spm
    from spm_rt.images import labelled_grid
    from spm_rt.world import load_shapes_pipeline
    from spm_rt.world.evaluate import EvalSettings, calibration_sets, format_summary, run_eval

    start = time.time()
    files = shipped_spms()
    if not files:
        raise SystemExit("no shipped SPMs found in spm_rt/world/assets/spms")
    pipe = load_shapes_pipeline()
    spms = [load_spm(f) for f in files]
    names = [",".join(s.concepts) for s in spms]
    prompts = ["a red circle", "a blue circle", "a red square", "a green triangle", "a yellow square", "a blue triangle"]
    kw = dict(num_inference_steps=args.steps, guidance_scale=4.0, output_type="np")
    seeds = list(range(len(prompts)))
    print(f"shapes world: SPMs {names}; prompts {prompts}")
    base = pipe(prompts, generator=[torch.Generator().manual_seed(s) for s in seeds], **kw).images
    calibration = {c: calibration_sets(c) for s in spms for c in s.concepts}
    columns, captions = [base], [["base"] * len(prompts)]
    for transport in ("clipcos_tokenuni", "calibrated"):
        rt = spm_rt.compile(pipe, spms, transport=transport, calibration=calibration)
        gates = rt.gates(prompts)
        columns.append(rt(prompts, generator=[torch.Generator().manual_seed(s) for s in seeds], **kw).images)
        captions.append(["\n".join(f"{n} {v:.2f}" for n, v in zip(names, g)) for g in gates.tolist()])
        rt.remove()
    rows = [[col[i] for col in columns] for i in range(len(prompts))]
    cells = [[cap[i] for cap in captions] for i in range(len(prompts))]
    labelled_grid(rows, row_labels=prompts, cell_labels=cells,
                  col_labels=["base", "SPMs, reference gates", "SPMs, calibrated gates"], upscale=4).save(args.out)
    print(f"wrote {args.out}")
    out_dir = Path(args.out).with_suffix("")
    out_dir = out_dir.parent / (out_dir.name + "_eval")
    settings = EvalSettings(n=args.n, steps=args.steps)
    summary = run_eval(pipe, {"all-linear": (spms, "linear")}, out_dir, None, settings, progress=True)
    print(format_summary(summary))
    print(f"summary figures ({args.n} samples per prompt; `spm-rt eval` for the full run): "
          + json.dumps({k: summary[k] for k in ("base_accuracy", "target_still_recognized", "nontarget_accuracy_delta",
                                                "nontarget_psnr_median", "nontarget_psnr_median_gates1")}))
    print(f"done in {time.time() - start:.0f} s")
    return 0
