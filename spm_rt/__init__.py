"""spm_rt: a performance-first runtime for SPM concept erasure in diffusers pipelines.

Example::

    >>> import spm_rt
    >>> rt = spm_rt.compile(pipe, ["snoopy.safetensors"])  # doctest: +SKIP
    >>> rt("a photo of snoopy").images[0]  # doctest: +SKIP
"""
from spm_rt.compile import SPMPipeline, compile
from spm_rt.config import SPMConfig
from spm_rt.formats import SPM, ModuleWeights, SPMFormatError, load_spm, save_spm
from spm_rt.gating import NestedCallError, gates_off, use_gates

__version__ = "0.1.0"
__all__ = ["compile", "SPMConfig", "SPMPipeline", "SPM", "ModuleWeights", "SPMFormatError", "load_spm", "save_spm",
           "use_gates", "gates_off", "NestedCallError", "__version__"]
