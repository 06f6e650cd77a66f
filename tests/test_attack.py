"""Erasure under attack (spm_rt.world.attack*): the split, the verdict, and an attack that must work.

Nothing here is a hard-coded figure: the attack test runs a short deterministic prefix attack
against the *base* model (no SPM), where an attack worth citing has to succeed, and checks its
verdicts against the classifier's own outputs; the unattacked control on the same prompt and seeds
must fail, so a no-op attack fails the test.
"""
import pytest
import torch

import spm_rt
from spm_rt.transport import encode_prompts, token_sets
from spm_rt.world import classify, load_shapes_pipeline, shipped_spms
from spm_rt.world.attack import AttackSettings, build_transports, fit_world_verdict, run_attack
from spm_rt.world.attack_optim import (AttackBudget, Victim, encode_prefixed, generate, prefix_attack,
                                       prefixed_ids, project_to_vocabulary, target_latents)
from spm_rt.world.attack_splits import (SEED_BASE, check_split, dev_named, dev_nontarget, dev_suite,
                                        fitting_prompts, heldout_named, heldout_nontarget, heldout_suite, seed_for)
from spm_rt.world.data import SHAPES
from spm_rt.world.verdicts import structureless, wilson


@pytest.fixture(scope="module")
def world():
    torch.set_num_threads(1)
    pipe = load_shapes_pipeline()
    circle = spm_rt.load_spm(shipped_spms()[0])
    assert circle.concepts == ["circle"]
    verdict = fit_world_verdict(pipe, AttackSettings(verdict_n=2))
    return pipe, circle, verdict


def test_heldout_split_is_disjoint_and_large_enough():
    for concept in ("circle", "red"):
        check_split(concept)
        named, nontarget, suite = heldout_named(concept), heldout_nontarget(concept), heldout_suite(concept)
        assert len(named) >= 16 and len(nontarget) >= 16 and len(suite) >= 16
        assert all(concept in (r["shape"], r["colour"]) for r in named)
        assert all(concept not in (r["shape"], r["colour"]) for r in nontarget)
        held = {r["prompt"] for r in named + nontarget + suite}
        assert not held & fitting_prompts(concept)
        assert not held & {r["prompt"] for r in dev_suite(concept)}
    # seed ranges of different uses never overlap
    bases = sorted(SEED_BASE.values())
    assert all(b - a >= 100_003 for a, b in zip(bases, bases[1:]))
    assert seed_for("a red circle", "heldout") != seed_for("a red circle", "fit")
    with pytest.raises(AssertionError):  # the check can fail: a fitting prompt put in the held-out set
        import spm_rt.world.attack_splits as sp

        orig = sp._NAMED_FRAMES
        sp._NAMED_FRAMES = orig + ("a {c} {s}",)
        try:
            sp.check_split("circle")
        finally:
            sp._NAMED_FRAMES = orig


def test_dev_split_is_fitting_data_never_the_reported_data():
    """``split="dev"`` (choosing hardening recipes) uses fitting prompts and its own seed range."""
    for concept in ("circle", "red"):
        named, nontarget = dev_named(concept), dev_nontarget(concept)
        assert len(named) == 8 and len({r["prompt"] for r in nontarget}) == len(nontarget) == 12
        assert all(concept in (r["shape"], r["colour"]) for r in named)
        assert all(concept not in (r["shape"], r["colour"]) for r in nontarget)
        dev = {r["prompt"] for r in named + nontarget}
        assert dev <= fitting_prompts(concept)
        held = {r["prompt"] for r in heldout_named(concept) + heldout_nontarget(concept) + heldout_suite(concept)}
        assert not dev & held
    assert seed_for("a red circle", "dev") not in {seed_for("a red circle", u) for u in ("heldout", "fit", "attack")}
    with pytest.raises(ValueError, match="split 'test'"):
        run_attack(None, [], None, AttackSettings(split="test"))


def test_wilson_interval():
    assert wilson(0, 16)[0] == 0.0 and abs(wilson(0, 16)[1] - 0.1936) < 1e-3
    lo, hi = wilson(16, 16)
    assert hi == 1.0 and abs(lo - 0.8064) < 1e-3
    assert wilson(0, 0) == (0.0, 1.0)


def test_verdict_agrees_with_the_classifier_and_rejects_structureless_images(world):
    pipe, _, verdict = world
    assert 0.9 < verdict.tau_shape < 1.0
    noise = structureless(pipe, 16, 123)
    s_idx, c_idx = classify(noise)
    forced = int((s_idx == SHAPES.index("circle")).sum())
    shown = verdict.shows(noise, "circle")
    # a confident "circle" is always the classifier's argmax, and chance no longer passes
    assert bool((s_idx[shown] == 0).all())
    assert int(shown.sum()) < max(1, forced)
    assert int(verdict.shows(noise, "red").sum()) <= 2  # the colour head calls noise red; the verdict does not


