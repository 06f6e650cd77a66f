"""Facilitated Transport: one gate per SPM per prompt, from the prompt's similarity to the
SPM's concepts, computed with the pipeline's own tokenizer and text encoder.

* ``clipcos(P, c)``: cosine of the flattened ``[77, d]`` text embeddings (padding included).
  SD1.x/2.x: the text encoder's last hidden state; SDXL: the pipeline's ``prompt_embeds``
  (both encoders).
* ``tokenuni(P, c) = |T_P ∩ T_c| / |T_c|`` over token ids minus the special tokens.
* ``clipcos_tokenuni`` (default) = max of the two.
* gate(SPM) = max over its concepts.

Opt-in transport: ``calibrated`` (:class:`CalibratedTransport`, end-of-text similarity with fitted
thresholds). Each class also scores already-encoded prompts
(:meth:`Transport.scores_encoded`, differentiable), which is how an attack that controls the
text encoder's input embeddings is gated exactly as a deployed pipeline would gate it.
"""
from __future__ import annotations

import torch

METRICS = ("clipcos", "tokenuni", "clipcos_tokenuni")
TRANSPORTS = METRICS + ("calibrated", "fixed")

# Default calibration prompts for a concept with no prompt sets of its own. The positives put the
# concept in common caption frames; the negatives are short neutral captions plus the empty prompt,
# which scores high on every whole-sequence measure (see docs: 0.985 clipcos on a tiny model).
POSITIVE_TEMPLATES = ("{}", "a {}", "a photo of {}", "a picture of a {}", "an image of {}", "{} in a scene")
NEUTRAL_PROMPTS = ("", "a photo", "a picture", "an image", "a scene", "a thing", "a photo of an object",
                   "a landscape", "a person", "a cat", "a house", "a car", "a tree", "a shape", "a colour")


def _is_sdxl(pipe) -> bool:
    return getattr(pipe, "text_encoder_2", None) is not None or getattr(pipe, "tokenizer_2", None) is not None


@torch.no_grad()
def encode_prompts(pipe, prompts: list[str]) -> torch.Tensor:
    """Text embeddings as the pipeline conditions its UNet: [B, 77, d] float32."""
    device = getattr(pipe, "_execution_device", None) or pipe.device
    if _is_sdxl(pipe):
        emb = pipe.encode_prompt(prompt=prompts, device=device, num_images_per_prompt=1,
                                 do_classifier_free_guidance=False)[0]
    else:
        emb = pipe.encode_prompt(prompts, device, 1, False)[0]
    return emb.float()


@torch.no_grad()
def encode_eot(pipe, prompts: list[str]) -> torch.Tensor:
    """End-of-text embedding of each prompt from the (first) text encoder: [B, d] float32.

    This is CLIP's pooled output: the final-layer-normed hidden state at the end-of-text token,
    the one summary of the prompt the encoder was trained to produce.
    """
    tok, te = pipe.tokenizer, pipe.text_encoder
    ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
              return_tensors="pt").input_ids.to(te.device)
    return te(ids).pooler_output.float()


def token_sets(tokenizer, prompts: list[str]) -> list[set[int]]:
    """Token ids of each prompt (truncated to the model length) minus the special tokens."""
    special = set(tokenizer.all_special_ids)
    ids = tokenizer(prompts, truncation=True, max_length=tokenizer.model_max_length).input_ids
    return [set(i) - special for i in ids]


