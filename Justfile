# wasm-infer tasks. `bash scripts/setup.sh` first on a fresh machine (installs just itself).

set shell := ["bash", "-euo", "pipefail", "-c"]

model_dir := env_var_or_default("WASM_INFER_MODEL_DIR", env_var("HOME") / ".cache/wasm-infer/model")
smollm2_dir := env_var_or_default("WASM_INFER_SMOLLM2_DIR", env_var("HOME") / ".cache/wasm-infer/smollm2")
minilm := "target/wasm32-wasip2/release/minilm.wasm"
smollm2 := "target/wasm32-wasip2/release/smollm2.wasm"
demo_text := "WebAssembly sandboxes keep untrusted models in check."

# List the recipes.
default:
    @just --list

# Install the wasm target and just, fetch and verify the model files.
setup:
    bash scripts/setup.sh

# Fetch the model files only (part of setup).
model:
    bash scripts/setup.sh

# Build the model guest components (release, simd128), embedding the model files: MiniLM, then
# SmolLM2 (a separate build: it turns on the SDK's `generator` feature, which MiniLM must not get).
guest:
    WASM_INFER_MODEL_DIR="{{model_dir}}" cargo build --release --target wasm32-wasip2 -p minilm
    WASM_INFER_SMOLLM2_DIR="{{smollm2_dir}}" cargo build --release --target wasm32-wasip2 -p smollm2

# Build the small test guests (guest/test-guests/*: hostile, and toy on the guest SDK) for
# wasm32-wasip2; the tests read them from target/wasm32-wasip2/release.
test-guests:
    cargo build --release --target wasm32-wasip2 -p hostile -p toy

# Build the host library and the wasm-infer binary.
build:
    cargo build --release -p wasm-infer

# Embed one sentence in the sandbox and print the 384-d vector and the usage line.
demo: guest build
    ./target/release/wasm-infer --fuel 10G --mem 2G {{minilm}} "{{demo_text}}"

# Run every test (unit, library, CLI) against the built guests, then the guest side natively
# (MiniLM's reference tests, the guest SDK's unit tests).
test: guest test-guests
    cargo test --release
    cargo test --release -p minilm -p wasm-infer-guest
    cargo test --release -p smollm2

# Soak: thousands of hostile runs mixed with good ones, then RSS, fds and cache must be as before.
soak: guest test-guests
    cargo test --release --test soak -- --ignored --nocapture

# Rewrite tests/golden/fuel.json after a toolchain, wasmtime or guest change (review the diff).
bless: guest test-guests
    BLESS=1 cargo test --release
    git diff --stat tests/golden

# fmt check and clippy, host and guests.
lint:
    cargo fmt --all -- --check
    cargo clippy --release --all-targets -- -D warnings
    WASM_INFER_MODEL_DIR="{{model_dir}}" cargo clippy --release --target wasm32-wasip2 -p minilm -p hostile -p wasm-infer-guest -p toy -- -D warnings
    WASM_INFER_SMOLLM2_DIR="{{smollm2_dir}}" cargo clippy --release --target wasm32-wasip2 -p smollm2 -- -D warnings

# deploy/ without a cluster or docker: the Kubernetes manifests parse and agree with
# deploy/serve.toml (grace period >= preStop + drain deadline, ports, probes, Redis Service, its
# password Secret and NetworkPolicy, one namespace, images by digest), pass the Kubernetes
# schemas (kubernetes-validate --strict) and the policy scanner (checkov, no failed check).
deploy-check:
    "$(bash scripts/deploy-venv.sh)" deploy/check.py

# Builds deploy/Containerfile from the artefacts built here with podman (a debootstrap stand-in
# for debian:bookworm-slim where no registry is reachable), runs it and checks /healthz, /readyz,
# one embedding, uid 10001 and that SIGTERM exits 0 within the drain deadline. Not in CI.
# Build the container image and check it for real (podman, root).
image: guest build
    deploy/build-image.sh target/release/wasm-infer {{minilm}}

# Benchmarks in one run: native candle (1 thread, all cores) vs in-sandbox (NaN canonicalisation
# off and on) vs the accelerator path, short / long / max inputs; throughput of 4 concurrent
# requests (pooled) vs native; compile, precompiled-load, instantiate; memory. Then SmolLM2:
# prompt and generated tokens/s, sandbox vs native candle, 1 thread. Markdown on stdout.
bench: guest build
    cargo run --release -p wasm-infer --example bench -- {{minilm}}
    WASM_INFER_SMOLLM2_DIR="{{smollm2_dir}}" cargo run --release -p wasm-infer --example bench_generate -- {{smollm2}}

# The same, plus peak RSS/PSS with 1, 4 and 16 concurrent runs (several more minutes).
bench-memory: guest build
    cargo run --release -p wasm-infer --example bench -- {{minilm}} --memory

# Host CPU per fuel unit of every host call a guest can make, at its worst shapes, against
# plain wasm loops (docs/cost-audit.md). Markdown on stdout.
cost-audit: test-guests build
    cargo run --release -p wasm-infer --example cost_audit -- target/wasm32-wasip2/release/hostile.wasm

