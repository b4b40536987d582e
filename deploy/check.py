#!/usr/bin/env python3
"""Checks deploy/ without a cluster or docker (`just deploy-check`): every manifest parses, and
the figures that must agree across files agree (drain deadline and grace period, ports, probe
routes, the Redis Service the config names, the ConfigMap the Deployment mounts); everything in
its own namespace, images by digest, the Redis password only in a Secret both pods mount, a
NetworkPolicy that admits only the server to Redis. Then the manifests are validated against
the Kubernetes schemas (kubernetes-validate, strict) and a policy scanner (checkov), both from
the venv of scripts/deploy-venv.sh, which runs this file."""
import os
import pathlib
import re
import subprocess
import sys
import tomllib

import yaml

DEPLOY = pathlib.Path(__file__).resolve().parent
failures = []


def check(ok, message):
    if not ok:
        failures.append(message)


def seconds(duration):
    match = re.fullmatch(r"(\d+)(ms|s|m)", duration)
    check(match, f"serve.toml: drain_deadline {duration!r} is not a duration this check reads")
    value, unit = int(match.group(1)), match.group(2)
    return {"ms": value / 1000, "s": value, "m": value * 60}[unit]


serve = tomllib.loads((DEPLOY / "serve.toml").read_text())
docs = {}
for path in sorted((DEPLOY / "k8s").glob("*.yaml")):
    for doc in yaml.safe_load_all(path.read_text()):
        check(isinstance(doc, dict) and "kind" in doc, f"{path.name}: a document without a kind")
        name = doc.get("metadata", {}).get("name", path.stem)
        docs[(doc["kind"], name)] = doc

for kind, name in [
    ("Kustomization", "kustomization"),
    ("Deployment", "wasm-infer"),
    ("Service", "wasm-infer"),
    ("Deployment", "wasm-infer-redis"),
    ("Service", "wasm-infer-redis"),
]:
    check((kind, name) in docs, f"missing {kind} {name}")

pod = docs[("Deployment", "wasm-infer")]["spec"]["template"]["spec"]
container = pod["containers"][0]

# Grace period covers the preStop sleep and the whole drain.
pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
check(pre_stop[0].endswith("sleep"), f"preStop is not a sleep: {pre_stop}")
drain = seconds(serve["drain_deadline"])
grace = pod["terminationGracePeriodSeconds"]
check(
    grace >= int(pre_stop[1]) + drain,
    f"terminationGracePeriodSeconds {grace} < preStop {pre_stop[1]} + drain_deadline {drain}",
)

# Probes on the server's routes and ports.
ports = {p["name"]: p["containerPort"] for p in container["ports"]}
check(ports["http"] == int(serve["listen"].rsplit(":", 1)[1]), "http port != serve.toml listen")
check(
    ports["metrics"] == int(serve["metrics_listen"].rsplit(":", 1)[1]),
    "metrics port != serve.toml metrics_listen",
)
check(container["livenessProbe"]["httpGet"]["path"] == "/healthz", "liveness is not /healthz")
check(container["readinessProbe"]["httpGet"]["path"] == "/readyz", "readiness is not /readyz")
check(container["resources"]["limits"].get("memory"), "no memory limit")
check(container["resources"]["requests"].get("cpu"), "no cpu request")

# The config the Deployment mounts is the one kustomize generates from serve.toml.
kustomization = docs[("Kustomization", "kustomization")]
generated = {g["name"]: g for g in kustomization["configMapGenerator"]}
mounted = [v["configMap"]["name"] for v in pod["volumes"] if "configMap" in v]
check(mounted and mounted[0] in generated, f"mounted ConfigMap {mounted} is not generated")
check(any(f.endswith("../serve.toml") for f in generated["wasm-infer-config"]["files"]), "serve.toml not in the ConfigMap")

# Shared limits: the Redis the config names is the Service shipped beside it.
rate_limit = serve["rate_limit"]
check(rate_limit["backend"] == "redis", "rate_limit.backend is not redis")
redis_host = re.match(r"redis://([^:/]+):(\d+)", rate_limit["redis_url"])
redis_service = docs[("Service", "wasm-infer-redis")]
check(redis_host and redis_host.group(1) == "wasm-infer-redis", "redis_url host is not the Service")
check(int(redis_host.group(2)) == redis_service["spec"]["ports"][0]["port"], "redis_url port != Service port")

for model in serve["models"]:
    check(model["path"].startswith("/opt/wasm-infer/"), f"model {model['name']} is not in the image")

# One namespace for everything, never `default`.
NAMESPACE = "wasm-infer"
check(("Namespace", NAMESPACE) in docs, f"no Namespace {NAMESPACE}")
check(kustomization.get("namespace") == NAMESPACE, f"kustomization namespace is not {NAMESPACE}")
for (kind, name), doc in docs.items():
    if kind not in ("Namespace", "Kustomization"):
        check(doc["metadata"].get("namespace") == NAMESPACE, f"{kind} {name} is not in {NAMESPACE}")

# Images by digest (a tag can be moved under a running deployment).
for (kind, name), doc in docs.items():
    if kind == "Deployment":
        for c in doc["spec"]["template"]["spec"]["containers"]:
            check(re.search(r"@sha256:[0-9a-f]{64}$", c["image"]), f"{name}: image {c['image']} not by digest")

