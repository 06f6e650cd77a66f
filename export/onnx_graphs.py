"""The torch modules that ``export_onnx`` traces: the UNet with gated SPM layers (or folded
weights), the text encoder with Facilitated Transport on tensors, the VAE decoder, and the
concept tensors the transport graph holds.

Split from ``spm_rt.export.onnx``. Each module computes exactly what the PyTorch runtime computes
(``spm_rt.functional``, ``spm_rt.transport``), written so that the SPM and concept tensors leave
the exporter as named initializers feeding their ops directly.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from spm_rt.kernels.reference import gate_coefficients
from spm_rt.stack import Stack
from spm_rt.transport import token_sets


def _is_sdxl(pipe) -> bool:
    return getattr(pipe, "text_encoder_2", None) is not None


class _SPMExportLayer(nn.Module):
    """Stands in for one adapted module during export: the original module plus the padded stack
    as parameters (so they leave the exporter as named initializers). Computes exactly
    ``spm_rt.functional``'s gated op, written so the SPM tensors feed Gemm/MatMul/Mul directly."""

    def __init__(self, base: nn.Module, stack: Stack, combine: str, gate_input: "_GateInput"):
        super().__init__()
        self.base = base
        self.gate_input = gate_input  # the graph's ``gates`` input, set by _UNetGraph.forward
        self.down = nn.Parameter(stack.down.detach().clone(), requires_grad=False)  # [K*r, in]
        self.up = nn.Parameter(stack.up.detach().clone(), requires_grad=False)  # [out, K*r]
        self.scale = nn.Parameter(stack.scale.detach().clone(), requires_grad=False)  # [K] float32
        self.rank = stack.rank
        self.k = stack.num_spms
        self.combine = combine
        self.conv = isinstance(base, nn.Conv2d)
        self.out_features, self.in_features = int(stack.up.shape[0]), int(stack.down.shape[1])

    def _coefficients(self, z: torch.Tensor, gates: torch.Tensor, k_axis: int) -> torch.Tensor:
        # z: K on axis k_axis, rank on k_axis + 1; gates [N, K] float32. The runtime's own gating
        # function (elementwise Mul/ReduceSum only: the scale initializer feeds a Mul directly)
        return gate_coefficients(z, gates, self.scale, self.combine, k_axis)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        gates = self.gate_input.gates  # [N, K] float32: the graph input, one row per UNet batch row
        n, kr = x.shape[0], self.k * self.rank
        if self.conv:  # x [N, in, H, W]
            z = torch.matmul(self.down, x.flatten(2))  # [N, K*r, HW]
            c = self._coefficients(z.unflatten(1, (self.k, self.rank)), gates, 1).flatten(1, 2)
            return y + torch.matmul(self.up, c).reshape_as(y)  # [N, out, HW] -> NCHW
        # feature sizes as Python ints: constant Reshape targets, no Shape/Gather/Concat per module
        z = F.linear(x.reshape(-1, self.in_features), self.down)  # [M, K*r] (Gemm, transB)
        c = self._coefficients(z.reshape(n, -1, self.k, self.rank), gates, 2).reshape(-1, kr)
        # one Gemm (transB) adds the branch to the base output in place of a separate Add pass over
        # [M, out]; reshape_as exports as Reshape(.., Shape(y)) instead of rebuilding y's shape
        # from gathered dims (8 small nodes per module)
        return torch.addmm(y.reshape(-1, self.out_features), c, self.up.t()).reshape_as(y)  # [M, out] -> y's shape


def _padded(gates: torch.Tensor, k: int) -> torch.Tensor:
    """A gate vector [K] padded with zeros to the runtime's k slots."""
    return torch.cat([gates, gates.new_zeros(k - gates.shape[0])])


