"""Does erasure work? ``spm-rt eval`` on the shapes world.

For every prompt of the world, generate from the same seeds without and with the SPMs, and judge
each image with the shipped classifier. Three gate sources are compared:

* ``reference``  Facilitated Transport as the reference computes it (clipcos_tokenuni);
* ``calibrated`` the opt-in calibrated transport (thresholds fitted on the partial-attribute
  captions "a circle" / "a red shape" — never on the full prompts that are evaluated);
* ``gates1``     every membrane fully open (what transport buys is the difference).

Summary figures (fractions, points as fractions, dB), headline under the reference transport:
``base_accuracy``, ``target_still_recognized``, ``nontarget_accuracy_delta``,
``nontarget_psnr_median``, ``nontarget_psnr_median_gates1``; the same per transport under
``by_transport``, and gate distributions for target vs non-target prompts.

Large prompt sets shard across processes: launched by ``torchrun``, each rank evaluates every
``world_size``-th prompt, writes ``shards/rank{r}.json`` and rank 0 merges (gloo works on CPU).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from spm_rt.gating import gates_off

from spm_rt.world.data import COLOURS, SHAPES, caption, parse_caption

TRANSPORTS = ("reference", "calibrated", "gates1")


def concept_attribute(concept: str) -> tuple[str, int]:
    """("shape" | "colour", index) of a world concept."""
    if concept in SHAPES:
        return "shape", SHAPES.index(concept)
    if concept in COLOURS:
        return "colour", COLOURS.index(concept)
    raise ValueError(f"{concept!r} is not a shapes-world concept ({SHAPES + COLOURS})")


def calibration_sets(concept: str) -> tuple[list[str], list[str]]:
    """Calibration prompts for a world concept, disjoint from the evaluated full prompts:
    the partial captions that contain it versus the other partial captions and the empty prompt."""
    partial = [caption(s, None) for s in SHAPES] + [caption(None, c) for c in COLOURS]
    pos = [p for p in partial if concept in p.split()]
    neg = [p for p in partial if concept not in p.split()] + [""]
    return pos, neg


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of [N, 3, H, W] images in [0, 1] (capped at 100 dB for identical images)."""
    mse = ((a - b) ** 2).flatten(1).mean(1)
    return (10 * torch.log10(1.0 / mse.clamp_min(1e-10))).clamp(max=100.0)


@dataclass
class EvalSettings:
    n: int = 32
    steps: int = 20
    guidance_scale: float = 4.0
    seed: int = 0
    combine: str = "linear"


def _generate(pipe, prompt: str, n: int, s: EvalSettings, seed: int, call=None, gates=None) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    cfg = pipe.unet.config
    latents = torch.randn((n, cfg.in_channels, cfg.sample_size, cfg.sample_size), generator=gen)
    kwargs = dict(num_inference_steps=s.steps, guidance_scale=s.guidance_scale, output_type="pt",
                  latents=latents.to(pipe.device, pipe.unet.dtype))
    with torch.no_grad():
        if call is None:  # the base model: membranes shut on purpose (a patched pipe erases otherwise)
            with gates_off(pipe):
                images = pipe([prompt] * n, **kwargs).images
        else:
            images = call([prompt] * n, gates=gates, **kwargs).images
    return images.float().cpu().clamp(0, 1)


def _rank_world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def evaluate_prompts(pipe, spms: list, prompts: list[str], settings: EvalSettings, *, classifier=None,
                     progress: bool = True, keep_images: int = 1) -> list[dict]:
    """Per-prompt records for ``prompts`` (one process's share). ``spms``: loaded SPMs whose
    concepts are shapes-world concepts."""
    import spm_rt
    from tqdm.auto import tqdm

    from spm_rt.transport import CalibratedTransport, Transport
    from spm_rt.world.classifier import classify

    concepts = [s.concepts for s in spms]
    rt = spm_rt.compile(pipe, spms, combine=settings.combine, transport="fixed",
                        max_batch_rows=max(2 * settings.n, 64))  # one prompt's n images per call, CFG doubles
    try:
        reference = Transport(pipe, concepts, "clipcos_tokenuni")
        calibration = {c: calibration_sets(c) for names in concepts for c in names}
        calibrated = CalibratedTransport(pipe, concepts, calibration)
        records = []
        for i, prompt in enumerate(tqdm(prompts, desc="eval", disable=not progress)):
            seed = settings.seed + 1000 * _prompt_index(prompt)
            shape, colour = parse_caption(prompt)
            targets = [c for names in concepts for c in names if c in prompt.split()]
            base = _generate(pipe, prompt, settings.n, settings, seed)
            b_shape, b_colour = classify(base, classifier)
            rec = {"prompt": prompt, "is_target": bool(targets), "targets": targets, "n": settings.n,
                   "base": _verdicts(b_shape, b_colour, shape, colour, targets), "by_transport": {}}
            gate_sets = {"reference": reference.gates([prompt])[0], "calibrated": calibrated.gates([prompt])[0],
                         "gates1": torch.ones(len(spms))}
            kept = {"base": base[:keep_images]}
            for name, g in gate_sets.items():
                images = _generate(pipe, prompt, settings.n, settings, seed, call=rt, gates=g.tolist())
                e_shape, e_colour = classify(images, classifier)
                entry = _verdicts(e_shape, e_colour, shape, colour, targets)
                entry["gates"] = [float(v) for v in g]
                entry["psnr"] = psnr(images, base).tolist()
                rec["by_transport"][name] = entry
                kept[name] = images[:keep_images]
            rec["_images"] = {k: v.tolist() for k, v in kept.items()}
            records.append(rec)
        return records
    finally:
        rt.remove()


