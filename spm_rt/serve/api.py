"""The HTTP request contract of ``POST /v1/generate``: parsing, limits and 4xx errors naming the
field. No Ray here (the ingress deployment calls :func:`parse_generate`).

Request body (JSON)::

    {"prompt": "a red circle" | ["a red circle", "a blue square"],
     "seed": 0,            # prompt i gets seed + i (as spm-rt generate)
     "steps": 20, "guidance": 4.0,
     "size": 32 | [32, 32],              # height, width (multiples of 8)
     "gates": [1.0, 0.0] | [[...], ...], # optional: one per SPM (or one row per prompt), in [0, 1]
     "erase": ["red"]}                   # optional: concepts forced on (gate 1)

Example::

    >>> limits = Limits()
    >>> specs = parse_generate(b'{"prompt": "a red circle", "erase": ["red"]}', limits, [["circle"], ["red"]], 32)
    >>> specs[0]["erase"], specs[0]["seed"], specs[0]["params"].steps
    ((1,), 0, 20)
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Optional, Union

from spm_rt.commands import DEFAULT_GUIDANCE, DEFAULT_STEPS
from spm_rt.serve.engine import Params
from spm_rt.serve.policy import concept_index


@dataclass
class Limits:
    """What one request may ask for; beyond it a 4xx names the field."""

    max_prompt_chars: int = 1000
    max_images: int = 8  # prompts per request
    max_steps: int = 100
    max_size: int = 1024  # pixels, each side
    max_guidance: float = 50.0
    max_body_bytes: int = 64 * 1024
    request_timeout_s: float = 300.0  # ingress waits this long for the model, then 504

    def as_dict(self) -> dict:
        return asdict(self)


class APIError(Exception):
    """A request error: HTTP ``status``, the ``field`` at fault and a message."""

    def __init__(self, status: int, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.status, self.field, self.message = status, field, message

    def body(self) -> dict:
        return {"error": {"field": self.field, "message": self.message}}


def _request_model():
    from pydantic import BaseModel, ConfigDict, StrictFloat, StrictInt, StrictStr

    Number = Union[StrictInt, StrictFloat]

    class GenerateRequest(BaseModel):
        model_config = ConfigDict(extra="forbid")

        prompt: Union[StrictStr, list[StrictStr]]
        seed: StrictInt = 0
        steps: StrictInt = DEFAULT_STEPS
        guidance: Number = DEFAULT_GUIDANCE
        size: Optional[Union[StrictInt, list[StrictInt]]] = None
        gates: Optional[Union[list[Number], list[list[Number]]]] = None
        erase: Optional[list[StrictStr]] = None

    return GenerateRequest


_MODEL = None


def _field(loc: tuple) -> str:
    """pydantic's error location -> ``gates[1][0]`` (type tags of unions dropped)."""
    out = str(loc[0]) if loc else "body"
    for part in loc[1:]:
        if isinstance(part, int):
            out += f"[{part}]"
    return out


def parse_generate(body: bytes, limits: Limits, concepts: list[list[str]], default_size: int | tuple[int, int]
                   ) -> list[dict]:
    """Validate a request body; returns one job spec per prompt: ``{"prompt", "seed", "params",
    "gates" ([K] or None), "erase" (SPM indices)}``. Raises :class:`APIError` naming the field."""
    global _MODEL
    from pydantic import ValidationError

    if _MODEL is None:
        _MODEL = _request_model()
    if len(body) > limits.max_body_bytes:
        raise APIError(413, "body", f"{len(body)} bytes, over the limit of {limits.max_body_bytes}")
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise APIError(400, "body", f"malformed JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise APIError(400, "body", "expected a JSON object")
    try:
        req = _MODEL.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        raise APIError(422, _field(tuple(err.get("loc", ()))), err.get("msg", "invalid")) from exc

    prompts = [req.prompt] if isinstance(req.prompt, str) else list(req.prompt)
    if not prompts:
        raise APIError(422, "prompt", "no prompt given")
    if len(prompts) > limits.max_images:
        raise APIError(422, "prompt", f"{len(prompts)} prompts, over the limit of {limits.max_images} images per request")
    for i, p in enumerate(prompts):
        where = "prompt" if isinstance(req.prompt, str) else f"prompt[{i}]"
        if not p.strip():
            raise APIError(422, where, "empty prompt")
        if len(p) > limits.max_prompt_chars:
            raise APIError(422, where, f"{len(p)} characters, over the limit of {limits.max_prompt_chars}")
    if not 1 <= req.steps <= limits.max_steps:
        raise APIError(422, "steps", f"{req.steps} not in [1, {limits.max_steps}]")
    if not 0.0 <= float(req.guidance) <= limits.max_guidance:
        raise APIError(422, "guidance", f"{req.guidance} not in [0, {limits.max_guidance}]")
    if not 0 <= req.seed < 2 ** 63 - limits.max_images:
        raise APIError(422, "seed", f"{req.seed} not in [0, 2^63 - {limits.max_images})")
    height, width = _size(req.size, default_size, limits)

    k = len(concepts)
    gates = None
    if req.gates is not None:
        rows = req.gates if req.gates and isinstance(req.gates[0], list) else [req.gates] * len(prompts)
        if len(rows) != len(prompts):
            raise APIError(422, "gates", f"{len(rows)} rows for {len(prompts)} prompts (one row per prompt, or one "
                                         "list of K values for all)")
        for r, row in enumerate(rows):
            where = "gates" if rows is not req.gates else f"gates[{r}]"
            if len(row) != k:
                raise APIError(422, where, f"{len(row)} values for {k} SPMs {_names(concepts)}")
            for j, v in enumerate(row):
                if not 0.0 <= float(v) <= 1.0:
                    raise APIError(422, f"{where}[{j}]", f"{v} outside [0, 1]")
        gates = [[float(v) for v in row] for row in rows]
    index = concept_index(concepts)
    erase = []
    for i, name in enumerate(req.erase or []):
        if name not in index:
            raise APIError(422, f"erase[{i}]", f"unknown concept {name!r} (this server erases {sorted(index)})")
        erase.append(index[name])
    params = Params(int(req.steps), float(req.guidance), height, width)
    return [{"prompt": p, "seed": req.seed + i, "params": params, "gates": None if gates is None else gates[i],
             "erase": tuple(sorted(set(erase)))} for i, p in enumerate(prompts)]


def _size(size, default, limits: Limits) -> tuple[int, int]:
    if size is None:
        return tuple(default) if isinstance(default, (tuple, list)) else (default, default)
    hw = [size, size] if isinstance(size, int) else list(size)
    if len(hw) != 2:
        raise APIError(422, "size", f"expected one number or [height, width], got {len(hw)} values")
    for name, v in zip(("height", "width"), hw):
        if not 8 <= v <= limits.max_size or v % 8:
            raise APIError(422, "size", f"{name} {v}: must be a multiple of 8 in [8, {limits.max_size}]")
    return hw[0], hw[1]


def _names(concepts) -> str:
    return "(" + ", ".join(",".join(c or ["?"]) for c in concepts) + ")"
