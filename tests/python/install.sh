#!/usr/bin/env bash
# Idempotent installer of the Python verifiers (schemathesis, openapi-spec-validator) into
# tests/python/.venv, pinned in requirements.txt. Re-installs only when requirements.txt is newer
# than the venv. Safe to call concurrently (serialized with flock). All output goes to stderr.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
if command -v flock >/dev/null 2>&1; then
    exec 9>.install.lock
    flock 9
fi
marker=.venv/.installed
if [[ ! -f "$marker" || "$marker" -ot requirements.txt ]]; then
    echo "tests/python/install.sh: installing requirements.txt into $(pwd)/.venv" >&2
    python3 -m venv .venv >&2
    .venv/bin/python -m pip install --quiet --disable-pip-version-check -r requirements.txt >&2
    touch "$marker"
else
    echo "tests/python/install.sh: .venv up to date" >&2
fi
