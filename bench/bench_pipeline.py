"""Pipeline latency with K SPMs: base vs the reference way vs diffusers/PEFT vs spm_rt merged / gated.

Scenarios (every variant round is paired with a base round right before it, ratios per pair):

* ``step``: one UNet denoising step with classifier-free guidance (2 UNet rows per prompt), on
  fixed random latents and text embeddings: text encoding, scheduler and VAE excluded. Steady
  state: merged weights are already in the cache, the reference network and PEFT adapters are
  already loaded with the gates. With 4 prompts, base and spm_rt ``gated`` run one batch of 8 rows
  with per-prompt gates; the reference way, PEFT and spm_rt ``merged`` cannot mix gates in a batch
  and run the prompts one after the other (4 UNet calls of 2 rows).
* ``generation``: ``pipe(...)`` end to end with ``output_type="latent"`` (text encoding of prompt
  and negative prompt + ``steps`` DDIM steps with CFG 7.5; the VAE decode, identical for every
  method, is left out so it does not dilute the ratios). Gates are given (``gates=``), so
  Facilitated Transport's extra text-encoder pass is *not* counted here (bench_merge.py measures
  it). Everything a method pays per prompt is inside the timed call: spm_rt ``merged`` starts
  with empty merge caches (merge included), the reference way rebuilds its gamma-weighted sum,
  PEFT calls ``set_adapters`` with the prompt's gates. 4 prompts: base and ``gated`` batched,
  the others one prompt at a time.

spm_rt runs ``combine="linear"`` (PEFT computes the same update); the reference way is the
reference code's ``official`` combination (its own math, same cost structure).
"""
from __future__ import annotations

import pytest
import torch

import spm_rt
from spm_rt.functional import resolve_backend
from baselines import ReferenceSPMNetwork, bare, peft_load, peft_set_gates, peft_unload
from conftest import ARCHS, DEVICE, KS, PROMPTS, TINY, Case, gates_for, run_paired

METHODS = ("reference", "peft", "merged", "gated")
SCENARIOS = (("step", 1), ("step", 4), ("generation", 1), ("generation", 4))
GUIDANCE = 7.5


def _cut_matrix(method: str, scenario: str, prompts: int, k: int) -> bool:
    """The SD1.5 cases run by default on a CPU (SPM_RT_BENCH_SD15_ALL=1 runs all 68).

    One SD1.5 UNet step with CFG at 16x16 latents costs 2-5 s of one shared core (5-13 s for the
    4-prompt batch) and every round pays it twice (base + variant); generations cost ~2.5 steps
    each, PEFT ~1.5-2.5 s to load each adapter. Kept, about 12 min on 2 shared cores:
    - 1-prompt step: every method at every K (the per-step price of each way);
    - 1-prompt generation: spm_rt merged at every K (merge included; the 20-step target is
      derived from it and the step);
    - 4-prompt step: spm_rt gated at every K (the serving target).
    Left out: the 4-prompt cases of the ways that run prompts one at a time (4x their 1-prompt
    step against a batched base) and the other 1-prompt generations; the tiny model
    (SPM_RT_BENCH_QUICK=1) runs them all."""
    if scenario == "step" and prompts == 1:
        return True
    if scenario == "generation" and prompts == 1:
        return method == "merged"
    if scenario == "step" and prompts == 4:
        return method == "gated"
    return False


def _cases():
    out = []
    for arch in ARCHS:
        # method-major, K ascending: one install per (method, K); PEFT loads its adapters incrementally
        variants = [(arch.name, scenario, prompts, method, k)
                    for method in METHODS for k in KS for scenario, prompts in SCENARIOS
                    if arch.full_matrix or _cut_matrix(method, scenario, prompts, k)]
        used = {(c[1], c[2]) for c in variants}
        out += [(arch.name, scenario, prompts, "base", 0) for scenario, prompts in SCENARIOS if (scenario, prompts) in used]
        out += variants
    return out


CASES = _cases()


def _case_id(c):
    arch, scenario, prompts, method, k = c
    return f"{arch}-{scenario}-{prompts}p-{method}" + (f"-K{k}" if k else "")


