"""``spm-rt generate`` and ``spm-rt inspect``.

Example::

    $ spm-rt generate --spm red --prompt "a red circle" --compare --out x.png
    'a red circle': red=1.000
    wrote x.png
"""
from __future__ import annotations

import argparse

from spm_rt.cli_common import MODEL_HELP, add_spm_argument, add_threads_argument

# the defaults of every generating command (generate, generate --onnx, export run)
DEFAULT_STEPS = 20
DEFAULT_GUIDANCE = 4.0


def add_generation_defaults(p: argparse.ArgumentParser) -> None:
    """``--seed``, ``--steps``, ``--guidance``: the same defaults for every command that generates."""
    p.add_argument("--seed", type=int, default=0, help="prompt i of the batch gets seed + i (default 0)")
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS, help=f"denoising steps (default {DEFAULT_STEPS})")
    p.add_argument("--guidance", "--guidance-scale", dest="guidance", type=float, default=DEFAULT_GUIDANCE,
                   help=f"classifier-free guidance scale (default {DEFAULT_GUIDANCE:g})")


def add_subcommands(sub) -> None:
    p = sub.add_parser("generate", help="generate images with SPMs (optionally side by side with the base model)")
    p.add_argument("--model", default="shapes", help=MODEL_HELP + " (default shapes)")
    p.add_argument("--onnx", default=None, help="run an exported ONNX folder with ONNX Runtime instead of --model")
    add_spm_argument(p, help="SPM .safetensors files, in gate order (--spm A B or --spm A --spm B); with --model "
                             "shapes a shipped SPM's name (circle, red) is enough")
    p.add_argument("--concepts", action="append", default=None,
                   help="concept names of each --spm whose file lacks them (once per --spm, in order; "
                        "names separated by | or , or a JSON list)")
    p.add_argument("--prompt", action="append", required=True, help="prompt (repeatable: one batch)")
    p.add_argument("--gates", type=float, nargs="+", default=None, help="fixed gates, one per SPM")
    p.add_argument("--combine", choices=["linear", "official"], default="linear")
    p.add_argument("--transport", default="clipcos_tokenuni",
                   choices=["clipcos_tokenuni", "clipcos", "tokenuni", "calibrated", "fixed"],
                   help="Facilitated Transport gate: clipcos_tokenuni (default) | clipcos | tokenuni | calibrated | fixed")
    p.add_argument("--strategy", choices=["auto", "merged", "gated"], default="auto")
    p.add_argument("--backend", choices=["auto", "torch", "triton"], default="auto")
    add_generation_defaults(p)
    p.add_argument("--compare", action="store_true", help="write a grid: without / with SPMs, labelled with gates")
    p.add_argument("--out", default="out.png")
    add_threads_argument(p)
    p.set_defaults(func=_generate)

    q = sub.add_parser("inspect", help="print what an SPM file holds")
    q.add_argument("files", nargs="+")
    q.set_defaults(func=_inspect)


def _generate_onnx(args: argparse.Namespace) -> int:
    from pathlib import Path

    from spm_rt.cli_common import CLIError, apply_threads, print_gates
    from spm_rt.images import labelled_grid

    if not (Path(args.onnx) / "manifest.json").is_file():
        raise CLIError(f"--onnx {args.onnx}: no manifest.json (not a folder written by 'spm-rt export onnx')")
    for flag, given in (("--spm", args.spm), ("--compare", args.compare), ("--concepts", args.concepts)):
        if given:
            raise CLIError(f"{flag} does not apply with --onnx (the SPMs were fixed at export)")
    apply_threads(args)
    images, gates, names = run_onnx(args.onnx, args.prompt, steps=args.steps, guidance=args.guidance,
                                    seed=args.seed, gates=args.gates)
    print_gates(args.prompt, names, gates)
    labelled_grid([list(images)], col_labels=args.prompt, cell_labels=[_gate_captions(names, gates)]).save(args.out)
    print(f"wrote {args.out}")
    return 0


def _gate_captions(names: list[str], gates) -> list[str]:
    return ["\n".join(f"{n[:10]} {float(v):.2f}" for n, v in zip(names, g)) for g in gates]


