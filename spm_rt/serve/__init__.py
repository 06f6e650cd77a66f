"""Serve SPM erasure over HTTP on Ray Serve: requests with different erasure share one UNet call.

``app(...)`` returns a Ray Serve application (a FastAPI ingress deployment bound to a model
deployment); ``spm-rt serve`` runs it. Each model replica has ONE ``@serve.batch`` that collects
requests, groups those with equal generation parameters (steps, guidance, size) and runs each
group as one gated ``rt(...)`` call with one row of gates per image (Facilitated Transport per
prompt, or the request's ``gates`` / ``erase``, never below the operator's policy floor). A served
image is bit-identical to ``rt(prompt, gates=..., generator=torch.Generator().manual_seed(seed))``
run alone (see :mod:`spm_rt.serve.engine` for what that takes). Needs the ``serve`` extra
(``pip install "spm_rt[serve]"``); the rest of spm_rt does not. See docs/serve.md.

Example::

    >>> from ray import serve  # doctest: +SKIP
    >>> from spm_rt.serve import app
    >>> from spm_rt.world import shipped_spms
    >>> serve.run(app(model="shapes", spms=shipped_spms(), max_batch=8), name="spm_rt")  # doctest: +SKIP
"""
from __future__ import annotations

import os

__all__ = ["app", "build_app", "DEFAULT_MAX_BATCH", "DEFAULT_BATCH_WAIT_MS"]

DEFAULT_MAX_BATCH = 8
DEFAULT_BATCH_WAIT_MS = 20.0


def require_serve():
    """Import ray.serve and fastapi, or say which extra installs them."""
    try:
        import fastapi  # noqa: F401
        from ray import serve  # noqa: F401
    except ImportError as exc:
        raise ImportError(f"spm_rt.serve needs Ray Serve and FastAPI ({exc.name} is missing): "
                          'pip install "spm_rt[serve]"') from exc


def app(model: str = "shapes", spms=(), *, concepts=None, max_batch: int = DEFAULT_MAX_BATCH,
        batch_wait_ms: float = DEFAULT_BATCH_WAIT_MS, policy=None, limits=None, replicas: int = 1,
        threads: int | None = 1, num_cpus: float = 1, num_gpus: float = 0, autoscaling_config: dict | None = None,
        ingress_replicas: int = 1):
    """A Ray Serve application serving ``model`` with ``spms`` erasable per request.

    model:   "shapes" | "tiny" | a local diffusers folder (present on every node that runs a replica).
    spms:    SPM files or loaded SPMs, in gate order (loaded here, shipped to replicas by Ray).
    max_batch, batch_wait_ms: the replica's ``@serve.batch`` (images per batch, wait to fill it).
    policy:  a policy file (YAML/JSON), a dict, a :class:`~spm_rt.serve.policy.Policy` or None.
    limits:  a :class:`~spm_rt.serve.api.Limits` or dict of its fields (request limits).
    replicas, num_cpus, num_gpus, threads: model replicas, Ray resources per replica and torch
             threads per replica; ``autoscaling_config`` replaces ``replicas`` (Ray Serve's dict).

    Example::

        >>> from ray import serve  # doctest: +SKIP
        >>> handle = serve.run(app("shapes", ["red.safetensors"], policy={"floors": {"red": 1.0}}))  # doctest: +SKIP
    """
    require_serve()
    from spm_rt.compile import load_spms
    from spm_rt.serve.api import Limits
    from spm_rt.serve.deployments import SPMIngress, SPMModel
    from spm_rt.serve.engine import REPRODUCIBLE_ENV
    from spm_rt.serve.policy import Policy

    loaded = load_spms(list(spms) if not isinstance(spms, (str, os.PathLike)) else [spms], concepts)
    names = [list(s.concepts or []) for s in loaded]
    if isinstance(policy, Policy):
        pol = policy
    elif isinstance(policy, dict):
        pol = Policy.from_dict(policy, names)
    elif policy is not None:
        pol = Policy.load(policy, names)
    else:
        pol = Policy.none(len(loaded))
    lim = limits if isinstance(limits, Limits) else Limits(**(limits or {}))
    if int(max_batch) < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    if float(batch_wait_ms) < 0:
        raise ValueError(f"batch_wait_ms must be >= 0, got {batch_wait_ms}")
    actor = {"num_cpus": num_cpus, "runtime_env": {"env_vars": dict(REPRODUCIBLE_ENV)}}
    if num_gpus:
        actor["num_gpus"] = num_gpus
    scale = {"autoscaling_config": autoscaling_config} if autoscaling_config else {"num_replicas": int(replicas)}
    model_dep = SPMModel.options(
        ray_actor_options=actor,
        max_ongoing_requests=max(4 * int(max_batch), 16),  # enough queued jobs to fill the next batch
        graceful_shutdown_timeout_s=lim.request_timeout_s,  # shutdown drains in-flight batches
        **scale,
    ).bind(model, loaded, None, int(max_batch), float(batch_wait_ms), threads)
    return SPMIngress.options(num_replicas=int(ingress_replicas), ray_actor_options={"num_cpus": 0},
                              max_ongoing_requests=1000).bind(model_dep, names, pol, lim)


def build_app(args: dict):
    """Application builder for ``serve run`` / ``serve deploy`` configs
    (``import_path: spm_rt.serve:build_app``); ``args`` are :func:`app`'s keywords, with ``spms``
    a list of files (or one comma-separated string).

    Example::

        $ serve run spm_rt.serve:build_app model=shapes spms=circle.safetensors,red.safetensors  # doctest: +SKIP
    """
    args = dict(args)
    spms = args.pop("spms", args.pop("spm", []))
    if isinstance(spms, str):
        spms = [s for s in spms.split(",") if s]
    for key, cast in (("max_batch", int), ("batch_wait_ms", float), ("replicas", int), ("threads", int),
                      ("num_cpus", float), ("num_gpus", float)):
        if key in args and isinstance(args[key], str):
            args[key] = cast(args[key])
    return app(spms=spms, **args)
