"""Fail closed, one call at a time, memory and config: every path through a patched UNet erases
(issue 21). Each test here failed on the code before the fix it names."""
import threading
import time

import numpy as np
import pytest
import torch
from torch import nn

import spm_rt
from spm_rt import NestedCallError, gates_off, use_gates
from spm_rt.gating import GateState
from spm_rt.testing import random_spm, tiny_pipeline
from test_runtime import unet_inputs


def _gen(target, prompts, seed=0, steps=2, **kw):
    gens = [torch.Generator().manual_seed(seed + i) for i in range(len(prompts) * kw.get("num_images_per_prompt", 1))]
    return target(prompts, generator=gens, num_inference_steps=steps, output_type="np", **kw).images


# -- fail closed --------------------------------------------------------------------------------
def test_direct_pipe_call_gets_the_gates_rt_would_give(spm_files):
    pipe = tiny_pipeline(0)
    base = _gen(pipe, ["a red circle", "a blue square"])
    rt = spm_rt.compile(pipe, spm_files)
    for prompts, kw in ((["a red circle", "a blue square"], {}),  # distinct gates: gated rows per prompt
                        (["a red circle"], {"num_images_per_prompt": 2}),
                        (["a green triangle"], {"guidance_scale": 1.0})):  # no CFG: [cond] rows only
        want = _gen(rt, prompts, **kw)
        got = _gen(pipe, prompts, **kw)  # the patched pipeline called directly
        np.testing.assert_array_equal(got, want)
    assert np.abs(_gen(pipe, ["a red circle", "a blue square"]) - base).max() > 1e-3  # it erases
    assert "encode_prompt" in pipe.__dict__ and "encode_prompt" not in type(pipe).__dict__.get("__dict__", {})
    rt.remove()
    assert "encode_prompt" not in pipe.__dict__  # the instance hook is gone
    np.testing.assert_array_equal(_gen(pipe, ["a red circle", "a blue square"]), base)


def test_direct_call_on_a_deep_copy_uses_the_copys_own_spms(spm_files):
    import copy

    pipe = tiny_pipeline(0)
    spm_rt.compile(pipe, spm_files[:1])
    pipe2 = copy.deepcopy(pipe)
    rt2 = pipe2._spm_rt
    rt2.set_spms(spm_files[1:2])
    with torch.no_grad():
        next(pipe2.text_encoder.parameters()).mul_(1.5)  # the copy encodes differently now
    np.testing.assert_array_equal(_gen(pipe2, ["a red circle"]), _gen(rt2, ["a red circle"]))
    assert pipe2.encode_prompt.__self__ is pipe2


def test_bare_unet_outside_a_call_runs_with_every_membrane_open(pipe, spm_files):
    sample, t, emb = unet_inputs(pipe, 2)
    with torch.no_grad():
        base = pipe.unet(sample, t, emb).sample
        rt = spm_rt.compile(pipe, spm_files, transport="fixed")
        bare = pipe.unet(sample, t, emb).sample
        with use_gates(rt, [1.0, 1.0, 1.0]):
            ones = pipe.unet(sample, t, emb).sample
        with gates_off(rt):
            off = pipe.unet(sample, t, emb).sample
    assert (bare - base).abs().max() > 1e-2  # not the base model ...
    torch.testing.assert_close(bare, ones, rtol=1e-5, atol=1e-5)  # ... but gates 1
    assert torch.equal(off, base)  # unerased only when asked: gates_off is the base, bit for bit


