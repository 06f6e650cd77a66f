"""spm_rt.export: ONNX graphs and TensorRT engines of SPM-patched Stable Diffusion pipelines.

Import-light: the names below resolve to their modules on first use, so ``import spm_rt.export``
does not import onnx, onnxruntime or tensorrt.

Example::

    >>> import spm_rt
    >>> from spm_rt.export import export_onnx, run_onnx_pipeline
    >>> rt = spm_rt.compile(pipe, ["snoopy.safetensors"])  # doctest: +SKIP
    >>> export_onnx(rt, "out/onnx", gates="input", k_max=4)  # doctest: +SKIP
    >>> run_onnx_pipeline("out/onnx", ["a photo of snoopy"], steps=30)[0].save("x.png")  # doctest: +SKIP
"""
from __future__ import annotations

if __name__ == "export":  # imported by accident as PyPI's `export` (repository root on sys.path)
    import importlib.util as _util
    import os as _os

    _spec = _util.spec_from_file_location(
        "_spm_rt_shadow", _os.path.join(_os.path.dirname(__file__), _os.pardir, "kernels", "_shadow.py"))
    _shadow = _util.module_from_spec(_spec)
    _spec.loader.exec_module(_shadow)
    _shadow.defer_to_installed(__name__, __file__)
else:
    import importlib

    _LAZY = {
        "export_onnx": "spm_rt.export.onnx",
        "check_onnx": "spm_rt.export.onnx",
        "read_manifest": "spm_rt.export.onnx",
        "set_onnx_spms": "spm_rt.export.onnx",
        "spm_initializers": "spm_rt.export.onnx",
        "concept_initializers": "spm_rt.export.onnx",
        "ONNXPipeline": "spm_rt.export.ort",
        "run_onnx_pipeline": "spm_rt.export.ort",
        "optimized_graph_signature": "spm_rt.export.ort",
        "build_engines": "spm_rt.export.trt",
        "refit_engines": "spm_rt.export.trt",
        "is_tensorrt_available": "spm_rt.export.trt",
    }

    __all__ = sorted(_LAZY)

    def __getattr__(name: str):
        module = _LAZY.get(name)
        if module is None:
            raise AttributeError(f"module 'spm_rt.export' has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        globals()[name] = value
        return value

    def __dir__():
        return sorted(list(globals()) + __all__)
