"""Half precision: how much of an SPM update survives merging into the weight dtype.

Merging rounds ``W + dW`` to the weight dtype, which drops every element of dW below half an ulp
of W. Each adapted layer measures how much of a unit-gate update survives that rounding
(``merge_error``: relative error of the applied update, measured at install and again whenever
the weight dtype or the SPMs change; ``spm_rt.kernels.reference.merged_update_error``).

The rounding error is about half an ulp of W per element whatever the gate, while the update
shrinks with the gate (linearly for combine="linear", quadratically for "official"), so the loss
at gate g is about ``merge_error / g`` (``/ g**2``): measured with bf16 640x640 rank-1 layers,
0.9% at g=1, 3% at 0.3, 8.7% at 0.1. Under ``strategy="auto"`` a merged call judges every layer
at the call's **smallest nonzero gate** (:func:`merge_allowed`); a layer whose loss there would
exceed :data:`MERGE_ERROR_MAX` runs the gated branch in that call instead; ``strategy="merged"``
keeps merging and warns once with the figure.
"""
from __future__ import annotations

import warnings

import torch

# Largest relative error of an SPM update that a merged weight may carry under strategy="auto"
# (beyond it the layer runs gated). 5% of the update is a 5% change of that layer's effective
# gate, below the spread Facilitated Transport itself puts between prompts that name a concept
# (clipcos 0.78-0.81 for "a red/blue/green circle", semantics section 3); bf16 merges lose 13% on
# a typical layer and up to 81% (issue 13, shipped circle SPM), fp16 merges 1.6% typical and 22%
# worst, fp32 merges ~1e-5. Measured on CPU (bench/bench_precision.py) the gated branch on the
# layers over this limit costs little against merging: see docs/performance.md.
MERGE_ERROR_MAX = 0.05


def loss_at(merge_error: float, gates: torch.Tensor, combine: str) -> float:
    """Estimated update loss of a merge at this gate vector ([K] float32, CPU) from the unit-gate
    ``merge_error``: divided by the smallest nonzero gate (squared for combine="official")."""
    nonzero = gates[gates != 0].abs()
    if nonzero.numel() == 0:
        return 0.0
    g = min(float(nonzero.min()), 1.0)
    return merge_error / (g * g if combine == "official" else g)


def merge_allowed(merge_error: float, gates: torch.Tensor, combine: str) -> bool:
    return loss_at(merge_error, gates, combine) <= MERGE_ERROR_MAX


def warn_lossy_merge(layer) -> None:
    """strategy="merged" on layers that lose more than MERGE_ERROR_MAX: once per patched UNet."""
    state = layer.spm_state
    if state.__dict__.get("_warned_lossy_merge"):
        return
    state.__dict__["_warned_lossy_merge"] = True
    report = precision_report(state.layers)["summary"]
    warnings.warn(f"strategy='merged': {report['over_limit']} of {report['layers']} adapted layers lose more than "
                  f"{MERGE_ERROR_MAX:.0%} of a unit-gate SPM update when merged in {report['dtype']} (worst "
                  f"{report['max']:.1%} at {report['worst']}, median {report['median']:.1%}); strategy='auto' runs "
                  "those layers gated instead (rt.precision_report() has every layer's figure)", stacklevel=5)


def precision_report(layers: dict) -> dict:
    """Per adapted layer, how much of a unit-gate update a merged weight loses to rounding into the
    weight dtype, and which path strategy="auto" takes there at unit gates; plus a summary.
    Measured again only where the dtype or the SPMs changed since the last measurement."""
    rows = {}
    for path, layer in layers.items():
        err = layer.refresh_merge_error()
        rows[path] = {"dtype": str(layer.weight.dtype).replace("torch.", ""), "merge_error": err,
                      "auto_path": "gated" if err > MERGE_ERROR_MAX else "merged"}
    errors = sorted(r["merge_error"] for r in rows.values())
    worst = max(rows, key=lambda p: rows[p]["merge_error"]) if rows else None
    n = len(errors)
    summary = {
        "layers": n,
        "dtype": ",".join(sorted({r["dtype"] for r in rows.values()})),
        "limit": MERGE_ERROR_MAX,
        "median": (errors[(n - 1) // 2] + errors[n // 2]) / 2 if n else 0.0,
        "max": errors[-1] if n else 0.0,
        "worst": worst,
        "over_limit": sum(e > MERGE_ERROR_MAX for e in errors),
    }
    return {"layers": rows, "summary": summary}
