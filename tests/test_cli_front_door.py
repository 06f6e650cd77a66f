"""The CLI front door (issue 21): every number checked before a model loads, one-line errors naming
the flag, shipped SPMs by name, the extra a missing dependency belongs to, no third-party noise."""
from __future__ import annotations

import sys
import warnings
from pathlib import Path

import pytest

from spm_rt.cli import build_parser, main
from test_cli import _one_error_line


@pytest.fixture
def no_model_load(monkeypatch):
    import spm_rt.models as models
    import spm_rt.world as world

    def boom(*a, **k):
        raise AssertionError("a model was loaded before the arguments were checked")

    monkeypatch.setattr(models, "load_pipeline", boom)
    monkeypatch.setattr(world, "load_shapes_pipeline", boom)


@pytest.mark.parametrize("argv, needles", [
    (["eval", "--n", "-3", "--out", "unused"], ["--n -3", ">= 1"]),
    (["eval", "--n", "0", "--out", "unused"], ["--n 0", ">= 1"]),
    (["eval", "--steps", "0", "--out", "unused"], ["--steps 0", "between 1 and 1000"]),
    (["eval", "--guidance", "nan", "--out", "unused"], ["--guidance nan", "finite"]),
    (["generate", "--steps", "0", "--prompt", "a red circle"], ["--steps 0"]),
    (["generate", "--steps", "-5", "--prompt", "a red circle"], ["--steps -5"]),
    (["generate", "--steps", "100000000", "--prompt", "a red circle"], ["--steps 100000000", "1000"]),
    (["generate", "--guidance", "nan", "--prompt", "a red circle"], ["--guidance nan", "finite"]),
    (["generate", "--guidance", "inf", "--prompt", "a red circle"], ["--guidance inf"]),
    (["demo", "--n", "0"], ["--n 0"]),
    (["demo", "--steps", "0"], ["--steps 0"]),
])
def test_numbers_are_checked_before_the_model_loads(argv, needles, capsys, no_model_load, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    _one_error_line(capsys, *needles)


def test_prompts_outside_the_shapes_world_are_warned_about(capsys):
    from spm_rt.cli_common import warn_outside_world

    assert warn_outside_world(["a purple hexagon", "a red circle", "a blue shape"], "shapes", "--prompts") == \
        ["a purple hexagon"]
    err = capsys.readouterr().err
    assert "warning" in err and "'a purple hexagon'" in err and "a red circle" not in err
    assert warn_outside_world(["a purple hexagon"], "tiny") == []  # other models: no vocabulary to check


def test_eval_warns_about_an_outside_prompt_before_loading(capsys, no_model_load, tmp_path):
    with pytest.raises(AssertionError, match="loaded before"):  # the warning comes first, then the model load
        main(["eval", "--prompts", "a purple hexagon", "--out", str(tmp_path)])
    assert "'a purple hexagon': outside the shapes world" in capsys.readouterr().err


def test_spm_by_shipped_name_for_the_shapes_model():
    from spm_rt.cli_common import resolve_spm_names
    from spm_rt.world import shipped_spms

    shipped = {p.stem: str(p) for p in shipped_spms()}
    assert resolve_spm_names(["circle", "red.safetensors"], "shapes") == [shipped["circle"], shipped["red"]]
    assert resolve_spm_names(["circle"], "tiny") == ["circle"]  # only the shapes world ships SPMs
    from spm_rt.world import hardened_spms

    hard = {p.stem: str(p) for p in hardened_spms()}
    assert resolve_spm_names(["circle_hardened"], "shapes") == [hard["circle_hardened"]]
    assert resolve_spm_names(["sub/circle"], "shapes") == ["sub/circle"]  # a path stays a path


def test_generate_with_spm_circle_runs(tmp_path, capsys):
    out = tmp_path / "x.png"
    assert main(["generate", "--spm", "circle", "--prompt", "a red circle", "--steps", "2", "--threads", "1",
                 "--out", str(out)]) == 0
    assert out.is_file() and "circle=" in capsys.readouterr().out


def test_bench_report_writes_markdown_without_matplotlib(tmp_path, capsys, monkeypatch):
    results = Path(__file__).resolve().parents[1] / "bench" / "results" / "cpu_quick.json"
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    assert main(["bench", "report", str(results), "--out", str(tmp_path / "r")]) == 2
    line = _one_error_line(capsys, "matplotlib", "spm_rt[bench]", "--no-plot")
    assert (tmp_path / "r.md").is_file() and not (tmp_path / "r.png").exists(), line
    assert main(["bench", "report", str(results), "--out", str(tmp_path / "s"), "--no-plot"]) == 0
    assert (tmp_path / "s.md").is_file()


def test_generate_help_lists_every_transport(capsys):
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    out = capsys.readouterr().out
    from spm_rt.transport import TRANSPORTS

    for t in TRANSPORTS:
        assert t in out


def test_cli_silences_third_party_noise():
    from torch.jit import TracerWarning

    from spm_rt.cli import quiet_third_party

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        quiet_third_party()
        warnings.warn("traced a branch", TracerWarning)
        warnings.warn_explicit("torchvision is not available", UserWarning, "x.py", 1, module="torchvision")
        warnings.warn("our own warning stays", UserWarning)
    assert [str(w.message) for w in seen] == ["our own warning stays"]
    assert build_parser() is not None
