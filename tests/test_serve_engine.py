"""spm_rt.serve without Ray: request parsing (4xx naming the field), policy floors, grouping, and
the engine's batched generation bit-identical to rt(...) alone (in a fresh process with the
replica's environment, since MKL_CBWR must be set before MKL loads)."""
import json
import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("pydantic")

from spm_rt.serve.api import APIError, Limits, parse_generate  # noqa: E402
from spm_rt.serve.engine import REPRODUCIBLE_ENV, Job, Params, group_jobs, resolve_gates  # noqa: E402
from spm_rt.serve.policy import KeyRejected, Policy, PolicyError  # noqa: E402

CONCEPTS = [["circle"], ["red"]]


def _err(body, limits=None, **kw) -> APIError:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    with pytest.raises(APIError) as info:
        parse_generate(raw, limits or Limits(), CONCEPTS, 32, **kw)
    return info.value


def test_parse_defaults_and_seeds():
    specs = parse_generate(b'{"prompt": ["a red circle", "a blue square"], "seed": 5}', Limits(), CONCEPTS, 32)
    assert [s["seed"] for s in specs] == [5, 6]  # prompt i gets seed + i, as spm-rt generate
    assert specs[0]["params"] == Params(20, 4.0, 32, 32)
    assert specs[0]["gates"] is None and specs[0]["erase"] == ()
    specs = parse_generate(b'{"prompt": "x", "gates": [0.5, 1], "erase": ["circle"], "size": [16, 24]}',
                           Limits(), CONCEPTS, 32)
    assert specs[0]["gates"] == [0.5, 1.0] and specs[0]["erase"] == (0,)
    assert (specs[0]["params"].height, specs[0]["params"].width) == (16, 24)


@pytest.mark.parametrize("body, status, field", [
    (b"{not json", 400, "body"),
    (b"[1, 2]", 400, "body"),
    ({"steps": 10}, 422, "prompt"),
    ({"prompt": 3}, 422, "prompt"),
    ({"prompt": ""}, 422, "prompt"),
    ({"prompt": ["ok", "  "]}, 422, "prompt[1]"),
    ({"prompt": "x" * 1001}, 422, "prompt"),
    ({"prompt": ["x"] * 9}, 422, "prompt"),
    ({"prompt": "x", "steps": "10"}, 422, "steps"),
    ({"prompt": "x", "steps": True}, 422, "steps"),
    ({"prompt": "x", "steps": 0}, 422, "steps"),
    ({"prompt": "x", "steps": 101}, 422, "steps"),
    ({"prompt": "x", "size": 2048}, 422, "size"),
    ({"prompt": "x", "size": 30}, 422, "size"),
    ({"prompt": "x", "guidance": -1}, 422, "guidance"),
    ({"prompt": "x", "seed": -1}, 422, "seed"),
    ({"prompt": "x", "gates": [1.0]}, 422, "gates"),
    ({"prompt": "x", "gates": [1.0, 1.5]}, 422, "gates[1]"),
    ({"prompt": "x", "gates": [1.0, "a"]}, 422, "gates[1]"),
    ({"prompt": ["x", "y"], "gates": [[1.0, 0.0]]}, 422, "gates"),
    ({"prompt": "x", "erase": ["snoopy"]}, 422, "erase[0]"),
    ({"prompt": "x", "negative": "y"}, 422, "negative"),
])
def test_bad_requests_name_the_field(body, status, field):
    e = _err(body)
    assert (e.status, e.field) == (status, field), e.message


def test_body_over_limit_is_413():
    e = _err({"prompt": "x" * 200}, Limits(max_body_bytes=100))
    assert (e.status, e.field) == (413, "body")


def test_nan_gates_rejected():
    e = _err(b'{"prompt": "x", "gates": [NaN, 0]}')
    assert (e.status, e.field) == (422, "gates[0]")


def test_policy_floor_per_key_and_file(tmp_path):
    p = Policy.from_dict({"floors": {"red": 1.0}, "keys": {"k1": {"floors": {"circle": 0.5}}}}, CONCEPTS)
    assert p.floor(None) == [0.0, 1.0]
    assert p.floor("k1") == [0.5, 1.0]  # the key's entry adds to the default floors
    assert p.floor("other") == [0.0, 1.0]
    strict = Policy.from_dict({"keys": {"k1": {}}, "require_key": True}, CONCEPTS)
    with pytest.raises(KeyRejected):
        strict.floor(None)
    with pytest.raises(KeyRejected):
        strict.floor("nope")
    f = tmp_path / "policy.yaml"
    f.write_text("floors:\n  circle: 0.25\n")
    assert Policy.load(f, CONCEPTS).floor(None) == [0.25, 0.0]
    for bad in ({"floors": {"snoopy": 1.0}}, {"floors": {"red": 2.0}}, {"floor": {}}, {"require_key": "yes"}):
        with pytest.raises(PolicyError):
            Policy.from_dict(bad, CONCEPTS)
    with pytest.raises(PolicyError, match="no such file"):
        Policy.load(tmp_path / "missing.yaml", CONCEPTS)


