"""backend="triton" through a whole UNet on the CPU (Triton interpreter), against backend="torch".

Runs in a subprocess: TRITON_INTERPRET must be set before triton is first imported, and other
test modules may import it earlier in this process.
"""
import os
import textwrap

import pytest

from subproc import run_python

pytest.importorskip("triton")

SCRIPT = textwrap.dedent('''
    import os
    os.environ["TRITON_INTERPRET"] = "1"
    import torch, spm_rt
    from spm_rt import use_gates
    from spm_rt.kernels import gated_linear as kernels
    launches = []  # groups= of every linear kernel launch (through the spm_rt::gated_linear op)
    _launch = kernels._forward_2d
    def counted(ops, *args, **kwargs):  # ops: the GatedOperands record
        launches.append(ops.groups)
        return _launch(ops, *args, **kwargs)
    kernels._forward_2d = counted
    from spm_rt.testing import tiny_pipeline, random_spm
    torch.set_num_threads(1)
    pipe = tiny_pipeline(0, sample_size=8)
    spms = [random_spm(pipe.unet, c, seed=i) for i, c in enumerate(["a", "b", "c"])]
    g = torch.Generator().manual_seed(0)
    sample = torch.randn(2, 4, 8, 8, generator=g)
    emb = torch.randn(2, 77, 32, generator=g)
    gates = torch.tensor([[1.0, 0.5, 0.0], [0.2, 0.0, 0.9]])  # different per sample: the gated path
    for combine in ("linear", "official"):
        out = {}
        for backend in ("torch", "triton"):
            rt = spm_rt.compile(pipe, spms, backend=backend, transport="fixed", combine=combine)
            n_blocks = sum(1 for p in rt.layers if p.endswith(".attn1.to_q"))
            launches.clear()
            with torch.no_grad(), use_gates(rt, gates):
                out[backend] = pipe.unet(sample, 500, emb).sample
                if backend == "triton":
                    # attn1 q/k/v and attn2 k/v each in one grouped launch
                    assert launches.count(3) == n_blocks and launches.count(2) == n_blocks, launches
                    again = pipe.unet(sample, 400, emb).sample  # a second step of the same call
                    assert launches.count(2) == n_blocks, launches  # attn2 k/v kept, not relaunched
                    assert launches.count(3) == 2 * n_blocks, launches
            if backend == "triton":
                # the custom ops under torch.compile: one graph, no break, same numbers as eager
                from torch._dynamo.testing import CompileCounterWithBackend
                counter = CompileCounterWithBackend("aot_eager")
                compiled = torch.compile(pipe.unet, backend=counter, fullgraph=True)
                with torch.no_grad(), use_gates(rt, gates):
                    traced = compiled(sample, 500, emb).sample
                assert counter.frame_count == 1, counter.frame_count
                err_c = (traced - out["triton"]).abs().max().item()
                assert err_c < 1e-4, err_c
            rt.remove()
        with torch.no_grad():
            base = pipe.unet(sample, 500, emb).sample
        err = (out["torch"] - out["triton"]).abs().max().item()
        moved = (out["torch"] - base).abs().max().item()
        print(combine, err, moved)
        assert moved > 1e-3, moved
        assert err < 1e-4, err
    print("OK")
''')


def test_triton_backend_whole_unet_in_interpreter():
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = run_python(["-c", SCRIPT], env=env, timeout=900)
    assert res.returncode == 0 and "OK" in res.stdout, res.stdout[-2000:] + res.stderr[-3000:]
