"""Training configuration: the reference implementation's YAML, field for field.

A run is one YAML file (the reference's ``configs/<concept>/config.yaml`` runs unchanged)::

    prompts_file: "configs/snoopy/prompt.yaml"   # or ``prompts:`` with the list inline
    pretrained_model: {name_or_path: "CompVis/stable-diffusion-v1-4", v2: false, v_pred: false}
    network: {rank: 1, alpha: 1.0}
    train: {iterations: 3000, lr: 1e-4, optimizer_type: AdamW8bit, lr_scheduler: cosine_with_restarts,
            lr_warmup_steps: 500, lr_scheduler_num_cycles: 3, noise_scheduler: ddim,
            max_denoising_steps: 30, precision: float32, seed: 0}
    save: {name: snoopy, path: output/snoopy, per_steps: 500, precision: float32}

The prompt-settings list holds one entry per concept (several entries train one multi-concept
SPM, as the reference allows)::

    - target: "snoopy"
      positive: "snoopy"          # default: target
      unconditional: ""           # default: ""
      neutral: ""                 # default: unconditional
      action: "erase_with_la"     # "erase" (default) or "erase_with_la"
      guidance_scale: 1.0         # eta
      resolution: 512
      dynamic_resolution: true
      batch_size: 1
      la_strength: 1000           # lambda
      sampling_batch_size: 4      # anchors per iteration

Values are coerced the way the reference's pydantic models coerce them (``guidance_scale: "1.0"``
and ``text_encoder_lr: 5e-05``, which YAML reads as strings, are numbers). Unknown fields raise
:class:`ConfigError` naming them. The reference's ``logging``, ``inference`` and ``other``
sections (wandb, sample images, xformers) are accepted and ignored with a note; so are the fields
the reference trainer itself ignores (``train.batch_size``, ``unet_lr``, ``text_encoder_lr``,
``pretrained_model.clip_skip``, prompt ``use_template``, ``seed``, ``case_number``).

This module imports no torch: the CLI parses and validates configs cheaply.
"""
from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

PRECISIONS = {"fp32": "float32", "float32": "float32", "fp16": "float16", "float16": "float16",
              "bf16": "bfloat16", "bfloat16": "bfloat16"}
ACTIONS = ("erase", "erase_with_la")
NOISE_SCHEDULERS = ("ddim", "ddpm", "lms", "euler_a")
LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
                 "piecewise_constant")
EMBEDDED_MODELS = ("tiny", "tiny-sd2", "tiny-sdxl", "shapes")

# Sections of the reference's RootConfig that only drive wandb logging, sample images and
# xformers; their field names are kept so typos are still caught.
_IGNORED_SECTIONS = {
    "logging": {"use_wandb", "run_name", "verbose", "interval", "prompts", "negative_prompt", "anchor_prompt",
                "width", "height", "num_inference_steps", "guidance_scale", "seed", "generate_num", "eval_num"},
    "inference": {"use_wandb", "negative_prompt", "width", "height", "num_inference_steps", "guidance_scale",
                  "seeds", "precision"},
    "other": {"use_xformers"},
}


class ConfigError(ValueError):
    """A training config is invalid; the message names the field (``train.iteratons``)."""


# ---------------------------------------------------------------------------------------------
# sections

@dataclass
class PromptSettings:
    """One concept to erase (one entry of the prompt-settings list). Defaults as the reference."""

    target: str
    positive: str | None = None  # None -> target
    unconditional: str = ""
    neutral: str | None = None  # None -> unconditional
    action: str = "erase"
    guidance_scale: float = 1.0
    resolution: int = 512
    dynamic_resolution: bool = False
    batch_size: int = 1
    dynamic_crops: bool = False  # SDXL only: random original size / crop in add_time_ids
    use_template: bool = False  # accepted; the reference trainer never applies it either
    la_strength: float = 1000.0
    sampling_batch_size: int = 4
    seed: int | None = None  # evaluation-only in the reference
    case_number: int = 0  # evaluation-only in the reference

    _choices = {"action": ACTIONS}

    def _finish(self, where: str) -> None:
        if self.positive is None:
            self.positive = self.target
        if self.neutral is None:
            self.neutral = self.unconditional
        _positive(self, where, "resolution", "batch_size", "sampling_batch_size")
        if self.sampling_batch_size % self.batch_size:
            raise ConfigError(f"{where}: sampling_batch_size ({self.sampling_batch_size}) must be a multiple of "
                              f"batch_size ({self.batch_size})")
        if self.la_strength < 0:
            raise ConfigError(f"{where}.la_strength must be >= 0")


