"""What one model replica runs: jobs (one image each) -> groups -> ONE gated ``rt(...)`` call per
group, each job with its own row of gates. No Ray here: the Ray deployment is a thin shell over
:class:`Engine`, so batching, gates and identity are testable in plain Python.

Identity with ``rt`` alone. A served image is bit-identical to ``rt(prompt, gates=g,
generator=torch.Generator().manual_seed(seed))`` run by itself on the same kind of process. Three
things make a batched call compute each image with exactly the arithmetic of a call alone
(measured on CPU, shapes world, torch 2.13, MKL 2024.2; ``tests/test_serve_engine.py`` checks it):

* one path for every batch: the replica compiles with ``strategy="gated"`` (under "auto" a call
  alone with one gate vector takes the merged-weight path and a mixed batch the gated path, which
  round differently, ~1e-5);
* MKL's conditional numerical reproducibility, ``MKL_CBWR=AUTO,STRICT`` (:data:`REPRODUCIBLE_ENV`,
  set in the replica's environment before MKL loads): by default MKL's sgemm takes another kernel
  for a few rows than for many (rows 0-1 of a [2, 192] x [192, 48] product differ from the same
  rows computed in a [16, 192] product);
* per-image VAE decoding, and at most :data:`ONE_THREAD_MAX_ROWS` UNet rows per call on one torch
  thread: PyTorch runs single-threaded 1x1 convolutions through its own kernel below 16 rows and
  through oneDNN from 16 rows, which round differently. With classifier-free guidance (2 rows per
  image) a call therefore holds at most 7 images on one thread; a larger group runs as several
  calls (the replica's ``calls`` counter shows it).

Example::

    >>> from spm_rt.serve.engine import Engine, Job, Params
    >>> engine = Engine.load("tiny", [])  # doctest: +SKIP
    >>> engine.run([Job("a red circle", seed=0, params=Params(2, 4.0, 32, 32))])[0].image.shape  # doctest: +SKIP
    (32, 32, 3)
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

# the environment a replica needs for batch-invariant BLAS (see the module docstring)
REPRODUCIBLE_ENV = {"MKL_CBWR": "AUTO,STRICT"}
# UNet rows per call on one torch thread: PyTorch's 1x1-convolution backend switches at 16 rows
ONE_THREAD_MAX_ROWS = 15


@dataclass(frozen=True)
class Params:
    """Generation parameters that must be equal for requests to share one UNet call."""

    steps: int
    guidance: float
    height: int
    width: int


@dataclass
class Job:
    """One image to generate. ``gates`` [K] replaces Facilitated Transport when given; ``erase``
    (SPM indices) forces those gates to 1; ``floor`` [K] is the operator's minimum per SPM."""

    prompt: str
    seed: int
    params: Params
    gates: list[float] | None = None
    erase: tuple[int, ...] = ()
    floor: list[float] | None = None
    received: float = field(default_factory=time.time)  # wall clock when the server got the request


@dataclass
class Result:
    """One generated image (uint8 [H, W, 3]) with the gates it was generated under and timings."""

    image: np.ndarray
    gates: list[float]
    queue_s: float  # from the request's arrival to the start of its UNet call
    batch_size: int  # images in that call
    generation_s: float  # that call, start to decoded image
    calls: int  # the replica's rt-call counter after this call (tests count calls with it)


@dataclass
class Failure:
    """A job whose UNet call raised (the message says why); the other calls of its batch ran."""

    message: str


def resolve_gates(ft: "np.ndarray | None", job: Job, k: int) -> list[float]:
    """The gates a job runs under: its own ``gates`` (or Facilitated Transport's ``ft``), then
    ``erase`` sets named SPMs to 1, then the floor raises each gate to at least the operator's
    value; a request can add erasure but never go below the floor."""
    base = list(job.gates) if job.gates is not None else [float(v) for v in ft]
    if len(base) != k:
        raise ValueError(f"gates: {len(base)} values for {k} SPMs")
    for i in job.erase:
        base[i] = 1.0
    if job.floor is not None:
        base = [max(g, f) for g, f in zip(base, job.floor)]
    return base


def group_jobs(jobs: list[Job], max_images) -> list[list[int]]:
    """Indices of ``jobs`` grouped by :class:`Params` (first-seen order), each group cut into
    calls of at most ``max_images`` (an int, or a function of the group's Params; None: no cut).

    Example::

        >>> p, q = Params(20, 4.0, 32, 32), Params(10, 4.0, 32, 32)
        >>> group_jobs([Job("a", 0, p), Job("b", 0, q), Job("c", 0, p)], max_images=8)
        [[0, 2], [1]]
    """
    groups: dict[Params, list[int]] = {}
    for i, job in enumerate(jobs):
        groups.setdefault(job.params, []).append(i)
    out = []
    for params, idx in groups.items():
        cap = max_images(params) if callable(max_images) else max_images
        cap = cap or len(idx)
        out.extend(idx[s:s + cap] for s in range(0, len(idx), cap))
    return out


