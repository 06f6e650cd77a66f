"""Scale-out on one machine: a ``ray.cluster_utils.Cluster`` with a head and a second simulated
node (loopback only, 1 CPU each); two model replicas of 1 CPU each must land one per node, and
requests through the HTTP proxy are served by both."""
import concurrent.futures as cf
import os
import socket

import pytest

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # node addresses 127.0.0.1
ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")
requests = pytest.importorskip("requests")
from ray.cluster_utils import Cluster  # noqa: E402

APP = "spm_rt_cluster"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    cwd = os.getcwd()
    os.chdir(tmp_path_factory.mktemp("ray"))  # Ray puts the driver's cwd on workers' sys.path
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False,
                                                       "node_ip_address": "127.0.0.1"})
    try:
        c.add_node(num_cpus=1, node_ip_address="127.0.0.1")
        c.wait_for_nodes()
        ray.init(address=c.address, log_to_driver=False, configure_logging=False)
    finally:
        os.chdir(cwd)
    try:
        yield c
    finally:
        serve.shutdown()
        ray.shutdown()
        c.shutdown()


def test_replicas_on_both_nodes_serve_requests(cluster):
    from spm_rt.serve import app
    from spm_rt.world import shipped_spms

    assert len([n for n in ray.nodes() if n["Alive"]]) == 2
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port}, proxy_location="HeadOnly")
    serve.run(app("shapes", shipped_spms(), replicas=2, num_cpus=1, max_batch=4, batch_wait_ms=20),
              name=APP, route_prefix="/")
    handle = serve.get_deployment_handle("SPMModel", app_name=APP)
    infos = {}
    for _ in range(40):  # the router spreads calls: collect both replicas
        info = handle.info.remote().result(timeout_s=60)
        infos[info["pid"]] = info
        if len(infos) == 2:
            break
    assert len(infos) == 2
    assert len({i["node_id"] for i in infos.values()}) == 2  # one replica per node
    before = {pid: i["calls"] for pid, i in infos.items()}

    url = f"http://127.0.0.1:{port}/v1/generate"
    bodies = [{"prompt": f"a {c} circle", "seed": i, "steps": 2} for i, c in enumerate(["red", "blue"] * 4)]
    with cf.ThreadPoolExecutor(4) as pool:
        responses = list(pool.map(lambda b: requests.post(url, json=b, timeout=180), bodies))
    assert [r.status_code for r in responses] == [200] * len(bodies), [r.text for r in responses]
    after = {}
    for _ in range(40):
        info = handle.info.remote().result(timeout_s=60)
        after[info["pid"]] = info["calls"]
        if len(after) == 2:
            break
    assert set(after) == set(before)
    assert all(after[p] > before[p] for p in before), (before, after)  # both replicas generated
