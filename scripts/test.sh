#!/usr/bin/env bash
# The test command: installs what the tests need (idempotently), then runs every test.
# `.ci/run` calls exactly this; so can you: `bash scripts/test.sh`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

need_apt=()
command -v node >/dev/null 2>&1 || need_apt+=(nodejs)
command -v npm >/dev/null 2>&1 || need_apt+=(npm)
command -v promtool >/dev/null 2>&1 || need_apt+=(prometheus)
command -v redis-server >/dev/null 2>&1 || need_apt+=(redis-server)
command -v systemd-analyze >/dev/null 2>&1 || need_apt+=(systemd) # tests/packaging.rs
[[ -x /usr/bin/chromium ]] || need_apt+=(chromium fonts-liberation) # Web Chat in a browser (tests/webchat.rs)
if ((${#need_apt[@]})); then
    echo "scripts/test.sh: installing ${need_apt[*]}" >&2
    if [[ $(id -u) -eq 0 ]]; then sudo=""; else sudo="sudo"; fi
    $sudo apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >&2
fi

# The Direct Line JS client, the Bot Framework SDK bot, Web Chat and playwright-core, pinned in
# tests/node/package-lock.json.
bash tests/node/install.sh

# schemathesis and openapi-spec-validator for tests/openapi.rs, pinned in
# tests/python/requirements.txt, in tests/python/.venv.
bash tests/python/install.sh

cargo test "$@"
