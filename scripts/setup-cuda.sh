#!/usr/bin/env bash
# Installs the CUDA toolkit that the `cuda` feature builds against, from PyPI wheels, outside the
# repository, and says how to use it. Idempotent: a second run only checks.
#
#   bash scripts/setup-cuda.sh        # or: just cuda-setup
#   source scripts/cuda-env.sh        # then: cargo build -p wasm-infer --features cuda ...
#
# Why CUDA 13.0: candle 0.11.1 builds its kernels with nvcc (candle-kernels, through cudaforge)
# and links the driver API through cudarc 0.19.10, which accepts CUDA 11.4 to 13.4 and reads the
# version from `nvcc --version`. PyPI ships nvcc itself only in the CUDA 13 wheels (the `-cu12`
# nvcc wheels hold ptxas alone), and 13.0 is the oldest 13.x, so the build runs on every driver
# that runs CUDA 13 at all (R580 or newer; the PTX that nvcc 13.0 writes is JIT-compiled by the
# driver, which must be at least as new as the toolkit). The pins are CUDA 13.0 Update 2, as the
# `cuda-toolkit==13.0.2` meta-package pins them.
#
# What it leaves, under ${WASM_INFER_HOME:-~/.cache/wasm-infer}:
#   cuda-venv/      the venv holding the wheels (about 1.2 GB)
#   cuda-13.0/      a CUDA root assembled from them: bin/ (nvcc), include/, nvvm/, lib/ (the
#                   wheels' libraries plus the unversioned names the linker looks for), and
#                   lib/stubs/libcuda.so(.1): a link-time stand-in for the driver library, see
#                   below.
#
# The driver library. candle 0.11.1 turns on cudarc's `dynamic-linking`, so the CUDA binary has
# libcuda.so.1 (the driver, which only an NVIDIA driver install provides: no wheel ships it) as
# a load-time dependency, and the linker needs a libcuda.so to resolve against. The toolkit's
# own stub is not in the wheels either, so this script builds one: every `cu*` entry point of
# the cuda.h it installed, each returning CUDA_ERROR_STUB_LIBRARY (34), as NVIDIA's stub does.
# scripts/cuda-env.sh puts it on LD_LIBRARY_PATH only where no real libcuda.so.1 can be loaded:
# there a CUDA build starts, and `--accel cuda` reports that no driver is installed.
set -euo pipefail
cd "$(dirname "$0")/.."

CACHE="${WASM_INFER_HOME:-$HOME/.cache/wasm-infer}"
VENV="$CACHE/cuda-venv"
CUDA_ROOT="$CACHE/cuda-13.0"

# CUDA 13.0 Update 2 (the cuda-toolkit==13.0.2 meta-package's pins).
PINS=(
    "nvidia-cuda-nvcc==13.0.88"    # nvcc, ptxas, fatbinary, nvlink
    "nvidia-cuda-crt==13.0.88"     # nvcc's crt/ headers
    "nvidia-nvvm==13.0.88"         # cicc and libdevice
    "nvidia-cuda-runtime==13.0.96" # cudart, cuda.h, cuda_runtime.h, cuda_fp16/bf16/fp8.h
    "nvidia-cuda-cccl==13.0.85"    # thrust, cub, libcu++ (candle's sort and MoE kernels)
    "nvidia-cuda-nvrtc==13.0.88"   # libnvrtc (cudarc's nvrtc feature, linked by candle)
    "nvidia-cublas==13.1.0.3"      # cuBLAS and cuBLASLt (candle's matmul)
    "nvidia-curand==10.4.0.35"     # cuRAND (candle's random tensors)
)
STAMP="$VENV/.wasm-infer-pins"

say() { printf '\033[1msetup-cuda:\033[0m %s\n' "$*" >&2; }

command -v python3 >/dev/null || { say "python3 is needed (for the venv)"; exit 1; }
command -v cc >/dev/null || { say "a C compiler (cc) is needed: nvcc uses it as its host compiler"; exit 1; }