def _prompt_index(prompt: str) -> int:
    import zlib

    return zlib.crc32(prompt.encode()) % 100_003  # the same seed for a prompt in every process and shard


def _verdicts(shape_idx, colour_idx, shape, colour, targets) -> dict:
    shape_ok = (shape_idx == SHAPES.index(shape)) if shape else torch.ones_like(shape_idx, dtype=torch.bool)
    colour_ok = (colour_idx == COLOURS.index(colour)) if colour else torch.ones_like(colour_idx, dtype=torch.bool)
    still = torch.zeros_like(shape_idx, dtype=torch.bool)
    for c in targets:
        attr, idx = concept_attribute(c)
        still |= (shape_idx == idx) if attr == "shape" else (colour_idx == idx)
    return {"correct": (shape_ok & colour_ok).float().mean().item(),
            "shape_correct": shape_ok.float().mean().item(),
            "colour_correct": colour_ok.float().mean().item(),
            "still_target": still.float().mean().item() if targets else None,
            "shapes": [SHAPES[i] for i in shape_idx.tolist()], "colours": [COLOURS[i] for i in colour_idx.tolist()]}


def _median(values: list[float]) -> float | None:
    if not values:
        return None
    v = sorted(values)
    mid = len(v) // 2
    return v[mid] if len(v) % 2 else 0.5 * (v[mid - 1] + v[mid])


def _gate_stats(values: list[float]) -> dict | None:
    if not values:
        return None
    t = torch.tensor(values)
    return {"mean": t.mean().item(), "min": t.min().item(), "max": t.max().item(), "median": _median(values)}


def summarize(records: list[dict]) -> dict:
    """The summary figures from per-prompt records."""
    base_acc = sum(r["base"]["correct"] for r in records) / len(records)
    targets = [r for r in records if r["is_target"]]
    others = [r for r in records if not r["is_target"]]
    by = {}
    for name in TRANSPORTS:
        if not records or name not in records[0]["by_transport"]:
            continue
        entry = {}
        if targets:
            entry["target_still_recognized"] = sum(r["by_transport"][name]["still_target"] for r in targets) / len(targets)
            entry["target_still_recognized_base"] = sum(r["base"]["still_target"] for r in targets) / len(targets)
        if others:
            acc = sum(r["by_transport"][name]["correct"] for r in others) / len(others)
            base = sum(r["base"]["correct"] for r in others) / len(others)
            entry["nontarget_accuracy"] = acc
            entry["nontarget_accuracy_delta"] = acc - base
            entry["nontarget_psnr_median"] = _median([p for r in others for p in r["by_transport"][name]["psnr"]])
        entry["gates_target"] = _gate_stats([g for r in targets for g in r["by_transport"][name]["gates"]])
        entry["gates_nontarget"] = _gate_stats([g for r in others for g in r["by_transport"][name]["gates"]])
        by[name] = entry
    ref = by.get("reference", {})
    return {
        "base_accuracy": base_acc,
        "target_still_recognized": ref.get("target_still_recognized"),
        "nontarget_accuracy_delta": ref.get("nontarget_accuracy_delta"),
        "nontarget_psnr_median": ref.get("nontarget_psnr_median"),
        "nontarget_psnr_median_gates1": by.get("gates1", {}).get("nontarget_psnr_median"),
        "by_transport": by,
        "num_prompts": len(records),
        "num_target_prompts": len(targets),
        "samples_per_prompt": records[0]["n"] if records else 0,
    }


