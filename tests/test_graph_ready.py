"""Graph-ready runtime: SPM tensors, gates and merged weights are module state, so a patched UNet
compiles with ``fullgraph=True`` and never recompiles for new prompts, gates or SPM sets.

Most compiled checks use dynamo with the ``aot_eager`` backend (the same tracing, functionalization
and guards as inductor, without inductor's minutes of C++ code generation on 2 cores); one test
runs inductor itself.
"""
import copy
import threading
import time
import warnings

import numpy as np
import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

import spm_rt
from spm_rt import use_gates
from spm_rt.testing import random_spm, tiny_pipeline
from test_runtime import dense_unet, unet_inputs

PROMPTS = ["a red circle", "a blue square", "a green triangle", "a yellow circle", "a red square"]


def _gen(rt, prompts, seed=0, steps=2, **kw):
    gens = [torch.Generator().manual_seed(seed + i) for i in range(len(prompts))]
    return rt(prompts, generator=gens, num_inference_steps=steps, output_type="np", **kw).images


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_compiled_unet_has_no_graph_break_and_no_recompiles(spm_files):
    eager = spm_rt.compile(tiny_pipeline(0), spm_files[:2], k_max=3)
    rt = spm_rt.compile(tiny_pipeline(0), spm_files[:2], k_max=3)
    counter = CompileCounterWithBackend("aot_eager")
    rt.compile_unet(backend=counter)  # fullgraph=True: any graph break raises
    calls = [(PROMPTS[i:i + 1], {}) for i in range(5)]  # 5 prompts, Facilitated Transport gates (merged)
    calls += [(PROMPTS[:2], {}), (PROMPTS[2:4], {})]  # mixed batches (gated)
    calls += [(PROMPTS[:2], {"gates": [[1.0, 0.0], [0.3, 0.7]]}), (PROMPTS[:1], {"gates": [0.5, 0.2]}),
              (PROMPTS[:2], {"gates": [0.9, 0.4]})]  # explicit gates, uniform over a 2-prompt batch (merged)
    modes = set()
    for i, (prompts, kw) in enumerate(calls):
        want = _gen(eager, prompts, i, **kw)
        got = _gen(rt, prompts, i, **kw)
        np.testing.assert_allclose(got, want, atol=1e-4)
        modes.add(_mode_of(eager, prompts, kw))
    assert modes == {"merged", "gated"}  # both paths were exercised
    base = _gen(tiny_pipeline(0), PROMPTS[:2], 0)
    assert np.abs(_gen(rt, PROMPTS[:2], 0) - base).max() > 1e-3  # the SPMs act

    # set_spms within k_max: same storage, no recompile, same images as a fresh compile of the new set
    layer = next(iter(rt.layers.values()))
    ptrs = (layer.spm_down.data_ptr(), layer.spm_up.data_ptr(), rt._state.row_gates.data_ptr())
    rt.set_spms(spm_files)  # 3 SPMs into 3 slots
    assert (layer.spm_down.data_ptr(), layer.spm_up.data_ptr(), rt._state.row_gates.data_ptr()) == ptrs
    fresh = spm_rt.compile(tiny_pipeline(0), spm_files)
    for i, prompts in enumerate((PROMPTS[:1], PROMPTS[:2])):
        np.testing.assert_allclose(_gen(rt, prompts, 10 + i), _gen(fresh, prompts, 10 + i), atol=1e-4)
    batch_shapes = 2  # 1 prompt (2 UNet rows with CFG) and 2 prompts (4 rows)
    assert counter.frame_count <= 2 * batch_shapes, counter.frame_count


def _mode_of(rt, prompts, kw):
    g = torch.as_tensor(kw["gates"]) if "gates" in kw else rt.gates(prompts)
    g = g if g.dim() == 2 else g[None].expand(len(prompts), -1)
    return "merged" if bool((g == g[:1]).all()) else "gated"


def test_inductor_fullgraph_matches_eager(spm_files):
    rt = spm_rt.compile(tiny_pipeline(0), spm_files[:2])
    want = _gen(rt, PROMPTS[:2], 3)  # distinct gates: the gated branch
    rt.compile_unet()  # inductor, fullgraph=True
    got = _gen(rt, PROMPTS[:2], 3)
    np.testing.assert_allclose(got, want, atol=1e-4)
    got2 = _gen(rt, PROMPTS[2:4], 5)  # other prompts, same graph
    rt.pipe.unet = rt.pipe.unet._orig_mod
    np.testing.assert_allclose(got2, _gen(rt, PROMPTS[2:4], 5), atol=1e-4)


