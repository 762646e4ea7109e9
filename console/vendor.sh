#!/usr/bin/env bash
# Copies uPlot's built files from the package pinned in package-lock.json into vendor/, which the
# binary embeds (src/console.rs). `vendor.sh --check` only compares and fails on a difference
# (tests/console.rs runs it, so the embedded copy is the locked package's, byte for byte).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
if command -v flock >/dev/null 2>&1; then
    exec 9>.install.lock
    flock 9
fi
if [[ ! -f node_modules/.package-lock.json || node_modules/.package-lock.json -ot package-lock.json ]]; then
    npm ci --no-audit --no-fund --ignore-scripts >&2
fi
for f in uPlot.iife.min.js uPlot.min.css; do
    if [[ "${1:-}" == "--check" ]]; then
        cmp "node_modules/uplot/dist/$f" "vendor/$f" || { echo "console/vendor/$f differs from the locked uplot; run console/vendor.sh" >&2; exit 1; }
    else
        cp "node_modules/uplot/dist/$f" "vendor/$f"
    fi
done