@dataclass
class PretrainedModelConfig:
    """``name_or_path``: a diffusers folder / hub id, or an embedded model (``tiny``, ``tiny-sd2``,
    ``tiny-sdxl``: :func:`spm_rt.testing.tiny_pipeline`; ``shapes``: the shapes-world model)."""

    name_or_path: str
    v2: bool = False
    v_pred: bool = False
    clip_skip: int | None = None  # accepted; the reference trainer does not apply it


@dataclass
class NetworkConfig:
    rank: int = 1
    alpha: float = 1.0

    def _finish(self, where: str) -> None:
        _positive(self, where, "rank")


@dataclass
class TrainingConfig:
    """The ``train:`` section. ``seed``, ``device`` and ``backend`` are spm_rt additions."""

    precision: str = "float32"
    noise_scheduler: str = "ddim"
    iterations: int = 3000
    batch_size: int = 1  # accepted; the reference uses each prompt's batch_size
    lr: float = 1e-4
    unet_lr: float = 1e-4  # accepted; the reference optimises with lr
    text_encoder_lr: float = 5e-5  # accepted; no text-encoder membranes
    optimizer_type: str = "AdamW8bit"
    optimizer_args: list[str] | None = None  # ["weight_decay=0.01", ...]
    lr_scheduler: str = "cosine_with_restarts"
    lr_warmup_steps: int = 500
    lr_scheduler_num_cycles: int = 3
    lr_scheduler_power: float = 1.0
    lr_scheduler_args: list[str] | str = ""  # ["step_rules='1:10,0.1'"] for piecewise_constant
    max_grad_norm: float = 0.0
    max_denoising_steps: int = 30
    seed: int = 0
    device: str = "auto"  # "auto": cuda when available
    backend: str = "auto"  # layer backend: "auto" (triton on CUDA when installed), "torch", "triton"

    _choices = {"noise_scheduler": NOISE_SCHEDULERS, "lr_scheduler": LR_SCHEDULERS,
                "backend": ("auto", "torch", "triton")}

    def _finish(self, where: str) -> None:
        self.precision = _precision(self.precision, f"{where}.precision")
        _positive(self, where, "iterations")
        if self.max_denoising_steps < 2:
            raise ConfigError(f"{where}.max_denoising_steps must be >= 2 (t_to is drawn from [1, steps - 1])")
        if self.lr_warmup_steps < 0 or self.max_grad_norm < 0:
            raise ConfigError(f"{where}: lr_warmup_steps and max_grad_norm must be >= 0")
        for arg in (self.optimizer_args or []):
            if "=" not in arg:
                raise ConfigError(f"{where}.optimizer_args: {arg!r} is not key=value")


@dataclass
class SaveConfig:
    name: str = "untitled"
    path: str = "./output"
    per_steps: int = 500
    precision: str = "float32"

    def _finish(self, where: str) -> None:
        self.precision = _precision(self.precision, f"{where}.precision")
        _positive(self, where, "per_steps")


@dataclass
class AdversarialConfig:
    """The ``adversarial:`` section (an spm_rt addition): adversarial Latent Anchoring in the
    AdvUnlearn / RECE spirit. A population of ``population`` prefix embeddings (``tokens``
    positions after the start token, assigned round-robin to the prompt settings) is refreshed
    every ``refresh_every`` iterations by ``attack_steps`` Adam steps of the prefix attack against
    the current SPM (gate 1): the prefix is pushed to make the erased model's prediction for
    ``prefix + target`` match the base model's prediction for ``positive``. Each iteration then
    adds the erase loss of ``per_step`` members (same setting) to the plain erase loss, weighted by
    ``weight``; Latent Anchoring keeps non-targets as before.

    ``retain`` (optional) lists real non-target prompts (a retain set, as AdvUnlearn's): each
    iteration anchors ``retain_per_step`` of them, SPM on against SPM off at the setting's
    ``la_strength``, beside the random anchors (which sit off the text encoder's output manifold
    and protect no real prompt)."""

    population: int = 8
    refresh_every: int = 50
    attack_steps: int = 10
    tokens: int = 4
    lr: float = 0.05  # Adam step of the attack, relative to the mean token-embedding norm
    per_step: int = 2
    weight: float = 1.0
    start: int = 0  # first iteration with adversarial terms (the first refresh happens here)
    buffer: int = 16  # recent training (latents, timestep) pairs the attack optimises on
    init: str | None = None  # start from this SPM file (harden a trained SPM); relative: to the config's folder
    retain: list[str] = field(default_factory=list)  # real non-target prompts anchored every iteration
    retain_per_step: int = 4

    def _finish(self, where: str) -> None:
        _positive(self, where, "population", "refresh_every", "attack_steps", "tokens", "per_step", "buffer",
                  "retain_per_step")
        if self.weight < 0 or self.start < 0 or self.lr <= 0:
            raise ConfigError(f"{where}: weight and start must be >= 0 and lr > 0")
        if self.per_step > self.population:
            raise ConfigError(f"{where}.per_step ({self.per_step}) must be <= population ({self.population})")