class _FoldedLayer(nn.Module):
    """An adapted module with the merged weight (base weight + SPM update for fixed gates)."""

    def __init__(self, base: nn.Module, merged: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(merged, requires_grad=False)
        self.bias = base.bias
        self.conv = isinstance(base, nn.Conv2d)

    def forward(self, x):
        return F.conv2d(x, self.weight, self.bias) if self.conv else F.linear(x, self.weight, self.bias)


class _GateInput:
    """Hands the UNet graph's ``gates`` input to every _SPMExportLayer during tracing."""

    gates: torch.Tensor | None = None


class _UNetGraph(nn.Module):
    def __init__(self, unet: nn.Module, sdxl: bool, gate_input: _GateInput | None):
        super().__init__()
        self.unet = unet
        self.sdxl = sdxl
        self.gate_input = gate_input

    def forward(self, sample, timestep, encoder_hidden_states, *rest):
        added = None
        if self.sdxl:
            added = {"text_embeds": rest[0], "time_ids": rest[1]}
            rest = rest[2:]
        if self.gate_input is not None:
            self.gate_input.gates = rest[0]
        try:
            return self.unet(sample, timestep, encoder_hidden_states, added_cond_kwargs=added, return_dict=False)[0]
        finally:
            if self.gate_input is not None:
                self.gate_input.gates = None


class _Transport(nn.Module):
    """Facilitated Transport on tensors, with the concepts as buffers."""

    def __init__(self, metric: str, concept_embeddings, concept_tokens, counts, owner, fixed_gates):
        super().__init__()
        self.metric = metric  # one of METRICS, or "fixed"
        self.register_buffer("concept_embeddings", concept_embeddings)  # [C, 77*d] normalized
        self.register_buffer("concept_tokens", concept_tokens)  # [C, T] int32, -1 = padding
        self.register_buffer("concept_token_counts", counts)  # [C] float32, |T_c|
        self.register_buffer("concept_owner", owner)  # [K, C] float32 one-hot: SPM k owns concept c
        self.register_buffer("fixed_gates", fixed_gates)  # [K] float32

    def forward(self, prompt_embeds, input_ids):
        b = input_ids.shape[0]
        if self.metric == "fixed":
            return self.fixed_gates.unsqueeze(0).expand(b, -1) + 0.0
        scores = None
        if self.metric in ("clipcos", "clipcos_tokenuni"):
            e = prompt_embeds.float().reshape(b, -1)
            e = e / torch.linalg.vector_norm(e, dim=1, keepdim=True).clamp_min(1e-12)
            scores = F.linear(e, self.concept_embeddings.float())  # [B, C]
        if self.metric in ("tokenuni", "clipcos_tokenuni"):
            hit = input_ids[:, None, None, :] == self.concept_tokens[None, :, :, None]  # [B, C, T, 77]
            present = hit.to(torch.float32).amax(dim=3)  # [B, C, T]
            uni = present.sum(dim=2) / self.concept_token_counts.clamp_min(1.0)  # [B, C]
            scores = uni if scores is None else torch.maximum(scores, uni)
        owned = self.concept_owner[None] > 0  # [1, K, C]
        per_spm = torch.where(owned, scores[:, None, :], torch.full_like(scores[:, None, :], float("-inf")))
        gates = per_spm.amax(dim=2)  # [B, K]
        active = self.concept_owner.amax(dim=1) > 0  # [K]: padding slots own no concept
        return torch.where(active[None], gates, torch.zeros_like(gates))


class _TextGraph(nn.Module):
    def __init__(self, pipe, transport: _Transport):
        super().__init__()
        self.sdxl = _is_sdxl(pipe)
        self.text_encoder = pipe.text_encoder
        if self.sdxl:
            self.text_encoder_2 = pipe.text_encoder_2
        self.transport = transport

    def forward(self, input_ids, input_ids_2=None):
        if not self.sdxl:  # StableDiffusionPipeline.encode_prompt: the last hidden state
            emb = self.text_encoder(input_ids)[0]
            return emb, self.transport(emb, input_ids)
        # StableDiffusionXLPipeline.encode_prompt: penultimate hidden states of both encoders,
        # concatenated; pooled output of encoder 2
        h1 = self.text_encoder(input_ids, output_hidden_states=True).hidden_states[-2]
        out2 = self.text_encoder_2(input_ids_2, output_hidden_states=True)
        emb = torch.cat([h1, out2.hidden_states[-2].to(h1.dtype)], dim=-1)
        return emb, self.transport(emb, input_ids), out2[0]


class _VAEDecoderGraph(nn.Module):
    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, latent_sample):
        return self.vae.decode(latent_sample, return_dict=False)[0]


@contextlib.contextmanager
def _swapped(root: nn.Module, replacements: dict[str, nn.Module]):
    """Temporarily set root.<path> = module for each entry; always restored."""
    old = {}
    try:
        for path, mod in replacements.items():
            parent_path, _, name = path.rpartition(".")
            parent = root.get_submodule(parent_path) if parent_path else root
            old[path] = (parent, name, getattr(parent, name))
            setattr(parent, name, mod)
        yield
    finally:
        for parent, name, mod in old.values():
            setattr(parent, name, mod)


def _concept_tensors(tokenizer, concepts: list[list[str]], k_max: int, c_max: int, emb_fn) -> dict[str, torch.Tensor]:
    """Concept initializers for the text-encoder graph (``emb_fn(names) -> [C, 77, d]``)."""
    flat = [c for names in concepts for c in names]
    if len(flat) > c_max:
        raise ValueError(f"{len(flat)} concepts do not fit concepts_max={c_max}")
    length = tokenizer.model_max_length
    tokens = torch.full((c_max, length), -1, dtype=torch.int32)
    counts = torch.zeros(c_max, dtype=torch.float32)
    for j, ids in enumerate(token_sets(tokenizer, flat) if flat else []):
        ids = sorted(ids)
        tokens[j, : len(ids)] = torch.tensor(ids, dtype=torch.int32)
        counts[j] = len(ids)
    owner = torch.zeros(k_max, c_max, dtype=torch.float32)
    j = 0
    for k, names in enumerate(concepts):
        for _ in names:
            owner[k, j] = 1.0
            j += 1
    emb = None
    if flat:
        e = emb_fn(flat).double().reshape(len(flat), -1)
        e = e / e.norm(dim=1, keepdim=True).clamp_min(1e-12)  # as spm_rt.transport normalizes
        emb = torch.zeros(c_max, e.shape[1], dtype=torch.float32)
        emb[: len(flat)] = e.float()
    return {"concept_embeddings": emb, "concept_tokens": tokens, "concept_token_counts": counts,
            "concept_owner": owner}
