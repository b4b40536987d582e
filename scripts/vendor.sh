#!/usr/bin/env bash
# The vendored, patched `wasmtime-internal-cranelift` (vendor/README.md) is derived, never edited:
#
#   scripts/vendor.sh update VERSION   take wasmtime VERSION: fetch the registry's crate of that
#                                      version, check its SHA-256 against the registry index's,
#                                      apply vendor/*.patch, replace the vendored tree, move every
#                                      `=` pin of the wasmtime crates to VERSION, update the
#                                      lockfile and run the patch's tests
#   scripts/vendor.sh check            the vendored tree is, byte for byte, the registry crate of
#                                      the locked version plus the patch; the lockfile resolves
#                                      the crate from the vendored path and records no unused
#                                      patch; wasmtime and the vendored crate are the same version
#   scripts/vendor.sh newer            prints a warning when the registry has a newer point
#                                      release of the pinned line (a warning: never fails)
set -euo pipefail
cd "$(dirname "$0")/.."

CRATE=wasmtime-internal-cranelift
# WASM_INFER_VENDORED: check another copy of the tree instead (tests/codegen_patch.rs).
VENDORED="${WASM_INFER_VENDORED:-vendor/$CRATE}"
PATCH="vendor/$CRATE.patch"
SUM="vendor/$CRATE.sha256"
# Every manifest that pins the wasmtime crates (the fuzz workspace applies the same patch).
MANIFESTS=(host/Cargo.toml fuzz/Cargo.toml)
# The wasmtime crates this project names, all pinned with `=` to one version.
PINNED='wasmtime|wasmtime-wasi|wasmtime-wizer|wasmtime-internal-cranelift'

say() { printf '\033[1mvendor:\033[0m %s\n' "$*" >&2; }
die() { say "$*"; exit 1; }

scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT

# The version of a package in a lockfile (the first entry of that name).
locked_version() { # LOCKFILE NAME
    awk -v n="name = \"$2\"" '$0 == n { getline; gsub(/version = |"/, ""); print; exit }' "$1"
}

