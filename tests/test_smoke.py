"""The front door with whatever versions the resolver picks today (issue 19).

``.ci/run`` runs this file (``-m smoke``) in a venv with the newest releases of every dependency,
beside the full suite on the pinned ``constraints.txt``, so a new diffusers / transformers / peft /
onnxruntime release that breaks the front door shows up as a named CI failure. Marked ``smoke``:
imports from the repository root, one real command of each CLI family, and (in test_readme.py) the
README's Python example.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from subproc import run_python

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.smoke
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def test_diffusers_imports_from_the_repository_root():
    """The repository root on sys.path first (``python -c`` there) must not break transformers,
    which imports PyPI's ``kernels`` while diffusers loads its pipelines (issue 19)."""
    code = "import transformers, diffusers; from diffusers import StableDiffusionPipeline"
    res = run_python(["-c", code], cwd=ROOT, env=ENV, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]


@pytest.mark.parametrize("name", ["kernels", "export"])
def test_top_level_folders_never_stand_in_for_pypi_packages(name):
    """Imported by their bare names from the repository root, kernels/ and export/ give the
    installed package of that name, or an ImportError that says to import spm_rt.<name>."""
    code = textwrap.dedent(f"""\
        import importlib.util, sys
        sys.path.insert(0, {str(ROOT)!r})
        installed = importlib.util.find_spec({name!r}, None)
        try:
            import {name} as m
        except ImportError as e:
            print("IMPORTERROR", e)
        else:
            print("FILE", m.__file__)
        """)
    res = run_python(["-c", code], cwd=ROOT, env=ENV, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    line = res.stdout.strip().splitlines()[-1]
    if line.startswith("FILE"):
        assert not line.split(" ", 1)[1].startswith(str(ROOT / name)), line
    else:
        assert f"spm_rt.{name}" in line, line


def _spm_rt(args, cwd, timeout=600):
    exe = shutil.which("spm-rt", path=str(Path(sys.executable).parent)) or shutil.which("spm-rt")
    assert exe, "the spm-rt console script is not installed"
    res = subprocess.run([exe, *args], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, f"spm-rt {' '.join(args)}\n{res.stdout[-2000:]}\n{res.stderr[-3000:]}"
    return res


def test_cli_version_and_inspect(tmp_path):
    from spm_rt.world.eval_commands import shipped_spms

    assert _spm_rt(["--version"], tmp_path).stdout.strip()
    assert "circle" in _spm_rt(["inspect", str(shipped_spms()[0])], tmp_path).stdout


def test_cli_generate(tmp_path):
    from spm_rt.world.eval_commands import shipped_spms

    _spm_rt(["generate", "--spm", str(shipped_spms()[0]), "--prompt", "a red circle", "--steps", "2",
             "--out", "g.png", "--threads", "1"], tmp_path)
    assert (tmp_path / "g.png").stat().st_size > 100


def test_cli_eval(tmp_path):
    _spm_rt(["eval", "--n", "1", "--steps", "2", "--prompts", "a red circle", "--no-combined",
             "--out", "ev", "--threads", "1"], tmp_path)
    assert json.loads((tmp_path / "ev" / "summary.json").read_text())


def test_cli_train(tmp_path):
    (tmp_path / "run.yaml").write_text(textwrap.dedent(f"""\
        prompts: [{{target: "a red circle", action: erase_with_la, resolution: 16, sampling_batch_size: 1}}]
        pretrained_model: {{name_or_path: tiny}}
        train: {{iterations: 1, max_denoising_steps: 2, optimizer_type: AdamW, lr: 0.01, seed: 1}}
        save: {{name: smoke, path: "{tmp_path / 'out'}", per_steps: 1}}
        """))
    _spm_rt(["train", "--config", "run.yaml", "--no-progress"], tmp_path)
    assert list((tmp_path / "out").glob("*.safetensors"))


def test_cli_export_onnx_and_check(tmp_path):
    pytest.importorskip("onnxruntime")
    from spm_rt.world.eval_commands import shipped_spms

    _spm_rt(["export", "onnx", "--model", "shapes", "--spm", str(shipped_spms()[0]), "--out", "onnx"], tmp_path)
    _spm_rt(["export", "check", "--onnx", "onnx"], tmp_path)


def test_cli_help_of_every_command(tmp_path):
    """The remaining families load their modules (attack, world, bench, ...) without error."""
    out = _spm_rt(["--help"], tmp_path).stdout
    commands = [c for c in ("generate", "inspect", "train", "world", "eval", "train-spms", "demo", "attack",
                            "export", "bench", "serve") if f"    {c}" in out]
    assert len(commands) >= 10, out
    for command in commands:
        assert "usage:" in _spm_rt([command, "--help"], tmp_path).stdout
