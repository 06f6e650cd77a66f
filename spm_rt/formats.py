"""SPM files: the kohya / A1111 LoRA layout the reference implementation writes.

Keys (for the diffusers module path ``down_blocks.0.attentions.1.transformer_blocks.0.attn2.to_k``)::

    lora_unet_down_blocks_0_attentions_1_transformer_blocks_0_attn2_to_k.lora_down.weight  [r, in] or [r, in, 1, 1]
    lora_unet_down_blocks_0_attentions_1_transformer_blocks_0_attn2_to_k.lora_up.weight    [out, r] or [out, r, 1, 1]
    lora_unet_down_blocks_0_attentions_1_transformer_blocks_0_attn2_to_k.alpha             0-d

Metadata (strings): ``prompts`` (concepts joined with ","), ``rank``, ``alpha``; spm_rt adds
``spm_rt.concepts``, a JSON list that keeps concept names containing "," intact.
Only safetensors is read: pickle-based formats are refused.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

CONCEPTS_KEY = "spm_rt.concepts"
_KEY_RE = re.compile(r"^(lora_unet_[A-Za-z0-9_]+)\.(lora_down\.weight|lora_up\.weight|alpha)$")
_PICKLE_SUFFIXES = {".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle"}


class SPMFormatError(ValueError):
    """An SPM file (or an SPM object) is malformed or does not fit the UNet it is applied to."""


@dataclass
class ModuleWeights:
    """One adapted module's membrane: ``down [r, in]``, ``up [out, r]`` and ``alpha`` (scale = alpha / r)."""

    down: torch.Tensor  # [r, in]
    up: torch.Tensor  # [out, r]
    alpha: float
    conv: bool = False  # stored as [r, in, 1, 1] / [out, r, 1, 1] (SD1.x proj_in / proj_out)

    @property
    def rank(self) -> int:
        return self.down.shape[0]


@dataclass
class SPM:
    """A loaded SPM: the erased ``concepts``, its ``rank``/``alpha`` and per-module weights keyed by
    the kohya LoRA name (``lora_unet_...``).

    Example::

        >>> spm = load_spm("snoopy.safetensors")  # doctest: +SKIP
        >>> spm.concepts, spm.rank, len(spm.weights)  # doctest: +SKIP
        (['snoopy'], 1, 192)
    """

    concepts: list[str] | None
    rank: int
    alpha: float
    weights: dict[str, ModuleWeights]
    metadata: dict[str, str] = field(default_factory=dict)
    source: str | None = None

    @property
    def name(self) -> str:
        if self.concepts:
            return ",".join(self.concepts)
        return Path(self.source).stem if self.source else "spm"

    def num_parameters(self) -> int:
        return sum(w.down.numel() + w.up.numel() for w in self.weights.values())


# ---------------------------------------------------------------------------------------------
# UNet module discovery and key mapping (by walking the UNet's own names, never by reversing keys)

def lora_key(module_path: str) -> str:
    """kohya LoRA name of a diffusers UNet module path."""
    return "lora_unet_" + module_path.replace(".", "_")


def adapted_modules(unet: nn.Module) -> dict[str, nn.Module]:
    """Every ``nn.Linear`` / 1x1 ``nn.Conv2d`` inside each ``Transformer2DModel`` of ``unet``,
    keyed by module path, in ``named_modules`` order. Already-patched modules (spm_rt wrappers)
    count as the module they wrap."""
    found: dict[str, nn.Module] = {}
    for name, mod in unet.named_modules():
        if type(mod).__name__ != "Transformer2DModel":
            continue
        stack = [(name, mod)]
        while stack:
            prefix, parent = stack.pop(0)
            for child_name, child in parent.named_children():
                path = f"{prefix}.{child_name}" if prefix else child_name
                if getattr(child, "_spm_wrapper", False):
                    found[path] = child.base
                elif isinstance(child, nn.Linear):
                    found[path] = child
                elif isinstance(child, nn.Conv2d):
                    if child.kernel_size != (1, 1) or child.groups != 1:
                        raise SPMFormatError(f"{path}: only 1x1 Conv2d layers can carry an SPM, got {child}")
                    found[path] = child
                else:
                    stack.append((path, child))
    # keep named_modules order (the walk above is breadth-first inside each transformer)
    order = {n: i for i, (n, _) in enumerate(unet.named_modules())}
    return dict(sorted(found.items(), key=lambda kv: order.get(kv[0], order.get(kv[0] + ".base", 0))))