class Engine:
    """Runs jobs on one compiled pipeline (``rt``, compiled with ``strategy="gated"``)."""

    def __init__(self, rt, *, threads: int | None = None):
        import torch

        if threads is not None:
            torch.set_num_threads(int(threads))
        self.rt = rt
        self.calls = 0  # gated rt(...) calls made (one per group chunk)
        self.batch_sizes: list[int] = []

    @classmethod
    def load(cls, model: str, spms: list, *, concepts=None, threads: int | None = None) -> "Engine":
        """Load ``model`` (shapes | tiny | a local diffusers folder) and compile ``spms`` onto it."""
        import torch

        import spm_rt
        from spm_rt.models import load_pipeline

        if threads is not None:
            torch.set_num_threads(int(threads))
        pipe = load_pipeline(model, dtype=torch.float32)
        pipe.set_progress_bar_config(disable=True)
        return cls(spm_rt.compile(pipe, spms, concepts=concepts, strategy="gated"), threads=threads)

    @property
    def num_spms(self) -> int:
        return self.rt.num_spms

    def default_size(self) -> tuple[int, int]:
        """(height, width) the pipeline generates by default."""
        pipe = self.rt.pipe
        s = int(pipe.unet.config.sample_size) * int(pipe.vae_scale_factor)
        return s, s

    def max_images_per_call(self, params: Params) -> int | None:
        """None (no cap) or the most images one call may hold for batch-invariant arithmetic."""
        import torch

        if torch.get_num_threads() != 1:
            return None
        rows_per_image = 2 if params.guidance > 1.0 else 1  # diffusers doubles rows for CFG
        return max(1, ONE_THREAD_MAX_ROWS // rows_per_image)

    def run(self, jobs: list[Job], max_images: int | None = None) -> list["Result | Failure"]:
        """Generate every job; returns results in job order. Jobs with equal :class:`Params` share
        one gated call (cut at ``max_images`` and at :meth:`max_images_per_call`); a call that
        raises gives its own jobs a :class:`Failure` and leaves the other calls alone."""
        def cap(params):
            caps = [c for c in (max_images, self.max_images_per_call(params)) if c]
            return min(caps) if caps else None

        results: list[Result | Failure | None] = [None] * len(jobs)
        for chunk in group_jobs(jobs, cap):
            try:
                out = self._generate([jobs[i] for i in chunk], jobs[chunk[0]].params)
            except Exception as exc:  # noqa: BLE001 - one group's failure is not the other groups' failure
                out = [Failure(f"{type(exc).__name__}: {exc}")] * len(chunk)
            for i, r in zip(chunk, out):
                results[i] = r
        return results  # type: ignore[return-value]

    def gates_for(self, jobs: list[Job]) -> list[list[float]]:
        """Each job's gates (:func:`resolve_gates`), Facilitated Transport run once for the jobs
        that need it."""
        need = [j.prompt for j in jobs if j.gates is None]
        ft = self.rt.gates(need).numpy() if need and self.rt.num_spms else None
        out, n = [], 0
        for job in jobs:
            row = None
            if job.gates is None:
                row = ft[n] if ft is not None else np.zeros(0, np.float32)
                n += 1
            out.append(resolve_gates(row, job, self.rt.num_spms))
        return out

    def _generate(self, jobs: list[Job], params: Params) -> list[Result]:
        import torch

        start = time.time()
        t0 = time.perf_counter()
        prompts = [j.prompt for j in jobs]
        gens = [torch.Generator().manual_seed(int(j.seed)) for j in jobs]
        kw = dict(num_inference_steps=params.steps, guidance_scale=params.guidance, height=params.height,
                  width=params.width, generator=gens)
        if self.rt.num_spms:
            gates = self.gates_for(jobs)
            latents = self.rt(prompts, gates=gates, output_type="latent", **kw).images
        else:
            gates = [[] for _ in jobs]
            latents = self.rt.pipe(prompts, output_type="latent", **kw).images
        self.calls += 1
        self.batch_sizes.append(len(jobs))
        images = [self._decode(latents[i:i + 1], gens[i]) for i in range(len(jobs))]
        took = time.perf_counter() - t0
        return [Result(image=im, gates=[float(v) for v in g], queue_s=max(0.0, start - j.received),
                       batch_size=len(jobs), generation_s=took, calls=self.calls)
                for im, g, j in zip(images, gates, jobs)]

    def _decode(self, latents, generator) -> np.ndarray:
        """One image's latents -> uint8 [H, W, 3], exactly as the pipeline decodes a batch of one
        (VAE, safety checker where the pipeline has one, postprocess)."""
        import torch

        from spm_rt.images import to_pil

        pipe = self.rt.pipe
        with torch.no_grad():
            image = pipe.vae.decode(latents / pipe.vae.config.scaling_factor, return_dict=False,
                                    generator=generator)[0]
            image, nsfw = pipe.run_safety_checker(image, latents.device, latents.dtype)
            denorm = [True] if nsfw is None else [not n for n in nsfw]
            arr = pipe.image_processor.postprocess(image, output_type="np", do_denormalize=denorm)[0]
        return np.asarray(to_pil(arr))