# Fetches the registry's .crate of VERSION into $scratch and prints its path after checking
# its SHA-256 against the checksum the registry index gives (through a throwaway lockfile).
fetch_crate() { # VERSION
    local version=$1 dir="$scratch/fetch"
    mkdir -p "$dir/src"
    cat >"$dir/Cargo.toml" <<EOF
[package]
name = "vendor-fetch"
version = "0.0.0"
edition = "2021"
[dependencies]
$CRATE = "=$version"
[workspace]
EOF
    : >"$dir/src/lib.rs"
    (cd "$dir" && cargo generate-lockfile --quiet && cargo fetch --quiet) \
        || die "could not resolve $CRATE $version from the registry"
    local want
    want=$(awk -v n="name = \"$CRATE\"" '$0 == n { f = 1 } f && /^checksum/ { gsub(/checksum = |"/, ""); print; exit }' "$dir/Cargo.lock")
    [ -n "$want" ] || die "the registry index gave no checksum for $CRATE $version"
    local file
    file=$(ls "${CARGO_HOME:-$HOME/.cargo}"/registry/cache/*/"$CRATE-$version.crate" 2>/dev/null | head -1)
    [ -n "$file" ] || die "cargo fetched $CRATE $version but its .crate is not in the cache"
    local got
    got=$(sha256sum "$file" | awk '{print $1}')
    [ "$got" = "$want" ] || die "$file: SHA-256 $got, the registry index says $want"
    echo "$file $want"
}

# Whether every wasmtime crate this project uses resolves at VERSION (wasmtime pins its sibling
# crates with `=`, so one missing crate of a release makes the whole release unusable).
resolvable() { # VERSION
    local dir="$scratch/resolve-$1"
    mkdir -p "$dir/src"
    : >"$dir/src/lib.rs"
    {
        printf '[package]\nname = "vendor-resolve"\nversion = "0.0.0"\nedition = "2021"\n[dependencies]\n'
        for c in ${PINNED//|/ }; do printf '%s = { version = "=%s", default-features = false }\n' "$c" "$1"; done
        printf '[workspace]\n'
    } >"$dir/Cargo.toml"
    (cd "$dir" && cargo generate-lockfile --quiet 2>&1 | grep -E '^error|requirement' >&2; [ -f Cargo.lock ])
}

# Unpacks the crate and applies the patch into $scratch/$CRATE-$VERSION; prints that path.
derive() { # CRATEFILE VERSION
    tar -xzf "$1" -C "$scratch"
    local tree="$scratch/$CRATE-$2"
    # Cargo writes these when it unpacks; neither belongs to the source.
    rm -f "$tree/.cargo-ok" "$tree/Cargo.lock"
    (cd "$tree" && patch --quiet --no-backup-if-mismatch -p1 <"$OLDPWD/$PATCH") \
        || die "vendor/$CRATE.patch does not apply to $CRATE $2: re-make the patch for this version"
    echo "$tree"
}

cmd=${1:-}
case "$cmd" in
update)
    version=${2:-}
    [[ "$version" =~ ^[0-9]+\.[0-9]+\.[0-9]+$ ]] || die "usage: scripts/vendor.sh update VERSION (e.g. 48.0.11)"
    resolvable "$version" \
        || die "the registry does not carry every wasmtime crate this project uses at $version (above); nothing changed"
    read -r file sum < <(fetch_crate "$version")
    tree=$(derive "$file" "$version")
    rm -rf "$VENDORED"
    cp -a "$tree" "$VENDORED"
    echo "$version $sum" >"$SUM"
    for m in "${MANIFESTS[@]}"; do
        sed -i -E "s/^(($PINNED) = \{ version = \")=[0-9.]+\"/\1=$version\"/" "$m"
    done
    say "vendored $CRATE $version (registry SHA-256 $sum) with $PATCH; pins moved to =$version"
    # Any cargo command re-resolves the lockfiles minimally for the new `=` pins.
    cargo metadata --format-version 1 >/dev/null
    (cd fuzz && cargo metadata --format-version 1 >/dev/null)
    "$0" check
    [ -n "${VENDOR_SKIP_TESTS:-}" ] && exit 0
    say "running the patch's tests"
    cargo test --release -p wasm-infer --lib -- codegen_patch
    say "done: review 'git diff', run 'just bench' and 'just test', and say what the release fixed"
    ;;
check)
    [ -f "$SUM" ] || die "$SUM is missing: run scripts/vendor.sh update VERSION"
    read -r version sum <"$SUM"
    vendored=$(awk -F'"' '/^version = / { print $2; exit }' "$VENDORED/Cargo.toml")
    [ "$vendored" = "$version" ] || die "$VENDORED is $vendored but $SUM records $version"
    for lock in Cargo.lock fuzz/Cargo.lock; do
        engine=$(locked_version "$lock" wasmtime)
        [ "$engine" = "$version" ] \
            || die "$lock has wasmtime $engine but the vendored $CRATE is $version: run 'just vendor-update $engine'"
        entry=$(awk -v n="name = \"$CRATE\"" '$0 == n { f = 1 } f && /^$/ { exit } f' "$lock")
        if grep -q '^source' <<<"$entry"; then
            die "$lock resolves $CRATE from the registry, not $VENDORED: the codegen patch is not applied"
        fi
        if grep -q '^\[\[patch.unused\]\]' "$lock"; then
            die "$lock records an unused [patch]: run 'just vendor-update VERSION' for the pinned wasmtime"
        fi
    done
    read -r file got < <(fetch_crate "$version")
    [ "$got" = "$sum" ] || die "the registry's $CRATE $version has SHA-256 $got, $SUM records $sum"
    tree=$(derive "$file" "$version")
    if ! diff -r "$tree" "$VENDORED" >"$scratch/diff"; then
        head -40 "$scratch/diff" >&2
        die "$VENDORED differs from the registry crate $version plus $PATCH (edit the patch, not the tree)"
    fi
    say "$VENDORED = registry $CRATE $version + $PATCH, byte for byte; both lockfiles use it"
    ;;
newer)
    version=$(locked_version Cargo.lock wasmtime)
    line=${version%%.*}
    # Outside the workspace: inside it, `cargo info` reports the locked version.
    latest=$(cd "$scratch" && cargo info "wasmtime@$line" 2>/dev/null | awk '/^version:/ { print $2; exit }' || true)
    if [ -z "$latest" ]; then
        say "could not ask the registry for wasmtime $line.x (offline?); pinned $version"
    elif [ "$latest" != "$version" ]; then
        say "WARNING: wasmtime $latest is published on the pinned $line.x line; this tree pins $version."
        say "WARNING: point releases carry security fixes: run 'just vendor-update $latest' (SECURITY.md)"
        resolvable "$latest" 2>/dev/null \
            || say "WARNING: the registry reached from here does not yet carry every crate of $latest (wasmtime-wasi, wasmtime-wizer, ...): the update cannot be taken from here yet"
    else
        say "wasmtime $version is the newest $line.x release"
    fi
    ;;
*)
    die "usage: scripts/vendor.sh update VERSION | check | newer"
    ;;
esac
