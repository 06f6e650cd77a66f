"""Benchmark suite set-up: collection of ``bench_*.py``, shared models, paired timing, run facts.

Run from the repository root (the root pytest config only collects ``tests/``; this conftest adds
``bench/bench_*.py`` when pytest is pointed at ``bench/``)::

    pytest bench/ --benchmark-json bench/results/cpu_results.json
    SPM_RT_BENCH_QUICK=1 pytest bench/      # tiny model only, a few minutes

Environment knobs (all optional; every value used is stored in each result's ``extra_info``):

    SPM_RT_BENCH_QUICK=1        the tiny model instead of SD1.5's architecture
    SPM_RT_BENCH_ARCHS=tiny,sd15  explicit model list (overrides QUICK)
    SPM_RT_BENCH_THREADS=N      torch.set_num_threads(N) (default 1 on a CPU, torch's choice on a GPU)
    SPM_RT_BENCH_CLOCK=cpu|wall process CPU time (default with 1 thread on a CPU) or wall clock
    SPM_RT_BENCH_ROUNDS=N       timed rounds per case (default: per architecture, see _all_archs)
    SPM_RT_BENCH_KS=1,4,16,64   numbers of SPMs
    SPM_RT_BENCH_SD15_LATENT=16 SD1.5 latent side (image side = 8x)
    SPM_RT_BENCH_SD15_STEPS=2   SD1.5 steps of the "short generation"
    SPM_RT_BENCH_SD15_ALL=1     every SD1.5 case (the default SD1.5 matrix is cut to fit 15 min)
    SPM_RT_BENCH_MALLOC=fixed|default  glibc malloc thresholds (see _fix_malloc; default "fixed")
"""
from __future__ import annotations

import contextlib
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pytest
import torch

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))  # `import baselines` from the bench modules

from runinfo import cpu_model  # noqa: E402


# ---------------------------------------------------------------------------------------------
# collection: bench/bench_*.py (the root config's python_files only knows test_*.py)

def pytest_collect_file(file_path: Path, parent):
    from _pytest.python import path_matches_patterns

    if file_path.suffix != ".py" or not file_path.name.startswith("bench_"):
        return None
    if BENCH_DIR not in file_path.resolve().parents:
        return None
    # Collected already by pytest itself: an explicit argument, or python_files set by the user.
    if parent.session.isinitpath(file_path) or path_matches_patterns(file_path, parent.config.getini("python_files")):
        return None
    return pytest.Module.from_parent(parent, path=file_path)


def _fix_malloc() -> str:
    """Pin glibc's mmap and trim thresholds for the whole run; returns what was done.

    Measured on this machine (SD1.5 architecture, 2-step generation at 128 px, one thread): with
    glibc's default *dynamic* threshold the same base pipeline ran in 4.6 s in a fresh process and
    3.2 s once some large tensors had been freed (freeing a big mmap'd block raises the threshold,
    after which activations and conv workspaces are served from the heap instead of fresh, page-
    faulted mmaps). Any method that frees large tensors (merged weights evicted, adapters unloaded)
    thus changed the speed of whatever ran next, by up to 40%. Fixed thresholds (256 MiB mmap,
    1 GiB trim) gave 3.3-3.7 s in every state, so ratios compare the methods, not malloc's history.
    """
    if os.environ.get("SPM_RT_BENCH_MALLOC", "fixed") != "fixed" or not sys.platform.startswith("linux"):
        return "default"
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
        ok = libc.mallopt(m_mmap_threshold, 256 << 20) == 1 and libc.mallopt(m_trim_threshold, 1 << 30) == 1
    except (OSError, AttributeError):  # not glibc
        return "default"
    return "fixed: mmap threshold 256 MiB, trim threshold 1 GiB" if ok else "default"


MALLOC = _fix_malloc()


def pytest_configure(config):
    # pytest-benchmark's timer follows CLOCK unless --benchmark-timer was given (its plugin reads
    # the option after this hook: it configures last).
    if CLOCK == "cpu" and getattr(config.option, "benchmark_timer", None) == "time.perf_counter":
        config.option.benchmark_timer = "time.process_time"


# ---------------------------------------------------------------------------------------------
# settings

def _env_int(name: str, default: int | None) -> int | None:
    value = os.environ.get(name, "").strip()
    return int(value) if value else default


