"""The README's Python examples run as written (issue 12): every ```python block is executed,
except those marked ``<!-- readme-test: skip (...) -->`` on the line before (the one that needs
real Stable Diffusion weights)."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
SKIP = "<!-- readme-test: skip"


def python_blocks(text: str) -> list[tuple[int, str, bool]]:
    """``(line number, code, skipped)`` for every fenced python block."""
    out = []
    for m in re.finditer(r"^```python\n(.*?)^```", text, flags=re.S | re.M):
        line = text.count("\n", 0, m.start()) + 1
        before = text[:m.start()].rstrip("\n").rsplit("\n", 1)[-1]
        out.append((line, m.group(1), before.strip().startswith(SKIP)))
    return out


BLOCKS = python_blocks(README.read_text())


def test_readme_has_a_runnable_example_and_a_marked_one():
    assert any(not skipped for _, _, skipped in BLOCKS)
    assert any(skipped and "from_pretrained" in code for _, code, skipped in BLOCKS)
    for _, code, skipped in BLOCKS:  # only the real-weights and the torch.compile examples may be skipped
        # (the compile one takes inductor minutes on a CPU: tests/test_graph_ready.py runs the same calls)
        assert not skipped or "from_pretrained" in code or "compile_unet" in code


@pytest.mark.smoke
@pytest.mark.parametrize("line, code", [(line, code) for line, code, skipped in BLOCKS if not skipped],
                         ids=lambda v: f"line{v}" if isinstance(v, int) else "")
def test_readme_python_block_runs(line, code, tmp_path, monkeypatch, capsys):
    import torch

    monkeypatch.chdir(tmp_path)  # the example writes its PNG and SPM copy here
    torch.set_num_threads(1)
    exec(compile(code, f"README.md:{line}", "exec"), {"__name__": "__readme__"})
    out = capsys.readouterr().out
    if "load_shapes_pipeline" in code:
        # what the README's comments say the example prints and writes
        assert "tensor([[1., 1.]," in out and "[0., 0.]])" in out, out
        assert (tmp_path / "red_circle_erased.png").is_file()
        from spm_rt import load_spm

        assert load_spm(tmp_path / "copy.safetensors").concepts == ["red"]


def test_declared_dependencies_cover_what_the_suite_and_configs_import():
    """scipy (LMSDiscreteScheduler: `noise_scheduler: lms`, and the training tests) is a base
    dependency; triton is bounded to the minors the kernels were tested with (3.6, 3.9)."""
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((README.parent / "pyproject.toml").read_text())["project"]
    names = {re.split(r"[<>=!~\[ ]", d, maxsplit=1)[0].lower(): d for d in project["dependencies"]}
    assert "scipy" in names
    for extra in ("triton", "test"):
        triton = [d for d in project["optional-dependencies"][extra] if re.match(r"triton\b", d)]
        assert triton == ["triton>=3.2,<3.10"], (extra, triton)


TEST_COMMAND = 'pip install torch==2.13.0 && pip install -e ".[test]" && pytest -q tests'


def test_ci_runs_the_readme_test_command_with_the_console_script():
    """`python -m pytest` would put the repository root (and its kernels/ folder) first on sys.path
    (issue 19): the README and .ci/run use the `pytest` console script, with the same install."""
    text = README.read_text()
    assert TEST_COMMAND in text and "python -m pytest" not in text
    ci = (README.parent / ".ci" / "run").read_text()
    assert "python -m pytest" not in ci
    assert 'pip install torch==2.13.0 && pip install -e ".[test]" -c constraints.txt' in ci
    assert "pytest -q tests" in ci and "pytest -q -m smoke tests" in ci
    pins = [l for l in (README.parent / "constraints.txt").read_text().splitlines() if l and not l.startswith("#")]
    assert pins and all("==" in l for l in pins) and not any(l.lower().startswith("torch==") for l in pins)