def test_inference_mode_eager_and_compiled(spm_files):
    rt = spm_rt.compile(tiny_pipeline(0), spm_files[:2])
    for prompts in (PROMPTS[:1], PROMPTS[:2]):
        want = _gen(rt, prompts, 1)
        with torch.inference_mode():
            np.testing.assert_array_equal(_gen(rt, prompts, 1), want)
    rt.compile_unet(backend="aot_eager")
    with torch.inference_mode():
        for prompts in (PROMPTS[:1], PROMPTS[:2]):
            np.testing.assert_allclose(_gen(rt, prompts, 1), _gen(rt, prompts, 1), atol=0)


@pytest.mark.parametrize("gates", [[[0.7, 0.4], [0.7, 0.4]], [[1.0, 0.3], [0.2, 0.9]]], ids=["merged", "gated"])
def test_to_float64_after_compile_matches_dense_math(gates):
    pipe = tiny_pipeline(0)
    spms = [random_spm(pipe.unet, c, seed=i, alpha=1.0 + i) for i, c in enumerate(["a", "b"])]
    rt = spm_rt.compile(pipe, spms, transport="fixed")
    _gen(rt, ["x"], steps=1)  # merged weights formed in float32 first: they must not go stale
    pipe.to(torch.float64)
    layer = next(iter(rt.layers.values()))
    assert layer.spm_down.dtype == torch.float64 and layer.spm_scale.dtype == torch.float32
    assert rt._state.row_gates.dtype == torch.float32
    reference = tiny_pipeline(0).to(torch.float64)
    sample, t, emb = (a.double() if a.is_floating_point() else a for a in unet_inputs(pipe, 2))
    g = torch.tensor(gates)
    with torch.no_grad():
        with use_gates(rt, g):
            got = pipe.unet(sample, t, emb).sample
        want = torch.cat([dense_unet(reference.unet, spms, g[b], "linear")(sample[b:b + 1], t, emb[b:b + 1]).sample
                          for b in range(2)])
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


def test_bfloat16_after_compile_runs_and_remerges(spm_files):
    pipe = tiny_pipeline(0)
    rt = spm_rt.compile(pipe, spm_files[:2], strategy="merged")
    _gen(rt, PROMPTS[:1])
    layer = next(iter(rt.layers.values()))
    pipe.to(torch.bfloat16)
    w = layer.weight.detach().clone()
    for prompts in (PROMPTS[:1], PROMPTS[:2]):  # merged, grouped
        out = _gen(rt, prompts)
        assert np.isfinite(out).all()
    assert layer.spm_up.dtype == torch.bfloat16 and torch.equal(layer.weight, w)  # restored bit-exactly
    seen = []
    hook = layer.register_forward_pre_hook(lambda m, a: seen.append(m.weight.detach().clone()))
    _gen(rt, PROMPTS[:1])
    hook.remove()
    fresh = layer._merge(rt._state.row_gates[0].cpu())  # what the merge gives from the bf16 weight now
    assert seen and seen[0].dtype == torch.bfloat16 and torch.equal(seen[0], fresh)  # merged in place, in bf16
    assert not torch.equal(seen[0], w) and torch.equal(layer.weight, w)


def test_deepcopy_gives_an_independent_working_copy(spm_files):
    pipe = tiny_pipeline(0)
    rt = spm_rt.compile(pipe, spm_files[:2])
    before = _gen(rt, PROMPTS[:2], 4)
    pipe2 = copy.deepcopy(pipe)
    rt2 = pipe2._spm_rt
    assert rt2.pipe is pipe2 and rt2 is not rt
    assert all(l2 is not l1 for l1, l2 in zip(rt.layers.values(), rt2.layers.values()))
    np.testing.assert_array_equal(_gen(rt2, PROMPTS[:2], 4), before)
    rt2.set_spms(spm_files[1:3])
    assert not np.array_equal(_gen(rt2, PROMPTS[:2], 4), before)
    np.testing.assert_array_equal(_gen(rt, PROMPTS[:2], 4), before)  # the original is untouched
    rt2.remove()
    np.testing.assert_array_equal(_gen(rt, PROMPTS[:2], 4), before)


def test_state_dict_keys_and_tensors_unchanged_while_patched(spm_files):
    pipe = tiny_pipeline(0)
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    rt = spm_rt.compile(pipe, spm_files)
    _gen(rt, PROMPTS[:1])  # merged buffers exist now
    after = pipe.unet.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[k], before[k]) for k in before)
    # and a state dict loads back into the patched UNet (same keys)
    pipe.unet.load_state_dict(before)