def module_shape(module: nn.Module) -> tuple[int, int]:
    """(out, in) of a Linear or 1x1 Conv2d."""
    return tuple(module.weight.shape[:2])


def resolve(spm: SPM, modules: dict[str, nn.Module]) -> dict[str, ModuleWeights]:
    """Map an SPM's keys onto module paths of a UNet, checking shapes.

    Raises SPMFormatError listing the first mismatching keys and shapes when the file was made for
    another architecture.
    """
    by_key = {lora_key(p): p for p in modules}
    resolved: dict[str, ModuleWeights] = {}
    missing, mismatched = [], []
    for key, w in spm.weights.items():
        path = by_key.get(key)
        if path is None:
            missing.append(key)
            continue
        out_f, in_f = module_shape(modules[path])
        if w.down.shape[1] != in_f or w.up.shape[0] != out_f:
            mismatched.append(f"{key}: SPM down {list(w.down.shape)} / up {list(w.up.shape)} vs module "
                              f"[out={out_f}, in={in_f}]")
            continue
        resolved[path] = w
    if missing or mismatched:
        where = spm.source or spm.name
        lines = []
        if missing:
            lines.append(f"{len(missing)} keys name no adapted module of this UNet, first: " + ", ".join(missing[:3]))
        if mismatched:
            lines.append(f"{len(mismatched)} keys have the wrong shape, first: " + "; ".join(mismatched[:3]))
        raise SPMFormatError(f"SPM {where!s} does not fit this UNet ({len(modules)} adapted modules; was it made "
                             "for another architecture?): " + " | ".join(lines))
    if not resolved:
        raise SPMFormatError(f"SPM {spm.source or spm.name} adapts no module of this UNet")
    return resolved


# ---------------------------------------------------------------------------------------------
# load / save

def _fail(path, msg: str):
    raise SPMFormatError(f"{path}: {msg}")