# Loopback load test of `wasm-infer serve` (bounded: 64 requests per level) at 1, 2, 8 and 32
# clients, accelerator and in-sandbox paths, vs a native candle loop; then a victim tenant's
# latency alone and under another tenant's spin flood. Markdown tables on stdout.
load: guest test-guests build
    cargo run --release -p wasm-infer --example load -- target/release/wasm-infer {{minilm}} target/wasm32-wasip2/release/hostile.wasm

# The front door's attack suite (issue 21, docs/serving.md#attacks): each attack against a real
# `wasm-infer serve` at its default edge settings while a legitimate client's latency, the server's
# RSS and its log bytes are measured; a table with pass/fail per target. A few minutes; not in CI.
attack: guest build
    cargo run --release -p wasm-infer --example attack -- "${CARGO_TARGET_DIR:-target}/release/wasm-infer" "${CARGO_TARGET_DIR:-target}/wasm32-wasip2/release/minilm.wasm"

# What the worker-process hop adds to a request (in-process vs a locked-down worker).
bench-workers: build test-guests
    cargo run --release -p wasm-infer --example worker_hop -- target/release/wasm-infer target/wasm32-wasip2/release/hostile.wasm

# Take wasmtime VERSION (a point release of the pinned line): re-derive the vendored, patched
# wasmtime-internal-cranelift from the registry's crate (checksum checked), move every `=` pin,
# update the lockfiles, run the patch's tests. SECURITY.md says when.
vendor-update VERSION:
    bash scripts/vendor.sh update {{VERSION}}

# The vendored tree is the registry crate of the locked version plus vendor/*.patch, byte for
# byte, and both lockfiles (main and fuzz) use it. In CI.
vendor-check:
    bash scripts/vendor.sh check

# Warns (never fails) when the registry has a newer point release of the pinned wasmtime line.
vendor-newer:
    bash scripts/vendor.sh newer

# Regenerate the reference embeddings with sentence-transformers (needs the venv in its docstring).
reference:
    ~/.cache/wasm-infer/pyref/bin/python tests/fixtures/make_reference.py "{{model_dir}}"

# Fuzz loading and input decoding (cargo-fuzz; installs it if missing). TARGET is
# load_component or run_input; SECONDS bounds the run. Findings land in fuzz/artifacts/.
fuzz TARGET="load_component" SECONDS="300":
    command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
    just test-guests
    cd fuzz && CARGO_TARGET_DIR=../target/fuzz cargo fuzz run --sanitizer none {{TARGET}} -- -max_total_time={{SECONDS}} -rss_limit_mb=4096

# Pinned PyPI wheels in ~/.cache/wasm-infer/cuda-venv; idempotent. In a shell, then:
# `source scripts/cuda-env.sh`.
# Install the CUDA 13.0 toolkit that `--features cuda` builds against (no GPU needed).
cuda-setup:
    bash scripts/setup-cuda.sh

# Builds and lints `--features cuda` into target/cuda (WASM_INFER_CUDA_TARGET_DIR overrides it),
# then runs tests/device.rs against that build on this host (no GPU: `--accel cuda` exits 2,
# `auto` falls back). `just cuda-setup` first.
# Check the CUDA backend without a GPU: build, clippy, start-up tests.
check-cuda:
    #!/usr/bin/env bash
    set -euo pipefail
    source scripts/cuda-env.sh
    export CARGO_TARGET_DIR="${WASM_INFER_CUDA_TARGET_DIR:-$PWD/target/cuda}"
    echo "check-cuda: nvcc $(nvcc --version | sed -n 's/.*release \([0-9.]*\).*/\1/p'), CUDA_COMPUTE_CAP=$CUDA_COMPUTE_CAP, driver: $WASM_INFER_CUDA_DRIVER"
    cargo build --release --target wasm32-wasip2 -p hostile
    # No separate `cargo build --features cuda`: clippy type-checks every target with the
    # feature, and the test build compiles the library and the binary with it (a plain build
    # would compile wasmtime and candle once more, with the dev-dependencies' features off).
    cargo clippy --release -p wasm-infer --features cuda --all-targets -- -D warnings
    cargo test --release -p wasm-infer --features cuda --test device

# Builds `--features cuda`, runs tests/device.rs and tests/accel.rs on the GPU, then tests/gpu.rs
# (reference embeddings, budgets and the driver's figures on the device, fallback, benchmark
# rows), which prints one summary table. `just setup` (the model) and `just cuda-setup` first.
# On a machine with a GPU: the whole accelerator path on the GPU, one summary table.
gpu-check:
    #!/usr/bin/env bash
    set -euo pipefail
    source scripts/cuda-env.sh
    if [ "$WASM_INFER_CUDA_DRIVER" != system ]; then
        echo "gpu-check: no NVIDIA driver (libcuda.so.1) on this machine; \`just check-cuda\` is the check without a GPU" >&2
        exit 1
    fi
    nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv,noheader || true
    export CARGO_TARGET_DIR="${WASM_INFER_CUDA_TARGET_DIR:-$PWD/target/cuda}"
    WASM_INFER_MODEL_DIR="{{model_dir}}" cargo build --release --target wasm32-wasip2 -p minilm -p hostile
    cargo test --release -p wasm-infer --features cuda --test device --test accel --test gpu --no-run
    export WASM_INFER_TEST_ACCEL=cuda
    cargo test --release -p wasm-infer --features cuda --test device --test accel
    cargo test --release -p wasm-infer --features cuda --test gpu -- --ignored --nocapture
