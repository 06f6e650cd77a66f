"""The shipped shapes-world SPMs: trained with the project's training path from the configs in
``spm_rt/world/configs``, then saved under the concept's name with its calibration prompt sets."""
from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

SHIPPED_CONCEPTS = ("circle", "red")


def config_path(concept: str) -> Path:
    return Path(str(resources.files("spm_rt.world") / "configs" / f"{concept}.yaml"))


def build_spm(concept: str, out_dir: str | Path, *, progress: bool = True, pipe=None, hardened: bool = False) -> Path:
    """Train the SPM for one world concept and write ``out_dir/<concept>.safetensors``; with
    ``hardened=True`` from ``configs/<concept>_hardened.yaml`` (adversarial Latent Anchoring) into
    ``out_dir/<concept>_hardened.safetensors``.

    Example::

        >>> build_spm("circle", "spms")  # doctest: +SKIP
        PosixPath('spms/circle.safetensors')
    """
    from spm_rt.compile import CALIBRATION_KEY
    from spm_rt.formats import load_spm, save_spm
    from spm_rt.train import load_config, train
    from spm_rt.world.evaluate import calibration_sets

    out_dir = Path(out_dir)
    name = f"{concept}_hardened" if hardened else concept
    cfg = load_config(config_path(name))
    cfg.save.path = str(out_dir / "_runs")
    trained = train(cfg, pipe=pipe, progress=progress)
    spm = load_spm(trained, concepts=[concept])
    spm.metadata["spm_rt.training_prompts"] = json.dumps(cfg.concepts)  # every target it was trained on
    spm.metadata[CALIBRATION_KEY] = json.dumps({concept: list(calibration_sets(concept))})
    spm.metadata["spm_rt.train_config"] = json.dumps(cfg.to_dict())
    return save_spm(spm, out_dir / f"{name}.safetensors")
