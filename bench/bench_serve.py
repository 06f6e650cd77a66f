"""Load bench of ``spm_rt.serve`` on the shapes world (loopback only, bounded, stops by itself).

One local Ray (``num_cpus=2``, no dashboard) runs two apps side by side: batching on
(``max_batch`` 8) and off (``max_batch`` 1), one model replica each (1 torch thread). Closed-loop
HTTP clients (1 / 4 / 8 / 16) each send requests back to back; every cell runs uniform erasure
(every request the same gates) and mixed erasure (five different gate settings in rotation,
Facilitated Transport among them), the four (batching x erasure) cells of a client count
alternating in order round after round. Reported: images/s and client-side p50 / p95 / p99
latency per cell, then a fault phase (a replica process killed under load: every request must end
in its images or an explicit 5xx; "lost" counts timeouts and dropped connections).

    python -P bench/bench_serve.py                     # ~10 min on 2 shared cores
    python -P bench/bench_serve.py --quick             # 1 and 8 clients, fewer requests

Writes ``bench/results/serve/serve.{json,md,png}`` (``--out`` changes the folder). Run it with
``python -P`` (or from outside the repository) while issue 19's ``kernels/`` shadowing is open.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import platform
import signal
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

MIXED = [{"gates": [0.0, 0.0]}, {"gates": [1.0, 0.0]}, {"gates": [0.0, 1.0]}, {"erase": ["circle", "red"]}, {}]
UNIFORM = {"gates": [1.0, 1.0]}
PROMPTS = ["a red circle", "a blue square", "a green triangle", "a yellow circle", "a red square"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _percentile(xs, q):
    import numpy as np

    return float(np.percentile(xs, q)) if xs else float("nan")


def run_cell(url: str, clients: int, requests_per_client: int, mixed: bool, steps: int, timeout: float,
             seed0: int) -> dict:
    """Closed loop: ``clients`` threads, each sending ``requests_per_client`` requests in turn."""
    import requests

    lat, statuses, lock = [], [], threading.Lock()

    def client(c):
        session = requests.Session()
        for i in range(requests_per_client):
            n = c * requests_per_client + i
            body = {"prompt": PROMPTS[n % len(PROMPTS)], "seed": seed0 + n, "steps": steps}
            body.update(MIXED[n % len(MIXED)] if mixed else UNIFORM)
            t = time.perf_counter()
            try:
                r = session.post(url, json=body, timeout=timeout)
                status = r.status_code
            except requests.RequestException:
                status = "lost"
            with lock:
                lat.append(time.perf_counter() - t)
                statuses.append(status)

    t0 = time.perf_counter()
    with cf.ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    wall = time.perf_counter() - t0
    ok = sum(s == 200 for s in statuses)
    return {"clients": clients, "mixed": mixed, "requests": len(statuses), "ok": ok, "wall_s": wall,
            "images_per_s": ok / wall, "p50_s": _percentile(lat, 50), "p95_s": _percentile(lat, 95),
            "p99_s": _percentile(lat, 99), "latencies_s": lat}


def kill_phase(url: str, info, clients: int, per_client: int, steps: int, timeout: float) -> dict:
    """Kill the batching app's model replica 2 s into a bounded load; count how requests ended."""
    import requests

    outcomes, lock = [], threading.Lock()

    def client(c):
        for i in range(per_client):
            body = {"prompt": PROMPTS[i % len(PROMPTS)], "seed": 1000 + 10 * c + i, "steps": steps}
            try:
                r = requests.post(url, json=body, timeout=timeout)
                ok = r.status_code == 200 and len(r.json().get("images", [])) == 1
                o = "ok" if ok else ("5xx" if r.status_code >= 500 and "error" in r.json() else f"other {r.status_code}")
            except requests.RequestException as exc:
                o = f"lost ({type(exc).__name__})"
            with lock:
                outcomes.append(o)

    pid = info()["pid"]
    with cf.ThreadPoolExecutor(clients) as pool:
        futures = [pool.submit(client, c) for c in range(clients)]
        time.sleep(2.0)
        os.kill(pid, signal.SIGKILL)
        for f in futures:
            f.result()
    return {"clients": clients, "requests": clients * per_client, "ok": outcomes.count("ok"),
            "5xx": outcomes.count("5xx"), "lost": sum(o.startswith("lost") for o in outcomes),
            "other": sum(o.startswith("other") for o in outcomes), "killed_pid": pid}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 4, 8, 16])
    ap.add_argument("--rounds", type=int, default=2, help="alternating rounds of the four cells per client count")
    ap.add_argument("--steps", type=int, default=10, help="denoising steps per image (default 10)")
    ap.add_argument("--batch-wait-ms", type=float, default=20.0)
    ap.add_argument("--timeout", type=float, default=300.0, help="client timeout per request (s)")
    ap.add_argument("--budget", type=float, default=900.0, help="stop starting new cells after this many seconds")
    ap.add_argument("--quick", action="store_true", help="1 and 8 clients, one round")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "serve"))
    args = ap.parse_args(argv)
    if args.quick:
        args.clients, args.rounds = [1, 8], 1

    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # Ray's addresses: 127.0.0.1 only
    load_before = os.getloadavg()
    import ray
    import torch
    from ray import serve

    from spm_rt.serve import app
    from spm_rt.world import shipped_spms

    cwd = os.getcwd()
    os.chdir(tempfile.mkdtemp(prefix="spm_rt_bench_serve_"))  # Ray adds the driver's cwd to workers' sys.path
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False,
             configure_logging=False)
    os.chdir(cwd)
    started = time.time()
    cells, fault = [], None
    try:
        port = _free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        for name, mb in (("on", 8), ("off", 1)):
            serve.run(app("shapes", shipped_spms(), max_batch=mb, batch_wait_ms=args.batch_wait_ms,
                          limits={"request_timeout_s": args.timeout}), name=f"batch_{name}", route_prefix=f"/{name}")
        urls = {n: f"http://127.0.0.1:{port}/{n}/v1/generate" for n in ("on", "off")}
        for n in urls:  # warm-up: first call pays lazy initialisation
            run_cell(urls[n], 2, 1, True, args.steps, args.timeout, 0)
        print(f"deployed and warm in {time.time() - started:.0f} s", flush=True)
        order = [("on", False), ("off", False), ("on", True), ("off", True)]
        for clients in args.clients:
            per = max(2, 16 // clients) if not args.quick else max(1, 8 // clients)
            for rnd in range(args.rounds):
                for batching, mixed in (order if rnd % 2 == 0 else order[::-1]):
                    if time.time() - started > args.budget:
                        print("budget reached: remaining cells skipped", flush=True)
                        break
                    cell = run_cell(urls[batching], clients, per, mixed, args.steps, args.timeout, 100 * rnd)
                    cell.update(batching=batching, round=rnd)
                    cells.append(cell)
                    print(f"clients {clients:2d} batching {batching:3s} {'mixed  ' if mixed else 'uniform'} "
                          f"{cell['images_per_s']:.2f} img/s p50 {cell['p50_s']:.2f} p95 {cell['p95_s']:.2f} s "
                          f"({cell['ok']}/{cell['requests']} ok)", flush=True)
        handle = serve.get_deployment_handle("SPMModel", app_name="batch_on")
        fault = kill_phase(urls["on"], lambda: handle.info.remote().result(timeout_s=60), 8, 3, args.steps,
                           args.timeout)
        print(f"replica kill: {fault}", flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()
    meta = {"load_avg_before": load_before, "load_avg_after": os.getloadavg(), "cpus": os.cpu_count(),
            "machine": platform.processor() or platform.machine(), "python": sys.version.split()[0],
            "torch": torch.__version__, "ray": ray.__version__, "steps": args.steps, "rounds": args.rounds,
            "batch_wait_ms": args.batch_wait_ms, "wall_s": time.time() - started,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    write_results(Path(args.out), cells, fault, meta)
    return 0


def _agg(cells, clients, batching, mixed):
    import numpy as np

    sel = [c for c in cells if c["clients"] == clients and c["batching"] == batching and c["mixed"] == mixed]
    if not sel:
        return None
    lat = [x for c in sel for x in c["latencies_s"]]
    ok = sum(c["ok"] for c in sel)
    wall = sum(c["wall_s"] for c in sel)
    return {"images_per_s": ok / wall, "per_round": [c["images_per_s"] for c in sel], "n": len(lat),
            "p50": float(np.percentile(lat, 50)), "p95": float(np.percentile(lat, 95)),
            "p99": float(np.percentile(lat, 99)), "ok": ok, "requests": sum(c["requests"] for c in sel)}


def write_results(out: Path, cells, fault, meta) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "serve.json").write_text(json.dumps({"meta": meta, "cells": cells, "fault": fault}, indent=1))
    clients = sorted({c["clients"] for c in cells})
    rows = ["| clients | batching | erasure | images/s (per round) | p50 s | p95 s | p99 s | ok/requests |",
            "|---|---|---|---|---|---|---|---|"]
    for n in clients:
        for batching in ("on", "off"):
            for mixed in (False, True):
                a = _agg(cells, n, batching, mixed)
                if a:
                    rounds = ", ".join(f"{v:.2f}" for v in a["per_round"])
                    rows.append(f"| {n} | {batching} | {'mixed' if mixed else 'uniform'} | {a['images_per_s']:.2f} "
                                f"({rounds}) | {a['p50']:.2f} | {a['p95']:.2f} | {a['p99']:.2f} | "
                                f"{a['ok']}/{a['requests']} |")

    def ratio(num, den):
        return f"{num / den:.2f}" if num and den else "n/a"

    def get(n, b, m, key):
        a = _agg(cells, n, b, m)
        return a[key] if a else None

    targets = [
        ("throughput, 8 clients, batching on vs off (uniform)", ">= 3x",
         ratio(get(8, "on", False, "images_per_s"), get(8, "off", False, "images_per_s"))),
        ("throughput, 8 clients, batching on vs off (mixed)", ">= 3x",
         ratio(get(8, "on", True, "images_per_s"), get(8, "off", True, "images_per_s"))),
        ("mixed vs uniform erasure, 8 clients, batching on (throughput)", "within 10%",
         ratio(get(8, "on", True, "images_per_s"), get(8, "on", False, "images_per_s"))),
        ("p95 latency, 8 clients batching on vs 1 client (uniform)", "<= 2.5x",
         ratio(get(8, "on", False, "p95"), get(1, "on", False, "p95"))),
        ("requests lost under a replica kill", "0", "n/a" if not fault else
         f"{fault['lost']} lost ({fault['ok']} ok, {fault['5xx']} explicit 5xx, {fault['other']} other, "
         f"of {fault['requests']})"),
    ]
    lines = [f"# spm-rt serve load bench (shapes world, {meta['steps']} steps, 32x32)", "",
             f"{meta['date']}; {meta['cpus']} CPUs shared with other jobs: load average "
             f"{meta['load_avg_before'][0]:.1f} before, {meta['load_avg_after'][0]:.1f} after; torch "
             f"{meta['torch']}, ray {meta['ray']}; one model replica per app, 1 torch thread; closed-loop "
             f"clients over loopback HTTP; {meta['rounds']} alternating rounds per client count; "
             f"batch wait {meta['batch_wait_ms']:g} ms; run took {meta['wall_s']:.0f} s.", "",
             "| measure | target | measured |", "|---|---|---|"]
    lines += [f"| {m} | {t} | {v} |" for m, t, v in targets]
    lines += ["", "Uniform: every request gates [1, 1]; mixed: five settings in rotation ([0,0], [1,0], [0,1], "
              "erase both, Facilitated Transport). Latency is client-side, request to response.", ""] + rows
    (out / "serve.md").write_text("\n".join(lines) + "\n")
    _plot(out / "serve.png", cells, clients)
    print(f"wrote {out / 'serve.md'}, serve.json, serve.png")


def _plot(path: Path, cells, clients) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    for batching, colour in (("on", "tab:blue"), ("off", "tab:orange")):
        for mixed, style in ((False, "-"), (True, "--")):
            xs = [n for n in clients if _agg(cells, n, batching, mixed)]
            aggs = [_agg(cells, n, batching, mixed) for n in xs]
            label = f"batching {batching}, {'mixed' if mixed else 'uniform'}"
            a1.plot(xs, [a["images_per_s"] for a in aggs], style, color=colour, marker="o", label=label)
            a2.plot(xs, [a["p95"] for a in aggs], style, color=colour, marker="o", label=label)
    a1.set(xlabel="concurrent clients", ylabel="images / s", title="throughput", xticks=clients)
    a2.set(xlabel="concurrent clients", ylabel="p95 latency (s)", title="p95 latency", xticks=clients)
    a1.legend(fontsize=8)
    a2.legend(fontsize=8)
    fig.suptitle("spm-rt serve, shapes world, 2 shared CPU cores")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
