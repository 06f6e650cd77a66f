"""Run an exported folder (:func:`spm_rt.export.export_onnx`) with ONNX Runtime: text encoder with
Facilitated Transport, the UNet denoising loop and the VAE decoder, from the folder alone.

The graphs run on numpy through onnxruntime; the scheduler is diffusers' own class (saved config)
and the tokenizer transformers' (saved files), so the loop reproduces the diffusers pipeline step
for step: same latents for the same seed (``torch.Generator().manual_seed(seed)``, drawn as
``randn_tensor`` does on the CPU), same classifier-free guidance layout ``[uncond; cond]``, same
SDXL micro-conditioning (``time_ids = [h, w, 0, 0, h, w]``, zero negative embeddings when
``force_zeros_for_empty_prompt`` and no negative prompt), same VAE scaling and post-processing.
Not reproduced: SDXL's invisible watermark (off unless the package is installed), the safety
checker, ``guidance_rescale``, ``clip_skip``, IP adapters.
"""
from __future__ import annotations

import inspect
import os
from pathlib import Path

import numpy as np

from spm_rt.export.onnx import read_manifest

_ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int32)": np.int32,
              "tensor(int64)": np.int64, "tensor(double)": np.float64}


def _require_ort():
    try:
        import onnxruntime
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("running ONNX graphs needs onnxruntime: pip install 'spm_rt[export]'") from exc
    return onnxruntime


