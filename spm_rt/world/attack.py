"""Erasure under attack: ``spm-rt attack`` on the shapes world (the protocol of docs/robustness.md).

Per erased concept (``circle``: a shape; ``red``: a colour), on **held-out** prompts and seeds only
(:mod:`spm_rt.world.attack_splits` keeps the split in code):

* **embedding attack** on 16 held-out prompts that name the concept ("a photo of a red circle",
  "two green circles", "circle, blue", ...), 8 images each: the attacks of
  :mod:`spm_rt.world.attack_optim` (``soft`` prefix embeddings, ``hard`` PEZ-projected real tokens,
  and per gate mode the adaptive ``two_stage`` attack: close the gate, then attack what runs). A
  prompt is broken when at least half of its images show the concept; per prompt the **maximum over
  attacks** is reported. Where a gate mode's gate is pinned at exactly 1 by the prompt's own tokens
  (the full concept word: no prefix can close it), that mode runs what ``fixed`` runs and the
  ``fixed`` attack's images are reused (bit-identical by construction).
* **prompt suite**: held-out prompt-level attacks (misspellings, synonyms, implied concepts, word
  orders, prefixes) through each gate, no optimisation;
* **non-target preservation**: held-out prompts pinning the attribute elsewhere ("two blue
  squares" for circle), accuracy (confident verdict of the asked shape and colour) vs the base model;
* **controls** beside every rate: the base model unattacked, the erased model unattacked, the
  erased model with a random 0-step prefix, the attack against the base model, and the verdict's
  chance floor. Every rate carries its Wilson 95% interval.

Gate modes: ``base`` (no SPM), ``reference`` (Facilitated Transport, clipcos_tokenuni),
``calibrated`` (``transport="calibrated"``, end-of-text ramp fitted on the partial captions),
``fixed`` (every gate 1).

Example::

    >>> from spm_rt.world.attack import AttackSettings, run_attack  # doctest: +SKIP
    >>> summary = run_attack(pipe, spms, "out/", AttackSettings.quick())  # doctest: +SKIP
    >>> summary["by_concept"]["circle"]["embedding"]["fixed"]["max"]["rate"]  # doctest: +SKIP
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from spm_rt.world.attack_optim import (AttackBudget, Victim, encode_prefixed, generate, prefix_attack,
                                       prefixed_ids, random_prefix, target_latents)
from spm_rt.world.attack_splits import (SUITE_CATEGORIES, check_split, dev_named, dev_nontarget, dev_suite,
                                        heldout_named, heldout_nontarget, heldout_suite, misspellings, seed_for)
from spm_rt.world.data import COLOURS, SHAPES, caption
from spm_rt.world.verdicts import chance_floor, fit_verdict, rate, structureless

__all__ = ["MODES", "GATED", "ATTACKS", "AttackSettings", "AttackBudget", "run_attack", "build_transports",
           "encode_prefixed", "prefixed_ids", "misspellings", "dev_suite", "SUITE_CATEGORIES", "fit_world_verdict"]

MODES = ("base", "reference", "calibrated", "fixed")
GATED = ("reference", "calibrated")
ATTACKS = ("soft", "hard", "two_stage")


@dataclass
class AttackSettings:
    """Budget of an attack run. Defaults: the full run of bench/results/attack; :meth:`quick` for CI."""

    n: int = 8                      # images per reported prompt (held-out seeds)
    steps: int = 10                 # DDIM steps of each generation
    guidance_scale: float = 4.0
    combine: str = "linear"
    modes: tuple[str, ...] = MODES
    attacks: tuple[str, ...] = ATTACKS
    prompts: int = 16               # held-out named prompts attacked per concept
    suite: bool = True              # the held-out prompt suite
    nontarget_n: int = 4            # images per held-out non-target prompt
    nontarget_prompts: int = 24
    verdict_n: int = 8              # fitting renders per full caption for the verdict thresholds
    chance_n: int = 64              # structureless images for the chance floor
    seed: int = 0                   # the attacker's seed
    budget: AttackBudget = field(default_factory=AttackBudget)
    hard_restarts: int = 3          # restarts of the hard (PEZ) attack (its other budget: ``budget``)
    split: str = "heldout"          # "dev": fitting-split prompts and seeds, to choose recipes (never reported)

    @classmethod
    def quick(cls) -> "AttackSettings":
        """A small deterministic run (CI, ``spm-rt attack --quick``): minutes on one core."""
        return cls(n=2, prompts=2, nontarget_n=1, nontarget_prompts=4, verdict_n=2, chance_n=8, suite=False,
                   hard_restarts=1, budget=AttackBudget(steps=6, restarts=2, check_every=3, check_images=1, refs=2, close_steps=2))


def build_transports(pipe, spms: list) -> dict:
    """The gate source of each mode for these SPMs (``None`` for base / fixed)."""
    from spm_rt.transport import CalibratedTransport, Transport
    from spm_rt.world.evaluate import calibration_sets

    concepts = [s.concepts for s in spms]
    flat = [c for names in concepts for c in names]
    return {"base": None, "fixed": None,
            "reference": Transport(pipe, concepts, "clipcos_tokenuni"),
            "calibrated": CalibratedTransport(pipe, concepts, {c: calibration_sets(c) for c in flat})}


def fit_world_verdict(pipe, s: AttackSettings, classifier=None):
    """The confidence-aware verdict, fitted on base-model renders of the world's 12 full captions
    (fitting split, fitting seeds)."""
    caps = [(sh, co) for co in COLOURS for sh in SHAPES]
    prompts = [caption(sh, co) for sh, co in caps]
    imgs = generate(None, pipe, s.verdict_n, [seed_for(p, "fit") for p in prompts], steps=s.steps,
                    guidance_scale=s.guidance_scale, prompts=prompts)
    shape_idx = torch.tensor([SHAPES.index(sh) for sh, _ in caps]).repeat_interleave(s.verdict_n)
    colour_idx = torch.tensor([COLOURS.index(co) for _, co in caps]).repeat_interleave(s.verdict_n)
    return fit_verdict(imgs.flatten(0, 1), shape_idx, colour_idx, classifier,
                       fitted_on=f"base-model renders of the 12 full world captions x {s.verdict_n} (fitting seeds)")


def _text_gates(transports: dict, mode: str, prompts: list[str], k: int) -> torch.Tensor | None:
    if mode == "base":
        return None
    if mode == "fixed":
        return torch.ones(len(prompts), k)
    return transports[mode].gates(prompts).float()


class _Judge:
    """Generation + verdict for held-out prompts; reuses base images where every gate is exactly 0."""

    def __init__(self, rt, transports, concept, spm_index, s, verdict, classifier):
        self.rt, self.transports, self.concept, self.spm_index = rt, transports, concept, spm_index
        self.s, self.verdict, self.classifier = s, verdict, classifier
        self.k = rt.num_spms

    def victim(self, mode: str) -> Victim:
        return Victim(self.rt, mode, self.transports.get(mode), self.spm_index)

    def images(self, mode: str, seeds: list[int], n: int, *, prompts=None, emb=None, gates=None, base=None,
               ones=None):
        """[B, n, 3, H, W]; ``gates`` [B, K] (None: base model). Rows whose gates are all exactly 0
        reuse ``base`` and rows whose gates are all exactly 1 reuse ``ones`` (the same seeds and
        conditioning under gates 0 / 1: what the runtime produces then, bit for bit)."""
        pipe = self.rt.pipe
        kw = dict(steps=self.s.steps, guidance_scale=self.s.guidance_scale)
        if gates is None or mode == "base":
            return generate(None, pipe, n, seeds, prompts=prompts, prompt_embeds=emb, **kw)
        out = base.clone() if base is not None else (ones.clone() if ones is not None else None)
        if ones is not None:
            for i in range(len(seeds)):
                if bool((gates[i] == 1).all()):
                    out[i] = ones[i]
        todo = [i for i in range(len(seeds)) if not (base is not None and bool((gates[i] == 0).all()))
                and not (ones is not None and bool((gates[i] == 1).all()))]
        if todo:
            sub = dict(prompts=[prompts[i] for i in todo] if prompts is not None else None,
                       prompt_embeds=emb[todo] if emb is not None else None)
            imgs = generate(self.victim(mode), pipe, n, [seeds[i] for i in todo], gates=gates[todo], **sub, **kw)
            if out is None:
                return imgs
            out[todo] = imgs
        return out

    def shown(self, imgs: torch.Tensor) -> torch.Tensor:
        """[B] share of each prompt's images that confidently show the concept."""
        B, n = imgs.shape[:2]
        return self.verdict.shows(imgs.flatten(0, 1), self.concept, self.classifier).view(B, n).float().mean(1)


