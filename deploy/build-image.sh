#!/usr/bin/env bash
# Builds the wasm-infer container image from artefacts already built on this machine and checks
# it for real (`just image`; not part of CI: it needs root or rootless podman and a few minutes).
#
#   deploy/build-image.sh [wasm-infer binary] [minilm.wasm]
#
# Defaults: target/release/wasm-infer and target/wasm32-wasip2/release/minilm.wasm (`just build
# guest`). Steps:
#   1. podman (Debian's package) if missing.
#   2. The base image docker.io/library/debian:bookworm-slim: used if present, else pulled; where
#      no registry is reachable, a local stand-in made from the same Debian release with
#      `debootstrap --variant=minbase bookworm` (deb.debian.org) and `podman import`, tagged with
#      the same name so the Containerfile stays unchanged. The stand-in is not Docker's image
#      (no dpkg path excludes, so a little larger), but the same release and packages.
#   3. `podman build --build-arg ARTIFACTS=prebuilt` from a small context (the two artefacts and
#      deploy/serve.toml), so target/ is not sent.
#   4. Runs the image on the host network with a loopback port, locked down as deploy/k8s runs it
#      (read-only root, no capabilities, a writable module cache), and checks: /healthz 200,
#      /readyz 200, POST /v1/embeddings of one text -> one 384-float vector, the server runs as
#      uid 10001, and `podman stop` (SIGTERM) makes it exit 0 within the drain deadline. The
#      container is removed whatever happens.
#
# The run uses deploy/serve.toml as baked into the image except: loopback listen addresses, and
# the rate-limit backend "memory" (the baked config names the Redis Service of deploy/k8s, and a
# fail-closed server refuses to start without it).
#
# Environment: IMAGE (default wasm-infer:local), PORT (18080), METRICS_PORT (19090),
# BASE_ROOTFS (where debootstrap builds, default a temporary directory).
set -euo pipefail

cd "$(dirname "$0")/.."
BIN=${1:-target/release/wasm-infer}
WASM=${2:-target/wasm32-wasip2/release/minilm.wasm}
IMAGE=${IMAGE:-wasm-infer:local}
PORT=${PORT:-18080}
METRICS_PORT=${METRICS_PORT:-19090}
BASE=docker.io/library/debian:bookworm-slim
NAME=wasm-infer-image-check-$$
# The tenant of deploy/serve.toml: its key_sha256 is the hash of this placeholder key.
KEY=replace-me-acme-key

say() { printf 'build-image: %s\n' "$*" >&2; }
die() { say "$*"; exit 1; }
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

for f in "$BIN" "$WASM"; do
    [ -f "$f" ] || die "$f is missing (just build guest, or pass the paths)"
done

# 1. podman.
if ! command -v podman >/dev/null; then
    say "installing podman"
    as_root apt-get update -q
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q podman
fi
# overlay where the kernel and the storage under it allow it, else vfs (slow, but works anywhere).
if ! podman info >/dev/null 2>&1; then
    say "podman does not start with its default storage; using vfs"
    export STORAGE_DRIVER=vfs
fi
DRIVER=$(podman info --format '{{.Store.GraphDriverName}}')

# 2. The base image.
if podman image exists "$BASE"; then
    say "base $BASE: present"
elif podman pull -q "$BASE" >/dev/null 2>&1; then
    say "base $BASE: pulled"
else
    say "base $BASE: not present and not pullable; making a local stand-in with debootstrap"
    if ! command -v debootstrap >/dev/null; then
        as_root apt-get update -q
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q debootstrap
    fi
    rootfs=${BASE_ROOTFS:-$(mktemp -d /tmp/bookworm-rootfs.XXXXXX)}
    as_root debootstrap --variant=minbase bookworm "$rootfs" http://deb.debian.org/debian >&2
    # What a slim image leaves out: package caches and lists, docs, man pages, logs.
    as_root rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* \
        "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/* \
        "$rootfs"/var/log/*.log "$rootfs"/var/cache/ldconfig/aux-cache
    as_root tar -C "$rootfs" --numeric-owner -c . \
        | podman import -q --change 'CMD ["bash"]' \
            --message "local stand-in for $BASE: debootstrap --variant=minbase bookworm (deb.debian.org)" \
            - "$BASE" >/dev/null
    [ -n "${BASE_ROOTFS:-}" ] || as_root rm -rf "$rootfs"
    say "base $BASE: made ($(podman image inspect --format '{{.Size}}' "$BASE") bytes)"
fi