# 1. The venv and the pinned wheels.
want="$(printf '%s\n' "${PINS[@]}" | sed 's/ *#.*//')"
if [ -x "$VENV/bin/python" ] && [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then
    say "CUDA 13.0 wheels present in $VENV"
else
    [ -x "$VENV/bin/python" ] || { say "creating $VENV"; python3 -m venv "$VENV"; }
    say "installing the CUDA 13.0 wheels into $VENV (about 1.2 GB)"
    # shellcheck disable=SC2086
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check $want
    printf '%s\n' "$want" >"$STAMP"
fi

# 2. The assembled CUDA root. The wheels put everything under site-packages/nvidia/cu13.
site=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')
NV="$site/nvidia/cu13"
[ -x "$NV/bin/nvcc" ] || { say "no nvcc in $NV/bin: the nvidia-cuda-nvcc wheel is broken"; exit 1; }
if [ -f "$CUDA_ROOT/.stamp" ] && [ "$(cat "$CUDA_ROOT/.stamp")" = "$want" ] \
    && [ -x "$CUDA_ROOT/bin/nvcc" ] && [ -e "$CUDA_ROOT/lib/stubs/libcuda.so.1" ]; then
    say "CUDA root present in $CUDA_ROOT"
else
    say "assembling the CUDA root in $CUDA_ROOT"
    rm -rf "$CUDA_ROOT"
    mkdir -p "$CUDA_ROOT/lib/stubs"
    for d in bin include nvvm; do ln -s "$NV/$d" "$CUDA_ROOT/$d"; done
    for f in "$NV"/lib/*; do ln -s "$f" "$CUDA_ROOT/lib/"; done
    # The wheels carry only the versioned sonames; `-lcublas` and the rest need the plain names.
    for so in "$NV"/lib/lib*.so.*; do
        base=$(basename "$so")
        plain="${base%%.so.*}.so"
        case "$base" in *-builtins*|*.alt.*) continue ;; esac
        [ -e "$CUDA_ROOT/lib/$plain" ] || ln -s "$base" "$CUDA_ROOT/lib/$plain"
    done
    ln -s lib "$CUDA_ROOT/lib64"

    # The driver stub: every cu* name that cuda.h declares or maps a name to (cuMemGetInfo ->
    # cuMemGetInfo_v2, ...), each returning CUDA_ERROR_STUB_LIBRARY; cuGetErrorName/String answer.
    src="$CUDA_ROOT/lib/stubs/libcuda-stub.c"
    {
        echo '/* Generated by scripts/setup-cuda.sh: a stand-in for libcuda.so.1 (no driver). */'
        echo 'static const char *stub_name = "CUDA_ERROR_STUB_LIBRARY";'
        echo 'static const char *stub_text = "CUDA driver is a stub library (no NVIDIA driver is installed)";'
        echo 'int cuGetErrorName(int e, const char **s) { (void)e; *s = stub_name; return 0; }'
        echo 'int cuGetErrorString(int e, const char **s) { (void)e; *s = stub_text; return 0; }'
        grep -ohE '\bcu[A-Z][A-Za-z0-9_]*' "$NV/include/cuda.h" | sort -u \
            | grep -vxE 'cuGetErrorName|cuGetErrorString' \
            | sed 's/.*/int &(void) { return 34; }/'
    } >"$src"
    cc -shared -fPIC -O1 -Wl,-soname,libcuda.so.1 -o "$CUDA_ROOT/lib/stubs/libcuda.so.1" "$src"
    ln -s libcuda.so.1 "$CUDA_ROOT/lib/stubs/libcuda.so"
    printf '%s\n' "$want" >"$CUDA_ROOT/.stamp"
fi

"$CUDA_ROOT/bin/nvcc" --version | grep -q 'release 13.0' \
    || { say "$CUDA_ROOT/bin/nvcc is not CUDA 13.0"; exit 1; }

# 3. ccache in front of nvcc, for the CUDA kernels of a build from clean (CI's, every change):
# candle-kernels' statically compiled MoE/GGUF library (15 files, `nvcc -c`) is 10 of the 11
# minutes its build script takes on 2 cores, and its sources never change (they are in the
# registry, versioned), so a second clean build takes them from ~/.cache/wasm-infer/ccache.
# cudaforge takes the compiler from $NVCC and the CUDA root from that path's grandparent, so the
# wrapper lives in $CUDA_ROOT/ccache/nvcc; scripts/cuda-env.sh points NVCC at it. (ccache passes
# `--ptx` compiles through uncached: those kernels take about a minute.)
if ! command -v ccache >/dev/null; then
    if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
        say "installing ccache (Debian)"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq ccache >/dev/null
    else
        say "no ccache: CUDA kernels will be compiled from scratch on every clean build"
    fi
fi
if command -v ccache >/dev/null; then
    mkdir -p "$CUDA_ROOT/ccache"
    printf '#!/bin/sh\n# Generated by scripts/setup-cuda.sh: nvcc through ccache.\nexec ccache "$(dirname "$0")/../bin/nvcc" "$@"\n' \
        >"$CUDA_ROOT/ccache/nvcc"
    chmod +x "$CUDA_ROOT/ccache/nvcc"
fi

# 4. The environment: scripts/cuda-env.sh sets it; print it for other shells.
# shellcheck source=scripts/cuda-env.sh
source scripts/cuda-env.sh
say "ready: nvcc $(nvcc --version | sed -n 's/.*release \([0-9.]*\).*/\1/p'), CUDA_COMPUTE_CAP=$CUDA_COMPUTE_CAP"
say "in a shell: source scripts/cuda-env.sh   (or eval the lines below)"
cat <<EOF
export CUDA_ROOT="$CUDA_ROOT"
export CUDA_PATH="$CUDA_ROOT"
export CUDA_HOME="$CUDA_ROOT"
export PATH="$CUDA_ROOT/bin:\$PATH"
export CUDA_COMPUTE_CAP="$CUDA_COMPUTE_CAP"
export CUDAFORGE_THREADS="$CUDAFORGE_THREADS"
${NVCC:+export NVCC="$NVCC"
export CCACHE_DIR="$CCACHE_DIR"
}export LD_LIBRARY_PATH="$LD_LIBRARY_PATH"
export WASM_INFER_CUDA_DRIVER="$WASM_INFER_CUDA_DRIVER"
EOF
