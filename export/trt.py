"""TensorRT engines from an exported ONNX folder: build (ONNX parser, builder config, one
optimization profile per graph, optional refit) and refit of the SPM set. The only module of
spm_rt that imports ``tensorrt`` (lazily, inside the functions).

Thin on purpose: everything TensorRT consumes is checked elsewhere (``onnx.checker``, strict
shape inference, ONNX Runtime parity with PyTorch in tests/test_export.py). See
export/README.md for what was and was not run.
"""
from __future__ import annotations

import functools
import importlib
import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from spm_rt.export.onnx import MANIFEST, concept_initializers, read_manifest, spm_initializers

PRECISIONS = ("fp32", "fp16", "bf16")
ENGINE_SUFFIX = ".plan"


# The TensorRT Python packages spm_rt can use, in order of preference: the standard one (engines for
# every NVIDIA GPU, Hopper included) and TensorRT for RTX (``pip install tensorrt-rtx-cu12``, import
# name ``tensorrt_rtx``), whose Builder, network definition and ONNX parser work without a GPU
# (only ``build_serialized_network`` needs a CUDA driver): what the CI parse check uses.
TENSORRT_MODULES = ("tensorrt", "tensorrt_rtx")
_INSTALL_HINT = ("pip install 'spm_rt[trt]' (TensorRT >= 10, engines need an NVIDIA GPU), or "
                 "pip install tensorrt-rtx-cu12 (TensorRT for RTX: parses graphs and marks weights without a GPU)")


@functools.lru_cache(maxsize=None)
def _tensorrt_module(preferred: str | None = None):
    names = (preferred,) if preferred else TENSORRT_MODULES
    for name in names:
        try:
            return importlib.import_module(name)
        except Exception:  # ImportError, or a broken install (missing shared library)
            continue
    return None


def import_tensorrt(preferred: str | None = None):
    """The TensorRT Python module: ``tensorrt`` if it imports, else ``tensorrt_rtx`` (or only
    ``preferred``; the environment variable ``SPM_RT_TENSORRT`` sets the default). No GPU needed.

    Example::

        >>> trt = import_tensorrt()  # doctest: +SKIP
        >>> trt.__name__  # doctest: +SKIP
        'tensorrt_rtx'
    """
    preferred = preferred or os.environ.get("SPM_RT_TENSORRT") or None
    if preferred is not None and preferred not in TENSORRT_MODULES:
        raise ValueError(f"SPM_RT_TENSORRT / preferred must be one of {TENSORRT_MODULES}, got {preferred!r}")
    trt = _tensorrt_module(preferred)
    if trt is None:
        wanted = preferred or " or ".join(TENSORRT_MODULES)
        raise ImportError(f"TensorRT needs the {wanted} Python package, which does not import here: {_INSTALL_HINT}")
    return trt


def is_tensorrt_available() -> bool:
    """True when a TensorRT Python package (``tensorrt`` or ``tensorrt_rtx``) imports (says
    nothing about a GPU)."""
    try:
        import_tensorrt()
    except (ImportError, ValueError):
        return False
    return True


def _require_tensorrt():
    """Import TensorRT and check for a CUDA GPU (engines need one), with an error naming what is missing."""
    trt = import_tensorrt()
    import torch

    if not torch.cuda.is_available():
        raise RuntimeError("TensorRT engines need an NVIDIA GPU with CUDA, and none is visible here "
                           "(torch.cuda.is_available() is False); 'spm-rt export check --tensorrt' parses "
                           "the graphs without one")
    return trt


# ---------------------------------------------------------------------------------------------
# shapes and optimization profiles (plain Python: checked without TensorRT)

@dataclass(frozen=True)
class Shapes:
    """min/opt/max of (images per call, image height, image width in pixels)."""

    min: tuple[int, int, int]
    opt: tuple[int, int, int]
    max: tuple[int, int, int]


def parse_shapes(text: str) -> Shapes:
    """``"1x512x512/2x512x512/4x768x768"`` -> :class:`Shapes` (batch x height x width, min/opt/max).

    Example::

        >>> parse_shapes("1x512x512/1x512x512/4x768x768").max
        (4, 768, 768)
    """
    parts = text.split("/")
    if len(parts) != 3:
        raise ValueError(f"shapes must be MIN/OPT/MAX, each BATCHxHEIGHTxWIDTH, got {text!r}")
    try:
        triples = [tuple(int(v) for v in p.lower().split("x")) for p in parts]
    except ValueError:
        raise ValueError(f"shapes must be MIN/OPT/MAX, each BATCHxHEIGHTxWIDTH (integers), got {text!r}") from None
    if any(len(t) != 3 or min(t) < 1 for t in triples):
        raise ValueError(f"shapes must be MIN/OPT/MAX, each BATCHxHEIGHTxWIDTH of positive integers, got {text!r}")
    for i in range(3):
        if not triples[0][i] <= triples[1][i] <= triples[2][i]:
            raise ValueError(f"shapes must satisfy min <= opt <= max in every dimension, got {text!r}")
    return Shapes(*triples)