@dataclass
class TrainConfig:
    """A whole training run (the reference's RootConfig plus its prompt-settings list).

    Build it from YAML with :func:`load_config`, from a dict with :meth:`from_dict`, or directly.

    Example::

        >>> cfg = TrainConfig.from_dict({
        ...     "prompts": [{"target": "circle", "action": "erase_with_la", "resolution": 32}],
        ...     "pretrained_model": {"name_or_path": "tiny"},
        ...     "train": {"iterations": 10, "max_denoising_steps": 4, "optimizer_type": "AdamW"},
        ... })
        >>> cfg.prompts[0].positive, cfg.network.rank
        ('circle', 1)
    """

    prompts: list[PromptSettings]
    pretrained_model: PretrainedModelConfig
    network: NetworkConfig = field(default_factory=NetworkConfig)
    train: TrainingConfig = field(default_factory=TrainingConfig)
    save: SaveConfig = field(default_factory=SaveConfig)
    adversarial: AdversarialConfig | None = None  # adversarial Latent Anchoring (spm_rt addition)
    prompts_file: str | None = None  # where prompts came from, if from a file
    source: str | None = None  # the YAML file, if any
    notes: list[str] = field(default_factory=list)  # accepted-but-ignored settings, shown to the user

    @property
    def concepts(self) -> list[str]:
        """The erased concepts (each setting's target, first occurrence order)."""
        return list(dict.fromkeys(p.target for p in self.prompts))

    @classmethod
    def from_dict(cls, data: dict, *, base_dir: str | os.PathLike | None = None,
                  source: str | None = None) -> "TrainConfig":
        """Validate a parsed YAML mapping. ``base_dir`` resolves a relative ``prompts_file`` when it
        is not found relative to the working directory (the reference resolves it from the cwd)."""
        if not isinstance(data, dict):
            raise ConfigError(f"{source or 'config'}: the top level must be a mapping, got {type(data).__name__}")
        known = {"prompts", "prompts_file", "pretrained_model", "network", "train", "save", "adversarial",
                 *_IGNORED_SECTIONS}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown field(s) {', '.join(unknown)} in {source or 'config'} "
                              f"(known: {', '.join(sorted(known))})")
        notes = []
        for section, names in _IGNORED_SECTIONS.items():
            if data.get(section) is None:
                continue
            if not isinstance(data[section], dict):
                raise ConfigError(f"{section} must be a mapping")
            bad = sorted(set(data[section]) - names)
            if bad:
                raise ConfigError(f"unknown field(s) {', '.join(f'{section}.{b}' for b in bad)}")
            notes.append(f"section '{section}' is accepted and ignored (wandb logging, sample images and xformers "
                         "are not part of spm_rt training)")

        if (data.get("prompts") is None) == (data.get("prompts_file") is None):
            raise ConfigError("give exactly one of 'prompts' (the list inline) or 'prompts_file'")
        prompts_file = data.get("prompts_file")
        if prompts_file is not None:
            raw_prompts = _read_yaml(_find_file(str(prompts_file), base_dir, "prompts_file"))
        else:
            raw_prompts = data["prompts"]
        if not isinstance(raw_prompts, list) or not raw_prompts:
            raise ConfigError("prompts must be a non-empty list of prompt settings")
        prompts = [_build(PromptSettings, p, f"prompts[{i}]") for i, p in enumerate(raw_prompts)]

        if data.get("pretrained_model") is None:
            raise ConfigError("pretrained_model.name_or_path is required")
        cfg = cls(
            prompts=prompts,
            pretrained_model=_build(PretrainedModelConfig, data["pretrained_model"], "pretrained_model"),
            network=_build(NetworkConfig, data.get("network") or {}, "network"),
            train=_build(TrainingConfig, data.get("train") or {}, "train"),
            save=_build(SaveConfig, data.get("save") or {}, "save"),
            adversarial=_build(AdversarialConfig, data["adversarial"], "adversarial")
            if data.get("adversarial") is not None else None,
            prompts_file=str(prompts_file) if prompts_file is not None else None,
            source=source,
        )
        cfg.notes = notes + cfg._ignored_notes(data)
        return cfg

    def _ignored_notes(self, data: dict) -> list[str]:
        notes = []
        t = data.get("train") or {}
        for name, why in (("batch_size", "each prompt setting's batch_size is used, as in the reference"),
                          ("unet_lr", "the membranes are optimised with train.lr, as in the reference"),
                          ("text_encoder_lr", "SPM adapts no text-encoder layer")):
            if name in t:
                notes.append(f"train.{name} is accepted and ignored ({why})")
        if self.pretrained_model.clip_skip not in (None, 1):
            notes.append("pretrained_model.clip_skip is ignored (the reference trainer does not apply it either)")
        if any(p.use_template for p in self.prompts):
            notes.append("use_template is ignored (the reference trainer never applies the templates either)")
        if self.train.lr_scheduler == "constant" and self.train.lr_warmup_steps:
            notes.append("lr_warmup_steps is ignored with lr_scheduler 'constant' (the reference raises instead)")
        return notes

    def to_dict(self) -> dict:
        """A plain dict (YAML-able; ``prompts`` inline)."""
        out = {"prompts": [_public(p) for p in self.prompts]}
        for name in ("pretrained_model", "network", "train", "save"):
            out[name] = _public(getattr(self, name))
        if self.adversarial is not None:
            out["adversarial"] = _public(self.adversarial)
        return out