class Installer:
    """The method currently installed on the shared pipeline; switching tears the previous one down
    (PEFT adapters stay loaded while the next case is PEFT too: K grows, loads are incremental)."""

    def __init__(self, models):
        self.models = models
        self.key = None
        self.state = None

    def get(self, arch, method: str, k: int):
        key = (arch.name, method, k)
        if key == self.key:
            return self.state
        pipe = self.models.pipe(arch)
        keep_peft = self.key is not None and self.key[:2] == (arch.name, "peft") and method == "peft"
        self.teardown(keep_peft=keep_peft)
        g = gates_for(k, 1)[0] if k else None
        if method == "base":
            state = None
        elif method in ("merged", "gated"):
            backend = "auto" if DEVICE == "cuda" else "torch"
            state = spm_rt.compile(pipe, self.models.spms(arch, k), transport="fixed", strategy=method,
                                   backend=backend)
        elif method == "reference":
            state = ReferenceSPMNetwork(pipe.unet, self.models.spms(arch, k))
            state.set_gates(g)
            state.apply()
        elif method == "peft":
            names = peft_load(pipe, self.models.files(arch, k))
            peft_set_gates(pipe, names, g)
            state = names
        else:
            raise ValueError(method)
        self.key, self.state = key, state
        return state

    def teardown(self, keep_peft: bool = False):
        if self.key is None:
            return
        arch_name, method, _ = self.key
        if method in ("merged", "gated"):
            self.state.remove()
        elif method == "reference":
            self.state.restore()
        elif method == "peft" and not keep_peft:
            pipe = self.models._pipes.get(arch_name)
            if pipe is not None:
                peft_unload(pipe)
        self.key, self.state = None, None


@pytest.fixture(scope="module")
def installer(models):
    inst = Installer(models)
    yield inst
    inst.teardown()


def _step_inputs(arch, pipe, rows: int):
    gen = torch.Generator().manual_seed(0)
    unet = pipe.unet
    lat = torch.randn(rows, unet.config.in_channels, arch.latent, arch.latent, generator=gen)
    emb = torch.randn(rows, 77, unet.config.cross_attention_dim, generator=gen)
    dtype = unet.dtype
    return lat.to(DEVICE, dtype), emb.to(DEVICE, dtype), torch.tensor(500, device=DEVICE)


