"""``spm-rt generate`` and ``spm-rt inspect``."""
from __future__ import annotations

import argparse


def add_subcommands(sub) -> None:
    p = sub.add_parser("generate", help="generate images with SPMs (optionally side by side with the base model)")
    p.add_argument("--model", default="shapes", help="shapes (default) | tiny | tiny-sdxl | a diffusers folder")
    p.add_argument("--onnx", default=None, help="run an exported ONNX folder with ONNX Runtime instead")
    p.add_argument("--spm", action="append", default=[], help="SPM .safetensors file (repeatable)")
    p.add_argument("--concepts", action="append", default=None,
                   help="concept names of each --spm whose file lacks them (repeatable, in --spm order)")
    p.add_argument("--prompt", action="append", required=True, help="prompt (repeatable: one batch)")
    p.add_argument("--gates", type=float, nargs="+", default=None, help="fixed gates, one per SPM")
    p.add_argument("--combine", choices=["linear", "official"], default="linear")
    p.add_argument("--transport", default="clipcos_tokenuni",
                   help="clipcos_tokenuni | clipcos | tokenuni | calibrated | fixed")
    p.add_argument("--strategy", choices=["auto", "merged", "gated"], default="auto")
    p.add_argument("--backend", choices=["auto", "torch", "triton"], default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=4.0)
    p.add_argument("--compare", action="store_true", help="write a grid: without / with SPMs, labelled with gates")
    p.add_argument("--out", default="out.png")
    p.set_defaults(func=_generate)

    q = sub.add_parser("inspect", help="print what an SPM file holds")
    q.add_argument("files", nargs="+")
    q.set_defaults(func=_inspect)


def _generators(seed: int, n: int):
    import torch

    return [torch.Generator().manual_seed(seed + i) for i in range(n)]


def _generate(args: argparse.Namespace) -> int:
    from spm_rt.images import labelled_grid

    prompts = args.prompt
    if args.onnx:
        from spm_rt.export.ort import run_onnx_pipeline

        images = run_onnx_pipeline(args.onnx, prompts, steps=args.steps, guidance_scale=args.guidance, seed=args.seed)
        labelled_grid([list(images)], col_labels=prompts).save(args.out)
        print(f"wrote {args.out}")
        return 0

    import spm_rt
    from spm_rt.models import load_pipeline

    pipe = load_pipeline(args.model)
    pipe.set_progress_bar_config(disable=False, desc="denoising", leave=False)
    kw = dict(num_inference_steps=args.steps, guidance_scale=args.guidance, output_type="np")
    base = pipe(prompts, generator=_generators(args.seed, len(prompts)), **kw).images if args.compare else None
    if not args.spm:
        images = base if base is not None else pipe(prompts, generator=_generators(args.seed, len(prompts)), **kw).images
        labelled_grid([list(images)], col_labels=prompts).save(args.out)
        print(f"wrote {args.out} (no SPMs given)")
        return 0
    transport = "fixed" if args.gates is not None and args.transport == "clipcos_tokenuni" else args.transport
    concepts = None
    if args.concepts:
        if len(args.concepts) != len(args.spm):
            raise SystemExit(f"--concepts given {len(args.concepts)} times for {len(args.spm)} --spm files")
        concepts = [c.split("|") for c in args.concepts]
    rt = spm_rt.compile(pipe, args.spm, combine=args.combine, transport=transport, strategy=args.strategy,
                        backend=args.backend, concepts=concepts,
                        **({"fixed_gates": args.gates} if transport == "fixed" and args.gates else {}))
    gates = rt.gates(prompts) if args.gates is None else None
    shown = gates if gates is not None else __import__("torch").tensor([args.gates] * len(prompts))
    images = rt(prompts, gates=args.gates, generator=_generators(args.seed, len(prompts)), **kw).images
    names = [",".join(c or ["?"]) for c in rt.concepts]
    for p, g in zip(prompts, shown.tolist()):
        print(f"{p!r}: " + ", ".join(f"{n}={v:.3f}" for n, v in zip(names, g)))
    captions = [["\n".join(f"{n[:10]} {v:.2f}" for n, v in zip(names, g))] for g in shown.tolist()]
    if args.compare:
        rows = [[base[i], images[i]] for i in range(len(prompts))]
        cells = [["base"] + captions[i] for i in range(len(prompts))]
        labelled_grid(rows, row_labels=prompts, col_labels=["without SPMs", "with SPMs"], cell_labels=cells).save(args.out)
    else:
        labelled_grid([list(images)], col_labels=prompts, cell_labels=[[c[0] for c in captions]]).save(args.out)
    print(f"wrote {args.out}")
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from spm_rt.formats import load_spm

    for f in args.files:
        spm = load_spm(f)
        convs = sum(w.conv for w in spm.weights.values())
        dtype = next(iter(spm.weights.values())).down.dtype
        print(f"{f}: concepts={spm.concepts} rank={spm.rank} alpha={spm.alpha} modules={len(spm.weights)} "
              f"(1x1 conv: {convs}) parameters={spm.num_parameters():,} dtype={dtype}")
    return 0