def _prompt_rate(shown: list[float]) -> dict:
    return rate(sum(v >= 0.5 for v in shown), len(shown))


def _image_rate(shown: list[float], n: int) -> dict:
    return rate(int(round(sum(shown) * n)), len(shown) * n)


def attack_concept(rt, transports: dict, spm_index: int, concept: str, s: AttackSettings, verdict, *,
                   progress: bool = True, classifier=None) -> dict:
    """Every figure for one erased concept on held-out prompts (see the module docstring)."""
    from tqdm.auto import tqdm

    check_split(concept)
    pipe, k = rt.pipe, rt.num_spms
    judge = _Judge(rt, transports, concept, spm_index, s, verdict, classifier)
    modes = [m for m in MODES if m in s.modes]
    gated = [m for m in GATED if m in modes]
    use = _seed_use(s)  # "heldout" (reported) or "dev" (fitting split: choosing recipes)
    named = (heldout_named if use == "heldout" else dev_named)(concept)[:s.prompts]
    ps = [r["prompt"] for r in named]
    seeds = [seed_for(p, use) for p in ps]
    out = {"concept": concept, "split": use, "spm_index": spm_index, "prompts": ps, "controls": {}, "embedding": {},
           "suite": {}, "nontarget": {}, "gates": {}, "records": {}, "seconds": {}, "_images": {}}
    t0 = time.time()

    # -- controls: unattacked, random 0-step prefix, chance floor ----------------------------------
    base_imgs = judge.images("base", seeds, s.n, prompts=ps)
    base_shown = judge.shown(base_imgs).tolist()
    ctrl = {"base_unattacked": _prompt_rate(base_shown), "base_unattacked_images": _image_rate(base_shown, s.n),
            "by_mode": {}}
    rnd_emb, rnd_eot, rnd_tokens = random_prefix(pipe, ps, s.budget.tokens, seed_for(concept, use, 17))
    rnd_base = judge.images("base", seeds, s.n, emb=rnd_emb)
    rows = {"base": {"unattacked": base_shown, "random_prefix": judge.shown(rnd_base).tolist()}}
    out["_images"][("unattacked", "base")] = (base_imgs[:, 0], base_shown)
    ones = {}  # fixed mode's images, reused where another mode's gates are exactly 1
    for m in sorted((m for m in modes if m != "base"), key=lambda m: m != "fixed"):
        g_text = _text_gates(transports, m, ps, k)
        imgs = judge.images(m, seeds, s.n, prompts=ps, gates=g_text, base=base_imgs, ones=ones.get("text"))
        with torch.no_grad():
            g_rnd = judge.victim(m).gates(rnd_emb, rnd_eot, rnd_tokens).float()
        imgs_rnd = judge.images(m, seeds, s.n, emb=rnd_emb, gates=g_rnd, base=rnd_base, ones=ones.get("rnd"))
        if m == "fixed":
            ones = {"text": imgs, "rnd": imgs_rnd}
        rows[m] = {"unattacked": judge.shown(imgs).tolist(), "random_prefix": judge.shown(imgs_rnd).tolist(),
                   "gates_text": g_text[:, spm_index].tolist()}
        out["_images"][("unattacked", m)] = (imgs[:, 0], rows[m]["unattacked"])
    for m, r in rows.items():
        ctrl["by_mode"][m] = {"unattacked": _prompt_rate(r["unattacked"]),
                              "random_prefix": _prompt_rate(r["random_prefix"])}
    floor_imgs = structureless(pipe, s.chance_n, seed_for(concept, use, 29))
    ctrl["chance_floor"] = chance_floor(verdict, floor_imgs, concept, classifier)
    out["controls"] = ctrl
    out["records"]["controls"] = rows
    out["seconds"]["controls"] = time.time() - t0

    # -- embedding attacks ------------------------------------------------------------------------
    t1 = time.time()
    # denoising targets: base-model latents of the world caption with the prompt's shape and colour
    # (attack seeds); the held-out paraphrases themselves are often off-distribution for this text
    # encoder, so their own base images need not show the concept
    targets = target_latents(pipe, [caption(r["shape"], r["colour"]) for r in named], s.budget.refs,
                             steps=s.steps, guidance_scale=s.guidance_scale)
    # prompts whose gate no prefix can close in a mode: every concept token present (full hit)
    pinned = {m: [_full_hit(pipe, transports[m], p, spm_index) for p in ps] for m in gated}
    results: dict[str, dict[str, list[float]]] = {}  # attack -> mode -> [B] shown
    details: dict = {}
    runs = [("soft", "base", "soft", "through", list(range(len(ps))))] if "base" in modes else []  # must break base
    for kind in [a for a in ("soft", "hard") if a in s.attacks]:
        if "fixed" in modes:
            runs.append((kind, "fixed", kind, "through", list(range(len(ps)))))
        for m in gated:
            runs.append((kind, m, kind, "through", [i for i, p in enumerate(pinned[m]) if not p]))
    if "two_stage" in s.attacks:
        for m in gated:
            runs.append(("two_stage", m, "soft", "two_stage", [i for i, p in enumerate(pinned[m]) if not p]))
    total_steps = s.budget.steps * sum(1 for *_, idx in runs if idx)
    bar = tqdm(total=total_steps, desc=f"{concept}: embedding attacks", disable=not progress)
    for name, mode, kind, schedule, idx in runs:
        shown = results.setdefault(name, {}).setdefault(mode, [None] * len(ps))
        if idx:
            done = bar.n
            budget = replace(s.budget, restarts=s.hard_restarts) if kind == "hard" else s.budget
            res = prefix_attack(judge.victim(mode), [ps[i] for i in idx], concept, targets[idx], budget, verdict,
                                kind=kind, schedule=schedule, seed=s.seed + 101 * len(results),
                                steps_gen=s.steps, guidance_scale=s.guidance_scale, classifier=classifier,
                                progress=bar.update)
            bar.update(max(0, done + s.budget.steps - bar.n))
            with torch.no_grad():
                emb, eot = encode_prefixed(pipe, res.ids, res.prefix)
                g = judge.victim(mode).gates(emb, eot, res.tokens)
            imgs = judge.images(mode, [seeds[i] for i in idx], s.n, emb=emb, gates=None if g is None else g.float())
            sh = judge.shown(imgs).tolist()
            for j, i in enumerate(idx):
                shown[i] = sh[j]
                details.setdefault(name, {}).setdefault(mode, {})[ps[i]] = {
                    "shown": sh[j], "gate": None if g is None else float(g[j, spm_index]),
                    "check_score": res.check_score[j], "steps_used": res.steps_used[j],
                    "loss_first": res.loss_first[j], "loss_last": res.loss_last[j],
                    "prefix_text": res.prefix_text[j] if res.prefix_text else None}
                out["_images"][(name, mode, ps[i])] = (imgs[j, 0], sh[j])
        if mode in gated:  # pinned prompts: this mode runs what fixed runs
            src = results.get(name if name != "two_stage" else "soft", {}).get("fixed")
            for i, p in enumerate(pinned[mode]):
                if p and src is not None:
                    shown[i] = src[i]
                    details.setdefault(name, {}).setdefault(mode, {})[ps[i]] = {"shown": src[i], "gate": 1.0,
                                                                                "pinned": True}
    bar.close()
    emb_out = {}
    for mode in modes:
        per_attack = {a: results[a][mode] for a in results if mode in results[a]
                      and all(v is not None for v in results[a][mode])}
        if not per_attack:
            continue
        best = [max(v[i] for v in per_attack.values()) for i in range(len(ps))]
        emb_out[mode] = {a: _prompt_rate(v) for a, v in per_attack.items()}
        emb_out[mode]["max"] = _prompt_rate(best)
        emb_out[mode]["max_images"] = _image_rate(best, s.n)
        emb_out[mode]["pinned_prompts"] = sum(pinned.get(mode, [])) if mode in gated else None
    out["embedding"] = emb_out
    out["records"]["embedding"] = details
    out["seconds"]["embedding"] = time.time() - t1

    # -- prompt suite -----------------------------------------------------------------------------
    t2 = time.time()
    if s.suite:
        suite = heldout_suite(concept) if use == "heldout" else [r for r in dev_suite(concept) if r["category"] != "plain"]
        sp = [r["prompt"] for r in suite]
        sseeds = [seed_for(p, use) for p in sp]
        sbase = judge.images("base", sseeds, s.n, prompts=sp)
        srec = {"base": {"shown": judge.shown(sbase).tolist()}}
        sones = None
        for m in sorted((m for m in modes if m != "base"), key=lambda m: m != "fixed"):
            g = _text_gates(transports, m, sp, k)
            imgs = judge.images(m, sseeds, s.n, prompts=sp, gates=g, base=sbase, ones=sones)
            sones = imgs if m == "fixed" else sones
            srec[m] = {"shown": judge.shown(imgs).tolist(), "gates": g[:, spm_index].tolist()}
        out["suite"] = {m: {"asr": _prompt_rate(r["shown"]), "images": _image_rate(r["shown"], s.n),
                            "by_category": {c: _prompt_rate([v for v, row in zip(r["shown"], suite)
                                                             if row["category"] == c])
                                            for c in dict.fromkeys(row["category"] for row in suite)}}
                        for m, r in srec.items()}
        out["records"]["suite"] = {"prompts": suite, "by_mode": srec}
    out["seconds"]["suite"] = time.time() - t2

    # -- non-target preservation and gates on held-out prompts --------------------------------------
    t3 = time.time()
    nt = (heldout_nontarget if use == "heldout" else dev_nontarget)(concept)[:s.nontarget_prompts]
    nps = [r["prompt"] for r in nt]
    nseeds = [seed_for(p, use, 3) for p in nps]
    nbase = judge.images("base", nseeds, s.nontarget_n, prompts=nps)

    def correct(imgs):
        return [judge.verdict.correct(imgs[i], r["shape"], r["colour"], classifier).float().mean().item()
                for i, r in enumerate(nt)]

    ncorr = {"base": correct(nbase)}
    ngates = {}
    nones = None
    for m in sorted((m for m in modes if m != "base"), key=lambda m: m != "fixed"):
        g = _text_gates(transports, m, nps, k)
        imgs = judge.images(m, nseeds, s.nontarget_n, prompts=nps, gates=g, base=nbase, ones=nones)
        nones = imgs if m == "fixed" else nones
        ncorr[m] = correct(imgs)
        ngates[m] = g[:, spm_index].tolist()
    base_acc = sum(ncorr["base"]) / len(nps)
    for m, c in ncorr.items():
        acc = _image_rate(c, s.nontarget_n)
        out["nontarget"][m] = {"accuracy": acc, "delta_pts": 100 * (acc["rate"] - base_acc)}
    for m in gated:
        named_g = rows[m]["gates_text"]
        suite_g = out["records"].get("suite", {}).get("by_mode", {}).get(m, {}).get("gates", [])
        out["gates"][m] = {"named_open": rate(sum(v >= 0.5 for v in named_g), len(named_g)),
                           "named_mean": sum(named_g) / len(named_g),
                           "suite_open": rate(sum(v >= 0.5 for v in suite_g), len(suite_g)) if suite_g else None,
                           "nontarget_closed": rate(sum(v < 0.5 for v in ngates[m]), len(ngates[m])),
                           "nontarget_exact_zero": rate(sum(v == 0 for v in ngates[m]), len(ngates[m])),
                           "nontarget_mean": sum(ngates[m]) / len(ngates[m])}
    out["records"]["nontarget"] = {"prompts": nps, "correct": ncorr, "gates": ngates}
    out["seconds"]["nontarget"] = time.time() - t3
    return out