def _grid(records: list[dict], path: Path, title_spms: str) -> None:
    from spm_rt.images import labelled_grid

    rows, labels, cells = [], [], []
    for r in sorted(records, key=lambda r: (not r["is_target"], r["prompt"])):
        imgs = {k: torch.tensor(v)[0].permute(1, 2, 0).numpy() for k, v in r["_images"].items()}
        rows.append([imgs["base"]] + [imgs[t] for t in TRANSPORTS])
        labels.append(("* " if r["is_target"] else "") + r["prompt"])
        cells.append([""] + [" ".join(f"{g:.2f}" for g in r["by_transport"][t]["gates"]) for t in TRANSPORTS])
    labelled_grid(rows, row_labels=labels, col_labels=["base"] + [f"{t}" for t in TRANSPORTS],
                  cell_labels=cells, upscale=3, title=f"SPMs: {title_spms}",
                  legend=["* = target prompt (names an erased concept); numbers under an image: its gates, "
                          "one per SPM (0 = SPM off, 1 = fully on)"]).save(path)


def run_eval(pipe, spm_groups: dict[str, list], out_dir: str | os.PathLike, prompts: list[str] | None = None,
             settings: EvalSettings | None = None, *, progress: bool = True) -> dict:
    """Evaluate each named group of SPMs (e.g. each SPM alone, then all together in both combine
    modes); writes ``out_dir/<group>/records.json`` + ``grid.png`` and ``out_dir/summary.json``.
    Under ``torchrun`` every rank takes a share of the prompts and rank 0 merges.

    Example::

        >>> run_eval(load_shapes_pipeline(), {"circle": [load_spm("circle.safetensors")]}, "eval_out")  # doctest: +SKIP
    """
    import dataclasses

    from spm_rt.world import prompts as world_prompts

    settings = settings or EvalSettings()
    prompts = list(prompts or world_prompts())
    rank, world = _rank_world()
    out = Path(out_dir)
    summary = {"settings": dataclasses.asdict(settings), "world_size": world, "groups": {}}
    for group, (spms, combine) in spm_groups.items():
        s = dataclasses.replace(settings, combine=combine)
        mine = prompts[rank::world]
        records = evaluate_prompts(pipe, spms, mine, s, progress=progress and rank == 0)
        shard_dir = out / group / "shards"
        shard_dir.mkdir(parents=True, exist_ok=True)
        (shard_dir / f"rank{rank}.json").write_text(json.dumps(records))
        if world > 1:
            import torch.distributed as dist

            dist.barrier()
        if rank == 0:
            merged = []
            for r in range(world):
                merged += json.loads((shard_dir / f"rank{r}.json").read_text())
            merged.sort(key=lambda rec: prompts.index(rec["prompt"]))
            _grid(merged, out / group / "grid.png", group)
            public = [{k: v for k, v in rec.items() if k != "_images"} for rec in merged]
            (out / group / "records.json").write_text(json.dumps(public, indent=1))
            fig = summarize(merged)
            fig.update({"spms": [s.concepts for s in spms], "combine": combine})
            summary["groups"][group] = fig
        if world > 1:
            dist.barrier()
    if rank == 0:
        first = next(iter(summary["groups"].values()))
        for key in ("base_accuracy", "target_still_recognized", "nontarget_accuracy_delta", "nontarget_psnr_median",
                    "nontarget_psnr_median_gates1"):
            summary[key] = first[key]  # headline: the first group (the first SPM alone)
        (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def format_summary(summary: dict) -> str:
    """A short human-readable table of the summary figures."""
    lines = []
    for group, fig in summary["groups"].items():
        lines.append(f"[{group}] spms={fig['spms']} combine={fig['combine']} prompts={fig['num_prompts']} "
                     f"(targets {fig['num_target_prompts']}) x {fig['samples_per_prompt']} samples")
        lines.append(f"  base accuracy {fig['base_accuracy']:.3f}")
        for name, e in fig["by_transport"].items():
            parts = []
            if "target_still_recognized" in e:
                parts.append(f"target still recognized {e['target_still_recognized']:.3f} "
                             f"(base {e['target_still_recognized_base']:.3f})")
            if "nontarget_accuracy_delta" in e:
                parts.append(f"non-target acc delta {e['nontarget_accuracy_delta']:+.3f}, "
                             f"PSNR median {e['nontarget_psnr_median']:.1f} dB")
            gt, gn = e.get("gates_target"), e.get("gates_nontarget")
            if gt and gn:
                parts.append(f"gates target {gt['mean']:.2f} [{gt['min']:.2f},{gt['max']:.2f}] / "
                             f"non-target {gn['mean']:.2f} [{gn['min']:.2f},{gn['max']:.2f}]")
            lines.append(f"  {name:10s} " + "; ".join(parts))
    return "\n".join(lines)