def load_config(path: str | os.PathLike) -> TrainConfig:
    """Read and validate a training YAML (the reference's ``config.yaml`` layout).

    A relative ``prompts_file`` is looked up from the working directory first (as the reference
    does) and then next to the config file.

    Example::

        >>> from spm_rt.train import load_config
        >>> cfg = load_config("run.yaml")  # doctest: +SKIP
        >>> cfg.concepts, cfg.train.iterations  # doctest: +SKIP
        (['snoopy'], 3000)
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file")
    return TrainConfig.from_dict(_read_yaml(path), base_dir=path.parent, source=str(path))


# ---------------------------------------------------------------------------------------------
# validation helpers

def _read_yaml(path: Path):
    import yaml

    try:
        with open(path, encoding="utf-8") as fh:
            return yaml.safe_load(fh)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from None


def _find_file(name: str, base_dir, what: str) -> Path:
    p = Path(name).expanduser()
    candidates = [p] if p.is_absolute() else [p] + ([Path(base_dir) / p] if base_dir is not None else [])
    for c in candidates:
        if c.is_file():
            return c
    raise ConfigError(f"{what}: {name} not found (looked at {', '.join(str(c) for c in candidates)})")


def _precision(value: str, where: str) -> str:
    if value not in PRECISIONS:
        raise ConfigError(f"{where} must be one of {', '.join(PRECISIONS)}, got {value!r}")
    return PRECISIONS[value]


def _positive(obj, where: str, *names: str) -> None:
    for n in names:
        if getattr(obj, n) < 1:
            raise ConfigError(f"{where}.{n} must be >= 1, got {getattr(obj, n)}")


def _public(obj) -> dict:
    return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}


_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


def _coerce(value, tp, where: str):
    """Lax coercion in the spirit of pydantic: numeric strings are numbers, "true"/"false" bools."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{where}: {value!r} fits none of {tp}")
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        return [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        raise ConfigError(f"{where} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{where} must be an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                pass
        raise ConfigError(f"{where} must be an integer, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{where} must be a number, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value.strip())
            except ValueError:
                pass
        raise ConfigError(f"{where} must be a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{where} must be a string, got {value!r}")
    raise TypeError(f"unsupported field type {tp}")  # pragma: no cover - a bug in this module


def _build(cls, data, where: str):
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"unknown field(s) {', '.join(f'{where}.{u}' for u in unknown)} "
                          f"(known: {', '.join(fields)})")
    kwargs = {}
    for name, f in fields.items():
        if name in data:
            kwargs[name] = _coerce(data[name], hints[name], f"{where}.{name}")
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{where}.{name} is required")
    obj = cls(**kwargs)
    for name, allowed in getattr(cls, "_choices", {}).items():
        if getattr(obj, name) not in allowed:
            raise ConfigError(f"{where}.{name} must be one of {', '.join(allowed)}, got {getattr(obj, name)!r}")
    finish = getattr(obj, "_finish", None)
    if finish is not None:
        finish(where)
    return obj