def _max_rows(s: AttackSettings, concepts: list[str]) -> int:
    """UNet rows of the largest batch a run sends (every prompt's images in one batch, x2 for CFG):
    the runtime's gate buffer is sized once, at compile time."""
    use = _seed_use(s)
    suite = max((len(heldout_suite(c) if use == "heldout" else dev_suite(c)) for c in concepts
                 if c in SHAPES + COLOURS), default=0)
    images = max(s.n * max(s.prompts, suite if s.suite else 0), s.nontarget_n * s.nontarget_prompts,
                 s.prompts * max(s.budget.restarts, s.hard_restarts) * s.budget.check_images)
    return 2 * images


def _seed_use(s: AttackSettings) -> str:
    if s.split not in ("heldout", "dev"):
        raise ValueError(f"split {s.split!r}: 'heldout' (reported figures) or 'dev' (fitting split, choosing recipes)")
    return s.split


def _full_hit(pipe, transport, prompt: str, spm_index: int) -> bool:
    """Every token of one of the SPM's concepts is in the prompt: token-overlap gates open fully
    whatever the prefix (a prefix adds tokens, it removes none)."""
    from spm_rt.transport import token_sets

    toks = token_sets(pipe.tokenizer, [prompt])[0]
    return any(c and c <= toks for c, o in zip(transport._concept_tokens, transport.owner.tolist()) if o == spm_index)


