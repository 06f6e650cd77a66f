"""The ``spm-rt`` CLI as a newcomer meets it (issue 12): one model resolver, one ``--spm``
convention, one error style, the same seeds and defaults with and without ONNX, ``--threads``."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from spm_rt.cli import build_parser, main

SPMS = Path(__file__).resolve().parents[1] / "spm_rt" / "world" / "assets" / "spms"
RED, CIRCLE = str(SPMS / "red.safetensors"), str(SPMS / "circle.safetensors")


def _one_error_line(capsys, *needles: str) -> str:
    err = capsys.readouterr().err.strip()
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("spm-rt: error: "), err
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if a command loads a model (user errors are found before)."""
    import spm_rt.models as models

    def boom(*a, **k):
        raise AssertionError("a model was loaded before the arguments were checked")

    monkeypatch.setattr(models, "load_pipeline", boom)


def test_version(capsys):
    import spm_rt

    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"spm-rt {spm_rt.__version__}"


@pytest.mark.parametrize("argv, needles", [
    (["inspect", "missing.safetensors"], ["missing.safetensors", "no such file"]),
    (["generate", "--spm", "missing.safetensors", "--prompt", "x"], ["--spm", "missing.safetensors"]),
    (["generate", "--spm", RED, CIRCLE, "--gates", "1", "--prompt", "x"], ["--gates", "1 value for 2 SPMs"]),
    (["generate", "--spm", RED, "--gates", "1", "0", "--prompt", "x"], ["--gates", "2 values for 1 SPM"]),
    (["generate", "--model", "no-such-model", "--prompt", "x"], ["--model", "no-such-model"]),
    (["export", "onnx", "--model", "no-such-model", "--spm", RED, "--out", "unused"], ["--model", "no-such-model"]),
    (["export", "onnx", "--model", "shapes", "--spm", RED, "missing.safetensors", "--out", "unused"],
     ["--spm", "missing.safetensors"]),
    (["export", "check", "--onnx", "no-such-dir"], ["--onnx", "no-such-dir"]),
    (["export", "run", "--onnx", "no-such-dir", "--prompt", "x", "--out", "x.png"], ["--onnx", "no-such-dir"]),
    (["generate", "--onnx", "no-such-dir", "--prompt", "x"], ["--onnx", "no-such-dir"]),
    (["eval", "--spm", "missing.safetensors", "--out", "unused"], ["--spm", "missing.safetensors"]),
    (["train", "--config", "missing.yaml"], ["--config", "missing.yaml"]),
    (["generate", "--spm", RED, "--prompt", "x", "--threads", "0"], ["--threads"]),
    (["attack", "--out", "unused", "--prompts", "17"], ["--prompts", "16 named prompts"]),
    (["attack", "--spm", RED, CIRCLE, "--label", "red_hardened", "--out", "unused"], ["--label", "one per --spm"]),
    (["attack", "--out", "unused", "--attack-steps", "0"], ["--attack-steps"]),
])
def test_user_errors_are_one_line_exit_2_before_any_model_load(argv, needles, capsys, no_model_load, tmp_path,
                                                               monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    _one_error_line(capsys, *needles)


def test_debug_shows_the_traceback():
    from spm_rt.cli_common import CLIError

    with pytest.raises(CLIError, match="no such file"):
        main(["--debug", "inspect", "missing.safetensors"])


def test_bench_report_refuses_a_json_that_is_not_pytest_benchmark(tmp_path, capsys):
    for content in ('{"a": 1}', "[1, 2]", '{"machine_info": {}, "benchmarks": []}', "not json"):
        bad = tmp_path / "bad.json"
        bad.write_text(content)
        assert main(["bench", "report", str(bad)]) == 2
        _one_error_line(capsys, "bad.json")
        assert not (tmp_path / "bad.md").exists()
    good = Path(__file__).resolve().parents[1] / "bench" / "results" / "cpu_results.json"
    assert main(["bench", "report", str(good), "--out", str(tmp_path / "good"), "--no-plot"]) == 0
    assert "Targets" in (tmp_path / "good.md").read_text()


# ---------------------------------------------------------------------------------------------
# one --spm convention, one model resolver

@pytest.mark.parametrize("command", [
    ["generate", "--prompt", "x"],
    ["eval", "--out", "o"],
    ["export", "onnx", "--model", "shapes", "--out", "o"],
    ["export", "refit", "--engine", "e"],
])
def test_spm_accepts_both_spellings(command):
    parser = build_parser()
    for spelling in (["--spm", "a", "b"], ["--spm", "a", "--spm", "b"]):
        args = parser.parse_args(command + spelling)
        assert args.spm == ["a", "b"], (command, spelling, args.spm)


def test_every_command_resolves_the_same_model_names():
    from spm_rt.cli_common import load_model

    assert type(load_model("shapes")).__name__ == "StableDiffusionPipeline"
    for name in ("tiny", "tiny:sd15"):  # the export command's old spelling still works
        assert load_model(name).unet.config.cross_attention_dim == load_model("tiny").unet.config.cross_attention_dim


def test_generation_defaults_are_shared():
    parser = build_parser()
    gen = parser.parse_args(["generate", "--prompt", "x"])
    run = parser.parse_args(["export", "run", "--onnx", "d", "--prompt", "x", "--out", "x.png"])
    assert (gen.steps, gen.guidance, gen.seed) == (run.steps, run.guidance, run.seed) == (20, 4.0, 0)
    # the old spelling of export run keeps working
    assert parser.parse_args(["export", "run", "--onnx", "d", "--prompt", "x", "--out", "x.png",
                              "--guidance-scale", "7.5"]).guidance == 7.5


@pytest.fixture(scope="module")
def shapes_onnx(tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx") / "shapes"
    # --spm A --spm B: both SPMs are exported (the old parser silently kept only B)
    assert main(["export", "onnx", "--model", "shapes", "--spm", RED, "--spm", CIRCLE, "--out", str(out)]) == 0
    return out


def test_export_onnx_takes_the_shapes_model_and_every_spm(shapes_onnx):
    manifest = json.loads((shapes_onnx / "manifest.json").read_text())
    assert manifest["concepts"] == [["red"], ["circle"]]


def test_generate_onnx_gives_the_same_images_and_gates_as_generate(shapes_onnx, tmp_path, capsys):
    from PIL import Image

    prompts = ["--prompt", "a red circle", "--prompt", "a blue square", "--prompt", "a green triangle"]
    common = [*prompts, "--seed", "3", "--steps", "3", "--threads", "1"]
    assert main(["generate", "--spm", RED, CIRCLE, *common, "--out", str(tmp_path / "torch.png")]) == 0
    torch_out = capsys.readouterr().out
    assert main(["generate", "--onnx", str(shapes_onnx), *common, "--out", str(tmp_path / "onnx.png")]) == 0
    onnx_out = capsys.readouterr().out
    gate_lines = lambda text: [ln for ln in text.splitlines() if ln.startswith("'")]  # noqa: E731
    assert len(gate_lines(torch_out)) == 3
    assert gate_lines(torch_out) == gate_lines(onnx_out)
    a = np.asarray(Image.open(tmp_path / "torch.png"), dtype=np.int16)
    b = np.asarray(Image.open(tmp_path / "onnx.png"), dtype=np.int16)
    assert a.shape == b.shape
    assert np.abs(a - b).max() <= 1  # same per-prompt seeds; float differences may flip a rounding
    # export run: same defaults and seeds, one PNG per prompt, gates printed
    assert main(["export", "run", "--onnx", str(shapes_onnx), "--prompt", "a green triangle", "--seed", "3",
                 "--steps", "3", "--out", str(tmp_path / "run.png")]) == 0
    assert gate_lines(capsys.readouterr().out) == gate_lines(torch_out)[2:]


def test_onnx_runner_per_prompt_seeds_match_diffusers_generator_list(shapes_onnx):
    import torch

    from spm_rt.export.ort import run_onnx_pipeline
    from spm_rt.world import load_shapes_pipeline

    import spm_rt

    prompts = ["a red circle", "a blue square"]
    got = run_onnx_pipeline(shapes_onnx, prompts, steps=2, guidance_scale=4.0, seed=[5, 9], output_type="np")
    rt = spm_rt.compile(load_shapes_pipeline(), [RED, CIRCLE])
    expected = rt(prompts, num_inference_steps=2, guidance_scale=4.0, output_type="np",
                  generator=[torch.Generator().manual_seed(s) for s in (5, 9)]).images
    assert np.abs(got - expected).max() < 1e-4
    with pytest.raises(ValueError, match="2 seeds for 1 prompts"):
        run_onnx_pipeline(shapes_onnx, prompts[:1], steps=1, seed=[1, 2])


# ---------------------------------------------------------------------------------------------
# threads, files, the demo picture

def test_default_threads_backs_off_when_cores_are_busy(monkeypatch):
    from spm_rt import cli_common

    monkeypatch.setattr(cli_common, "physical_cores", lambda: 2)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    for load, want in ((0.0, 2), (0.4, 2), (0.9, 1), (1.2, 1), (3.5, 1)):
        monkeypatch.setattr(os, "getloadavg", lambda load=load: (load, load, load))
        assert cli_common.default_threads() == want, load
    monkeypatch.setattr(os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # torchrun: the cores are shared among the ranks
    assert cli_common.default_threads() == 1


@pytest.mark.parametrize("command", [["demo"], ["eval", "--out", "o"], ["generate", "--prompt", "x"],
                                     ["world", "sample", "--prompt", "x", "--out", "o.png"]])
def test_threads_flag(command):
    assert build_parser().parse_args(command + ["--threads", "3"]).threads == 3
    assert build_parser().parse_args(command).threads is None  # the load-aware default


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640)])
def test_saved_spms_are_readable_as_the_umask_allows(tmp_path, umask, mode):
    from spm_rt import load_spm, save_spm

    old = os.umask(umask)
    try:
        path = save_spm(load_spm(RED), tmp_path / "copy.safetensors")
    finally:
        os.umask(old)
    assert os.stat(path).st_mode & 0o777 == mode


def test_demo_picture_labels(tmp_path):
    from spm_rt.images import _GAP, _ROW_GAP, labelled_grid
    from spm_rt.world.eval_commands import demo_eval_dir, demo_legend

    assert demo_eval_dir("spm_demo.png") == Path("spm_demo_eval")
    legend = " ".join(demo_legend(["circle", "red"]))
    for word in ("reference gates", "calibrated gates", "base", "circle, red"):
        assert word in legend
    assert _GAP < _ROW_GAP  # a caption sits nearer its own image than the next row
    img = np.zeros((8, 8, 3))
    with_title = labelled_grid([[img, img]], row_labels=["p"], col_labels=["base", "SPMs"],
                               cell_labels=[["", "red 1.00"]], title="title", legend=["a", "b"])
    without = labelled_grid([[img, img]], row_labels=["p"], col_labels=["base", "SPMs"],
                            cell_labels=[["", "red 1.00"]])
    assert with_title.size[1] > without.size[1]
