"""``spm-rt export ...`` subcommands: onnx, check, run, engine, refit, triton. Thin: parse, call the library,
print/save. Heavy imports happen inside the handlers."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _floats(text: str | None, flag: str) -> list[float] | None:
    from spm_rt.cli_common import CLIError

    if text is None:
        return None
    try:
        return [float(v) for v in text.split(",")]
    except ValueError as exc:
        raise CLIError(f"{flag} {text!r}: comma-separated numbers expected") from exc


def _check_onnx_dir(path: str, flag: str = "--onnx") -> None:
    from spm_rt.cli_common import CLIError

    if not (Path(path) / "manifest.json").is_file():
        raise CLIError(f"{flag} {path}: no manifest.json (not a folder written by 'spm-rt export onnx')")


def _cmd_onnx(args) -> int:
    import torch

    import spm_rt
    from spm_rt.cli_common import check_gates, load_model, load_spm_files, parse_concepts
    from spm_rt.export.onnx import export_onnx

    # files first (cheap), then the model: a typo costs no model load
    spms = load_spm_files(args.spm, parse_concepts(args.concepts, len(args.spm)))
    fixed = _floats(args.fixed_gates, "--fixed-gates")
    folded = _floats(args.folded_gates, "--folded-gates")
    check_gates(fixed, len(spms), "--fixed-gates")
    check_gates(folded, len(spms), "--folded-gates")
    load_dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[args.load_dtype]
    pipe = load_model(args.model, dtype=load_dtype)
    pipe.set_progress_bar_config(disable=True)
    if args.device:
        pipe.to(args.device)
    rt = spm_rt.compile(pipe, spms, combine=args.combine, transport=args.transport, fixed_gates=fixed)
    dtype = None if args.dtype is None else getattr(torch, args.dtype)
    external = {"auto": None, "yes": True, "no": False}[args.external_data]
    manifest = export_onnx(rt, args.out, gates=args.gates, k_max=args.k_max, concepts_max=args.concepts_max,
                           folded_gates=folded, opset=args.opset, dtype=dtype,
                           components=tuple(args.components.split(",")), external_data=external)
    for name, spec in manifest["graphs"].items():
        ins = ", ".join(f"{i['name']}{i['shape']}" for i in spec["inputs"])
        outs = ", ".join(f"{o['name']}{o['shape']}" for o in spec["outputs"])
        print(f"{name}: {Path(args.out) / spec['file']}  ({ins}) -> ({outs})")
    print(f"manifest: {Path(args.out) / 'manifest.json'}  concepts={manifest['concepts']} "
          f"gates={manifest['gates_mode']} k_max={manifest['k_max']} combine={manifest['combine']}")
    return 0


def _cmd_check(args) -> int:
    from spm_rt.cli_common import CLIError
    from spm_rt.export.onnx import check_onnx

    _check_onnx_dir(args.onnx)
    for f in check_onnx(args.onnx):
        print(f"ok: {f}")
    if args.tensorrt:
        from spm_rt.export.trt_check import check_tensorrt

        try:
            report = check_tensorrt(args.onnx, shapes=args.shapes)
        except (ImportError, RuntimeError, ValueError) as exc:
            raise CLIError(f"export check --tensorrt: {exc}") from exc
        for name, r in report.items():
            ins = ", ".join(f"{i['name']}{i['shape']}" for i in r["inputs"])
            outs = ", ".join(f"{o['name']}{o['shape']}" for o in r["outputs"])
            print(f"ok (TensorRT parser, {r['tensorrt']}): {r['file']}  {r['layers']} layers  ({ins}) -> ({outs})"
                  f"  refittable weights: {len(r['refittable'])}")
    return 0


def _cmd_run(args) -> int:
    """Same conventions as ``spm-rt generate --onnx``: defaults, per-prompt seeds, printed gates."""
    from spm_rt.cli_common import apply_threads, print_gates
    from spm_rt.commands import run_onnx

    _check_onnx_dir(args.onnx)
    apply_threads(args)
    images, gates, names = run_onnx(args.onnx, args.prompt, steps=args.steps, guidance=args.guidance,
                                    seed=args.seed, gates=_floats(args.gates, "--gates"), height=args.height,
                                    width=args.width, negative_prompt=args.negative_prompt, providers=args.provider)
    print_gates(args.prompt, names, gates)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        path = out if len(images) == 1 else out.with_name(f"{out.stem}_{i}{out.suffix}")
        image.save(path)
        print(path)
    return 0


def _cmd_engine(args) -> int:
    from spm_rt.cli_common import CLIError
    from spm_rt.export.trt import build_engines

    precision = "fp16" if args.fp16 else "bf16" if args.bf16 else "fp32"
    graphs = tuple(args.graphs.split(",")) if args.graphs else None
    _check_onnx_dir(args.onnx)
    try:
        built = build_engines(args.onnx, args.out, precision=precision, refittable=args.refittable,
                              shapes=args.shapes, graphs=graphs, workspace_gb=args.workspace_gb)
    except RuntimeError as exc:  # missing GPU, parse/build errors: one line like every user error
        raise CLIError(f"export engine: {exc}") from exc
    for name, path in built.items():
        print(f"{name}: {path}")
    return 0


def _cmd_triton(args) -> int:
    from spm_rt.export.triton import export_triton

    _check_onnx_dir(args.onnx)
    for name, path in export_triton(args.onnx, args.out, max_batch_size=args.max_batch_size,
                                    max_queue_delay_us=args.max_queue_delay_us, link=args.link).items():
        print(f"{name}: {path}")
    return 0


def _cmd_refit(args) -> int:
    from spm_rt.cli_common import CLIError
    from spm_rt.export.trt import refit_engines

    from spm_rt.cli_common import load_spm_files, parse_concepts

    load_spm_files(args.spm)  # checked before any engine is opened
    try:
        counts = refit_engines(args.engine, args.spm, concepts=parse_concepts(args.concepts, len(args.spm)),
                               onnx_dir=args.onnx, fixed_gates=_floats(args.fixed_gates, "--fixed-gates"))
    except RuntimeError as exc:
        raise CLIError(f"export refit: {exc}") from exc
    for name, n in counts.items():
        print(f"{name}: refitted {n} weights")
    return 0


def add_subcommands(subparsers) -> None:
    """Register ``spm-rt export {onnx,check,run,engine,refit,triton}``."""
    from spm_rt.cli_common import MODEL_HELP, add_spm_argument, add_threads_argument
    from spm_rt.commands import add_generation_defaults

    export = subparsers.add_parser("export", help="ONNX graphs and TensorRT engines",
                                   description="Export SPM-patched pipelines to ONNX / TensorRT and run them.")
    sub = export.add_subparsers(dest="export_command", metavar="WHAT")
    export.set_defaults(func=lambda args: (export.print_help(), 2)[1])

    p = sub.add_parser("onnx", help="export text encoder (with gates), UNet and VAE decoder to ONNX")
    p.add_argument("--model", required=True, help=MODEL_HELP)
    add_spm_argument(p, required=True)
    p.add_argument("--concepts", action="append", help="concept names of one SPM (repeat once per SPM; "
                                                       "separated by | or , or a JSON list)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--gates", choices=("input", "folded", "none"), default="input",
                   help="input: gates [batch, k_max] are a graph input; folded: SPMs merged for fixed gates; "
                        "none: the base UNet")
    p.add_argument("--k-max", type=int, help="pad to this many SPM slots (one graph for up to k_max SPMs)")
    p.add_argument("--concepts-max", type=int, help="concept slots in the text-encoder graph")
    p.add_argument("--combine", choices=("linear", "official"), default="linear")
    p.add_argument("--transport", choices=("clipcos_tokenuni", "clipcos", "tokenuni", "fixed"),
                   default="clipcos_tokenuni")
    p.add_argument("--fixed-gates", help="comma-separated gates for --transport fixed")
    p.add_argument("--folded-gates", help="comma-separated gates merged with --gates folded (default ones)")
    p.add_argument("--opset", type=int, default=17)
    p.add_argument("--dtype", choices=("float32", "float16"),
                   help="graph dtype (default: the model's; for bf16 engines export float32 and use --bf16)")
    p.add_argument("--load-dtype", choices=("float32", "float16", "bfloat16"), default="float32",
                   help="dtype to load the pipeline in")
    p.add_argument("--device", help="device to trace on (e.g. cuda)")
    p.add_argument("--components", default="text_encoder,unet,vae_decoder")
    p.add_argument("--external-data", choices=("auto", "yes", "no"), default="auto",
                   help="weights in a separate file (auto: when over 2 GB)")
    p.set_defaults(func=_cmd_onnx)

    p = sub.add_parser("check", help="onnx.checker and strict shape inference on an exported folder "
                                     "(--tensorrt: also TensorRT's ONNX parser, no GPU needed)")
    p.add_argument("--onnx", required=True)
    p.add_argument("--tensorrt", action="store_true",
                   help="also parse every graph with TensorRT's ONNX parser (tensorrt or tensorrt-rtx-cu12; no GPU "
                        "needed) and check inputs, outputs, dynamic axes, profile and refittable weights")
    p.add_argument("--shapes", help="with --tensorrt: the profile to check, MIN/OPT/MAX as BATCHxHEIGHTxWIDTH "
                                    "(default 1..4 images at the model's size)")
    p.set_defaults(func=_cmd_check)

    p = sub.add_parser("run", help="generate images from an exported folder with ONNX Runtime")
    p.add_argument("--onnx", required=True, help="folder written by 'spm-rt export onnx'")
    p.add_argument("--prompt", action="append", required=True, help="repeat for several images")
    p.add_argument("--out", required=True, help="PNG path (x.png; several prompts: x_0.png, x_1.png, ...)")
    p.add_argument("--negative-prompt")
    add_generation_defaults(p)  # the defaults of spm-rt generate
    add_threads_argument(p)
    p.add_argument("--height", type=int)
    p.add_argument("--width", type=int)
    p.add_argument("--gates", help="comma-separated gates overriding the text-encoder graph's")
    p.add_argument("--provider", action="append", help="onnxruntime execution provider (repeatable)")
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser("engine", help="build TensorRT engines from an exported folder (needs tensorrt and a GPU)")
    p.add_argument("--onnx", required=True)
    p.add_argument("--out", required=True)
    prec = p.add_mutually_exclusive_group()
    prec.add_argument("--fp16", action="store_true")
    prec.add_argument("--bf16", action="store_true")
    p.add_argument("--refittable", action="store_true", help="keep the SPM tensors refittable (spm-rt export refit)")
    p.add_argument("--shapes", help="MIN/OPT/MAX as BATCHxHEIGHTxWIDTH in pixels, e.g. 1x512x512/1x512x512/4x512x512")
    p.add_argument("--graphs", help="comma-separated subset of text_encoder,unet,vae_decoder")
    p.add_argument("--workspace-gb", type=float)
    p.set_defaults(func=_cmd_engine)

    p = sub.add_parser("triton", help="a Triton Inference Server model repository (ONNX Runtime backend, dynamic "
                                      "batching, gates per request) from an exported folder")
    p.add_argument("--onnx", required=True, help="folder written by 'spm-rt export onnx'")
    p.add_argument("--out", required=True, help="model repository folder")
    p.add_argument("--max-batch-size", type=int, default=8,
                   help="rows per batched call (UNet rows: 2 per prompt with classifier-free guidance)")
    p.add_argument("--max-queue-delay-us", type=int, default=2000)
    p.add_argument("--link", action="store_true", help="symlink the ONNX files instead of copying them")
    p.set_defaults(func=_cmd_triton)

    p = sub.add_parser("refit", help="swap the SPM set of refittable TensorRT engines without a rebuild")
    p.add_argument("--engine", required=True, help="folder written by 'spm-rt export engine --refittable'")
    add_spm_argument(p, required=True)
    p.add_argument("--concepts", action="append")
    p.add_argument("--onnx", help="the exported folder (for concept embeddings; default: the one built from)")
    p.add_argument("--fixed-gates")
    p.set_defaults(func=_cmd_refit)


if __name__ == "__main__":  # pragma: no cover
    parser = argparse.ArgumentParser(prog="spm-rt")
    add_subcommands(parser.add_subparsers(dest="command"))
    ns = parser.parse_args()
    sys.exit(ns.func(ns) or 0)
