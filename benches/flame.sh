#!/usr/bin/env bash
# A CPU flame graph of the message path: the release server pinned to one core, wrk posting
# "my vpn is broken" (a metered user topic) into one conversation from the other core, and
# `perf record` (cpu-clock, DWARF call graphs) sampling the server; folded and drawn with
# inferno (`cargo install inferno`, done here when missing).
#
#   bash benches/flame.sh                      # docs/flame-message.svg from this tree
#   BIN=/path/to/botgate OUT=docs/x.svg TITLE="..." SKIP_BUILD=1 bash benches/flame.sh
#
# Not for CI: it needs perf (Debian's linux-perf) and a quiet machine.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
BIN=${BIN:-target/release/botgate}
OUT=${OUT:-docs/flame-message.svg}
TITLE=${TITLE:-"botgate: a metered message (user topic), server CPU"}
SECONDS_SAMPLED=${SECONDS_SAMPLED:-4}
[ "${SKIP_BUILD:-0}" = 1 ] || cargo build --release --bin botgate >&2
command -v perf >/dev/null || { echo "flame.sh: installing linux-perf" >&2; apt-get install -y -qq linux-perf >&2; }
command -v wrk >/dev/null || { echo "flame.sh: installing wrk" >&2; apt-get install -y -qq wrk >&2; }
command -v inferno-flamegraph >/dev/null || cargo install inferno --locked >&2

WORK=$(mktemp -d)
trap 'kill "$PID" 2>/dev/null || true; rm -rf "$WORK"' EXIT
taskset -c 0 "$BIN" --config benches/load.toml --listen 127.0.0.1:0 --admin-listen 127.0.0.1:0 \
  --data-dir "$WORK/data" >"$WORK/out" 2>"$WORK/err" &
PID=$!
for _ in $(seq 100); do grep -q listening "$WORK/out" 2>/dev/null && break; sleep 0.05; done
PUB=$(sed -n 's/.*public=\([^ ]*\).*/\1/p' "$WORK/out" | head -1)
t=$(curl -s "http://$PUB/api/v1/bots/helpdesk/directline/token" | sed -n 's/.*"token":"\([^"]*\)".*/\1/p')
body=$(curl -s -X POST -H "Authorization: Bearer $t" "http://$PUB/v3/directline/conversations")
CONV=$(echo "$body" | sed -n 's/.*"conversationId":"\([^"]*\)".*/\1/p')
cat >"$WORK/post.lua" <<EOF
wrk.method = "POST"
wrk.body = '{"type":"message","from":{"id":"dl_u"},"text":"my vpn is broken"}'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer $t"
EOF
taskset -c 1 wrk -t1 -c32 -d"$((SECONDS_SAMPLED + 2))s" -s "$WORK/post.lua" \
  "http://$PUB/v3/directline/conversations/$CONV/activities" >"$WORK/wrk" &
WRK=$!
sleep 1
perf record -e cpu-clock -F 999 --call-graph dwarf,16384 -p "$PID" -o "$WORK/perf.data" \
  -- sleep "$SECONDS_SAMPLED" 2>"$WORK/perf.err" >/dev/null
wait "$WRK"
perf script -i "$WORK/perf.data" 2>/dev/null | inferno-collapse-perf >"$WORK/folded"
inferno-flamegraph --title "$TITLE" --width 1600 --minwidth 2 <"$WORK/folded" >"$OUT"
echo "flame.sh: $(wc -l <"$WORK/folded") stacks, $(awk '/requests in/ {print $1}' "$WORK/wrk") requests; wrote $OUT" >&2
