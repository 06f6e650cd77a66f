"""spm_rt.export: ONNX graphs and TensorRT engines of SPM-patched UNets (heavy deps imported lazily)."""
