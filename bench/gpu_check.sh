#!/usr/bin/env bash
# Kernel correctness + timing on a GPU machine (under 8 minutes on an H200).
#
# Runs bench/bench_kernels.py: forward/backward against a float64 reference at SD1.5 sizes, then
# do_bench timings of bare GEMM / torch_unfused / torch_concat / triton. Writes the JSON into $OUT
# when set (the device machine's return folder), else bench/results/, and prints a short table
# last. Exit status: 0 ok (or no GPU: skipped with a message), 1 a correctness check failed.
#
# Import path: the package maps spm_rt.kernels to the kernels/ folder (setuptools package-dir), so
# a plain checkout has no importable spm_rt.kernels, and `import spm_rt` would run spm_rt/__init__,
# which needs the runtime's dependencies (diffusers, ...) that the GPU machine may lack. Instead of
# `pip install -e .`, this script builds a throwaway shim: an empty spm_rt package whose kernels/
# is a symlink to ./kernels, put first on PYTHONPATH, and runs the benchmark by file path (so the
# repository root, which holds the real spm_rt/, is not on sys.path). The kernels import only
# torch, triton and spm_rt.kernels.reference.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out_dir="${OUT:-$repo/bench/results}"
mkdir -p "$out_dir"
json="$out_dir/kernels-$(date -u +%Y%m%dT%H%M%SZ).json"

shim="$(mktemp -d)"
trap 'rm -rf "$shim"' EXIT
mkdir -p "$shim/spm_rt"
printf '"""Shim for bench/gpu_check.sh: only spm_rt.kernels (-> kernels/) is importable."""\n' >"$shim/spm_rt/__init__.py"
ln -s "$repo/kernels" "$shim/spm_rt/kernels"
export PYTHONPATH="$shim${PYTHONPATH:+:$PYTHONPATH}"

# from inside the shim dir, so that the caller's working directory cannot put the real spm_rt first
(cd "$shim" && python - <<'PY'
import torch, triton
import spm_rt, spm_rt.kernels.gated_linear as gl
assert spm_rt.__file__.startswith(__import__("os").getcwd()), f"spm_rt resolved to {spm_rt.__file__}, not the shim"
print(f"torch {torch.__version__}, triton {triton.__version__}, spm_rt.kernels via shim -> {gl.__file__}")
print("GPU:", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none")
PY
)

cd "$repo"
python bench/bench_kernels.py --json "$json" "$@"
