"""What a training run is built from: the pipeline named by the config, the reference's training
noise scheduler, the optimizer and the LR schedule (names as the reference's train_util)."""
from __future__ import annotations

import warnings

import torch
from torch import nn

from spm_rt.train.config import TrainConfig

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def load_pipeline(config: TrainConfig):
    """The pipeline named by ``config.pretrained_model`` (embedded name, diffusers folder or hub id)."""
    pm = config.pretrained_model
    name = pm.name_or_path
    dtype = _DTYPES[config.train.precision]
    if name in ("tiny", "tiny-sd15", "tiny-sd2", "tiny-sdxl"):
        from spm_rt.testing import tiny_pipeline

        arch = {"tiny": "sd15", "tiny-sd15": "sd15", "tiny-sd2": "sd2", "tiny-sdxl": "sdxl"}[name]
        pipe = tiny_pipeline(0, arch=arch)
    elif name == "shapes":
        import importlib

        world = importlib.import_module("spm_rt.world")
        loader = getattr(world, "load_shapes_pipeline", None)
        if loader is None:
            raise RuntimeError("the embedded shapes model is not available in this installation "
                               "(spm_rt.world.load_shapes_pipeline is missing)")
        pipe = loader(dtype=dtype)
    else:
        from diffusers import DiffusionPipeline

        kwargs = {"torch_dtype": dtype}
        try:
            index = DiffusionPipeline.load_config(name)
        except Exception as exc:
            raise RuntimeError(f"pretrained_model.name_or_path {name!r}: not a diffusers pipeline folder or a "
                               f"reachable hub id ({type(exc).__name__}: {exc})") from None
        if "safety_checker" in index:  # never used in training; do not load it
            kwargs.update(safety_checker=None, requires_safety_checker=False)
        pipe = DiffusionPipeline.from_pretrained(name, **kwargs)
    if not hasattr(pipe, "unet") or not hasattr(pipe, "text_encoder"):
        raise RuntimeError(f"{name}: a Stable Diffusion (1.x/2.x) or SDXL pipeline is needed, "
                           f"got {type(pipe).__name__}")
    return pipe


def _noise_scheduler(name: str, pipe_scheduler_config, v_pred: bool):
    """The reference's training scheduler, with the model's own beta schedule (for SD checkpoints
    these are the reference's fixed values: 0.00085, 0.012, scaled_linear, 1000 steps)."""
    import diffusers

    cls = {"ddim": diffusers.DDIMScheduler, "ddpm": diffusers.DDPMScheduler,
           "lms": diffusers.LMSDiscreteScheduler, "euler_a": diffusers.EulerAncestralDiscreteScheduler}[name]
    src = dict(pipe_scheduler_config)
    kwargs = {k: src[k] for k in ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas")
              if k in src and src[k] is not None}
    if name in ("ddim", "ddpm"):
        kwargs["clip_sample"] = False
    kwargs["prediction_type"] = "v_prediction" if v_pred else src.get("prediction_type", "epsilon")
    return cls(**kwargs)


def _literal_kwargs(args) -> dict:
    import ast

    if not args:
        return {}
    if isinstance(args, str):
        args = [args]
    out = {}
    for arg in args:
        key, _, value = arg.partition("=")
        out[key.strip()] = ast.literal_eval(value.strip())
    return out


def build_optimizer(params: list[nn.Parameter], config: TrainConfig) -> torch.optim.Optimizer:
    """``train.optimizer_type``: AdamW, AdamW8bit (bitsandbytes on CUDA; otherwise AdamW with a
    warning), SGDNesterov, SGDNesterov8bit, Lion (lion_pytorch), any ``torch.optim`` class name, or
    a dotted ``package.module.Class``."""
    import importlib

    t = config.train
    kwargs = _literal_kwargs(t.optimizer_args)
    kind = (t.optimizer_type or "AdamW").strip()
    low = kind.lower()
    device = params[0].device if params else torch.device("cpu")
    if low.endswith("8bit"):
        bnb = None
        if device.type == "cuda":
            try:
                import bitsandbytes as bnb
            except ImportError:
                bnb = None
        if bnb is not None:
            cls = {"adamw8bit": bnb.optim.AdamW8bit, "sgdnesterov8bit": bnb.optim.SGD8bit,
                   "lion8bit": getattr(bnb.optim, "Lion8bit", None),
                   "pagedadamw8bit": getattr(bnb.optim, "PagedAdamW8bit", None)}.get(low)
            if cls is None:
                raise ValueError(f"train.optimizer_type {kind!r} is not available in this bitsandbytes")
            if low == "sgdnesterov8bit":
                kwargs.setdefault("momentum", 0.9)
                kwargs["nesterov"] = True
            return cls(params, lr=t.lr, **kwargs)
        fallback = {"adamw8bit": "AdamW", "pagedadamw8bit": "AdamW", "sgdnesterov8bit": "SGDNesterov",
                    "lion8bit": "Lion"}.get(low)
        if fallback is None:
            raise ValueError(f"train.optimizer_type {kind!r} needs bitsandbytes and a CUDA device")
        why = ("bitsandbytes is not installed" if device.type == "cuda"
               else f"8-bit optimizers need CUDA (device {device.type})")
        warnings.warn(f"optimizer_type {kind}: {why}; using 32-bit {fallback} instead", stacklevel=2)
        low, kind = fallback.lower(), fallback
    if low == "adamw":
        return torch.optim.AdamW(params, lr=t.lr, **kwargs)
    if low == "sgdnesterov":
        kwargs.setdefault("momentum", 0.9)
        return torch.optim.SGD(params, lr=t.lr, nesterov=True, **kwargs)
    if low == "lion":
        try:
            import lion_pytorch
        except ImportError:
            raise ImportError("optimizer_type Lion needs lion_pytorch: pip install lion-pytorch") from None
        return lion_pytorch.Lion(params, lr=t.lr, **kwargs)
    if "." in kind:
        module, _, cls_name = kind.rpartition(".")
        cls = getattr(importlib.import_module(module), cls_name)
    else:
        cls = getattr(torch.optim, kind, None)
        if cls is None:
            raise ValueError(f"unknown train.optimizer_type {kind!r} (AdamW, AdamW8bit, SGDNesterov, Lion, a "
                             "torch.optim class name or a dotted import path)")
    return cls(params, lr=t.lr, **kwargs)


def build_lr_scheduler(optimizer, config: TrainConfig):
    """diffusers' schedules by the reference's names (``cosine_with_restarts`` with
    ``lr_scheduler_num_cycles`` cycles and ``lr_warmup_steps`` warmup, ...)."""
    from diffusers.optimization import get_scheduler

    t = config.train
    extra = _literal_kwargs(t.lr_scheduler_args)
    warmup = 0 if t.lr_scheduler == "constant" else t.lr_warmup_steps
    if t.lr_scheduler == "piecewise_constant":
        return get_scheduler(t.lr_scheduler, optimizer, step_rules=extra.get("step_rules"))
    if t.lr_scheduler in ("cosine_with_restarts",):
        return get_scheduler(t.lr_scheduler, optimizer, num_warmup_steps=warmup, num_training_steps=t.iterations,
                             num_cycles=t.lr_scheduler_num_cycles)
    if t.lr_scheduler == "polynomial":
        return get_scheduler(t.lr_scheduler, optimizer, num_warmup_steps=warmup, num_training_steps=t.iterations,
                             power=t.lr_scheduler_power)
    return get_scheduler(t.lr_scheduler, optimizer, num_warmup_steps=warmup, num_training_steps=t.iterations)
