"""Dense float64 oracle for SPM-patched UNets, written independently of spm_rt's stacking,
kernels and merge (explicit per-SPM loops over the file's own tensors)."""
import copy

import torch

from spm_rt.formats import adapted_modules, lora_key


def dense_update(module_path, out_f, in_f, spms, gates, combine):
    """The SPM update of one module in float64 for one gate vector (zero where no SPM adapts it).

    linear: sum_k g_k (alpha_k / r_k) U_k D_k; official: the reference's key-by-key sum
    (sum_k g_k U_k)(sum_k g_k D_k) run with the FIRST SPM's metadata alpha / rank everywhere."""
    key = lora_key(module_path)
    delta = torch.zeros(out_f, in_f, dtype=torch.float64)
    terms = [(float(g), s.weights.get(key)) for g, s in zip(gates, spms)]
    if combine == "linear":
        for g, mw in terms:
            if mw is not None:
                delta += g * (mw.alpha / mw.rank) * (mw.up.double().reshape(out_f, -1) @ mw.down.double().reshape(-1, in_f))
        return delta
    rank = max(mw.rank for _, mw in terms if mw is not None) if any(mw is not None for _, mw in terms) else 1
    up_sum = torch.zeros(out_f, rank, dtype=torch.float64)
    down_sum = torch.zeros(rank, in_f, dtype=torch.float64)
    for g, mw in terms:
        if mw is not None:
            up_sum[:, :mw.rank] += g * mw.up.double().reshape(out_f, -1)
            down_sum[:mw.rank] += g * mw.down.double().reshape(-1, in_f)
    return (spms[0].alpha / spms[0].rank) * (up_sum @ down_sum)


def dense_unet(unet, spms, gates, combine, dtype=None):
    """A copy of ``unet`` whose adapted weights hold ``W + update`` for one gate vector: computed in
    float64 and rounded to ``dtype`` (default: the UNet's dtype; float64 gives the exact oracle,
    the whole copy then runs in float64)."""
    u = copy.deepcopy(unet)
    if dtype is not None:
        u = u.to(dtype)
    for path, m in adapted_modules(u).items():
        out_f, in_f = m.weight.shape[:2]
        w = m.weight.data.double().reshape(out_f, in_f)
        delta = dense_update(path, out_f, in_f, spms, gates, combine)
        m.weight.data = (w + delta).to(m.weight.dtype).view_as(m.weight)
    return u


def rel_err(a, b):
    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    return ((a - b).norm() / b.norm()).item()