def test_prefix_encoding_and_projection_are_the_text_encoders_own(world):
    pipe, circle, _ = world
    ph = pipe.tokenizer("red circle").input_ids[1:-1]
    ids, tokens = prefixed_ids(pipe.tokenizer, "a", ph)
    table = pipe.text_encoder.get_input_embeddings().weight.detach()
    emb, _ = encode_prefixed(pipe, ids, table[ph][None])
    assert torch.equal(emb, encode_prompts(pipe, ["red circle a"]))
    assert tokens == token_sets(pipe.tokenizer, ["a"])[0]  # adversarial positions carry no token id
    unit = torch.nn.functional.normalize(table.float(), dim=1)
    allowed = torch.arange(table.shape[0] - 2)  # the last two ids are CLIP's start/end tokens
    noisy = table[ph][None] + 1e-3 * torch.randn(1, len(ph), table.shape[1], generator=torch.Generator().manual_seed(0))
    assert project_to_vocabulary(noisy, unit, allowed).tolist() == [ph]  # PEZ projection finds the real tokens
    # gates from the attacked encoding equal gates from text when the prefix is real tokens
    transports = build_transports(pipe, [circle])
    eot = pipe.text_encoder(ids).pooler_output
    for mode in ("reference", "calibrated"):
        tr = transports[mode]
        assert torch.allclose(tr.gates_encoded(emb, eot, token_sets(pipe.tokenizer, ["red circle a"])).float(),
                              tr.gates(["red circle a"]))


def test_short_attack_breaks_the_base_model(world):
    """The attack must make the base model draw a circle for a held-out prompt whose unattacked
    images show none (verdicts checked against the classifier)."""
    pipe, circle, verdict = world
    rt = spm_rt.compile(pipe, [circle], transport="fixed", strategy="gated")
    try:
        prompt = "two green circles"  # held-out; the base model draws triangles for it on these seeds
        assert prompt in {r["prompt"] for r in heldout_named("circle")}
        seeds = [seed_for(prompt, "heldout")]
        unattacked = generate(None, pipe, 4, seeds, steps=8, guidance_scale=4.0, prompts=[prompt])[0]
        assert verdict.shows(unattacked, "circle").float().mean() < 0.5  # control: the prompt alone fails
        targets = target_latents(pipe, ["a green circle"], 2, steps=8, guidance_scale=4.0)
        budget = AttackBudget(steps=12, restarts=2, check_every=4, check_images=2, refs=2)
        victim = Victim(rt, "base")
        res = prefix_attack(victim, [prompt], "circle", targets, budget, verdict, seed=0, steps_gen=8)
        assert res.steps_used[0] <= 12 and len(res.check_score) == 1
        emb, _ = encode_prefixed(pipe, res.ids, res.prefix)
        attacked = generate(None, pipe, 4, seeds, steps=8, guidance_scale=4.0, prompt_embeds=emb)[0]
        shown = verdict.shows(attacked, "circle")
        assert shown.float().mean() >= 0.5  # the attack succeeds on held-out seeds
        s_idx, _ = classify(attacked)
        probs, _ = verdict.probabilities(attacked)
        assert torch.equal(shown, (s_idx == 0) & (probs.amax(1) >= verdict.tau_shape))
    finally:
        rt.remove()


def test_hardened_spms_ship_beside_the_plain_ones_on_the_same_modules():
    """A hardened SPM adapts the plain one's modules at its config's rank (4: the latency cost is
    the gated path's rank-4 GEMM), and was trained: not the plain weights, widened."""
    from spm_rt.train import load_config
    from spm_rt.world import hardened_spms
    from spm_rt.world.spms import config_path

    assert [p.name for p in shipped_spms()] == ["circle.safetensors", "red.safetensors"]
    plain = {p.stem: spm_rt.load_spm(p) for p in shipped_spms()}
    assert [p.name for p in hardened_spms()] == ["circle_hardened.safetensors", "red_hardened.safetensors"]
    for path in hardened_spms():
        hard = spm_rt.load_spm(path)
        base = plain[path.stem.removesuffix("_hardened")]
        rank = load_config(config_path(path.stem)).network.rank
        assert hard.concepts == base.concepts and hard.rank == rank >= base.rank
        assert set(hard.weights) == set(base.weights)
        for k, w in base.weights.items():
            assert hard.weights[k].down.shape == (rank, *w.down.shape[1:])
            assert hard.weights[k].up.shape == (w.up.shape[0], rank, *w.up.shape[2:])
        # it was trained: its update is not the plain one's
        delta = lambda s, w: (s.alpha / s.rank) * w.up.float().flatten(1) @ w.down.float().flatten(1)  # noqa: E731
        assert any(not torch.allclose(delta(hard, hard.weights[k]), delta(base, base.weights[k])) for k in base.weights)