class ONNXPipeline:
    """The exported pipeline on ONNX Runtime.

    ``providers`` defaults to the CPU provider (pass e.g. ``["CUDAExecutionProvider",
    "CPUExecutionProvider"]`` where available). ``components`` limits which graphs are loaded.

    Example::

        >>> runner = ONNXPipeline("out/onnx")  # doctest: +SKIP
        >>> runner.encode(["a photo of snoopy"])["gates"]  # doctest: +SKIP
        array([[0.93]], dtype=float32)
        >>> images = runner(["a photo of snoopy"], steps=30, seed=0)  # doctest: +SKIP
    """

    def __init__(self, onnx_dir: str | os.PathLike, *, providers: list[str] | None = None,
                 components: tuple[str, ...] | None = None, session_options=None):
        ort = _require_ort()
        self.root = Path(onnx_dir)
        self.manifest = read_manifest(self.root)
        info = self.manifest["pipeline"]
        self.sdxl = self.manifest["arch"] == "sdxl"
        self.providers = providers or ["CPUExecutionProvider"]
        wanted = components or tuple(self.manifest["graphs"])
        self.sessions = {}
        for name in wanted:
            spec = self.manifest["graphs"].get(name)
            if spec is None:
                raise FileNotFoundError(f"{onnx_dir}: no {name} graph (exported components: "
                                        f"{list(self.manifest['graphs'])})")
            self.sessions[name] = ort.InferenceSession(str(self.root / spec["file"]), sess_options=session_options,
                                                       providers=self.providers)
        import transformers

        tok_cls = getattr(transformers, info.get("tokenizer_class") or "CLIPTokenizer", transformers.CLIPTokenizer)
        self.tokenizer = tok_cls.from_pretrained(str(self.root / info["tokenizer"]))
        self.tokenizer_2 = tok_cls.from_pretrained(str(self.root / info["tokenizer_2"])) if self.sdxl else None
        # each graph's own input types (the text encoder stays float32 when the UNet is float16)
        self._types = {name: {i.name: _ORT_TYPES.get(i.type, np.float32) for i in sess.get_inputs()}
                       for name, sess in self.sessions.items()}

    # -- graphs --------------------------------------------------------------------------------
    def _ids(self, tokenizer, prompts: list[str]) -> np.ndarray:
        return np.asarray(tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length,
                                    truncation=True).input_ids, dtype=np.int32)

    def encode(self, prompts: str | list[str]) -> dict[str, np.ndarray]:
        """Text-encoder graph: ``prompt_embeds [B, 77, d]``, ``gates [B, k_max]`` (Facilitated
        Transport computed in the graph) and, for SDXL, ``pooled_prompt_embeds [B, d2]``.

        Example::

            >>> ONNXPipeline("out/onnx").encode("a red circle")["gates"].shape  # doctest: +SKIP
            (1, 4)
        """
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        feeds = {"input_ids": self._ids(self.tokenizer, prompts)}
        if self.sdxl:
            feeds["input_ids_2"] = self._ids(self.tokenizer_2, prompts)
        names = [o.name for o in self.sessions["text_encoder"].get_outputs()]
        return dict(zip(names, self.sessions["text_encoder"].run(None, self._cast("text_encoder", feeds))))

    def unet(self, sample, timestep, encoder_hidden_states, gates=None, text_embeds=None, time_ids=None) -> np.ndarray:
        """One UNet call; ``gates [rows, k_max]`` per UNet batch row (graphs exported with gates="input")."""
        timestep = np.asarray(timestep, np.float32).reshape(-1)
        if timestep.shape[0] == 1 and sample.shape[0] > 1:
            timestep = np.repeat(timestep, sample.shape[0])
        feeds = {"sample": sample, "timestep": timestep, "encoder_hidden_states": encoder_hidden_states}
        if self.sdxl:
            feeds["text_embeds"] = text_embeds
            feeds["time_ids"] = time_ids
        if self.manifest["gates_mode"] == "input":
            if gates is None:
                raise ValueError("this UNet graph takes gates [rows, k_max]")
            feeds["gates"] = gates
        return self.sessions["unet"].run(None, self._cast("unet", feeds))[0]

    def _cast(self, graph: str, feeds: dict) -> dict:
        types = self._types[graph]
        return {k: np.ascontiguousarray(np.asarray(v).astype(types[k], copy=False)) for k, v in feeds.items()}

    def decode(self, latents: np.ndarray) -> np.ndarray:
        """VAE decoder graph on scaled-back latents: images in [-1, 1], NCHW."""
        return self.sessions["vae_decoder"].run(None, self._cast("vae_decoder", {"latent_sample": latents}))[0]

    # -- the loop ------------------------------------------------------------------------------
    def _scheduler(self):
        import diffusers

        folder = self.root / self.manifest["pipeline"]["scheduler"]
        import json

        cls_name = json.loads((folder / "scheduler_config.json").read_text())["_class_name"]
        return getattr(diffusers, cls_name).from_pretrained(str(folder))

    def __call__(self, prompts: str | list[str], *, steps: int = 50, guidance_scale: float = 7.5,
                 seed: int | list[int] = 0,
                 height: int | None = None, width: int | None = None, negative_prompt: str | list[str] | None = None,
                 gates=None, eta: float = 0.0, output_type: str = "pil", progress: bool = False):
        """Generate one image per prompt; returns PIL images (``output_type="pil"``) or a float
        array ``[B, H, W, 3]`` in [0, 1] (``"np"``). ``gates [K]`` or ``[B, K]`` overrides the
        text-encoder graph's gates (columns beyond K are padded with zeros). ``seed``: an int
        seeds one generator for the whole batch (diffusers' ``generator=torch.Generator()``);
        a list of ints, one per prompt, seeds one generator per prompt (diffusers'
        ``generator=[...]``; what ``spm-rt generate --onnx`` passes: ``seed + i``)."""
        import torch

        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        b = len(prompts)
        info = self.manifest["pipeline"]
        scale = info["vae_scale_factor"]
        height = height or info["unet_sample_size"] * scale
        width = width or info["unet_sample_size"] * scale
        if height % scale or width % scale:
            raise ValueError(f"height and width must be multiples of {scale}")
        cfg = guidance_scale > 1.0 and info.get("time_cond_proj_dim") is None

        enc = self.encode(prompts)
        emb, pooled = enc["prompt_embeds"], enc.get("pooled_prompt_embeds")
        k_max = self.manifest["k_max"]
        if gates is not None:
            g = np.asarray(gates, np.float32)
            g = np.broadcast_to(g[None] if g.ndim == 1 else g, (b, g.shape[-1]))
            g = np.pad(g, ((0, 0), (0, k_max - g.shape[1])))
        else:
            g = enc["gates"]
        if cfg:
            if self.sdxl and negative_prompt is None and info["force_zeros_for_empty_prompt"]:
                neg_emb, neg_pooled = np.zeros_like(emb), np.zeros_like(pooled)
            else:
                neg = negative_prompt if negative_prompt is not None else ""
                neg = [neg] * b if isinstance(neg, str) else list(neg)
                neg_enc = self.encode(neg)
                neg_emb, neg_pooled = neg_enc["prompt_embeds"], neg_enc.get("pooled_prompt_embeds")
            emb = np.concatenate([neg_emb, emb])
            pooled = np.concatenate([neg_pooled, pooled]) if self.sdxl else None
            row_gates = np.concatenate([g, g])  # the prompt's gates on both CFG halves
        else:
            row_gates = g
        time_ids = None
        if self.sdxl:
            time_ids = np.tile(np.asarray([[height, width, 0, 0, height, width]], np.float32), (emb.shape[0], 1))

        scheduler = self._scheduler()
        scheduler.set_timesteps(steps)
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(0)
        shape = (b, info["unet_in_channels"], height // scale, width // scale)
        if isinstance(seed, int):  # one generator for the batch, as diffusers' generator=Generator
            generator = torch.Generator("cpu").manual_seed(seed)
            latents = torch.randn(shape, generator=generator, dtype=torch.float32)
        else:  # one generator per prompt, as diffusers' generator=[Generator, ...] (randn_tensor)
            seeds = list(seed)
            if len(seeds) != b:
                raise ValueError(f"seed: {len(seeds)} seeds for {b} prompts (one per prompt, or one int)")
            generator = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
            latents = torch.cat([torch.randn((1, *shape[1:]), generator=g, dtype=torch.float32) for g in generator])
        latents = latents * scheduler.init_noise_sigma
        accepted = set(inspect.signature(scheduler.step).parameters)
        extra = {k: v for k, v in (("eta", eta), ("generator", generator)) if k in accepted}

        timesteps = scheduler.timesteps
        iterator = timesteps
        if progress:
            from tqdm.auto import tqdm

            iterator = tqdm(timesteps, desc="denoising")
        for t in iterator:
            model_in = torch.cat([latents] * 2) if cfg else latents
            model_in = scheduler.scale_model_input(model_in, t)
            noise = self.unet(model_in.numpy(), np.full(model_in.shape[0], float(t), np.float32), emb,
                              gates=row_gates, text_embeds=pooled, time_ids=time_ids)
            noise = torch.from_numpy(np.asarray(noise, np.float32))
            if cfg:
                uncond, text = noise.chunk(2)
                noise = uncond + guidance_scale * (text - uncond)
            latents = scheduler.step(noise, t, latents, **extra, return_dict=False)[0]

        mean, std = info.get("latents_mean"), info.get("latents_std")
        if mean is not None and std is not None:
            mean = torch.tensor(mean).view(1, -1, 1, 1)
            std = torch.tensor(std).view(1, -1, 1, 1)
            latents = latents * std / info["vae_scaling_factor"] + mean
        else:
            latents = latents / info["vae_scaling_factor"]
            if info.get("vae_shift_factor") is not None:
                latents = latents + info["vae_shift_factor"]
        image = self.decode(latents.numpy()).astype(np.float32)
        image = np.clip(image / 2 + 0.5, 0.0, 1.0).transpose(0, 2, 3, 1)
        if output_type == "np":
            return image
        if output_type != "pil":
            raise ValueError(f"output_type must be 'pil' or 'np', got {output_type!r}")
        from PIL import Image

        return [Image.fromarray((im * 255).round().astype(np.uint8)) for im in image]


def run_onnx_pipeline(onnx_dir: str | os.PathLike, prompts: str | list[str], *, steps: int = 50,
                      guidance_scale: float = 7.5, seed: int | list[int] = 0, height: int | None = None, width: int | None = None,
                      negative_prompt: str | list[str] | None = None, gates=None, output_type: str = "pil",
                      providers: list[str] | None = None, session_options=None, progress: bool = False):
    """Generate images from an exported folder with ONNX Runtime only (text encoder with gates, UNet
    loop, VAE decode); returns a list of PIL images (or ``[B, H, W, 3]`` floats with
    ``output_type="np"``). Same images as the PyTorch ``SPMPipeline`` for the same seed, within
    floating-point tolerance.

    Example::

        >>> from spm_rt.export import run_onnx_pipeline
        >>> images = run_onnx_pipeline("out/onnx", ["a photo of snoopy"], steps=30, seed=0)  # doctest: +SKIP
        >>> images[0].save("snoopy.png")  # doctest: +SKIP
    """
    runner = ONNXPipeline(onnx_dir, providers=providers, session_options=session_options)
    return runner(prompts, steps=steps, guidance_scale=guidance_scale, seed=seed, height=height, width=width,
                  negative_prompt=negative_prompt, gates=gates, output_type=output_type, progress=progress)


def optimized_graph_signature(onnx_path: str | os.PathLike, *, session_options=None,
                              providers: list[str] | None = None) -> list[tuple]:
    """The graph ONNX Runtime actually runs, as comparable data: load ``onnx_path`` with
    ``session_options`` (default: ORT's, all optimizations, one thread), save the optimized model
    (``SessionOptions.optimized_model_filepath``, weights to a scratch file) and return one entry
    per node, in execution order: ``(op_type, domain, attributes, inputs)``, where an input is
    ``("init", dims, dtype)`` for an initializer and ``("value",)`` otherwise. Two graphs with equal
    signatures run the same kernels on same-shaped weights: they differ only in weight values.

    Example::

        >>> a = optimized_graph_signature("base/unet/model.onnx")  # doctest: +SKIP
        >>> a == optimized_graph_signature("folded/unet/model.onnx")  # doctest: +SKIP
        True
    """
    import tempfile

    import onnx

    ort = _require_ort()
    if session_options is None:
        session_options = ort.SessionOptions()
        session_options.intra_op_num_threads = 1
        session_options.inter_op_num_threads = 1
        session_options.log_severity_level = 3  # not the NCHWc "hardware specific" warning of every save
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "optimized.onnx"
        session_options.optimized_model_filepath = str(out)
        session_options.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                                 "optimized.onnx_data")
        session_options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes",
                                                 "1024")
        ort.InferenceSession(str(onnx_path), session_options, providers=providers or ["CPUExecutionProvider"])
        session_options.optimized_model_filepath = ""
        model = onnx.load(str(out), load_external_data=False)
    inits = {i.name: (tuple(i.dims), int(i.data_type)) for i in model.graph.initializer}
    signature = []
    for node in model.graph.node:
        attrs = tuple(sorted((a.name, repr(onnx.helper.get_attribute_value(a))) for a in node.attribute))
        ins = tuple(("init",) + inits[i] if i in inits else ("value",) for i in node.input)
        signature.append((node.op_type, node.domain, attrs, ins))
    return signature


__all__ = ["ONNXPipeline", "run_onnx_pipeline", "optimized_graph_signature"]
