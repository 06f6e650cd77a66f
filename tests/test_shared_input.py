"""Projections that share an input: cross-attention k/v kept for a whole generation, and the
grouped q/k/v bookkeeping (the Triton launch itself is checked in test_triton_pipeline.py)."""
import pytest
import torch

import spm_rt
from spm_rt import use_gates
from spm_rt.layers import SPMLayer
from spm_rt.testing import random_spm, tiny_pipeline


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline(0)


def _count_computes(rt):
    """Wrap every adapted layer's eager computation (after any reuse) to count calls."""
    counts = {}
    for path, layer in rt.layers.items():
        counts[path] = 0

        def counted(*args, _orig=layer.eager_forward, _path=path):
            counts[_path] += 1
            return _orig(*args)

        layer.eager_forward = counted
    return counts


@pytest.mark.parametrize("strategy, gates", [("gated", [[1.0, 0.3], [0.0, 0.8]]),  # gated branch
                                             ("merged", [[1.0, 0.3], [0.0, 0.8]]),  # one merged copy per prompt
                                             ("auto", [1.0, 0.3])])  # uniform: the merged buffer
def test_cross_attention_kv_computed_once_per_generation(pipe, strategy, gates):
    spms = [random_spm(pipe.unet, c, seed=i) for i, c in enumerate(["a", "b"])]
    kwargs = dict(num_inference_steps=3, guidance_scale=4.0, output_type="pt")
    images = {}
    for reuse in (True, False):
        rt = spm_rt.compile(pipe, spms, transport="fixed", strategy=strategy, reuse_cross_kv=reuse)
        counts = _count_computes(rt)
        images[reuse] = rt(["x", "y"], gates=gates,
                           generator=torch.Generator().manual_seed(0), **kwargs).images
        rt.remove()
        cross_kv = [p for p in counts if ".attn2.to_k" in p or ".attn2.to_v" in p]
        self_kv = [p for p in counts if ".attn1.to_k" in p]
        assert cross_kv and self_kv
        assert all(counts[p] == (1 if reuse else 3) for p in cross_kv), {p: counts[p] for p in cross_kv}
        assert all(counts[p] == 3 for p in self_kv)  # self-attention inputs change every step
    assert torch.equal(images[True], images[False])  # reuse returns exactly what would be recomputed


def test_reuse_sees_a_new_call_and_in_place_changes(pipe):
    spm = random_spm(pipe.unet, "a", seed=3)
    rt = spm_rt.compile(pipe, [spm], transport="fixed", strategy="gated")
    g = torch.Generator().manual_seed(0)
    sample = torch.randn(1, 4, 32, 32, generator=g)
    emb = torch.randn(1, 77, pipe.unet.config.cross_attention_dim, generator=g)
    with torch.no_grad():
        with use_gates(rt, torch.tensor([[1.0]])):
            first = pipe.unet(sample, 10, emb).sample
            emb.mul_(2.0)  # in place: the kept k/v no longer match this tensor
            changed = pipe.unet(sample, 10, emb).sample
        with use_gates(rt, torch.tensor([[0.5]])):  # a new call with other gates: nothing carried over
            half = pipe.unet(sample, 10, emb).sample
    rt.remove()
    rt = spm_rt.compile(pipe, [spm], transport="fixed", strategy="gated", reuse_cross_kv=False)
    with torch.no_grad():
        with use_gates(rt, torch.tensor([[1.0]])):
            expect_changed = pipe.unet(sample, 10, emb).sample
        with use_gates(rt, torch.tensor([[0.5]])):
            expect_half = pipe.unet(sample, 10, emb).sample
    rt.remove()
    assert not torch.equal(first, changed)
    assert torch.equal(changed, expect_changed)
    assert torch.equal(half, expect_half)


def test_attention_groups_and_training_bypass(pipe):
    spm = random_spm(pipe.unet, "a", seed=1)
    rt = spm_rt.compile(pipe, [spm], transport="fixed", strategy="gated")
    groups = {id(layer.shared): layer.shared for layer in rt.layers.values() if layer.shared is not None}
    sizes = sorted((g.cross, len(g.members)) for g in groups.values())
    n_blocks = sum(1 for p in rt.layers if p.endswith(".attn1.to_q"))
    assert sizes == [(False, 3)] * n_blocks + [(True, 2)] * n_blocks
    # with gradients needed nothing is reused: every call computes (and so back-propagates)
    layer = next(l for p, l in rt.layers.items() if p.endswith(".attn2.to_k"))
    x = torch.randn(1, 77, layer.base.in_features, requires_grad=True)
    with use_gates(rt, torch.tensor([[1.0]])):
        a = layer(x)
        b = layer(x)
    assert a is not b
    (a.sum() + b.sum()).backward()
    assert x.grad is not None
    members = [m for g in groups.values() for m in g.members]
    rt.remove()
    assert all(isinstance(m, SPMLayer) and m.shared._cat is None for m in members)  # no copies kept
    assert all(m._pristine is None and not m._merged for m in members)  # host copies released too
