"""The Ray Serve deployments: an HTTP ingress (FastAPI) and the model, whose one ``@serve.batch``
per replica hands each batch of jobs to :class:`spm_rt.serve.engine.Engine`. Imports ray, so only
:func:`spm_rt.serve.app` imports this module."""

import asyncio
import base64
import io
import os
import time

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from ray import serve

from spm_rt.serve.api import APIError, Limits, parse_generate
from spm_rt.serve.engine import Engine, Failure, Job
from spm_rt.serve.policy import KeyRejected, Policy

MODEL_NAME = "SPMModel"
INGRESS_NAME = "SPMIngress"

web = FastAPI(title="spm_rt", description="Stable Diffusion with SPM concept erasure, per-request gates")


class GenerationFailed(RuntimeError):
    """The UNet call of this request's group raised (answered 500 with the message)."""


@serve.deployment(name=MODEL_NAME)
class SPMModel:
    """One replica: the compiled pipeline and its batcher (a batch is one list of jobs)."""

    def __init__(self, model: str, spms: list[str], concepts, max_batch: int, batch_wait_ms: float,
                 threads: int | None = 1):
        self.engine = Engine.load(model, spms, concepts=concepts, threads=threads)
        self.max_batch = int(max_batch)
        self.generate_batch.set_max_batch_size(self.max_batch)
        self.generate_batch.set_batch_wait_timeout_s(float(batch_wait_ms) / 1000.0)

    async def generate(self, job: Job):
        result = await self.generate_batch(job)
        if isinstance(result, Failure):
            raise GenerationFailed(result.message)
        return result

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.02)
    async def generate_batch(self, jobs: list[Job]):
        # in a thread: the replica's event loop keeps queueing the next batch meanwhile
        return await asyncio.to_thread(self.engine.run, jobs, self.max_batch)

    def info(self) -> dict:
        """Replica facts for health checks and tests: pid, node, rt calls made, batch sizes."""
        import ray
        import torch

        return {"pid": os.getpid(), "node_id": ray.get_runtime_context().get_node_id(), "calls": self.engine.calls,
                "batch_sizes": list(self.engine.batch_sizes), "threads": torch.get_num_threads(),
                "default_size": self.engine.default_size(), "mkl_cbwr": os.environ.get("MKL_CBWR")}


def _png_base64(image) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _error(status: int, field: str, message: str) -> JSONResponse:
    return JSONResponse(status_code=status, content={"error": {"field": field, "message": message}})


def _api_key(request: Request) -> str | None:
    key = request.headers.get("x-api-key")
    auth = request.headers.get("authorization", "")
    if key is None and auth.lower().startswith("bearer "):
        key = auth[7:].strip()
    return key or None


@serve.deployment(name=INGRESS_NAME)
@serve.ingress(web)
class SPMIngress:
    """HTTP: validates, applies the policy floor, sends one job per image to the model, answers."""

    def __init__(self, model, concepts: list[list[str]], policy: Policy, limits: Limits):
        self.model = model
        self.concepts = concepts
        self.policy = policy
        self.limits = limits
        self.default_size = None  # the pipeline's own, asked from a model replica once

    async def _default_size(self) -> tuple[int, int]:
        if self.default_size is None:
            info = await asyncio.wait_for(self.model.info.remote(), timeout=self.limits.request_timeout_s)
            self.default_size = tuple(info["default_size"])
        return self.default_size

    @web.get("/healthz")
    async def healthz(self):
        try:
            info = await asyncio.wait_for(self.model.info.remote(), timeout=10.0)
        except Exception as exc:  # noqa: BLE001 - any failure of the model is "not healthy"
            return _error(503, "model", f"model replica unavailable ({type(exc).__name__})")
        return {"status": "ok", "replica_pid": info["pid"]}

    @web.get("/v1/concepts")
    async def concepts(self):
        names = [",".join(c or ["?"]) for c in self.concepts]
        return {"spms": [{"index": i, "concepts": c, "floor": self.policy.default[i]}
                         for i, c in enumerate(self.concepts)],
                "gate_order": names, "limits": self.limits.as_dict()}

    @web.post("/v1/generate")
    async def generate(self, request: Request):
        received = time.time()
        t0 = time.perf_counter()
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.limits.max_body_bytes:
            return _error(413, "body", f"{length} bytes, over the limit of {self.limits.max_body_bytes}")
        body = bytearray()
        async for chunk in request.stream():  # stop reading at the limit: a huge body is not buffered
            body += chunk
            if len(body) > self.limits.max_body_bytes:
                return _error(413, "body", f"over the limit of {self.limits.max_body_bytes} bytes")
        try:
            size = await self._default_size()
        except Exception as exc:  # noqa: BLE001
            return _error(503, "model", f"model replica unavailable ({type(exc).__name__})")
        try:
            specs = parse_generate(bytes(body), self.limits, self.concepts, size)
            floor = self.policy.floor(_api_key(request))
        except APIError as exc:
            return JSONResponse(status_code=exc.status, content=exc.body())
        except KeyRejected as exc:
            return _error(401, "api_key", str(exc))
        jobs = [Job(prompt=s["prompt"], seed=s["seed"], params=s["params"], gates=s["gates"], erase=s["erase"],
                    floor=floor, received=received) for s in specs]
        try:
            results = await asyncio.wait_for(asyncio.gather(*(self.model.generate.remote(j) for j in jobs)),
                                             timeout=self.limits.request_timeout_s)
        except asyncio.TimeoutError:
            return _error(504, "model", f"no result within {self.limits.request_timeout_s:g} s")
        except Exception as exc:  # noqa: BLE001 - every failure is an explicit 5xx, never a hang
            if isinstance(exc, GenerationFailed):
                return _error(500, "model", f"generation failed: {exc}")
            # a replica that died or is restarting: retryable
            return _error(503, "model", f"model replica failed ({type(exc).__name__}); the request may be retried")
        names = [",".join(c or ["?"]) for c in self.concepts]
        images = []
        for spec, job, r in zip(specs, jobs, results):
            images.append({"prompt": job.prompt, "seed": job.seed, "png_base64": _png_base64(r.image),
                           "gates": dict(zip(names, r.gates)), "gates_list": r.gates,
                           "timings": {"queue_s": r.queue_s, "batch_size": r.batch_size,
                                       "generation_s": r.generation_s}})
        p = specs[0]["params"]
        return {"images": images, "steps": p.steps, "guidance": p.guidance, "size": [p.height, p.width],
                "floor": dict(zip(names, floor)), "timings": {"total_s": time.perf_counter() - t0}}