QUICK = os.environ.get("SPM_RT_BENCH_QUICK", "") not in ("", "0")
# One thread by default on a CPU: with one thread per core and other work on the machine, OpenMP
# barriers made an SD1.5 UNet step 2-5x slower and far noisier (10-27 s instead of 4-6 s here).
THREADS = _env_int("SPM_RT_BENCH_THREADS", None if torch.cuda.is_available() else 1)
if THREADS:
    torch.set_num_threads(THREADS)
ROUNDS = _env_int("SPM_RT_BENCH_ROUNDS", None)
KS = tuple(int(k) for k in os.environ.get("SPM_RT_BENCH_KS", "1,4,16,64").split(",") if k.strip())
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# The clock of every figure. "cpu" (process CPU time) is the default for single-threaded CPU runs:
# on a core shared with other work, wall time also counts the time spent waiting for the core.
# Measured here on SD1.5 steps (base vs itself, 5 pairs): per-pair ratios 0.78-1.29 by wall clock,
# 0.99-1.02 by CPU time. Wall-clock pairs are stored beside it in every result.
CLOCK = os.environ.get("SPM_RT_BENCH_CLOCK", "").strip() or (
    "cpu" if DEVICE == "cpu" and torch.get_num_threads() == 1 else "wall")
if CLOCK not in ("cpu", "wall"):
    raise ValueError(f"SPM_RT_BENCH_CLOCK must be 'cpu' or 'wall', got {CLOCK!r}")


@dataclass(frozen=True)
class Arch:
    """One model configuration of the suite."""

    name: str
    latent: int  # latent side; image side = latent * vae_factor
    vae_factor: int
    gen_steps: int  # denoising steps of the timed generations
    step_rounds: int  # timed rounds per step case (each paired with a base round)
    gen_rounds: int  # timed rounds per generation / per-prompt-cost case
    dtype: torch.dtype = torch.float32
    full_matrix: bool = True  # every scenario x method x K (else the cut list in bench_pipeline)

    @property
    def image(self) -> int:
        return self.latent * self.vae_factor

    @property
    def rounds(self) -> int:  # the step rounds: what a case of the size of one UNet step gets
        return self.step_rounds


def _all_archs() -> dict[str, Arch]:
    tiny = Arch("tiny", latent=16, vae_factor=2, gen_steps=20, step_rounds=ROUNDS or 5, gen_rounds=ROUNDS or 2)
    if DEVICE == "cuda":
        sd15 = Arch("sd15", latent=_env_int("SPM_RT_BENCH_SD15_LATENT", 64), vae_factor=8,
                    gen_steps=_env_int("SPM_RT_BENCH_SD15_STEPS", 20), step_rounds=ROUNDS or 10,
                    gen_rounds=ROUNDS or 5, dtype=torch.float16)
    else:
        # One SD1.5 UNet step with CFG at 16x16 latents costs 2-5 s of a shared core, and every
        # round of a case pays it twice (base + variant): 2-step generations, few rounds and a cut
        # matrix (bench_pipeline._cut_matrix; SPM_RT_BENCH_SD15_ALL=1 for every case).
        sd15 = Arch("sd15", latent=_env_int("SPM_RT_BENCH_SD15_LATENT", 16), vae_factor=8,
                    gen_steps=_env_int("SPM_RT_BENCH_SD15_STEPS", 2), step_rounds=ROUNDS or 3,
                    gen_rounds=ROUNDS or 2,
                    full_matrix=os.environ.get("SPM_RT_BENCH_SD15_ALL", "") not in ("", "0"))
    return {"tiny": tiny, "sd15": sd15}


def _archs() -> list[Arch]:
    archs = _all_archs()
    names = os.environ.get("SPM_RT_BENCH_ARCHS", "").strip()
    if names:
        return [archs[n.strip()] for n in names.split(",") if n.strip()]
    return [archs["tiny"]] if QUICK else [archs["sd15"]]


ARCHS = _archs()
TINY = _all_archs()["tiny"]  # the not-timed checks run on it whatever the selection


# ---------------------------------------------------------------------------------------------
# models (built once per session; benchmarks compile / remove their adapters around each case)