# The Redis password: read by the server from a file of the Secret it mounts, given to Redis
# from the same Secret, generated from a file git ignores; never in the config or a manifest.
check("@" not in rate_limit["redis_url"], "redis_url carries credentials")
secret_file = pathlib.PurePosixPath(rate_limit.get("redis_password", {}).get("file", ""))
check(str(secret_file) != ".", "rate_limit.redis_password is not read from a file")
secrets = {g["name"]: g for g in kustomization.get("secretGenerator", [])}
check("wasm-infer-redis" in secrets, "no generated Secret wasm-infer-redis")
generated_file = secrets.get("wasm-infer-redis", {}).get("files", ["="])[0].split("=", 1)
check(generated_file[0] == secret_file.name, f"the Secret's key {generated_file[0]} != {secret_file.name}")
ignored = (DEPLOY.parent / ".gitignore").read_text().split()
check(f"/deploy/k8s/{generated_file[1]}" in ignored, f"deploy/k8s/{generated_file[1]} is not in .gitignore")


def secret_mount(pod_spec, container_spec):
    volumes = {v["name"]: v["secret"]["secretName"] for v in pod_spec["volumes"] if "secret" in v}
    return {m["mountPath"] for m in container_spec["volumeMounts"] if volumes.get(m["name"]) == "wasm-infer-redis"}


check(str(secret_file.parent) in secret_mount(pod, container), "the server does not mount the Secret where serve.toml reads it")
redis_pod = docs[("Deployment", "wasm-infer-redis")]["spec"]["template"]["spec"]
redis_container = redis_pod["containers"][0]
check(str(secret_file.parent) in secret_mount(redis_pod, redis_container), "Redis does not mount the Secret")
redis_command = " ".join(redis_container.get("command", []) + redis_container.get("args", []))
check(f"requirepass %s" in redis_command and str(secret_file) in redis_command, "Redis does not require the Secret's password")
check("env" not in redis_container, "Redis takes environment variables (secrets go as files)")

# Only the server reaches Redis.
policies = {name: doc for (kind, name), doc in docs.items() if kind == "NetworkPolicy"}
redis_labels = docs[("Deployment", "wasm-infer-redis")]["spec"]["template"]["metadata"]["labels"]
server_labels = docs[("Deployment", "wasm-infer")]["spec"]["template"]["metadata"]["labels"]
guarding = [p for p in policies.values() if p["spec"]["podSelector"].get("matchLabels", {}).items() <= redis_labels.items()]
check(guarding, "no NetworkPolicy selects the Redis pods")
for policy in guarding:
    check("Ingress" in policy["spec"]["policyTypes"], "the Redis NetworkPolicy does not govern ingress")
    for rule in policy["spec"].get("ingress", []):
        peers = rule.get("from", [])
        check(peers and all(set(p) == {"podSelector"} and p["podSelector"]["matchLabels"].items() <= server_labels.items() for p in peers),
              f"the Redis NetworkPolicy admits more than the server's pods: {rule}")
check(any(p["spec"]["podSelector"].get("matchLabels", {}).items() <= server_labels.items() for p in policies.values()), "no NetworkPolicy selects the server's pods")

# Schemas and policies, by the tools themselves.
manifests = [str(p) for p in sorted((DEPLOY / "k8s").glob("*.yaml")) if p.name != "kustomization.yaml"]
bin_dir = pathlib.Path(sys.executable).parent
for tool in ("kubernetes-validate", "checkov"):
    if not (bin_dir / tool).exists():
        failures.append(f"{tool} is not installed beside {sys.executable}: run `just deploy-check` (scripts/deploy-venv.sh)")
if not failures:
    validate = subprocess.run([bin_dir / "kubernetes-validate", "--strict", "--quiet", *manifests], capture_output=True, text=True)
    check(validate.returncode == 0, f"kubernetes-validate:\n{validate.stdout}{validate.stderr}")
    scan = subprocess.run(
        [bin_dir / "checkov", "--quiet", "--compact", "--skip-download", "--framework", "kubernetes", "-d", str(DEPLOY / "k8s")],
        capture_output=True, text=True, env={**os.environ, "BC_SKIP_MAPPING": "TRUE"},
    )
    passed = re.search(r"Passed checks: (\d+), Failed checks: (\d+)", scan.stdout)
    check(scan.returncode == 0 and passed, f"checkov:\n{scan.stdout[-4000:]}{scan.stderr[-2000:]}")
    scanned = f"; schemas valid; checkov {passed.group(1)} passed, {passed.group(2)} failed" if passed else ""
else:
    scanned = ""

if failures:
    print("deploy-check failed:\n  " + "\n  ".join(failures), file=sys.stderr)
    sys.exit(1)
print(
    f"deploy-check: {len(docs)} manifests parse; grace {grace}s >= preStop {pre_stop[1]}s + drain {drain}s; "
    f"ports, probes, ConfigMap, Redis, its password and its NetworkPolicy agree; namespace {NAMESPACE}; "
    f"images by digest{scanned}"
)
