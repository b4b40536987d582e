#!/usr/bin/env bash
# The venv with the tools `just deploy-check` runs: PyYAML, kubernetes-validate (the Kubernetes
# schemas, bundled) and checkov (the policy scanner), pinned; outside the repo, reused once made.
# Prints the venv's python on success.
set -euo pipefail
venv="${WASM_INFER_DEPLOY_VENV:-$HOME/.cache/wasm-infer/deploy-venv}"
want="PyYAML==6.0.4 kubernetes-validate==1.37.0 checkov==3.3.30"
if ! "$venv/bin/python" -c 'import yaml, kubernetes_validate, checkov' 2>/dev/null \
    || ! "$venv/bin/pip" freeze 2>/dev/null | grep -qx 'checkov==3.3.30'; then
    python3 -m venv "$venv" >&2
    # shellcheck disable=SC2086
    "$venv/bin/pip" install --quiet --disable-pip-version-check $want >&2
fi
echo "$venv/bin/python"