def sd15_pipeline(latent: int, dtype=torch.float32, seed: int = 0):
    """Stable Diffusion 1.5's UNet, text encoder and VAE configurations with random weights."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from spm_rt.tokenizer import VOCAB_SIZE, clip_tokenizer

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    ).eval()
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=VOCAB_SIZE, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
        num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768,
        bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
    )).eval()
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=2, sample_size=512, scaling_factor=0.18215,
    ).eval()
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=clip_tokenizer(), unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    if DEVICE != "cpu" or dtype != torch.float32:  # a no-op .to() still warns about dtypes
        pipe = pipe.to(device=DEVICE, dtype=dtype)
    return pipe


def build_pipeline(arch: Arch):
    from spm_rt.testing import tiny_pipeline

    if arch.name == "tiny":
        pipe = tiny_pipeline(0, sample_size=arch.latent, dtype=arch.dtype)
        return pipe.to(DEVICE) if DEVICE != "cpu" else pipe
    return sd15_pipeline(arch.latent, arch.dtype)


class Models:
    """Session cache: one pipeline per architecture, and its K random SPMs (+ files for PEFT)."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        self._pipes: dict[str, object] = {}
        self._spms: dict[str, list] = {}
        self._files: dict[str, list[Path]] = {}

    def pipe(self, arch: Arch):
        if arch.name not in self._pipes:
            torch.set_grad_enabled(False)
            self._pipes[arch.name] = build_pipeline(arch)
        return self._pipes[arch.name]

    def spms(self, arch: Arch, k: int) -> list:
        from spm_rt.testing import random_spm

        have = self._spms.setdefault(arch.name, [])
        unet = self.pipe(arch).unet
        while len(have) < k:
            i = len(have)
            have.append(random_spm(unet, f"concept {i}", seed=1000 + i, dtype=arch.dtype))
        return have[:k]

    def files(self, arch: Arch, k: int) -> list[Path]:
        from baselines import write_spm_files

        have = self._files.setdefault(arch.name, [])
        if len(have) < k:
            spms = self.spms(arch, k)
            folder = self.tmp / arch.name
            have[:] = write_spm_files(spms, folder)
        return have[:k]


@pytest.fixture(scope="session")
def models(tmp_path_factory) -> Models:
    return Models(tmp_path_factory.mktemp("spm_files"))


# ---------------------------------------------------------------------------------------------
# gates: fixed, non-zero, distinct per prompt (values do not change the cost, zeros would)

def gates_for(k: int, prompts: int) -> torch.Tensor:
    """[prompts, k] gates in (0.2, 1.0], a different vector per prompt."""
    base = torch.linspace(1.0, 0.2, k) if k > 1 else torch.ones(1)
    return torch.stack([base.roll(p) * (1.0 - 0.05 * p) for p in range(prompts)])


PROMPTS = ["a photo of a cat", "a watercolor of a lighthouse", "an astronaut riding a horse", "a bowl of soup"]


# ---------------------------------------------------------------------------------------------
# run facts stored with every result

try:
    _LOAD_AT_START = round(os.getloadavg()[0], 2)
except OSError:
    _LOAD_AT_START = None


def versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("torch", "diffusers", "transformers", "peft", "spm_rt", "triton", "pytest-benchmark"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def hardware() -> dict:
    hw = {"cpu": cpu_model(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
          "device": DEVICE, "malloc": MALLOC}
    try:
        hw["loadavg_1min"] = round(os.getloadavg()[0], 2)  # other work on the machine, now
    except OSError:
        pass
    if DEVICE == "cuda":
        hw["gpu"] = torch.cuda.get_device_name(0)
    return hw


def pytest_benchmark_update_machine_info(config, machine_info):
    hw = hardware()
    hw["loadavg_1min_at_start"] = _LOAD_AT_START
    machine_info["spm_rt_bench"] = {"versions": versions(), "hardware": hw, "quick": QUICK,
                                    "archs": [a.name for a in ARCHS], "ks": list(KS)}


# ---------------------------------------------------------------------------------------------
# paired timing: every timed round of a variant is paired with a base round next to it, the base
# first in even rounds and second in odd ones (interleaved, alternating)

def sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def timed(fn) -> float:
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0


@dataclass
class Case:
    """What one benchmark measures; becomes its ``extra_info``."""

    arch: str
    scenario: str  # step | generation | merge | transport
    method: str  # base | reference | peft | merged | gated
    k: int
    prompts: int
    unet_batch: int
    latent: list
    image: list
    dtype: str
    steps: int | None = None
    notes: str = ""
    options: dict = field(default_factory=dict)


def run_paired(benchmark, case: Case, fn, base_fn=None, *, rounds: int, warmup_rounds: int = 0, setup=None,
               base_context=None):
    """Time ``fn`` with ``benchmark.pedantic``; before each round run ``setup`` (untimed) and, when
    given, ``base_fn`` timed by hand with the same clock inside ``base_context()`` (entering and
    leaving it is not timed). Stores the pairs and their ratios in ``extra_info``, and the
    wall-clock times of both beside them."""
    clock = getattr(benchmark, "_timer", None) or (time.process_time if CLOCK == "cpu" else time.perf_counter)
    base_times: list[float] = []
    base_wall: list[float] = []
    wall: list[float] = []

    # The base round runs before the variant in even rounds and after it in odd ones (as the first
    # thing of the next round's setup, or after the last round): a drift within a round (thermal,
    # allocator, another process) then biases half the pairs each way instead of every ratio alike.
    order: list[str] = []
    pending = [False]  # an odd round's base still to run

    def run_base():
        with base_context() if base_context is not None else contextlib.nullcontext():
            sync()
            w0, c0 = time.perf_counter(), clock()
            base_fn()
            sync()
            base_times.append(clock() - c0)
            base_wall.append(time.perf_counter() - w0)

    def before_round():
        if base_fn is not None:
            if pending[0]:
                run_base()
                pending[0] = False
            if len(order) % 2 == 0:
                run_base()
                order.append("base-first")
            else:
                pending[0] = True
                order.append("variant-first")
        if setup is not None:
            setup()
        sync()

    def target():
        w0 = time.perf_counter()
        fn()
        sync()
        wall.append(time.perf_counter() - w0)

    benchmark.group = f"{case.arch} {case.scenario} {case.prompts}p"
    benchmark.pedantic(target, setup=before_round, rounds=rounds, warmup_rounds=warmup_rounds, iterations=1)
    if pending[0]:
        run_base()
    info = benchmark.extra_info
    info["pair_order"] = order[warmup_rounds:]
    info.update(asdict(case))
    info["versions"] = versions()
    info["hardware"] = hardware()
    info["rounds"] = rounds
    info["warmup_rounds"] = warmup_rounds
    stats = getattr(benchmark, "stats", None)
    times = list(stats.stats.data) if stats is not None else []
    info["times"] = times
    info["clock"] = getattr(clock, "__name__", str(clock))
    info["wall_times"] = wall[warmup_rounds:]
    if base_fn is not None and times:
        base = base_times[warmup_rounds:]  # base rounds of warm-up rounds are warm-up too
        ratios = [v / b for v, b in zip(times, base)]
        info["base_times"] = base
        info["base_wall_times"] = base_wall[warmup_rounds:]
        info["paired_ratios"] = ratios
        info["ratio"] = statistics.median(ratios)
        info["ratio_of_medians"] = statistics.median(times) / statistics.median(base)
        wall_ratios = [v / b for v, b in zip(info["wall_times"], info["base_wall_times"])]
        info["wall_paired_ratios"] = wall_ratios
        info["wall_ratio"] = statistics.median(wall_ratios) if wall_ratios else None
    elif case.method == "base":
        info["ratio"] = 1.0
    return info


# ---------------------------------------------------------------------------------------------
# run-level facts in the JSON

_SESSION_START = time.perf_counter()


def pytest_benchmark_update_json(config, benchmarks, output_json):
    settings = {"quick": QUICK, "threads": torch.get_num_threads(), "clock": CLOCK, "ks": list(KS),
                "archs": [{"name": a.name, "latent": a.latent, "image": a.image, "gen_steps": a.gen_steps,
                           "step_rounds": a.step_rounds, "gen_rounds": a.gen_rounds,
                           "dtype": str(a.dtype).replace("torch.", ""),
                           "full_matrix": a.full_matrix} for a in ARCHS]}
    info = {"session_seconds": time.perf_counter() - _SESSION_START, "settings": settings}
    try:
        info["loadavg_1min_at_end"] = round(os.getloadavg()[0], 2)
    except OSError:
        pass
    output_json["spm_rt_bench"] = info