# A container that starts here. Podman's defaults (crun, and raising RLIMIT_NOFILE/NPROC) need a
# pure cgroup v2 host and CAP_SYS_RESOURCE; where that fails (a VM with hybrid cgroups and no
# CAP_SYS_RESOURCE, say), runc with limits below the host's works.
PODMAN=(podman)
LIMITS=()
if ! podman run --rm --network none "$BASE" true >/dev/null 2>&1; then
    command -v runc >/dev/null || {
        as_root apt-get update -q
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q runc
    }
    PODMAN=(podman --runtime runc)
    LIMITS=(--ulimit nofile=16384:16384 --ulimit nproc=8192:8192)
    "${PODMAN[@]}" run --rm --network none "${LIMITS[@]}" "$BASE" true >/dev/null \
        || die "no container starts here, with podman's defaults or with runc and lower ulimits"
    say "containers start with runc and ${LIMITS[*]} (podman's defaults do not start one here)"
fi

# 3. Build from the prebuilt artefacts.
ctx=$(mktemp -d /tmp/wasm-infer-image.XXXXXX)
cleanup_ctx() { as_root rm -rf "$ctx"; }
trap cleanup_ctx EXIT
mkdir -p "$ctx/prebuilt" "$ctx/deploy"
# Hard links where the file system allows (the artefacts are ~290 MB), else copies.
ln "$BIN" "$ctx/prebuilt/wasm-infer" 2>/dev/null || cp "$BIN" "$ctx/prebuilt/wasm-infer"
ln "$WASM" "$ctx/prebuilt/minilm.wasm" 2>/dev/null || cp "$WASM" "$ctx/prebuilt/minilm.wasm"
[ -x "$ctx/prebuilt/wasm-infer" ] || die "$BIN is not executable"
cp deploy/serve.toml "$ctx/deploy/serve.toml"
say "building $IMAGE (storage: $DRIVER)"
build_start=$(date +%s)
"${PODMAN[@]}" build -q "${LIMITS[@]}" --build-arg ARTIFACTS=prebuilt -f deploy/Containerfile -t "$IMAGE" "$ctx" >/dev/null
build_s=$(( $(date +%s) - build_start ))
size=$(podman image inspect --format '{{.Size}}' "$IMAGE")

# 4. Run and check.
sed -e "s|^listen = .*|listen = \"127.0.0.1:$PORT\"|" \
    -e "s|^metrics_listen = .*|metrics_listen = \"127.0.0.1:$METRICS_PORT\"|" \
    -e 's|^backend = "redis"|backend = "memory"|' deploy/serve.toml >"$ctx/serve.toml"
chmod 0644 "$ctx/serve.toml"
cleanup() { podman rm -f -t 0 "$NAME" >/dev/null 2>&1 || true; cleanup_ctx; }
trap cleanup EXIT
# As deploy/k8s/deployment.yaml runs it: read-only root file system, no capabilities, no privilege
# escalation, writable only the module cache and /tmp (emptyDirs there). The cache is a host
# directory owned by 10001, as an emptyDir with fsGroup 10001 is: a podman tmpfs there comes up
# root-owned 0755 whatever its mode option says (podman 4.3), and the server then cannot start.
mkdir "$ctx/cache"
as_root chown 10001:10001 "$ctx/cache"
"${PODMAN[@]}" run -d --name "$NAME" --network host "${LIMITS[@]}" \
    --read-only --cap-drop ALL --security-opt no-new-privileges \
    -v "$ctx/cache:/var/cache/wasm-infer:rw" --tmpfs /tmp:rw,size=256m,mode=1777 \
    -v "$ctx/serve.toml:/etc/wasm-infer/serve.toml:ro,Z" "$IMAGE" >/dev/null

results=()
failed=0
record() { # name ok detail
    if [ "$2" = ok ]; then results+=("  ok    $1: $3"); else results+=("  FAIL  $1: $3"); failed=1; fi
}
url=http://127.0.0.1:$PORT
code() { curl -s -o /dev/null -w '%{http_code}' --max-time 5 "$@" || true; }

# Ready once the model is loaded and a tiny inference succeeded (compiling the model takes a
# while on a small machine).
ready_start=$(date +%s)
ready=
for _ in $(seq 1 240); do
    [ "$(podman inspect --format '{{.State.Running}}' "$NAME")" = true ] || break
    if [ "$(code "$url/readyz")" = 200 ]; then ready=1; break; fi
    sleep 1
