"""The report of ``spm-rt attack``: the PNG grid and the plain-text table (rates with intervals)."""
from __future__ import annotations

from pathlib import Path

from spm_rt.world.verdicts import fmt_rate

# grid columns: (attack, gate mode) in this order where present
_COLUMNS = (("unattacked", "base"), ("unattacked", "fixed"), ("soft", "base"), ("soft", "fixed"), ("hard", "fixed"),
            ("soft", "reference"), ("two_stage", "reference"), ("soft", "calibrated"), ("two_stage", "calibrated"))


def write_grid(by_concept: dict, path: Path, settings, rows_per_concept: int = 6) -> None:
    """Rows: held-out attacked prompts (first ``rows_per_concept`` per concept); columns: the
    base model and the erased model unattacked, then each attack against each gate mode (first
    image of each, held-out seed); under each image the share of the prompt's images the verdict
    counts as the concept."""
    from spm_rt.images import labelled_grid

    rows, labels, cells = [], [], []
    cols = []
    for key in _COLUMNS:
        if any(_cell(r, key, r["prompts"][0]) is not None for r in by_concept.values()):
            cols.append(key)
    for label, r in by_concept.items():
        for i, p in enumerate(r["prompts"][:rows_per_concept]):
            row, cell = [], []
            for key in cols:
                got = _cell(r, key, p, i)
                if got is None:
                    row.append(_blank())
                    cell.append("-")
                else:
                    img, shown = got
                    row.append(img.permute(1, 2, 0).numpy())
                    cell.append(f"{'HIT' if shown >= 0.5 else 'miss'} {shown:.2f}")
            rows.append(row)
            cells.append(cell)
            labels.append(f"{label}: {p}")
    b = settings.budget
    labelled_grid(rows, row_labels=labels, col_labels=[f"{a} / {m}" for a, m in cols], cell_labels=cells, upscale=3,
                  title="spm-rt attack (held-out prompts and seeds): attacks x gate modes",
                  legend=[f"HIT = at least half of the prompt's {settings.n} images confidently classified as the erased "
                          "concept (the share follows); '-' = gate pinned at 1 (same as fixed) or not run",
                          f"soft/hard = {b.tokens} prefix embeddings / real tokens, {b.steps} Adam steps x {b.restarts} "
                          f"restarts, early stop; two_stage = close the gate, then attack what runs"]).save(path)


def _blank():
    import numpy as np

    return np.ones((32, 32, 3))


def _cell(r: dict, key: tuple, prompt: str, i: int = 0):
    imgs = r["_images"]
    if key[0] == "unattacked":
        got = imgs.get(key)
        return None if got is None else (got[0][i], got[1][i])
    return imgs.get((key[0], key[1], prompt))


def format_summary(summary: dict) -> str:
    """A plain-text table of the headline figures, each rate with its Wilson 95% interval."""
    lines = [f"verdict: shape head top probability >= {summary['verdict']['tau_shape']:.5f} "
             f"({summary['verdict']['fitted_on']}), else none"]
    for label, r in summary["by_concept"].items():
        c = r["controls"]
        split = r.get("split", "heldout")
        tag = "held-out" if split == "heldout" else "DEV (fitting-split: for choosing recipes, never reported)"
        lines.append(f"{label} ({r['concept']}), {len(r['prompts'])} {tag} prompts:")
        lines.append(f"  controls: base unattacked {fmt_rate(c['base_unattacked'])}; chance floor (structureless "
                     f"images) {fmt_rate(c['chance_floor']['verdict'])}, forced choice "
                     f"{fmt_rate(c['chance_floor']['forced_choice'])}")
        for m, e in c["by_mode"].items():
            lines.append(f"    {m:<11} unattacked {fmt_rate(e['unattacked']):<28} random 0-step prefix "
                         f"{fmt_rate(e['random_prefix'])}")
        lines.append("  embedding ASR (max over attacks; per attack):")
        for m, e in r["embedding"].items():
            per = ", ".join(f"{a} {fmt_rate(v)}" for a, v in e.items()
                            if a not in ("max", "max_images", "pinned_prompts"))
            pin = "" if e.get("pinned_prompts") is None else f" [{e['pinned_prompts']} prompts pinned at gate 1]"
            lines.append(f"    {m:<11} {fmt_rate(e['max'])}{pin}  ({per})")
        if r["suite"]:
            lines.append("  prompt suite ASR:")
            for m, e in r["suite"].items():
                lines.append(f"    {m:<11} {fmt_rate(e['asr'])}")
        lines.append("  non-target accuracy (delta vs base):")
        for m, e in r["nontarget"].items():
            lines.append(f"    {m:<11} {fmt_rate(e['accuracy'])} ({e['delta_pts']:+.1f} pts)")
        for m, e in r["gates"].items():
            lines.append(f"  gate {m}: named open {fmt_rate(e['named_open'])}, suite open {fmt_rate(e['suite_open'])},"
                         f" non-target closed {fmt_rate(e['nontarget_closed'])} (mean {e['nontarget_mean']:.2f})")
    return "\n".join(lines)
