#!/usr/bin/env python3
"""Checks deploy/ without a cluster or docker (`just deploy-check`): every manifest parses, and
the figures that must agree across files agree (drain deadline and grace period, ports, probe
routes, the Redis Service the config names, the ConfigMap the Deployment mounts)."""
import pathlib
import re
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

if failures:
    print("deploy-check failed:\n  " + "\n  ".join(failures), file=sys.stderr)
    sys.exit(1)
print(f"deploy-check: {len(docs)} manifests parse; grace {grace}s >= preStop {pre_stop[1]}s + drain {drain}s; ports, probes, ConfigMap and Redis agree")