def test_methods_compute_the_same_update(models, installer):
    """Not timed: the compared ways run the same math on the tiny model (a fair comparison)."""
    installer.teardown()
    arch = TINY
    pipe = models.pipe(arch)
    spms = models.spms(arch, 3)
    g = gates_for(3, 1)[0]
    lat, emb, t = _step_inputs(arch, pipe, 2)
    unet = pipe.unet

    def run(**kw):
        rt = spm_rt.compile(pipe, spms, transport="fixed", backend="torch", **kw)
        try:
            with spm_rt.use_gates(pipe, g):
                return unet(lat, t, encoder_hidden_states=emb).sample
        finally:
            rt.remove()

    base = unet(lat, t, encoder_hidden_states=emb).sample
    merged, gated = run(strategy="merged"), run(strategy="gated")
    official = run(strategy="merged", combine="official")
    net = ReferenceSPMNetwork(unet, spms)
    net.set_gates(g)
    net.apply()
    try:
        reference = unet(lat, t, encoder_hidden_states=emb).sample
    finally:
        net.restore()
    names = peft_load(pipe, models.files(arch, 3))
    try:
        peft_set_gates(pipe, names, g)
        peft = unet(lat, t, encoder_hidden_states=emb).sample
    finally:
        peft_unload(pipe)
    assert torch.equal(unet(lat, t, encoder_hidden_states=emb).sample, base)
    assert (merged - base).abs().max() > 1e-3  # the SPMs do something
    torch.testing.assert_close(gated, merged, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(peft, merged, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(reference, official, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_pipeline_latency(benchmark, models, installer, case):
    arch_name, scenario, prompts, method, k = case
    arch = next(a for a in ARCHS if a.name == arch_name)
    pipe = models.pipe(arch)
    state = installer.get(arch, method, k)
    gates = gates_for(k, prompts) if k else None
    sequential = method in ("reference", "peft", "merged") and prompts > 1
    unet = pipe.unet
    setup = None

    if scenario == "step":
        lat, emb, t = _step_inputs(arch, pipe, 2 * prompts)

        def base_fn():
            unet(lat, t, encoder_hidden_states=emb)

        if method == "base":
            fn = base_fn
        elif sequential:
            # prompt p's rows in a CFG batch laid out [uncond x P, cond x P]
            per_prompt = [(torch.cat([lat[p : p + 1], lat[prompts + p : prompts + p + 1]]),
                           torch.cat([emb[p : p + 1], emb[prompts + p : prompts + p + 1]])) for p in range(prompts)]

            def fn():
                for p, (lp, ep) in enumerate(per_prompt):
                    if method == "merged":
                        with spm_rt.use_gates(pipe, gates[p : p + 1]):
                            unet(lp, t, encoder_hidden_states=ep)
                    else:  # reference / PEFT: loaded once with one gate vector (steady state)
                        unet(lp, t, encoder_hidden_states=ep)
        elif method in ("merged", "gated"):
            def fn():
                with spm_rt.use_gates(pipe, gates):
                    unet(lat, t, encoder_hidden_states=emb)
        else:
            def fn():
                unet(lat, t, encoder_hidden_states=emb)
    else:
        # height/width: the pipeline would otherwise use the UNet's sample_size (512 px for SD1.5)
        kwargs = dict(num_inference_steps=arch.gen_steps, guidance_scale=GUIDANCE, output_type="latent",
                      height=arch.image, width=arch.image)
        batch = PROMPTS[:prompts]

        def base_fn():
            pipe(batch, generator=torch.Generator().manual_seed(0), **kwargs)

        def one(p):  # one prompt (or the whole batch for p=None) with everything it pays per prompt
            g = gates if p is None else gates[p : p + 1]
            prompt = batch if p is None else [batch[p]]
            gen = torch.Generator().manual_seed(0)
            if method in ("merged", "gated"):
                state(prompt, gates=g, generator=gen, **kwargs)
            elif method == "reference":
                state.set_gates(g[0])
                pipe(prompt, generator=gen, **kwargs)
            else:
                peft_set_gates(pipe, state, g[0])
                pipe(prompt, generator=gen, **kwargs)

        if method == "base":
            fn = base_fn
        elif sequential:
            def fn():
                for p in range(prompts):
                    one(p)
        else:
            def fn():
                one(None)

        if method == "merged":
            def clear_merge_caches():  # merge included in every timed generation
                for layer in state.layers.values():
                    layer.restore_weight()  # (every merged call merges; restoring is a no-op between calls)

            setup = clear_merge_caches

    # Warm-up: merged steps get their prompts' gate vectors merged (the steady state has them);
    # on the tiny model and GPUs one unpaired call of the variant (first-call allocations). The
    # SD1.5 CPU run skips that call (one UNet step costs seconds): the base round before each
    # variant round keeps the shared pipeline warm.
    if method == "merged" and scenario == "step":
        for p in range(prompts):
            for layer in state.layers.values():
                layer.prepare_merged(gates[p].cpu())
    elif DEVICE == "cuda" or arch.name == "tiny":
        fn()
    rounds = arch.step_rounds if scenario == "step" else arch.gen_rounds
    unet_rows = 2 * prompts if not sequential else 2
    options = {"guidance_scale": GUIDANCE, "sequential_prompts": sequential,
               "text_encoding_counted": scenario == "generation", "transport_counted": False,
               "vae_decode": False, "merge_included": method == "merged" and scenario == "generation",
               "merged_buffers": 1 if method == "merged" else None,
               "combine": {"reference": "official", "peft": "linear", "merged": "linear", "gated": "linear"}.get(method),
               "backend": resolve_backend(state.config.backend, torch.device(DEVICE)) if method in ("merged", "gated") else None,
               "scheduler": type(pipe.scheduler).__name__}
    c = Case(arch=arch.name, scenario=scenario, method=method, k=k, prompts=prompts, unet_batch=unet_rows,
             latent=[unet_rows, unet.config.in_channels, arch.latent, arch.latent], image=[arch.image, arch.image],
             dtype=str(arch.dtype).replace("torch.", ""), steps=arch.gen_steps if scenario == "generation" else None,
             options=options)
    # Base rounds run on the same pipeline with the method's modules taken out of the forward path
    # (bare(); swapping them is not timed). The base method has nothing installed.
    run_paired(benchmark, c, fn, None if method == "base" else base_fn, rounds=rounds, setup=setup,
               base_context=lambda: bare(pipe))