class Transport:
    """Gate computation for K SPMs, with the concepts' embeddings and token sets cached.

    Example::

        >>> tr = Transport(pipe, [["snoopy"], ["mickey", "spongebob"]])  # doctest: +SKIP
        >>> tr.gates(["a photo of snoopy", "a cat"])  # doctest: +SKIP
        tensor([[1.0000, 0.7123], [0.6871, 0.6650]])
    """

    def __init__(self, pipe, concepts: list[list[str]], metric: str = "clipcos_tokenuni"):
        if metric not in METRICS:
            raise ValueError(f"transport metric must be one of {METRICS}, got {metric!r}")
        flat = self._set_concepts(pipe, concepts, metric)
        self._concept_emb = self._normalized(encode_prompts(pipe, flat)) if metric != "tokenuni" else None

    def _set_concepts(self, pipe, concepts: list[list[str]], metric: str) -> list[str]:
        """Shared set-up: concept lists, owner SPM of each concept, token sets; returns the flat list."""
        for k, names in enumerate(concepts):
            if not names:
                raise ValueError(f"SPM {k} has no concept names: pass concepts=... (or transport='fixed' with gates)")
        self.pipe = pipe
        self.metric = metric
        self.concepts = [list(c) for c in concepts]
        flat = [c for names in self.concepts for c in names]
        self.owner = torch.tensor([k for k, names in enumerate(self.concepts) for _ in names])  # [C]
        self.num_spms = len(self.concepts)
        self._concept_tokens = token_sets(pipe.tokenizer, flat)
        return flat

    @staticmethod
    def _normalized(emb: torch.Tensor) -> torch.Tensor:
        flat = emb.reshape(emb.shape[0], -1).double()
        return flat / flat.norm(dim=1, keepdim=True).clamp_min(1e-12)

    def clipcos(self, prompts: list[str]) -> torch.Tensor:
        """[B, C] cosine of each prompt's flattened embedding with each concept's."""
        e = self._normalized(encode_prompts(self.pipe, prompts))
        return (e @ self._concept_emb.to(e.device).t()).float().cpu()

    def tokenuni(self, prompts: list[str]) -> torch.Tensor:
        """[B, C] share of each concept's tokens present in each prompt."""
        p_sets = token_sets(self.pipe.tokenizer, prompts)
        out = torch.zeros(len(prompts), len(self._concept_tokens))
        for j, c in enumerate(self._concept_tokens):
            if c:
                for i, p in enumerate(p_sets):
                    out[i, j] = len(p & c) / len(c)
        return out

    def scores(self, prompts: list[str]) -> torch.Tensor:
        """[B, C] the metric per (prompt, concept)."""
        if self.metric == "clipcos":
            return self.clipcos(prompts)
        if self.metric == "tokenuni":
            return self.tokenuni(prompts)
        return torch.maximum(self.clipcos(prompts), self.tokenuni(prompts))

    def gates(self, prompts: str | list[str]) -> torch.Tensor:
        """[B, K] gate of each SPM: max over its concepts of the metric."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        s = self.scores(prompts)
        out = torch.full((len(prompts), self.num_spms), float("-inf"))
        out = out.scatter_reduce(1, self.owner.expand(len(prompts), -1), s, reduce="amax")
        return out

    def _tokenuni_sets(self, prompt_tokens: list[set[int]]) -> torch.Tensor:
        out = torch.zeros(len(prompt_tokens), len(self._concept_tokens), dtype=torch.float64)
        for j, c in enumerate(self._concept_tokens):
            if c:
                for i, p in enumerate(prompt_tokens):
                    out[i, j] = len(p & c) / len(c)
        return out

    def scores_encoded(self, emb: torch.Tensor, eot: torch.Tensor, prompt_tokens: list[set[int]]) -> torch.Tensor:
        """[B, C] the metric from prompts already encoded: ``emb`` [B, 77, d] as :func:`encode_prompts`
        returns it, ``eot`` [B, d] as :func:`encode_eot` returns it, ``prompt_tokens`` the token-id
        sets :func:`token_sets` returns (for tokenuni). Differentiable in ``emb`` / ``eot``: an
        attack that controls the text encoder's input embeddings is gated by this, the same
        computation :meth:`scores` does on text (float64; tested equal)."""
        tok = self._tokenuni_sets(prompt_tokens).to(emb.device)
        if self.metric == "tokenuni":
            return tok
        e = self._normalized(emb)  # the one normalisation of clipcos (text and encoded paths alike)
        cos = e @ self._concept_emb.to(e.device).t()
        return cos if self.metric == "clipcos" else torch.maximum(cos, tok)

    def gates_encoded(self, emb: torch.Tensor, eot: torch.Tensor, prompt_tokens: list[set[int]]) -> torch.Tensor:
        """[B, K] gates from encoded prompts (:meth:`scores_encoded`), differentiable; float64."""
        s = self.scores_encoded(emb, eot, prompt_tokens)
        owner = self.owner.to(s.device)
        return torch.stack([s[:, owner == k].amax(1) for k in range(self.num_spms)], 1)


class CalibratedTransport(Transport):
    """Opt-in gate (``transport="calibrated"``) that keeps target prompts near 1 and other prompts
    near 0, where the reference metric leaves unrelated prompts around 0.7.

    Score: cosine of end-of-text embeddings, ``e(P) . e(c)``. Per concept, two thresholds are
    fitted on prompts that contain the concept (``positives``) and neutral ones (``negatives``,
    always including the empty prompt): ``lo`` = the highest negative score, ``hi`` = the lowest
    positive score. Gate = ``clamp((score - lo) / (hi - lo), 0, 1)``, and 1 when every token of the
    concept occurs in the prompt. Fitting costs one text-encoder pass over the calibration prompts
    at compile time.

    ``calibration`` maps a concept name to ``(positives, negatives)``; concepts without an entry
    use ``POSITIVE_TEMPLATES`` / ``NEUTRAL_PROMPTS``.
    """

    def __init__(self, pipe, concepts: list[list[str]], calibration: dict | None = None):
        flat = self._set_concepts(pipe, concepts, "calibrated")
        self._concept_eot = torch.nn.functional.normalize(encode_eot(pipe, flat).double(), dim=1)
        calibration = calibration or {}
        lo, hi, self.calibration = [], [], {}
        for j, c in enumerate(flat):
            pos, neg = calibration.get(c, (None, None))
            pos = list(pos) if pos else [t.format(c) for t in POSITIVE_TEMPLATES]
            neg = list(neg) if neg else list(NEUTRAL_PROMPTS)
            if "" not in neg:
                neg.append("")
            sp = self._eot_scores(pos)[:, j]
            sn = self._eot_scores(neg)[:, j]
            lo_j, hi_j = float(sn.max()), float(sp.min())
            if hi_j <= lo_j + 1e-3:
                # Not separable by this score: a steep ramp just above the negatives, so every
                # calibration negative stays closed (direct mentions still open via token hits).
                hi_j = lo_j + 1e-3
            lo.append(lo_j)
            hi.append(hi_j)
            self.calibration[c] = {"lo": lo_j, "hi": hi_j, "positives": pos, "negatives": neg}
        self._lo = torch.tensor(lo, dtype=torch.float64)
        self._hi = torch.tensor(hi, dtype=torch.float64)

    def _eot_scores(self, prompts: list[str]) -> torch.Tensor:
        e = torch.nn.functional.normalize(encode_eot(self.pipe, prompts).double(), dim=1)
        return e @ self._concept_eot.to(e.device).t()

    def scores(self, prompts: list[str]) -> torch.Tensor:
        s = self._eot_scores(prompts).cpu()
        ramp = ((s - self._lo) / (self._hi - self._lo)).clamp(0.0, 1.0)
        full_hit = (self.tokenuni(prompts) >= 1.0).double()
        return torch.maximum(ramp, full_hit).float()

    def scores_encoded(self, emb, eot, prompt_tokens):
        e = torch.nn.functional.normalize(eot.double(), dim=1)
        s = e @ self._concept_eot.to(e.device).t()
        ramp = ((s - self._lo.to(e.device)) / (self._hi - self._lo).to(e.device)).clamp(0.0, 1.0)
        full_hit = (self._tokenuni_sets(prompt_tokens) >= 1.0).double().to(e.device)
        return torch.maximum(ramp, full_hit)
