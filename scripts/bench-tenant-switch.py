#!/usr/bin/env python3
"""What a tenant switch costs with `worker_affinity = "tenant"` (docs/serving.md, "Workers per
tenant"): one `wasm-infer serve` with one worker and two tenants, per affinity: the median
latency of N requests of one tenant, then of N requests alternating the two tenants (with
`tenant`, each one a worker replaced before it runs).

    python3 scripts/bench-tenant-switch.py target/release/wasm-infer MODEL.wasm NAME TEXT N
"""
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

import hashlib

KEYS = ["sk-bench-a", "sk-bench-b"]


def serve(binary, affinity, name, path, workdir):
    tenants = "".join(
        f'[[tenants]]\nname = "t{i}"\nkey_sha256 = "{hashlib.sha256(k.encode()).hexdigest()}"\n'
        for i, k in enumerate(KEYS)
    )
    config = os.path.join(workdir, f"{affinity}.toml")
    with open(config, "w") as f:
        f.write(
            f'listen = "127.0.0.1:0"\nisolation = "process"\nworkers = 1\n'
            f'worker_affinity = "{affinity}"\n[[models]]\nname = "{name}"\npath = "{path}"\n'
            + tenants
        )
    env = dict(os.environ, WASM_INFER_LOG="info")
    server = subprocess.Popen(
        [binary, "serve", "--config", config],
        stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, env=env, text=True,
    )
    for line in server.stderr:
        if line.startswith("listening on "):
            return server, line.split()[-1]
    sys.exit(f"the server did not start ({affinity})")


def request(base, key, name, text):
    body = json.dumps({"model": name, "input": {"text": text}}).encode()
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {key}"}
    started = time.perf_counter()
    urllib.request.urlopen(urllib.request.Request(base + "/v1/infer", body, headers)).read()
    return (time.perf_counter() - started) * 1000


def main():
    binary, path, name, text, n = sys.argv[1:6]
    n = int(n)
    with tempfile.TemporaryDirectory() as workdir:
        for affinity in ["shared", "tenant"]:
            server, base = serve(binary, affinity, name, path, workdir)
            try:
                for _ in range(3):
                    request(base, KEYS[0], name, text)
                same = [request(base, KEYS[0], name, text) for _ in range(n)]
                alternating = [request(base, KEYS[i % 2], name, text) for i in range(n)]
            finally:
                server.kill()
                server.wait()
            print(
                f"{affinity}: one tenant p50 {statistics.median(same):.2f} ms, "
                f"alternating p50 {statistics.median(alternating):.2f} ms (n={n})"
            )


if __name__ == "__main__":
    main()
