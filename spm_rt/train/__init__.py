"""SPM training: the reference algorithm (erase loss + Latent Anchoring) on spm_rt's own layers.

Public API: :func:`train`, :class:`TrainConfig`, :func:`load_config`, :class:`Trainer`. The CLI is
``spm-rt train --config run.yaml [--resume CHECKPOINT]``.

Example::

    >>> from spm_rt.train import load_config, train
    >>> path = train(load_config("run.yaml"))  # doctest: +SKIP
    >>> import spm_rt; spm_rt.load_spm(path).concepts  # doctest: +SKIP
    ['snoopy']

torch/diffusers are imported only when training starts: importing this package (or parsing and
validating a config) is cheap.
"""
from __future__ import annotations

from spm_rt.train.config import ConfigError, PromptSettings, TrainConfig, load_config

__all__ = ["train", "Trainer", "TrainableSPM", "TrainConfig", "PromptSettings", "ConfigError", "load_config"]


def __getattr__(name: str):
    if name in ("train", "Trainer", "TrainableSPM"):
        from spm_rt.train import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module 'spm_rt.train' has no attribute {name!r}")
