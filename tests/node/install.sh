#!/usr/bin/env bash
# Idempotent installer for the Node test harness (echo-bot.js, directline-client.js).
# Runs `npm ci` only when node_modules is missing or older than package-lock.json.
# Safe to call concurrently (parallel cargo tests): serialized with flock when available.
# All output goes to stderr.
set -euo pipefail
here="${BASH_SOURCE[0]}"
if [[ "$here" == */* ]]; then cd "${here%/*}"; fi

if ! command -v node >/dev/null 2>&1; then
    echo "tests/node/install.sh: 'node' not found on PATH; install Node.js >= 18 (e.g. apt-get install nodejs npm)" >&2
    exit 1
fi
if ! command -v npm >/dev/null 2>&1; then
    echo "tests/node/install.sh: 'npm' not found on PATH; install npm (e.g. apt-get install npm)" >&2
    exit 1
fi

if command -v flock >/dev/null 2>&1; then
    exec 9>.install.lock
    flock 9
fi

marker=node_modules/.package-lock.json
if [[ ! -f "$marker" || "$marker" -ot package-lock.json ]]; then
    echo "tests/node/install.sh: running npm ci in $(pwd)" >&2
    # --ignore-scripts: no dependency needs an install script (only core-js' banner).
    npm ci --no-audit --no-fund --ignore-scripts >&2
else
    echo "tests/node/install.sh: node_modules up to date" >&2
fi