def run_onnx(onnx_dir: str, prompts: list[str], *, steps: int, guidance: float, seed: int, gates=None,
             negative_prompt=None, height=None, width=None, providers=None):
    """Generate with an exported folder under the CLI's conventions (per-prompt seeds); returns
    ``(PIL images, gates [B, K] as printed, concept names)``."""
    import numpy as np

    from spm_rt.cli_common import check_gates, prompt_seeds
    from spm_rt.export.ort import ONNXPipeline

    runner = ONNXPipeline(onnx_dir, providers=providers)
    names = [",".join(c or ["?"]) for c in runner.manifest.get("concepts") or []]
    k = len(names)
    check_gates(gates, k)
    if gates is not None:
        shown = np.asarray([gates] * len(prompts), np.float32)
    else:
        shown = np.asarray(runner.encode(prompts)["gates"])[:, :k]
    images = runner(prompts, steps=steps, guidance_scale=guidance, seed=prompt_seeds(seed, len(prompts)),
                    gates=gates, negative_prompt=negative_prompt, height=height, width=width, progress=True)
    return images, shown, names


def _generate(args: argparse.Namespace) -> int:
    if args.onnx:
        return _generate_onnx(args)

    import torch

    import spm_rt
    from spm_rt.cli_common import (CLIError, apply_threads, check_gates, check_guidance, check_steps, generators,
                                   load_model, load_spm_files, parse_concepts, print_gates, resolve_spm_names,
                                   warn_outside_world)
    from spm_rt.images import labelled_grid

    prompts = args.prompt
    # every number and file is checked before the model loads
    check_steps(args.steps, args.model)
    check_guidance(args.guidance)
    files = resolve_spm_names(args.spm, args.model) or []
    # every file is checked (and loaded: cheap) before the model
    spms = load_spm_files(files, parse_concepts(args.concepts, len(files)))
    check_gates(args.gates, len(spms))
    if args.gates is not None and not spms:
        raise CLIError("--gates given without --spm")
    apply_threads(args)
    warn_outside_world(prompts, args.model)  # after every error: a warning never precedes an error line
    pipe = load_model(args.model)
    pipe.set_progress_bar_config(disable=False, desc="denoising", leave=False)
    kw = dict(num_inference_steps=args.steps, guidance_scale=args.guidance, output_type="np")
    base = pipe(prompts, generator=generators(args.seed, len(prompts)), **kw).images if args.compare else None
    if not spms:
        images = base if base is not None else pipe(prompts, generator=generators(args.seed, len(prompts)), **kw).images
        labelled_grid([list(images)], col_labels=prompts).save(args.out)
        print(f"wrote {args.out} (no SPMs given)")
        return 0
    transport = "fixed" if args.gates is not None and args.transport == "clipcos_tokenuni" else args.transport
    rt = spm_rt.compile(pipe, spms, combine=args.combine, transport=transport, strategy=args.strategy,
                        backend=args.backend,
                        **({"fixed_gates": args.gates} if transport == "fixed" and args.gates else {}))
    shown = rt.gates(prompts) if args.gates is None else torch.tensor([args.gates] * len(prompts))
    images = rt(prompts, gates=args.gates, generator=generators(args.seed, len(prompts)), **kw).images
    names = [",".join(c or ["?"]) for c in rt.concepts]
    print_gates(prompts, names, shown.tolist())
    captions = _gate_captions(names, shown.tolist())
    if args.compare:
        rows = [[base[i], images[i]] for i in range(len(prompts))]
        cells = [["", captions[i]] for i in range(len(prompts))]
        labelled_grid(rows, row_labels=prompts, col_labels=["without SPMs", "with SPMs"], cell_labels=cells,
                      title=f"SPMs: {', '.join(names)}; gates under each image").save(args.out)
    else:
        labelled_grid([list(images)], col_labels=prompts, cell_labels=[captions]).save(args.out)
    print(f"wrote {args.out}")
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from spm_rt.cli_common import load_spm_files

    for f in args.files:
        spm = load_spm_files([f], flag="")[0]
        convs = sum(w.conv for w in spm.weights.values())
        dtype = next(iter(spm.weights.values())).down.dtype
        print(f"{f}: concepts={spm.concepts} rank={spm.rank} alpha={spm.alpha} modules={len(spm.weights)} "
              f"(1x1 conv: {convs}) parameters={spm.num_parameters():,} dtype={dtype}")
    return 0
