#!/usr/bin/env bash
# The venv with the official `openai` Python client that tests/serve.rs drives the server with
# (outside the repo, reused once made). Prints the venv's python on success.
set -euo pipefail
venv="${WASM_INFER_OPENAI_VENV:-$HOME/.cache/wasm-infer/openai-venv}"
if ! "$venv/bin/python" -c 'import openai' 2>/dev/null; then
    python3 -m venv "$venv" >&2
    "$venv/bin/pip" install --quiet --disable-pip-version-check 'openai>=1.40,<3' >&2
fi
echo "$venv/bin/python"