def load_spm(path: str | os.PathLike, concepts: str | list[str] | None = None) -> SPM:
    """Load an SPM ``.safetensors`` file (reference / kohya layout).

    ``concepts`` names the erased concepts when the file's metadata does not (or overrides it).
    Raises :class:`SPMFormatError` (naming the file and key) for pickle formats, truncated or
    corrupt files, missing up/down halves, non-finite values and unknown keys.

    Example::

        >>> spm = load_spm("mickey_snoopy.safetensors")  # doctest: +SKIP
        >>> spm.concepts  # doctest: +SKIP
        ['mickey', 'snoopy']
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        _fail(path, "no such file")
    if path.suffix.lower() in _PICKLE_SUFFIXES:
        _fail(path, "pickle-based formats are refused (they can run code); convert the file to .safetensors")
    with open(path, "rb") as fh:
        head = fh.read(9)
    # safetensors: an 8-byte little-endian header length, then the JSON header ("{"); a length whose
    # low byte is 0x80 must not read as a pickle's protocol opcode
    if (head[:2] == b"PK" or head[:1] == b"\x80") and head[8:9] != b"{":
        _fail(path, "this is a pickle/zip checkpoint, not safetensors; refused (convert it to .safetensors)")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except SPMFormatError:
        raise
    except Exception as exc:  # safetensors raises its own error types for bad headers / truncation
        _fail(path, f"not a readable safetensors file ({type(exc).__name__}: {exc})")

    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        m = _KEY_RE.match(key)
        if m is None:
            _fail(path, f"unknown key {key!r} (an SPM holds only lora_unet_*.lora_down.weight / .lora_up.weight / .alpha)")
        groups.setdefault(m.group(1), {})[m.group(2)] = t
    if not groups:
        _fail(path, "holds no SPM weights")

    weights: dict[str, ModuleWeights] = {}
    for prefix, parts in groups.items():
        for half in ("lora_down.weight", "lora_up.weight"):
            if half not in parts:
                _fail(path, f"key {prefix}.{half} is missing (the other half is present)")
        down, up = parts["lora_down.weight"], parts["lora_up.weight"]
        conv = down.dim() == 4
        if conv:
            if down.shape[2:] != (1, 1) or up.dim() != 4 or up.shape[2:] != (1, 1):
                _fail(path, f"{prefix}: conv SPM weights must be 1x1, got down {list(down.shape)} up {list(up.shape)}")
            down, up = down[:, :, 0, 0], up[:, :, 0, 0]
        elif down.dim() != 2 or up.dim() != 2:
            _fail(path, f"{prefix}: expected 2-D (or 1x1 conv) weights, got down {list(down.shape)} up {list(up.shape)}")
        if down.shape[0] != up.shape[1]:
            _fail(path, f"{prefix}: rank mismatch, down {list(down.shape)} vs up {list(up.shape)}")
        if down.dtype not in (torch.float32, torch.float16, torch.bfloat16) or up.dtype != down.dtype:
            _fail(path, f"{prefix}: unsupported dtypes {down.dtype}/{up.dtype} (fp32, fp16 or bf16)")
        for half, t in (("lora_down.weight", down), ("lora_up.weight", up)):
            if not torch.isfinite(t).all():
                _fail(path, f"key {prefix}.{half} holds non-finite values")
        alpha_t = parts.get("alpha")
        if alpha_t is not None:
            if alpha_t.numel() != 1 or not torch.isfinite(alpha_t.float()).all():
                _fail(path, f"key {prefix}.alpha must be one finite number, got shape {list(alpha_t.shape)}")
            alpha = float(alpha_t.float().item())
        else:
            alpha = float(down.shape[0])  # kohya convention: no alpha means scale 1
        weights[prefix] = ModuleWeights(down.contiguous(), up.contiguous(), alpha, conv)

    ranks = {w.rank for w in weights.values()}
    rank = int(metadata.get("rank", max(ranks))) if str(metadata.get("rank", "")).strip().isdigit() else max(ranks)
    try:
        alpha = float(metadata["alpha"]) if "alpha" in metadata else next(iter(weights.values())).alpha
    except ValueError:
        _fail(path, f"metadata alpha {metadata['alpha']!r} is not a number")

    if concepts is not None:
        names = [concepts] if isinstance(concepts, str) else list(concepts)
    elif CONCEPTS_KEY in metadata:
        try:
            names = json.loads(metadata[CONCEPTS_KEY])
        except json.JSONDecodeError:
            _fail(path, f"metadata {CONCEPTS_KEY} is not a JSON list")
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            _fail(path, f"metadata {CONCEPTS_KEY} is not a JSON list of strings")
    elif metadata.get("prompts", "").strip():
        names = [p.strip() for p in metadata["prompts"].split(",") if p.strip()]
    else:
        names = None  # unknown: the caller must name the concepts (or pass fixed gates)
    return SPM(concepts=names, rank=rank, alpha=alpha, weights=weights, metadata=metadata, source=str(path))


def save_spm(spm: SPM, path: str | os.PathLike, dtype: torch.dtype | None = None) -> Path:
    """Write ``spm`` in the reference layout (loadable by the reference code, kohya tools and
    diffusers' ``load_lora_weights``).

    Example::

        >>> save_spm(spm, "circle.safetensors", dtype=torch.float16)  # doctest: +SKIP
    """
    from safetensors.torch import save_file

    tensors = {}
    for prefix, w in spm.weights.items():
        down, up = w.down, w.up
        if dtype is not None:
            down, up = down.to(dtype), up.to(dtype)
        if w.conv:
            down, up = down[:, :, None, None], up[:, :, None, None]
        tensors[f"{prefix}.lora_down.weight"] = down.detach().contiguous().cpu()
        tensors[f"{prefix}.lora_up.weight"] = up.detach().contiguous().cpu()
        tensors[f"{prefix}.alpha"] = torch.tensor(float(w.alpha), dtype=down.dtype)
    concepts = list(spm.concepts or [])
    metadata = {k: v for k, v in spm.metadata.items() if isinstance(v, str)}
    metadata.update({
        "prompts": ",".join(concepts),
        "rank": str(spm.rank),
        "alpha": str(spm.alpha),
        CONCEPTS_KEY: json.dumps(concepts),
    })
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=metadata)
    public_permissions(path)
    return path


def _umask() -> int:
    try:  # Linux: read it without changing it (os.umask would, for a moment, for every thread)
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def public_permissions(path: str | os.PathLike) -> None:
    """Give a written file the permissions of an ordinary ``open(path, "w")``: 0666 minus the
    umask (0644 usually). ``safetensors.torch.save_file`` (0.8.0 here) leaves 0600 whatever the
    umask, so other users (a serving process, a shared model folder) could not read the file."""
    os.chmod(path, 0o666 & ~_umask())