def test_resolve_gates_never_below_floor():
    p = Params(2, 4.0, 32, 32)
    floor = [0.0, 1.0]
    # the request asks for red off: the floor keeps it on
    assert resolve_gates(None, Job("x", 0, p, gates=[0.3, 0.0], floor=floor), 2) == [0.3, 1.0]
    # Facilitated Transport's gates, erase adds circle
    assert resolve_gates([0.2, 0.4], Job("x", 0, p, erase=(0,), floor=floor), 2) == [1.0, 1.0]
    assert resolve_gates([0.2, 0.4], Job("x", 0, p), 2) == [0.2, 0.4]


def test_group_jobs_by_params_and_cap():
    a, b = Params(20, 4.0, 32, 32), Params(20, 7.5, 32, 32)
    jobs = [Job(str(i), i, a if i % 3 else b) for i in range(10)]
    groups = group_jobs(jobs, max_images=4)
    assert sorted(i for g in groups for i in g) == list(range(10))
    assert all(len({jobs[i].params for i in g}) == 1 and len(g) <= 4 for g in groups)
    assert len(groups) == 3  # 6 jobs of a in 4 + 2, 4 jobs of b in one call


def test_a_failing_group_does_not_fail_the_others(monkeypatch):
    from spm_rt.serve.engine import Engine, Failure

    engine = Engine(rt=None)
    good, bad = Params(20, 4.0, 32, 32), Params(13, 4.0, 32, 32)

    def generate(jobs, params):
        if params == bad:
            raise ValueError("boom")
        return [f"image of {j.prompt}" for j in jobs]

    monkeypatch.setattr(engine, "_generate", generate)
    monkeypatch.setattr(engine, "max_images_per_call", lambda params: None)
    out = engine.run([Job("a", 0, good), Job("b", 0, bad), Job("c", 0, good)])
    assert out[0] == "image of a" and out[2] == "image of c"
    assert isinstance(out[1], Failure) and "boom" in out[1].message


_IDENTITY = textwrap.dedent("""
    import json, sys, torch
    from spm_rt.serve.engine import Engine, Job, Params
    from spm_rt.world import shipped_spms
    torch.set_num_threads(1)
    engine = Engine.load("shapes", shipped_spms(), threads=1)
    p, q = Params(2, 4.0, 32, 32), Params(3, 4.0, 32, 32)
    prompts = ["a red circle", "a blue square", "a green triangle", "a red square", "a yellow circle"]
    jobs = [Job(prompts[0], 11, p), Job(prompts[1], 12, p, gates=[0.0, 0.0]), Job(prompts[2], 13, q),
            Job(prompts[3], 14, p, erase=(0,)), Job(prompts[4], 15, p, gates=[0.3, 0.9], floor=[0.5, 0.0])]
    served = engine.run(jobs, max_images=8)
    out = {"calls": engine.calls, "sizes": engine.batch_sizes, "identical": [], "gates": []}
    for job, r in zip(jobs, served):
        g = None if (job.gates is None and not job.erase and job.floor is None) else [r.gates]
        alone = engine.rt(job.prompt, gates=g, generator=torch.Generator().manual_seed(job.seed), output_type="np",
                          num_inference_steps=job.params.steps, guidance_scale=job.params.guidance).images[0]
        alone = (alone * 255).round().clip(0, 255).astype("uint8")
        out["identical"].append(bool((alone == r.image).all()))
        out["gates"].append(r.gates)
    out["ft"] = engine.rt.gates(prompts[0]).tolist()[0]
    print("RESULT " + json.dumps(out))
""")


def test_batched_generation_bit_identical_to_rt_alone():
    """Mixed erasure in one call (FT gates, explicit gates, erase, a floor) and a second parameter
    group: every image equals rt(...) run alone with its gates and seed, bit for bit."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", **REPRODUCIBLE_ENV)
    proc = subprocess.run([sys.executable, "-P", "-c", _IDENTITY], capture_output=True, text=True, env=env,
                          timeout=600, cwd=os.path.dirname(__file__))
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and line, proc.stderr[-3000:]
    out = json.loads(line[0][7:])
    assert out["calls"] == 2 and sorted(out["sizes"]) == [1, 4]  # one gated call per parameter group
    assert out["identical"] == [True] * 5
    gates = out["gates"]
    assert gates[0] == out["ft"]  # Facilitated Transport, computed in the batch, as rt alone computes it
    assert gates[1] == [0.0, 0.0] and gates[3][0] == 1.0 and gates[4] == [0.5, 0.9]


@pytest.mark.parametrize("argv, message", [
    (["--max-batch", "0"], "--max-batch 0"),
    (["--spm", "missing.safetensors"], "--spm missing.safetensors: no such file"),
    (["--policy", "missing.yaml"], "--policy missing.yaml: no such file"),
    (["--model", "no/such/dir"], "--model"),
])
def test_serve_cli_user_errors_before_ray_starts(argv, message, capsys):
    from spm_rt.cli import main
    from spm_rt.world import shipped_spms

    spm = [] if "--spm" in argv else ["--spm", str(shipped_spms()[1])]
    assert main(["serve", *spm, *argv]) == 2
    assert message in capsys.readouterr().err