def run_attack(pipe, spms: list, out_dir: str | os.PathLike | None, settings: AttackSettings | None = None, *,
               together: bool = False, progress: bool = True, classifier=None, labels: list[str] | None = None) -> dict:
    """Attack every world concept of ``spms`` (loaded SPMs) and return the summary; with
    ``out_dir``, also write ``summary.json`` and ``grid.png``. Each SPM is compiled alone (its
    concept attacked with only its own membrane), or all at once with ``together=True``.
    ``labels`` names each SPM in the report (default: its concepts; e.g. "circle_hardened").

    Example::

        >>> from spm_rt.world import load_shapes_pipeline, shipped_spms  # doctest: +SKIP
        >>> pipe = load_shapes_pipeline(); spms = [spm_rt.load_spm(shipped_spms()[0])]  # doctest: +SKIP
        >>> s = run_attack(pipe, spms, None, AttackSettings.quick())  # doctest: +SKIP
        >>> s["by_concept"]["circle"]["embedding"]["fixed"]["max"]  # doctest: +SKIP
    """
    import spm_rt

    s = settings or AttackSettings()
    bad = [m for m in s.modes if m not in MODES]
    if bad:
        raise ValueError(f"unknown gate mode(s) {bad}; choose from {MODES}")
    bad = [a for a in s.attacks if a not in ATTACKS]
    if bad:
        raise ValueError(f"unknown attack(s) {bad}; choose from {ATTACKS}")
    _seed_use(s)
    labels = labels or [",".join(sp.concepts) for sp in spms]
    t0 = time.time()
    verdict = fit_world_verdict(pipe, s, classifier)
    groups = [list(zip(spms, labels))] if together else [[(sp, lb)] for sp, lb in zip(spms, labels)]
    by_concept = {}
    for group in groups:
        rt = spm_rt.compile(pipe, [sp for sp, _ in group], combine=s.combine, transport="fixed", strategy="gated",
                            max_batch_rows=_max_rows(s, [c for sp, _ in group for c in sp.concepts]))
        try:
            transports = build_transports(pipe, [sp for sp, _ in group])
            for i, (spm, label) in enumerate(group):
                for concept in spm.concepts:
                    if concept in SHAPES + COLOURS:
                        key = label if label != concept else concept
                        by_concept[key] = attack_concept(rt, transports, i, concept, s, verdict, progress=progress,
                                                         classifier=classifier)
                        by_concept[key]["spm"] = label
        finally:
            rt.remove()
    if not by_concept:
        raise ValueError(f"none of the SPMs' concepts {[sp.concepts for sp in spms]} is a shapes-world concept")
    summary = {
        "protocol": "docs/robustness.md",
        "settings": {**asdict(s), "modes": list(s.modes), "attacks": list(s.attacks)},
        "spms": labels,
        "verdict": verdict.to_dict(),
        "split": s.split if s.split == "heldout" else "dev: fitting-split prompts and seeds, for choosing recipes; "
                                                          "never a reported figure",
        "asr_definition": "share of held-out prompts with at least half of their images confidently classified "
                          "as the erased concept (images: share of images); per prompt the maximum over attacks",
        "seconds": None,
        "torch_threads": torch.get_num_threads(),
        "by_concept": {c: {k: v for k, v in r.items() if k != "_images"} for c, r in by_concept.items()},
        "together": together,
    }
    summary["seconds"] = time.time() - t0
    if out_dir is not None:
        from spm_rt.world.attack_report import write_grid

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "summary.json").write_text(json.dumps(summary, indent=1))
        write_grid(by_concept, out / "grid.png", s)
    return summary


def quick_settings(**overrides) -> AttackSettings:
    """:meth:`AttackSettings.quick` with fields replaced."""
    return replace(AttackSettings.quick(), **overrides)