def default_shapes(manifest: dict) -> Shapes:
    """1..4 images at the pipeline's default size."""
    info = manifest["pipeline"]
    px = info["unet_sample_size"] * info["vae_scale_factor"]
    return Shapes((1, px, px), (1, px, px), (4, px, px))


def graph_profiles(manifest: dict, graph: str, shapes: Shapes) -> dict[str, tuple[tuple[int, ...], ...]]:
    """Optimization-profile shapes ``{input: (min, opt, max)}`` of one exported graph.

    The UNet sees ``2 x batch`` rows with classifier-free guidance and ``batch`` rows without:
    its row range is ``[min batch, 2 x max batch]``, optimized for ``2 x opt batch``. Text encoder
    and VAE decoder see ``batch``.

    Example::

        >>> graph_profiles(read_manifest("out/onnx"), "unet", parse_shapes("1x512x512/1x512x512/2x512x512"))["gates"]  # doctest: +SKIP
        ((1, 4), (2, 4), (4, 4))
    """
    info = manifest["pipeline"]
    scale = info["vae_scale_factor"]
    spec = manifest["graphs"][graph]
    for s in (shapes.min, shapes.opt, shapes.max):
        if s[1] % scale or s[2] % scale:
            raise ValueError(f"image height and width must be multiples of {scale}, got {s}")
    if graph == "unet":
        sizes = [(shapes.min[0], shapes.min[1], shapes.min[2]), (2 * shapes.opt[0], shapes.opt[1], shapes.opt[2]),
                 (2 * shapes.max[0], shapes.max[1], shapes.max[2])]
    else:
        sizes = [shapes.min, shapes.opt, shapes.max]
    seq = info["model_max_length"]
    out = {}
    for inp in spec["inputs"]:
        per = []
        for batch, h, w in sizes:
            named = {"batch": batch, "height": h // scale, "width": w // scale, "sequence": seq}
            dims = []
            for d in inp["shape"]:
                if isinstance(d, int):
                    dims.append(d)
                elif d in named:
                    dims.append(named[d])
                else:
                    raise ValueError(f"{graph} input {inp['name']} has an unknown symbolic axis {d!r}")
            per.append(tuple(dims))
        out[inp["name"]] = tuple(per)
    return out


def refittable_names(manifest: dict, graph: str) -> list[str]:
    """Initializer names a refit swaps: the UNet's ``spm.*`` tensors and the text encoder's
    ``transport.*`` concept tensors."""
    if graph == "unet" and manifest["gates_mode"] == "input":
        return [f"spm.{p}.{part}" for p in manifest["spm_modules"] for part in ("down", "up", "scale")]
    if graph == "text_encoder":
        return ["transport.concept_embeddings", "transport.concept_tokens", "transport.concept_token_counts",
                "transport.concept_owner", "transport.fixed_gates"]
    return []


# ---------------------------------------------------------------------------------------------
# build

def _progress_monitor_class(trt):
    """An ``IProgressMonitor`` drawing one tqdm bar per build phase (nested phases indented)."""
    from tqdm.auto import tqdm

    class TqdmProgressMonitor(trt.IProgressMonitor):
        def __init__(self):
            trt.IProgressMonitor.__init__(self)
            self._bars: dict[str, object] = {}
            self._depth: dict[str, int] = {}
            self._lock = threading.Lock()  # TensorRT may call from several threads

        def phase_start(self, phase_name, parent_phase, num_steps):
            with self._lock:
                depth = self._depth.get(parent_phase, -1) + 1 if parent_phase else 0
                self._depth[phase_name] = depth
                self._bars[phase_name] = tqdm(total=num_steps, desc="  " * depth + phase_name, position=depth,
                                              leave=depth == 0, dynamic_ncols=True)

        def step_complete(self, phase_name, step):
            with self._lock:
                bar = self._bars.get(phase_name)
                if bar is not None:
                    bar.update(step + 1 - bar.n)
            return True  # never cancel the build

        def phase_finish(self, phase_name):
            with self._lock:
                bar = self._bars.pop(phase_name, None)
                self._depth.pop(phase_name, None)
                if bar is not None:
                    bar.close()

    return TqdmProgressMonitor


def parse_onnx(onnx_path: str | os.PathLike, *, trt=None):
    """Parse one ONNX graph (external data included) with TensorRT's ONNX parser into a network
    definition; no GPU needed. Returns ``(builder, network, parser, logger)`` (the parser owns the
    weights the network refers to: keep it alive with the network). Raises with every parser error.

    Example::

        >>> builder, network, parser, _ = parse_onnx("out/onnx/unet/model.onnx")  # doctest: +SKIP
        >>> [network.get_input(i).name for i in range(network.num_inputs)]  # doctest: +SKIP
        ['sample', 'timestep', 'encoder_hidden_states', 'gates']
    """
    trt = trt or import_tensorrt()
    logger = trt.Logger(trt.Logger.ERROR)
    builder = trt.Builder(logger)
    flags = 0
    if hasattr(trt.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH") and int(trt.__version__.split(".")[0]) < 10 \
            and trt.__name__ == "tensorrt":
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT ({trt.__name__} {trt.__version__}) could not parse {onnx_path}: {errors}")
    return builder, network, parser, logger


def engine_config(builder, network, profiles: dict[str, tuple[tuple[int, ...], ...]], *, precision: str = "fp32",
                  refittable: bool = False, refit_names: list[str] | None = None,
                  workspace_gb: float | None = None, trt=None):
    """The builder config of one engine, on a parsed network (no GPU needed): precision, one
    optimization profile, and with ``refittable`` TensorRT's per-weight refit
    (``BuilderFlag.REFIT_INDIVIDUAL`` + ``INetworkDefinition.mark_weights_refittable``): only
    ``refit_names`` are marked, every other weight stays a constant the builder may fold and fuse.
    On a TensorRT without per-weight refit, ``BuilderFlag.REFIT`` (every weight refittable).

    TensorRT for RTX builds strongly typed networks only (no FP16/BF16 flags): the precision is
    the ONNX graph's (``spm-rt export onnx --dtype float16``); ``precision`` other than fp32 is an
    error there.
    """
    trt = trt or import_tensorrt()
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    config = builder.create_builder_config()
    if workspace_gb:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    if precision != "fp32":
        flag = getattr(trt.BuilderFlag, precision.upper(), None)
        if flag is None:
            raise ValueError(f"{trt.__name__} {trt.__version__} has no {precision.upper()} builder flag (TensorRT for "
                             f"RTX builds strongly typed networks): export the graph in that dtype instead "
                             f"(spm-rt export onnx --dtype float16) and build it as fp32")
        config.set_flag(flag)
    profile = builder.create_optimization_profile()
    for name, (mn, opt, mx) in profiles.items():
        profile.set_shape(name, mn, opt, mx)
    config.add_optimization_profile(profile)
    if refittable:
        if hasattr(trt.BuilderFlag, "REFIT_INDIVIDUAL") and hasattr(network, "mark_weights_refittable"):
            config.set_flag(trt.BuilderFlag.REFIT_INDIVIDUAL)
            unknown = [n for n in (refit_names or []) if not network.mark_weights_refittable(n)]
            if unknown:
                raise RuntimeError(f"TensorRT did not find weights named {unknown[:3]} in the network")
        else:
            config.set_flag(trt.BuilderFlag.REFIT)
    return config


def build_engine(onnx_path: str | os.PathLike, engine_path: str | os.PathLike,
                 profiles: dict[str, tuple[tuple[int, ...], ...]], *, precision: str = "fp32",
                 refittable: bool = False, refit_names: list[str] | None = None,
                 workspace_gb: float | None = None, progress: bool = True) -> Path:
    """Build one serialized engine from one ONNX graph (external data is read by the parser):
    :func:`parse_onnx`, :func:`engine_config`, then ``build_serialized_network`` (needs a GPU).

    Example::

        >>> build_engine("out/onnx/unet/model.onnx", "out/trt/unet.plan", profiles, refittable=True,
        ...              refit_names=refittable_names(manifest, "unet"))  # doctest: +SKIP
    """
    trt = _require_tensorrt()
    builder, network, parser, _ = parse_onnx(onnx_path, trt=trt)
    config = engine_config(builder, network, profiles, precision=precision, refittable=refittable,
                           refit_names=refit_names, workspace_gb=workspace_gb, trt=trt)
    monitor = None
    if progress and hasattr(trt, "IProgressMonitor"):  # TensorRT >= 10
        monitor = _progress_monitor_class(trt)()
        config.progress_monitor = monitor  # must outlive the build
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT failed to build an engine from {onnx_path} (see the log above)")
    engine_path = Path(engine_path)
    engine_path.parent.mkdir(parents=True, exist_ok=True)
    with open(engine_path, "wb") as fh:
        fh.write(serialized)
    del monitor, parser
    return engine_path


def build_engines(onnx_dir: str | os.PathLike, out_dir: str | os.PathLike, *, precision: str = "fp32",
                  refittable: bool = False, shapes: Shapes | str | None = None,
                  graphs: tuple[str, ...] | None = None, workspace_gb: float | None = None,
                  progress: bool = True) -> dict[str, Path]:
    """Build TensorRT engines for the graphs of an exported folder into ``out_dir``
    (``<graph>.plan`` plus ``manifest.json``: the ONNX manifest with an ``engines`` section).

    Example::

        >>> from spm_rt.export.trt import build_engines
        >>> build_engines("out/onnx", "out/trt", precision="fp16", refittable=True,
        ...               shapes="1x512x512/1x512x512/4x512x512")  # doctest: +SKIP
        {'unet': PosixPath('out/trt/unet.plan'), ...}
    """
    trt = _require_tensorrt()
    onnx_dir = Path(onnx_dir)
    manifest = read_manifest(onnx_dir)
    if isinstance(shapes, str):
        shapes = parse_shapes(shapes)
    shapes = shapes or default_shapes(manifest)
    graphs = graphs or tuple(manifest["graphs"])
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    built, engines = {}, {}
    for name in graphs:
        if name not in manifest["graphs"]:
            raise ValueError(f"{onnx_dir} has no {name} graph (it has {list(manifest['graphs'])})")
        profiles = graph_profiles(manifest, name, shapes)
        names = refittable_names(manifest, name) if refittable else []
        onnx_path = onnx_dir / manifest["graphs"][name]["file"]
        present = _initializer_names(onnx_path) if names else set()
        path = build_engine(onnx_path, out / f"{name}{ENGINE_SUFFIX}", profiles, precision=precision,
                            refittable=refittable, refit_names=[n for n in names if n in present],
                            workspace_gb=workspace_gb, progress=progress)
        built[name] = path
        engines[name] = {"file": path.name, "precision": precision, "refittable": refittable,
                         "profiles": {k: [list(s) for s in v] for k, v in profiles.items()}}
    manifest = dict(manifest)
    manifest["engines"] = engines
    manifest["source_onnx"] = str(onnx_dir.resolve())
    manifest["versions"] = dict(manifest.get("versions", {}), tensorrt=trt.__version__)
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return built


def _initializer_names(onnx_path: Path) -> set[str]:
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    return {i.name for i in model.graph.initializer}


# ---------------------------------------------------------------------------------------------
# refit

def refit_engines(engine_dir: str | os.PathLike, spms, *, concepts=None, onnx_dir: str | os.PathLike | None = None,
                  fixed_gates=None) -> dict[str, int]:
    """Swap the SPM set of refittable engines without a rebuild: sets the UNet engine's
    ``spm.*`` weights and the text-encoder engine's ``transport.*`` weights by name (concept
    embeddings are computed with the ONNX text-encoder graph of ``onnx_dir``, default the folder
    the engines were built from), then re-serializes the engines. Returns refitted weights per engine.

    Example::

        >>> from spm_rt.export.trt import refit_engines
        >>> refit_engines("out/trt", ["mickey.safetensors", "snoopy.safetensors"])  # doctest: +SKIP
        {'unet': 576, 'text_encoder': 4}
    """
    trt = _require_tensorrt()
    root = Path(engine_dir)
    manifest = read_manifest(root)
    engines = manifest.get("engines") or {}
    if not engines:
        raise ValueError(f"{root}: no engines listed in {MANIFEST} (built with spm-rt export engine?)")
    not_refittable = [n for n, e in engines.items() if n in ("unet", "text_encoder") and not e.get("refittable")]
    if not_refittable:
        raise ValueError(f"engines {not_refittable} were built without --refittable; rebuild them to refit")
    from spm_rt.compile import load_spms  # the same loader as the ONNX swap

    spms = load_spms(spms, concepts)
    arrays: dict[str, dict[str, np.ndarray]] = {}
    if "unet" in engines:
        arrays["unet"] = spm_initializers(manifest, spms)
    if "text_encoder" in engines:
        new_concepts = [list(s.concepts or []) for s in spms]
        te = {}
        if manifest["transport"] != "fixed":
            if not all(new_concepts):
                raise ValueError("every SPM needs concept names for Facilitated Transport: pass concepts=...")
            te = concept_initializers(onnx_dir or manifest["source_onnx"], new_concepts)
        fixed = np.zeros(manifest["k_max"], dtype=np.float32)
        fixed[: len(spms)] = fixed_gates if fixed_gates is not None else 1.0
        te["transport.fixed_gates"] = fixed
        arrays["text_encoder"] = te
    logger = trt.Logger(trt.Logger.WARNING)
    runtime = trt.Runtime(logger)
    counts = {}
    for name, weights in arrays.items():
        path = root / engines[name]["file"]
        engine = runtime.deserialize_cuda_engine(path.read_bytes())
        refitter = trt.Refitter(engine, logger)
        available = set(refitter.get_all_weights())
        if name == "text_encoder":  # tensors the graph does not use (e.g. tokens under clipcos) were dropped
            source = Path(onnx_dir or manifest["source_onnx"]) / manifest["graphs"][name]["file"]
            present = _initializer_names(source)
            weights = {k: v for k, v in weights.items() if k in present}
        weights = {k: np.ascontiguousarray(v) for k, v in weights.items()}
        unknown = [k for k in weights if k not in available]
        if unknown:
            raise RuntimeError(f"{path}: weights {unknown[:3]} are not refittable in this engine")
        keep = []  # trt.Weights borrows the numpy memory until the refit is done
        for k, arr in weights.items():
            w = trt.Weights(arr)
            keep.append((arr, w))
            if not refitter.set_named_weights(k, w):
                raise RuntimeError(f"{path}: TensorRT rejected new weights for {k} (shape {arr.shape}, {arr.dtype})")
        missing = refitter.get_missing_weights()
        if missing:
            raise RuntimeError(f"{path}: the refit also needs weights {list(missing)[:3]}")
        if not refitter.refit_cuda_engine():
            raise RuntimeError(f"{path}: TensorRT refit failed (see the log above)")
        path.write_bytes(bytes(engine.serialize()))
        counts[name] = len(weights)
    manifest.update({"concepts": [list(s.concepts or []) for s in spms], "spm_names": [s.name for s in spms],
                     "num_spms": len(spms)})
    (root / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return counts


# ---------------------------------------------------------------------------------------------
# run (for checks against ONNX Runtime / PyTorch)

class TRTEngine:
    """Run a serialized engine on torch CUDA tensors: ``engine({name: np.ndarray}) -> {name: np.ndarray}``.

    Example::

        >>> out = TRTEngine("out/trt/unet.plan")({"sample": x, "timestep": t, "encoder_hidden_states": e, "gates": g})  # doctest: +SKIP
    """

    def __init__(self, path: str | os.PathLike):
        trt = _require_tensorrt()
        self._trt = trt
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(Path(path).read_bytes())
        if self.engine is None:
            raise RuntimeError(f"TensorRT could not deserialize {path}")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if n not in self.inputs]

    def __call__(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        trt = self._trt
        keep = []
        for name in self.inputs:
            dtype = trt.nptype(self.engine.get_tensor_dtype(name))
            t = torch.from_numpy(np.ascontiguousarray(np.asarray(feeds[name]).astype(dtype))).cuda()
            keep.append(t)
            self.context.set_input_shape(name, tuple(t.shape))
            self.context.set_tensor_address(name, t.data_ptr())
        outs = {}
        for name in self.outputs:
            shape = tuple(self.context.get_tensor_shape(name))
            dtype = trt.nptype(self.engine.get_tensor_dtype(name))
            t = torch.empty(shape, dtype=torch.from_numpy(np.zeros(0, dtype)).dtype, device="cuda")
            outs[name] = t
            self.context.set_tensor_address(name, t.data_ptr())
        stream = torch.cuda.current_stream()
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError("TensorRT execution failed")
        stream.synchronize()
        return {k: v.cpu().numpy() for k, v in outs.items()}


__all__ = ["is_tensorrt_available", "Shapes", "parse_shapes", "default_shapes", "graph_profiles",
           "refittable_names", "build_engine", "build_engines", "refit_engines", "TRTEngine", "PRECISIONS"]