def test_direct_call_with_embeddings_only_opens_every_membrane(spm_files):
    pipe = tiny_pipeline(0)
    rt = spm_rt.compile(pipe, spm_files)
    with rt._state.passthrough():  # embeddings no direct call encoded (a direct encode_prompt would remember them)
        emb = pipe.encode_prompt(["a blue square"], "cpu", 1, False)[0]
    got = pipe(prompt_embeds=emb, guidance_scale=1.0, num_inference_steps=2, output_type="np",
               generator=[torch.Generator().manual_seed(0)]).images
    want = rt(prompt_embeds=emb, gates=[1.0, 1.0, 1.0], guidance_scale=1.0, num_inference_steps=2, output_type="np",
              generator=[torch.Generator().manual_seed(0)]).images
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_another_thread_never_reads_a_running_calls_gates(pipe, spm_files):
    rt = spm_rt.compile(pipe, spm_files[:1], transport="fixed")
    sample, t, emb = unet_inputs(pipe, 2)
    with torch.no_grad():
        ones = pipe.unet(sample, t, emb).sample  # outside any call: gates 1
        with use_gates(rt, [0.3]):
            partial = pipe.unet(sample, t, emb).sample
    assert (ones - partial).abs().max() > 1e-3
    inside, other, done_at = threading.Event(), [], []

    def slow_step(p, i, ts, kwargs):
        if i == 0:
            inside.set()
            time.sleep(0.5)
        return kwargs

    th = threading.Thread(target=lambda: (_gen(rt, ["x"], steps=2, gates=[0.3], callback_on_step_end=slow_step),
                                          done_at.append(time.perf_counter())))
    th.start()
    assert inside.wait(60)
    with torch.no_grad():
        other.append(pipe.unet(sample, t, emb).sample)  # during the call, from this thread
    finished = time.perf_counter()
    th.join()
    torch.testing.assert_close(other[0], ones, rtol=1e-5, atol=1e-5)  # its own (open) gates, not 0.3
    assert finished >= done_at[0]  # it waited for the running call