done
ready_s=$(( $(date +%s) - ready_start ))
if [ -z "$ready" ]; then
    podman logs "$NAME" 2>&1 | tail -20 >&2
    die "the server did not become ready in ${ready_s}s"
fi

c=$(code "$url/healthz"); record "GET /healthz" "$([ "$c" = 200 ] && echo ok)" "$c"
c=$(code "$url/readyz"); record "GET /readyz" "$([ "$c" = 200 ] && echo ok)" "$c (ready after ${ready_s}s)"

# The "plain" case of tests/fixtures/reference.json (sentence-transformers' vector), held to the
# tests' bar: cosine >= 0.9999.
reference=tests/fixtures/reference.json
request=$(python3 -c '
import json, sys
case = next(c for c in json.load(open(sys.argv[1]))["cases"] if c["name"] == "plain")
print(json.dumps({"model": "minilm", "input": case["text"]}))' "$reference")
body=$(curl -s --max-time 30 -H "Authorization: Bearer $KEY" -H 'Content-Type: application/json' \
    -d "$request" -w '\n%{http_code}' "$url/v1/embeddings" || true)
emb=$(printf '%s' "$body" | python3 -c '
import json, math, sys
text = sys.stdin.read()
body, status = text.rsplit("\n", 1)
try:
    case = next(c for c in json.load(open(sys.argv[1]))["cases"] if c["name"] == "plain")
    want = case["embedding"]
    reply = json.loads(body)
    vec = reply["data"][0]["embedding"]
    ok = len(reply["data"]) == 1 and len(vec) == 384 and all(isinstance(x, float) for x in vec)
    norm = lambda v: math.sqrt(sum(x * x for x in v))
    cosine = sum(x * y for x, y in zip(vec, want)) / (norm(vec) * norm(want))
    count, tokens = len(reply["data"]), reply["usage"]["prompt_tokens"]
    print(("ok" if ok and status == "200" and cosine >= 0.9999 else "no"),
          f"{status}, {count} vector of {len(vec)} floats, {tokens} tokens, "
          f"cosine {cosine:.6f} to the reference")
except Exception as error:
    print("no", f"{status}: {body[:200]!r} ({error})")
' "$reference")
record "POST /v1/embeddings" "${emb%% *}" "${emb#* }"

pid=$(podman inspect --format '{{.State.Pid}}' "$NAME")
uid=$(podman exec "$NAME" id -u 2>/dev/null || true)
host_uid=$(awk '/^Uid:/ {print $2}' "/proc/$pid/status" 2>/dev/null || echo "?")
comm=$(cat "/proc/$pid/comm" 2>/dev/null || echo "?")
record "runs as uid 10001" "$([ "$uid" = 10001 ] && echo ok)" \
    "id -u in the container: $uid; pid $pid ($comm) real uid $host_uid (as seen from the host)"

drain=$(sed -n 's/^drain_deadline = "\([0-9]*\)s"/\1/p' deploy/serve.toml)
stop_start=$(date +%s.%N)
# A stop timeout past the drain deadline, so that podman's SIGKILL cannot hide a slow drain.
podman stop -t $((drain + 10)) "$NAME" >/dev/null
stop_s=$(python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.2f}')" \
    "$stop_start" "$(date +%s.%N)")
exit_code=$(podman inspect --format '{{.State.ExitCode}}' "$NAME")
in_time=$(python3 -c "import sys; print(float(sys.argv[1]) <= float(sys.argv[2]))" "$stop_s" "$drain")
record "SIGTERM (podman stop)" "$([ "$exit_code" = 0 ] && [ "$in_time" = True ] && echo ok)" \
    "exit $exit_code after ${stop_s}s (drain deadline ${drain}s)"
last_logs=$(podman logs "$NAME" 2>&1 | tail -3)
podman rm "$NAME" >/dev/null
record "container removed" "$(podman container exists "$NAME" || echo ok)" "$NAME"

base_note=$(podman image inspect --format '{{.Comment}}' "$BASE" 2>/dev/null || true)
printf '\nwasm-infer image %s\n' "$IMAGE"
printf '  size   %s bytes (%s MB); built in %ss; storage %s\n' "$size" "$((size / 1000000))" "$build_s" "$DRIVER"
printf '  runtime %s %s\n' "${PODMAN[*]}" "${LIMITS[*]:-(podman defaults)}"
printf '  base   %s%s\n' "$BASE" "${base_note:+ ($base_note)}"
printf '%s\n' "${results[@]}"
printf '  last log lines:\n%s\n' "$(printf '%s\n' "$last_logs" | sed 's/^/    /')"
exit "$failed"
