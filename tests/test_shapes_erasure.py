"""End to end on the shipped shapes-world model: the shipped SPMs erase their concepts and the
calibrated transport spares the other prompts. A short eval (few samples) of what
``spm-rt eval`` measures at full size, held to the issue's targets (constants below)."""
import json

import pytest
import torch

from subproc import run_python
from spm_rt.world.eval_commands import shipped_spms

pytestmark = pytest.mark.skipif(not shipped_spms(), reason="no shipped SPMs in spm_rt/world/assets/spms")

# The targets, asserted on a short run of each shipped SPM alone (4 samples per prompt:
# the first 4 of the full eval's 8, same seeds). The full eval (bench/results/shapes_eval, README)
# measured 0% (red) and 6.2% (circle) of target images still recognized, non-target accuracy
# unchanged and images bit-identical with calibrated gates. Two SPMs at once in the linear combine
# miss the erasure target (12.5%); that is reported in the README, not asserted here.
# This short run measured circle 1 of 16 target images still round (6.2%), red 0 of 12.
TARGET_BASE_MIN = 0.9  # base fidelity target
ERASED_MAX = 0.10  # erasure target: share of target images still showing the concept
ACCURACY_DELTA_MAX = 0.03  # preservation target: non-target accuracy within 3 points
PSNR_MIN = 25.0  # preservation target: median non-target PSNR against base, dB

NON_TARGETS = {"circle": ["a red square", "a green triangle"], "red": ["a blue square", "a yellow triangle"]}


def _prompts(concept):
    from spm_rt.world.data import COLOURS, SHAPES, caption

    targets = [caption(s, c) for s in SHAPES for c in COLOURS if concept in (s, c)]
    return targets + NON_TARGETS[concept]


@pytest.fixture(scope="module")
def summaries(tmp_path_factory):
    from spm_rt.formats import load_spm
    from spm_rt.world import load_shapes_pipeline
    from spm_rt.world.evaluate import EvalSettings, run_eval

    torch.manual_seed(0)
    pipe = load_shapes_pipeline()
    out = {}
    for f in shipped_spms():
        spm = load_spm(f)
        (concept,) = spm.concepts
        d = tmp_path_factory.mktemp(concept)
        summary = run_eval(pipe, {concept: ([spm], "linear")}, d, _prompts(concept), EvalSettings(n=4, steps=20),
                           progress=False)
        out[concept] = summary["groups"][concept]
        out[concept]["records"] = json.loads((d / concept / "records.json").read_text())
    return out


def test_both_concepts_shipped(summaries):
    assert set(summaries) == {"circle", "red"}


@pytest.mark.parametrize("concept", ["circle", "red"])
def test_shipped_spm_erases_its_concept(summaries, concept):
    fig = summaries[concept]
    assert fig["num_target_prompts"] == len(_prompts(concept)) - 2
    for transport in ("reference", "calibrated"):
        t = fig["by_transport"][transport]
        assert t["target_still_recognized_base"] >= TARGET_BASE_MIN  # the base model draws the concept
        assert t["target_still_recognized"] <= ERASED_MAX, (transport, t["target_still_recognized"])


@pytest.mark.parametrize("concept", ["circle", "red"])
def test_calibrated_transport_spares_non_targets(summaries, concept):
    fig = summaries[concept]["by_transport"]
    cal, gates1 = fig["calibrated"], fig["gates1"]
    assert cal["gates_nontarget"]["max"] <= 0.01
    assert cal["nontarget_psnr_median"] >= PSNR_MIN
    assert abs(cal["nontarget_accuracy_delta"]) <= ACCURACY_DELTA_MAX
    assert gates1["nontarget_psnr_median"] < cal["nontarget_psnr_median"]  # what transport buys


@pytest.mark.parametrize("concept", ["circle", "red"])
def test_reference_transport_gates_are_high_on_non_targets(summaries, concept):
    """The documented weakness of whole-sequence clipcos on a small encoder (semantics section 3)."""
    ref = summaries[concept]["by_transport"]["reference"]
    assert ref["gates_nontarget"]["min"] > 0.5


def test_demo_command_runs(tmp_path):
    out = tmp_path / "demo.png"
    res = run_python(["-m", "spm_rt.cli", "demo", "--out", str(out), "--n", "1", "--steps", "8"], timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert out.stat().st_size > 1000
    assert "summary figures" in res.stdout
    line = next(l for l in res.stdout.splitlines() if l.startswith("summary figures"))
    figures = json.loads(line.split(": ", 1)[1])
    assert set(figures) == {"base_accuracy", "target_still_recognized", "nontarget_accuracy_delta",
                            "nontarget_psnr_median", "nontarget_psnr_median_gates1"}


@pytest.mark.parametrize("concept", ["circle", "red"])
def test_calibrated_ramp_alone_closes_its_calibration_negatives(concept, monkeypatch):
    """What the calibration itself does (the keyword rule switched off): the end-of-text ramp fitted
    on the concept's calibration prompts closes every negative and the empty prompt, which the
    reference metric leaves above 0.5. Measured: on this model the one calibration positive does
    not score above the negatives (lo 0.990 / 0.984 for circle / red), so the fit falls back to the
    steep ramp and target prompts open through the keyword rule alone; the test pins that too, so
    a model where the ramp starts to separate shows up here."""
    from spm_rt.transport import CalibratedTransport, Transport
    from spm_rt.world import load_shapes_pipeline
    from spm_rt.world.evaluate import calibration_sets

    pipe = load_shapes_pipeline()
    pos, neg = calibration_sets(concept)
    transport = CalibratedTransport(pipe, [[concept]], {concept: (pos, neg)})
    monkeypatch.setattr(transport, "tokenuni", lambda prompts: torch.zeros(len(prompts), 1))
    assert transport.scores(neg + [""]).max() <= 1e-3
    reference = Transport(pipe, [[concept]], "clipcos_tokenuni")
    assert reference.gates(neg).min() > 0.5  # what the calibration buys over the reference metric
    fit = transport.calibration[concept]
    assert fit["hi"] == pytest.approx(fit["lo"] + 1e-3)  # not separable on this model (see docstring)


def test_eval_and_attack_size_the_gate_buffer_for_their_largest_batch():
    """The runtime's row-gate buffer is allocated once (64 UNet rows by default); an eval of 40
    images per prompt (80 rows) was refused before the eval sized it for its own batches."""
    from spm_rt.formats import load_spm
    from spm_rt.world import load_shapes_pipeline
    from spm_rt.world.attack import AttackSettings, _max_rows
    from spm_rt.world.attack_splits import heldout_suite
    from spm_rt.world.evaluate import EvalSettings, evaluate_prompts

    torch.set_num_threads(1)
    pipe = load_shapes_pipeline()
    spm = load_spm(shipped_spms()[0])
    recs = evaluate_prompts(pipe, [spm], ["a red circle"], EvalSettings(n=40, steps=1))
    assert len(recs) == 1
    s = AttackSettings()
    assert _max_rows(s, ["circle"]) >= 2 * s.n * max(s.prompts, len(heldout_suite("circle")))
