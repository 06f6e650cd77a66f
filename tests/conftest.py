import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture
def pipe():
    from spm_rt.testing import tiny_pipeline

    return tiny_pipeline(0)


@pytest.fixture
def spm_files(tmp_path, pipe):
    """Three SPM files for the tiny SD1.5 pipeline (the third with two concepts)."""
    from spm_rt import save_spm
    from spm_rt.testing import random_spm

    paths = []
    for i, concepts in enumerate(["circle", "red", ["blue", "green"]]):
        p = tmp_path / f"spm{i}.safetensors"
        save_spm(random_spm(pipe.unet, concepts, seed=10 + i), p)
        paths.append(p)
    return paths
