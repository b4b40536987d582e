# Sourced, not run: the environment that `--features cuda` builds and runs in, from the toolkit
# that scripts/setup-cuda.sh (`just cuda-setup`) installed.
#
#   source scripts/cuda-env.sh
#
# Sets CUDA_ROOT, CUDA_PATH and CUDA_HOME (cudarc's build script links from there), puts its nvcc
# first on PATH (candle-kernels' build compiles with it, and cudarc reads the CUDA version from
# `nvcc --version`), sets CUDA_COMPUTE_CAP (the one architecture candle-kernels compiles for;
# see below) and CUDAFORGE_THREADS (parallel nvcc jobs), and puts the toolkit's libraries
# (cuBLAS, cuRAND, NVRTC, cudart) on LD_LIBRARY_PATH for the built binaries: they find them
# nowhere else. Where no real driver library (libcuda.so.1) can be
# loaded, it also adds the setup's stub, so that a CUDA build still starts here and says that
# no driver is installed; WASM_INFER_CUDA_DRIVER says which (`system` or `stub`).
#
# CUDA_COMPUTE_CAP: candle-kernels 0.11.1 builds through cudaforge, which compiles every kernel
# for exactly one architecture: CUDA_COMPUTE_CAP when set, else the first GPU that nvidia-smi
# reports. The default here is 80: the kernels become compute_80 PTX, which the driver
# JIT-compiles (once, cached in ~/.nv/ComputeCache) for any GPU of compute capability 8.0 or
# newer: A100 (8.0), A10/A40/RTX 30xx (8.6), L4/L40 (8.9), H100/H200 (9.0), B200 (10.0).
# A value of 90 or more would make cudaforge emit arch-specific PTX (sm_90a), which runs on
# that one architecture only. The statically compiled MoE/GGUF kernels (libmoe.a, unused by
# wasm-infer) get sm_80 machine code and would run on 8.x only.

_wi_cuda_root="${WASM_INFER_HOME:-$HOME/.cache/wasm-infer}/cuda-13.0"
if [ ! -x "$_wi_cuda_root/bin/nvcc" ] || [ ! -e "$_wi_cuda_root/lib/stubs/libcuda.so.1" ]; then
    echo "cuda-env: no CUDA toolkit in $_wi_cuda_root: run \`just cuda-setup\` (scripts/setup-cuda.sh) first" >&2
    unset _wi_cuda_root
    return 1 2>/dev/null || exit 1
fi
export CUDA_ROOT="$_wi_cuda_root"
export CUDA_PATH="$CUDA_ROOT"
export CUDA_HOME="$CUDA_ROOT"
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-80}"
# cudaforge runs one nvcc per kernel file on half the physical cores by default (one, on two);
# the kernels are the longest step of a clean CUDA build, so give them every core.
export CUDAFORGE_THREADS="${CUDAFORGE_THREADS:-$(nproc 2>/dev/null || echo 2)}"
# nvcc through ccache where setup-cuda.sh made the wrapper (see there): candle-kernels' build
# takes the compiler from $NVCC.
if [ -x "$CUDA_ROOT/ccache/nvcc" ] && command -v ccache >/dev/null 2>&1; then
    export NVCC="$CUDA_ROOT/ccache/nvcc"
    export CCACHE_DIR="${CCACHE_DIR:-${WASM_INFER_HOME:-$HOME/.cache/wasm-infer}/ccache}"
fi
case ":${PATH:-}:" in
*":$CUDA_ROOT/bin:"*) ;;
*) export PATH="$CUDA_ROOT/bin:${PATH:-}" ;;
esac

# LD_LIBRARY_PATH: the toolkit's libraries first, the stub (if any) last, nothing twice.
_wi_ld=""
_wi_ifs="$IFS"
IFS=:
for _wi_dir in ${LD_LIBRARY_PATH:-}; do
    case "$_wi_dir" in
    "" | "$CUDA_ROOT/lib" | "$CUDA_ROOT/lib/stubs") ;;
    *) _wi_ld="${_wi_ld:+$_wi_ld:}$_wi_dir" ;;
    esac
done
IFS="$_wi_ifs"
_wi_ld="$CUDA_ROOT/lib${_wi_ld:+:$_wi_ld}"
# (The stub goes last, but LD_LIBRARY_PATH comes before the loader's cache: it is added only
# where the loader finds no libcuda.so.1 at all, or it would hide the real one.)
if command -v python3 >/dev/null 2>&1; then
    _wi_has_driver() { LD_LIBRARY_PATH="$_wi_ld" python3 -c 'import ctypes; ctypes.CDLL("libcuda.so.1")' 2>/dev/null; }
else
    _wi_has_driver() { ldconfig -p 2>/dev/null | grep -q 'libcuda\.so\.1 '; }
fi
if _wi_has_driver; then
    export WASM_INFER_CUDA_DRIVER=system
else
    export WASM_INFER_CUDA_DRIVER=stub
    _wi_ld="$_wi_ld:$CUDA_ROOT/lib/stubs"
fi
export LD_LIBRARY_PATH="$_wi_ld"
unset _wi_cuda_root _wi_ld _wi_ifs _wi_dir
unset -f _wi_has_driver
