"""spm_rt.serve on a real local Ray Serve (num_cpus=2, loopback only, no dashboard), one Ray
instance and one deployed app for the whole module: batching into one rt call, identity with rt
alone, the policy floor, bad input over HTTP, and a replica killed under load."""
import base64
import concurrent.futures as cf
import io
import os
import signal
import socket
import time

import numpy as np
import pytest

# Ray's node addresses become 127.0.0.1 (set before ray is imported): loopback traffic only
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")
requests = pytest.importorskip("requests")

STEPS = 3  # short generations: the tests check plumbing and identity, not image quality
APP = "spm_rt_test"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_local_ray(tmp_dir, **kw):
    """Ray on loopback with 2 CPUs. Ray puts the driver's working directory on its workers'
    sys.path: started from a scratch directory, the repository's top-level folders (kernels/)
    cannot shadow installed packages in the replicas."""
    cwd = os.getcwd()
    os.chdir(tmp_dir)
    try:
        ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False,
                 configure_logging=False, **kw)
    finally:
        os.chdir(cwd)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from spm_rt.serve import app
    from spm_rt.world import shipped_spms

    start_local_ray(tmp_path_factory.mktemp("ray"))
    port = _free_port()
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        policy = {"keys": {"strict-key": {"floors": {"red": 1.0}}}}
        serve.run(app("shapes", shipped_spms(), max_batch=6, batch_wait_ms=400, policy=policy,
                      limits={"request_timeout_s": 120.0}), name=APP, route_prefix="/")
        url = f"http://127.0.0.1:{port}"
        yield url
    finally:
        serve.shutdown()
        ray.shutdown()


def _info():
    return serve.get_deployment_handle("SPMModel", app_name=APP).info.remote().result(timeout_s=60)


def _post(url, body, timeout=180, **kw):
    return requests.post(f"{url}/v1/generate", json=body, timeout=timeout, **kw)


def _png(b64: str) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))


def test_healthz_and_concepts(server):
    assert requests.get(f"{server}/healthz", timeout=60).json()["status"] == "ok"
    c = requests.get(f"{server}/v1/concepts", timeout=60).json()
    assert c["gate_order"] == ["circle", "red"]
    assert c["limits"]["max_images"] == 8


MIXED = [  # four erasure settings that must share one UNet call, and one other parameter group
    {"prompt": "a red circle", "seed": 3, "steps": STEPS},  # Facilitated Transport
    {"prompt": "a blue square", "seed": 4, "steps": STEPS, "gates": [0.0, 0.0]},  # nothing erased
    {"prompt": "a green circle", "seed": 5, "steps": STEPS, "erase": ["red"]},
    {"prompt": "a red triangle", "seed": 6, "steps": STEPS, "gates": [0.25, 0.75]},
    {"prompt": "a yellow circle", "seed": 7, "steps": STEPS + 1},  # other steps: its own call
]


@pytest.fixture(scope="module")
def mixed(server):
    before = _info()["calls"]
    with cf.ThreadPoolExecutor(len(MIXED)) as pool:
        responses = list(pool.map(lambda b: _post(server, b), MIXED))
    return before, _info()["calls"], responses


def test_batching_groups_requests_into_one_rt_call(mixed):
    before, after, responses = mixed
    assert [r.status_code for r in responses] == [200] * len(MIXED), [r.text for r in responses]
    sizes = [r.json()["images"][0]["timings"]["batch_size"] for r in responses]
    assert sizes == [4, 4, 4, 4, 1]  # the four differently-gated requests shared one call
    assert after - before == 2  # one gated rt call per parameter group
    gates = [r.json()["images"][0]["gates_list"] for r in responses]
    assert gates[1] == [0.0, 0.0] and gates[2][1] == 1.0 and gates[3] == [0.25, 0.75]
    assert all(r.json()["images"][0]["timings"]["queue_s"] >= 0 for r in responses)


def test_served_images_bit_identical_to_rt_alone(mixed):
    """The reference runs rt(...) alone in a fresh Ray worker with the replica's environment."""
    from spm_rt.serve.engine import REPRODUCIBLE_ENV

    _, _, responses = mixed

    @ray.remote(num_cpus=0, runtime_env={"env_vars": dict(REPRODUCIBLE_ENV)})
    def alone(cases):
        import torch

        import spm_rt
        from spm_rt.models import load_pipeline
        from spm_rt.world import shipped_spms

        torch.set_num_threads(1)
        pipe = load_pipeline("shapes")
        rt = spm_rt.compile(pipe, shipped_spms(), strategy="gated")
        out = []
        for prompt, seed, steps, gates in cases:
            im = rt(prompt, gates=gates, generator=torch.Generator().manual_seed(seed), num_inference_steps=steps,
                    guidance_scale=4.0, output_type="np").images[0]
            out.append((im * 255).round().clip(0, 255).astype(np.uint8))
        return out

    cases = []
    for body, r in zip(MIXED, responses):
        used = r.json()["images"][0]["gates_list"]
        ft = "gates" not in body and "erase" not in body
        cases.append((body["prompt"], body["seed"], body["steps"], None if ft else used))
    refs = ray.get(alone.remote(cases), timeout=300)
    for body, r, ref in zip(MIXED, responses, refs):
        assert np.array_equal(_png(r.json()["images"][0]["png_base64"]), ref), body


