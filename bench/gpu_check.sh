#!/usr/bin/env bash
# Kernel correctness + timing on a GPU machine (under 8 minutes on an H200).
#
# Runs bench/bench_kernels.py (its docstring has the details): every SD1.5 (512 px) and SDXL
# (1024 px) adapted-layer shape, count-weighted per UNet step, checked against a float64 reference
# and then timed with CUDA graphs (warm L2) and after an L2 flush (cold): Triton kernel vs bare
# cuBLAS/cuDNN, per-sample merged weights (one batched GEMM), torch concat and torch unfused.
# Kernel part bounded by SPM_KERNEL_BUDGET_S (default 240 s: sections past it are listed as skipped
# in the JSON). Writes the JSON into $OUT when set (the device machine's return folder), else
# bench/results/, and prints its short table. Exit status: 0 ok (or no GPU: skipped with a
# message), 1 a correctness check failed.
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
(cd "$shim" && python3 - <<'PY'
import torch, triton
import spm_rt, spm_rt.kernels.gated_linear as gl
assert spm_rt.__file__.startswith(__import__("os").getcwd()), f"spm_rt resolved to {spm_rt.__file__}, not the shim"
print(f"torch {torch.__version__}, triton {triton.__version__}, spm_rt.kernels via shim -> {gl.__file__}")
print("GPU:", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none")
PY
)

cd "$repo"
kernels_rc=0
python3 bench/bench_kernels.py --json "$json" --budget-s "${SPM_KERNEL_BUDGET_S:-240}" "$@" || kernels_rc=$?
[ "$kernels_rc" = 0 ] || echo "kernels: FAILED (exit $kernels_rc): see $json"

# --- whole SD1.5 generations, eager vs CUDA-graphed base vs graphed erased (bench/gpu_compiled.py) ---
# Needs the whole spm_rt package and diffusers (carry its wheel: device README "Notes"); a second
# shim links every room of the package (spm_rt/, kernels/ -> spm_rt.kernels, export/ -> spm_rt.export).
# SPM_SKIP_COMPILED=1 skips it; SPM_COMPILED_TIMEOUT (default 300 s) bounds it.
if [ "${SPM_SKIP_COMPILED:-0}" != 1 ]; then
  full="$shim/full"
  mkdir -p "$full/spm_rt"
  for f in "$repo"/spm_rt/*; do ln -s "$f" "$full/spm_rt/$(basename "$f")"; done
  ln -s "$repo/kernels" "$full/spm_rt/kernels"
  ln -s "$repo/export" "$full/spm_rt/export"
  if (cd "$full" && PYTHONPATH="$full" python3 -c "import diffusers, spm_rt" 2>/dev/null); then
    (cd "$full" && PYTHONPATH="$full" timeout "${SPM_COMPILED_TIMEOUT:-300}" python3 "$repo/bench/gpu_compiled.py" \
       --json "$out_dir/compiled-$(date -u +%Y%m%dT%H%M%SZ).json") || echo "compiled generations: FAILED or timed out"
  else
    echo "compiled generations: SKIPPED (diffusers or spm_rt not importable: carry the diffusers wheel)"
  fi
fi

# --- native library (libspm_kernels): the GPU ctest + native vs Triton JIT at one SD1.5 shape ---
# Guarded: SPM_SKIP_NATIVE=1 skips it. Uses $SPM_KERNELS_LIB or build/libspm_kernels.so when present
# (a build carried from another machine: its GPU test binary is run directly), else builds one
# with cmake (sm_90 only unless SPM_CUDA_ARCHS is set; about a minute) into a scratch directory.
# A correctness or build failure exits 1; an incomplete toolchain (no cmake, no C compiler, no
# cuda.h: the CUDA toolkit's or the one the triton wheel ships) is reported and skipped.
native_toolchain_missing() {
  command -v cmake >/dev/null 2>&1 || { echo "cmake"; return; }
  if [ -n "${CC:-}" ]; then command -v "$CC" >/dev/null 2>&1 || { echo "C compiler \$CC=$CC"; return; }
  elif ! command -v cc >/dev/null 2>&1 && ! command -v gcc >/dev/null 2>&1 && ! command -v clang >/dev/null 2>&1; then
    echo "C compiler (cc, gcc or clang)"; return
  fi
  local d
  for d in "${CUDA_HOME:-}" "${CUDA_PATH:-}" /usr/local/cuda /opt/cuda; do
    [ -n "$d" ] && [ -f "$d/include/cuda.h" ] && return
  done
  python3 - <<'PY' 2>/dev/null || echo "cuda.h (no CUDA toolkit headers, and no triton wheel holding backends/nvidia/include/cuda.h)"
import os, sys, triton
sys.exit(0 if os.path.isfile(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "include", "cuda.h")) else 1)
PY
}
if [ "${SPM_SKIP_NATIVE:-0}" != 1 ]; then
  native_rc=0
  lib="${SPM_KERNELS_LIB:-$repo/build/libspm_kernels.so}"
  nb="$(dirname "$lib")"
  missing=""
  [ -f "$lib" ] || missing="$(native_toolchain_missing)"
  if [ -n "$missing" ]; then
    echo "native: SKIPPED (no $lib, and the toolchain to build it is incomplete: no $missing)"
  elif [ ! -f "$lib" ]; then
    nb="$shim/native-build"
    if cmake -S "$repo" -B "$nb" -DPython3_EXECUTABLE="$(command -v python3)" \
         -DSPM_CUDA_ARCHS="${SPM_CUDA_ARCHS:-90}" >"$out_dir/native-build.log" 2>&1 &&
       cmake --build "$nb" -j"$(nproc)" >>"$out_dir/native-build.log" 2>&1; then
      lib="$nb/libspm_kernels.so"
    else
      echo "native: BUILD FAILED (see $out_dir/native-build.log)"; tail -20 "$out_dir/native-build.log"; native_rc=1
    fi
  fi
  if [ -f "$lib" ]; then
    echo "native: $lib"
    if [ -f "$nb/CTestTestfile.cmake" ] && command -v ctest >/dev/null 2>&1 && [ "$nb" = "$shim/native-build" ]; then
      ctest --test-dir "$nb" --output-on-failure -V -R spm_gpu_forward || native_rc=1
    elif [ -x "$nb/tests/native/spm_test_gpu" ]; then
      set +e; LD_LIBRARY_PATH="$nb${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" "$nb/tests/native/spm_test_gpu"; rc=$?; set -e
      [ "$rc" = 0 ] || [ "$rc" = 77 ] || native_rc=1
    fi
    (cd "$shim" && python3 "$repo/bench/bench_native.py" --lib "$lib" \
       --json "$out_dir/native-$(date -u +%Y%m%dT%H%M%SZ).json") || native_rc=1
  fi
fi

# the kernel table again, last, so that it is the tail of the log whatever ran after it
[ -f "${json%.json}.txt" ] && { echo; echo "== kernels (from $json) =="; cat "${json%.json}.txt"; }
[ "${native_rc:-0}" = 0 ] || exit "$native_rc"
exit "$kernels_rc"