def test_set_spms_waits_for_a_running_call(spm_files):
    rt = spm_rt.compile(tiny_pipeline(0), spm_files[:1], transport="fixed")
    want_old = _gen(rt, ["a red circle"], 7, steps=3)
    started = threading.Event()
    results = []

    def slow_step(pipe, i, t, kwargs):
        if i == 0:
            started.set()
            time.sleep(0.5)  # set_spms is called meanwhile from the main thread
        return kwargs

    th = threading.Thread(target=lambda: results.append(_gen(rt, ["a red circle"], 7, steps=3,
                                                             callback_on_step_end=slow_step)))
    th.start()
    assert started.wait(60)
    t0 = time.perf_counter()
    rt.set_spms(spm_files[1:2])
    waited = time.perf_counter() - t0
    th.join()
    np.testing.assert_array_equal(results[0], want_old)  # the running call kept the old SPMs throughout
    assert waited > 0.2  # set_spms blocked until the call ended
    fresh = spm_rt.compile(tiny_pipeline(0), spm_files[1:2], transport="fixed")
    np.testing.assert_array_equal(_gen(rt, ["a red circle"], 7, steps=3), _gen(fresh, ["a red circle"], 7, steps=3))


def test_k_max_overflow_reallocates_with_a_warning(spm_files):
    rt = spm_rt.compile(tiny_pipeline(0), spm_files[:1])
    assert rt.k_max == 1
    layer = next(iter(rt.layers.values()))
    ptr = layer.spm_down.data_ptr()
    with pytest.warns(UserWarning, match="compiled graphs will be rebuilt"):
        rt.set_spms(spm_files)
    assert rt.k_max == 3 and layer.spm_down.data_ptr() != ptr
    fresh = spm_rt.compile(tiny_pipeline(0), spm_files)
    np.testing.assert_allclose(_gen(rt, PROMPTS[:2]), _gen(fresh, PROMPTS[:2]), atol=1e-6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rt.set_spms(spm_files[:2])  # fits the 3 slots: in place, no warning
    assert rt.k_max == 3
    np.testing.assert_allclose(_gen(rt, PROMPTS[:2]), _gen(spm_rt.compile(tiny_pipeline(0), spm_files[:2]),
                                                            PROMPTS[:2]), atol=1e-6)


def test_merge_happens_once_per_call_not_per_step(spm_files):
    rt = spm_rt.compile(tiny_pipeline(0), spm_files)
    merges = []
    for layer in rt.layers.values():
        orig = layer._merge

        def counted(g, _orig=orig, **kwargs):
            merges.append(1)
            return _orig(g, **kwargs)

        layer._merge = counted
    n = len(rt.layers)
    for i, p in enumerate(PROMPTS[:3]):  # three distinct gate vectors, 4 steps each
        _gen(rt, [p], steps=4)
        assert len(merges) == (i + 1) * n
    # merged in place and restored after every call (no second device copy of the weights to keep
    # a merge in): the same gate vector again is one more merge per call, still none per step
    _gen(rt, [PROMPTS[2]], steps=4)
    assert len(merges) == 4 * n


def test_native_backend_is_refused_clearly_before_patching(spm_files, monkeypatch):
    pipe = tiny_pipeline(0)
    with pytest.raises(RuntimeError, match="backend='native' cannot run on cpu"):
        spm_rt.compile(pipe, spm_files, backend="native")
    assert not hasattr(pipe, "_spm_rt") and not any(getattr(m, "_spm_wrapper", False) for m in pipe.unet.modules())


def test_custom_ops_trace_without_a_graph_break():
    """The Triton ops' fake kernels let dynamo trace through them (no kernel runs while tracing);
    the native op likewise."""
    import spm_rt.kernels.ops as ops

    def fn(x, w, d, u, s, g):
        y, _ = ops.gated_linear_op(x, w, None, d, u, s, g, 3, "linear", 1, 1, False)
        return ops.gated_linear_native_op(y, w, None, d, u, s, g, 3, "linear", 1, 1) + 1

    args = (torch.randn(6, 8), torch.randn(8, 8), torch.randn(2, 8), torch.randn(8, 2), torch.ones(2),
            torch.rand(2, 2))
    gm = torch._dynamo.export(fn)(*args).graph_module  # raises on a graph break
    targets = [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]
    assert any("gated_linear.default" in t for t in targets)
    assert any("gated_linear_native.default" in t for t in targets)