def test_policy_floor_cannot_be_lowered(server):
    body = {"prompt": ["a red circle", "a red square"], "seed": 1, "steps": STEPS, "gates": [[0.0, 0.0], [1.0, 0.2]]}
    r = _post(server, body, headers={"X-API-Key": "strict-key"})
    assert r.status_code == 200, r.text
    assert [im["gates_list"] for im in r.json()["images"]] == [[0.0, 1.0], [1.0, 1.0]]  # red floored at 1
    assert r.json()["floor"] == {"circle": 0.0, "red": 1.0}
    r = _post(server, dict(body, erase=["circle"]), headers={"Authorization": "Bearer strict-key"})
    assert [im["gates_list"] for im in r.json()["images"]] == [[1.0, 1.0], [1.0, 1.0]]  # raising is allowed
    r = _post(server, body)  # no key: no floor
    assert [im["gates_list"] for im in r.json()["images"]] == [[0.0, 0.0], [1.0, 0.2]]


@pytest.mark.parametrize("data, status, field", [
    (b"{oops", 400, "body"),
    (b'{"prompt": ""}', 422, "prompt"),
    (b'{"prompt": "x", "steps": "many"}', 422, "steps"),
    (b'{"prompt": "x", "steps": 1000}', 422, "steps"),
    (b'{"prompt": "x", "size": 4096}', 422, "size"),
    (b'{"prompt": ["x","x","x","x","x","x","x","x","x"]}', 422, "prompt"),
    (b'{"prompt": "x", "erase": ["snoopy"]}', 422, "erase[0]"),
    (b'{"prompt": "x", "gates": [0.5]}', 422, "gates"),
    (b'{"prompt": "x", "gates": [0.5, -0.1]}', 422, "gates[1]"),
    (b'{"prompt": "' + b"x" * 70000 + b'"}', 413, "body"),
])
def test_bad_input_is_4xx_naming_the_field(server, data, status, field):
    r = requests.post(f"{server}/v1/generate", data=data, headers={"Content-Type": "application/json"}, timeout=60)
    assert r.status_code == status, r.text
    assert r.json()["error"]["field"] == field


def test_replica_keeps_serving_after_bad_input(server):
    r = _post(server, {"prompt": "a blue circle", "steps": STEPS})
    assert r.status_code == 200 and len(r.json()["images"]) == 1


def test_replica_killed_under_load_loses_no_request(server):
    """12 requests from 4 clients; the model replica's process is killed mid-load. Every request
    gets its image (200) or an explicit 5xx within the timeout: none hangs, none is dropped."""
    pid = _info()["pid"]
    n_clients, per_client, timeout = 4, 3, 150
    outcomes = []

    def client(c):
        mine = []
        for i in range(per_client):
            try:
                r = _post(server, {"prompt": "a green square", "seed": 10 * c + i, "steps": STEPS}, timeout=timeout)
                ok = r.status_code == 200 and len(r.json()["images"]) == 1
                explicit = r.status_code >= 500 and "error" in r.json()
                mine.append("ok" if ok else "5xx" if explicit else f"other {r.status_code}")
            except requests.RequestException as exc:
                mine.append(f"lost {type(exc).__name__}")
        return mine

    with cf.ThreadPoolExecutor(n_clients) as pool:
        futures = [pool.submit(client, c) for c in range(n_clients)]
        time.sleep(1.5)  # requests are queued / running on the replica
        os.kill(pid, signal.SIGKILL)
        for f in futures:
            outcomes.extend(f.result(timeout=timeout * per_client + 30))
    assert len(outcomes) == n_clients * per_client
    assert all(o in ("ok", "5xx") for o in outcomes), outcomes
    # Ray Serve restarts the replica: the service answers again
    deadline = time.time() + 120
    while time.time() < deadline:
        if requests.get(f"{server}/healthz", timeout=30).status_code == 200:
            break
        time.sleep(1)
    assert _info()["pid"] != pid
    assert _post(server, {"prompt": "a red circle", "steps": STEPS}).status_code == 200
