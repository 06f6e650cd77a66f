"""``spm-rt serve``: deploy :func:`spm_rt.serve.app` on a new local Ray cluster or an existing one.

Example::

    $ spm-rt serve --model shapes --spm spm_rt/world/assets/spms/red.safetensors --port 8000
    serving on http://127.0.0.1:8000 (POST /v1/generate, GET /v1/concepts, GET /healthz); Ctrl-C stops
"""
from __future__ import annotations

import argparse
import os

from spm_rt.cli_common import MODEL_HELP, add_spm_argument

# Ray's switch for "this machine runs no multi-node cluster": node addresses become 127.0.0.1, so a
# local `spm-rt serve` (no --address) sends Ray's own traffic over loopback only
LOCAL_ONLY_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


def add_subcommands(sub) -> None:
    from spm_rt.serve import DEFAULT_BATCH_WAIT_MS, DEFAULT_MAX_BATCH

    p = sub.add_parser("serve", help="serve SPM erasure over HTTP on Ray Serve (needs the serve extra)")
    p.add_argument("--model", default="shapes", help=MODEL_HELP + " (default shapes)")
    add_spm_argument(p, help="SPM .safetensors files, in gate order (--spm A B or --spm A --spm B)")
    p.add_argument("--concepts", action="append", default=None,
                   help="concept names of each --spm whose file lacks them (once per --spm, in order)")
    p.add_argument("--replicas", type=int, default=1, help="model replicas (default 1)")
    p.add_argument("--max-batch", type=int, default=DEFAULT_MAX_BATCH,
                   help=f"images per UNet call a replica collects (default {DEFAULT_MAX_BATCH}; 1 turns batching off)")
    p.add_argument("--batch-wait-ms", type=float, default=DEFAULT_BATCH_WAIT_MS,
                   help=f"how long a replica waits to fill a batch (default {DEFAULT_BATCH_WAIT_MS:g})")
    p.add_argument("--host", default="127.0.0.1", help="HTTP address (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--policy", default=None, help="operator policy file (YAML/JSON): gate floors per concept / API key")
    p.add_argument("--address", default=None,
                   help="join this Ray cluster (default: $RAY_ADDRESS, else start a local one)")
    p.add_argument("--num-cpus", type=float, default=1, help="CPUs per model replica (Ray resource, default 1)")
    p.add_argument("--num-gpus", type=float, default=0, help="GPUs per model replica (Ray resource, default 0)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per model replica (default 1)")
    p.set_defaults(func=_serve)


def _serve(args: argparse.Namespace) -> int:
    import signal
    import threading

    from spm_rt.cli_common import CLIError, load_spm_files, parse_concepts, resolve_spm_names
    from spm_rt.serve import require_serve

    require_serve()
    for flag, value, low in (("--replicas", args.replicas, 1), ("--max-batch", args.max_batch, 1),
                             ("--threads", args.threads, 1), ("--port", args.port, 1)):
        if value < low:
            raise CLIError(f"{flag} {value}: must be >= {low}")
    if args.batch_wait_ms < 0:
        raise CLIError(f"--batch-wait-ms {args.batch_wait_ms}: must be >= 0")
    files = resolve_spm_names(args.spm, args.model) or []  # --spm circle: the shipped SPM for --model shapes
    spms = load_spm_files(files, parse_concepts(args.concepts, len(files)))  # bad files fail before Ray starts
    from spm_rt.cli_common import _ALIASES
    from spm_rt.models import EMBEDDED

    model = _ALIASES.get(args.model, args.model)  # the same model names as every other command
    if model not in EMBEDDED:
        if not os.path.isdir(model):
            raise CLIError(f"--model {args.model!r}: neither one of {', '.join(EMBEDDED)} nor a local diffusers folder")
        model = os.path.abspath(model)  # replicas resolve it, in their own working directory
    from spm_rt.serve import app
    from spm_rt.serve.policy import PolicyError

    try:
        application = app(model, spms, max_batch=args.max_batch, batch_wait_ms=args.batch_wait_ms,
                          policy=args.policy, replicas=args.replicas, threads=args.threads, num_cpus=args.num_cpus,
                          num_gpus=args.num_gpus)
    except PolicyError as exc:
        raise CLIError(str(exc)) from exc

    address = args.address or os.environ.get("RAY_ADDRESS")
    if not address:
        for k, v in LOCAL_ONLY_ENV.items():
            os.environ.setdefault(k, v)
    import ray
    from ray import serve

    if address:
        ray.init(address=address)
    else:
        ray.init(include_dashboard=False)
    stop = threading.Event()
    try:
        serve.start(http_options={"host": args.host, "port": args.port})
        serve.run(application, name="spm_rt", route_prefix="/")
        host = "127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host
        print(f"serving on http://{host}:{args.port} (POST /v1/generate, GET /v1/concepts, GET /healthz); "
              "Ctrl-C stops", flush=True)
        # Ctrl-C and SIGTERM end the loop (SIGINT too where a launcher started us with it ignored)
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        while not stop.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        print("shutting down (draining in-flight requests)", flush=True)
        try:
            serve.delete("spm_rt")  # waits for replicas to finish their in-flight batches
            if not address:
                serve.shutdown()
        finally:
            ray.shutdown()
    return 0
