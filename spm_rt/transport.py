"""Facilitated Transport: one gate per SPM per prompt, from the prompt's similarity to the
SPM's concepts, computed with the pipeline's own tokenizer and text encoder.

* ``clipcos(P, c)``: cosine of the flattened ``[77, d]`` text embeddings (padding included).
  SD1.x/2.x: the text encoder's last hidden state; SDXL: the pipeline's ``prompt_embeds``
  (both encoders).
* ``tokenuni(P, c) = |T_P ∩ T_c| / |T_c|`` over token ids minus the special tokens.
* ``clipcos_tokenuni`` (default) = max of the two.
* gate(SPM) = max over its concepts.
"""
from __future__ import annotations

import torch

METRICS = ("clipcos", "tokenuni", "clipcos_tokenuni")
TRANSPORTS = METRICS + ("fixed",)


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
        for k, names in enumerate(concepts):
            if not names:
                raise ValueError(f"SPM {k} has no concept names: pass concepts=... (or transport='fixed' with gates)")
        self.pipe = pipe
        self.metric = metric
        self.concepts = [list(c) for c in concepts]
        flat = [c for names in self.concepts for c in names]
        self.owner = torch.tensor([k for k, names in enumerate(self.concepts) for _ in names])  # [C]
        self.num_spms = len(self.concepts)
        self._concept_emb = self._normalized(encode_prompts(pipe, flat)) if metric != "tokenuni" else None
        self._concept_tokens = token_sets(pipe.tokenizer, flat)

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