def test_compiled_unet_bare_call_and_direct_call_erase(spm_files):
    torch._dynamo.reset()
    pipe = tiny_pipeline(0)
    rt = spm_rt.compile(pipe, spm_files)
    want = _gen(rt, ["a red circle", "a blue square"])
    sample, t, emb = unet_inputs(pipe, 2)
    with torch.no_grad():
        with use_gates(rt, [1.0, 1.0, 1.0]):
            ones = pipe.unet(sample, t, emb).sample
    rt.compile_unet(backend="aot_eager")
    with torch.no_grad():
        torch.testing.assert_close(pipe.unet(sample, t, emb).sample, ones, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(_gen(pipe, ["a red circle", "a blue square"]), want, atol=1e-4)
    torch._dynamo.reset()


# -- nesting ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("inner", ["rt", "use_gates", "set_spms", "set_spms_past_k_max", "remove"])
def test_nested_calls_are_refused_and_leave_a_clean_state(spm_files, inner):
    pipe = tiny_pipeline(0)
    rt = spm_rt.compile(pipe, spm_files[:1], transport="fixed")
    want = _gen(rt, ["a red circle"], gates=[0.7])

    def step(p, i, ts, kwargs):
        if inner == "rt":
            rt(["x"], num_inference_steps=1, output_type="np")
        elif inner == "use_gates":
            with use_gates(rt, [0.1]):
                pass
        elif inner == "set_spms":
            rt.set_spms(spm_files[1:2])
        elif inner == "set_spms_past_k_max":
            rt.set_spms(spm_files)
        else:
            rt.remove()
        return kwargs

    with pytest.raises(NestedCallError, match="inside a running spm_rt call"):
        _gen(rt, ["a red circle"], gates=[0.7], callback_on_step_end=step)
    state = rt._state
    assert state.owner is None and state.mode == "gated" and bool((state.row_gates == 1).all())  # open, idle
    assert rt.k_max == 1 and rt.layers
    np.testing.assert_array_equal(_gen(rt, ["a red circle"], gates=[0.7]), want)  # nothing changed


def test_nested_use_gates_is_refused():
    pipe = tiny_pipeline(0)
    rt = spm_rt.compile(pipe, [random_spm(pipe.unet, "a")], transport="fixed")
    with use_gates(rt, [0.5]):
        with pytest.raises(NestedCallError):
            with use_gates(rt, [1.0]):
                pass
        assert rt._state.mode == "merged"  # the outer call's state is intact


# -- all or nothing ---------------------------------------------------------------------------------
def test_set_spms_is_all_or_nothing_on_an_out_of_memory(spm_files, monkeypatch):
    import sys

    compile_module = sys.modules["spm_rt.compile"]  # (spm_rt.compile is also the function)

    rt = spm_rt.compile(tiny_pipeline(0), spm_files[:1], k_max=3)
    before = _gen(rt, ["a red circle"])
    buffers = {p: (layer.spm_down.clone(), layer.spm_scale.clone()) for p, layer in rt.layers.items()}
    calls = []

    def oom(layers):
        calls.append(1)
        raise torch.OutOfMemoryError("simulated out of memory while measuring the new SPMs")

    monkeypatch.setattr(compile_module, "precision_report", oom)
    with pytest.raises(torch.OutOfMemoryError):
        rt.set_spms(spm_files[1:])
    monkeypatch.undo()
    assert calls and len(rt.spms) == 1
    assert all(torch.equal(layer.spm_down, buffers[p][0]) and torch.equal(layer.spm_scale, buffers[p][1])
               for p, layer in rt.layers.items())
    np.testing.assert_array_equal(_gen(rt, ["a red circle"]), before)


# -- row buffer, graphs, config -------------------------------------------------------------------------
def test_row_buffer_is_allocated_once_and_a_bigger_batch_is_refused(spm_files):
    rt = spm_rt.compile(tiny_pipeline(0), spm_files[:1], transport="fixed", max_batch_rows=8)
    ptr = rt._state.row_gates.data_ptr()
    for n in (1, 2, 4):  # up to 4 prompts = 8 rows with CFG
        _gen(rt, ["x"] * n, steps=1)
        assert rt._state.row_gates.data_ptr() == ptr
    with pytest.raises(ValueError, match="max_batch_rows=8"):
        _gen(rt, ["x"] * 5, steps=1)
    assert rt._state.row_gates.data_ptr() == ptr and rt._state.owner is None


def test_batch_not_matching_the_gates_is_refused_before_a_compiled_graph(spm_files):
    torch._dynamo.reset()
    pipe = tiny_pipeline(0)
    rt = spm_rt.compile(pipe, spm_files[:1], transport="fixed").compile_unet(backend="aot_eager")
    sample, t, emb = unet_inputs(pipe, 3)
    with torch.no_grad(), use_gates(rt, [[0.2], [0.9]]):  # 2 prompt-images: 3 rows cannot map
        with pytest.raises(ValueError, match="does not map onto the call's gates"):
            pipe.unet(sample, t, emb)
    torch._dynamo.reset()


def test_one_graph_for_gated_and_grouped_and_few_over_batch_sizes(spm_files):
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    pipe = tiny_pipeline(0)
    rt = spm_rt.compile(pipe, spm_files[:2], transport="fixed", strategy="merged")
    counter = CompileCounterWithBackend("aot_eager")
    rt.compile_unet(backend=counter)
    mixed = [[1.0, 0.0], [0.3, 0.7]]
    _gen(rt, ["a", "b"], gates=mixed)  # grouped (strategy merged, rows differ): the gated graph
    frames = counter.frame_count
    rt.config.strategy = "gated"
    _gen(rt, ["a", "b"], gates=mixed)  # gated: the same graph
    assert counter.frame_count == frames
    for n in (1, 3, 4):  # more batch sizes on the gated graph: dynamo goes dynamic after the second
        _gen(rt, ["a"] * n, gates=[[0.2, 0.5]] * (n - 1) + [[0.9, 0.1]])
    assert counter.frame_count <= frames + 2, counter.frame_count
    torch._dynamo.reset()


def test_config_changes_take_effect(spm_files):
    rt = spm_rt.compile(tiny_pipeline(0), spm_files, transport="fixed")
    _gen(rt, ["x"], gates=[0.5, 0.5, 0.5])
    assert rt._state.last_mode == "merged"
    rt.config.strategy = "gated"  # the one config object: the layers and the gate state read it
    _gen(rt, ["x"], gates=[0.5, 0.5, 0.5])
    assert rt._state.last_mode == "gated"
    assert rt.layer_config is rt.config and all(layer.config is rt.config for layer in rt.layers.values())


def test_gate_state_is_not_a_child_module_of_every_layer(spm_files):
    pipe = tiny_pipeline(0)
    rt = spm_rt.compile(pipe, spm_files)
    assert not any(isinstance(m, GateState) for m in pipe.unet.modules())
    assert "GateState" not in repr(pipe.unet)
    pipe.unet.to(torch.float64)
    assert rt._state.row_gates.dtype == torch.float32


# -- memory -----------------------------------------------------------------------------------------
def test_merged_call_keeps_no_second_device_copy_and_restores_bit_exactly(spm_files):
    pipe = tiny_pipeline(0)
    rt = spm_rt.compile(pipe, spm_files, transport="fixed")
    weights = {p: (layer.weight.data_ptr(), layer.weight.detach().clone()) for p, layer in rt.layers.items()}
    seen = {}

    def look(m, args):
        seen[m.path] = m.weight.detach().clone()

    hooks = [layer.register_forward_pre_hook(look) for layer in rt.layers.values()]
    _gen(rt, ["x"], gates=[0.5, 0.5, 0.5])
    for h in hooks:
        h.remove()
    assert rt._state.last_mode == "merged"
    for p, layer in rt.layers.items():
        ptr, w = weights[p]
        assert layer.weight.data_ptr() == ptr and torch.equal(layer.weight, w)  # same storage, pristine again
        assert not torch.equal(seen[p], w)  # the call ran on the merged weight, in that storage
        assert layer._pristine.device.type == "cpu"  # the restore source lives in host memory
        device_tensors = [t for t in list(layer.parameters()) + list(layer.buffers())]
        assert sum(t.numel() for t in device_tensors if t.shape == w.shape) == w.numel()  # no merged copy


def test_grouped_path_does_not_sync_per_layer(spm_files, monkeypatch):
    rt = spm_rt.compile(tiny_pipeline(0), spm_files[:2], transport="fixed", strategy="merged")
    inside, calls = [False], []
    for name in ("nonzero", "item", "tolist", "cpu"):  # host syncs on a GPU tensor
        orig = getattr(torch.Tensor, name)

        def counted(self, *a, _orig=orig, _name=name, **k):
            if inside[0]:
                calls.append(_name)
            return _orig(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, counted)
    steps = []
    for layer in rt.layers.values():
        layer.register_forward_pre_hook(lambda m, a: inside.__setitem__(0, True))
        layer.register_forward_hook(lambda m, a, o: inside.__setitem__(0, False))
    first = next(iter(rt.layers.values()))
    first.register_forward_pre_hook(lambda m, a: steps.append(len(calls)))
    want = _gen(spm_rt.compile(tiny_pipeline(0), spm_files[:2], transport="fixed", strategy="gated"), ["a", "b"],
                gates=[[1.0, 0.0], [0.3, 0.7]], steps=3)
    got = _gen(rt, ["a", "b"], gates=[[1.0, 0.0], [0.3, 0.7]], steps=3)
    monkeypatch.undo()
    assert rt._state.last_mode == "grouped"
    assert len(steps) == 3 and not calls, calls[:10]  # no host sync inside any adapted layer at any step
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_auto_judges_merge_loss_at_the_smallest_gate():
    from spm_rt.config import SPMConfig
    from spm_rt.kernels.reference import merged_update_error
    from spm_rt.layers import SPMLinear
    from spm_rt.precision import MERGE_ERROR_MAX
    from spm_rt.stack import Stack

    gen = torch.Generator().manual_seed(0)
    base = nn.Linear(640, 640).to(torch.bfloat16)
    with torch.no_grad():
        base.weight.copy_(torch.randn(640, 640, generator=gen) / 640**0.5)
    # a rank-1 update whose bf16 merge loses ~2-3% at gate 1
    scale = None
    for s in (0.05, 0.1, 0.2, 0.4, 0.8):
        down = (torch.randn(1, 640, generator=gen) * s).bfloat16()
        up = (torch.randn(640, 1, generator=gen) * s).bfloat16()
        e1 = merged_update_error(base.weight, down, up, torch.ones(1), torch.ones(1))
        if e1 < MERGE_ERROR_MAX * 0.6:
            scale = s
            break
    assert scale is not None
    e03 = merged_update_error(base.weight, down, up, torch.ones(1), torch.tensor([0.3]))
    assert e03 > MERGE_ERROR_MAX  # the real loss at gate 0.3 is over the limit
    config = SPMConfig(strategy="auto", backend="torch")
    state = GateState(1)
    state.config = config
    layer = SPMLinear(base, Stack(down, up, torch.ones(1), 1), config, state, "probe")
    state.layers = {"probe": layer}
    state.begin(torch.ones(1, 1))
    assert not layer.merge_gated  # merges at gate 1
    state.end()
    state.begin(torch.tensor([[0.3]]))
    assert layer.merge_gated  # judged at 0.3: runs gated
    state.end()
