#!/usr/bin/env bash
# Soak: 10 minutes of legitimate and hostile traffic at once, the server's RSS sampled.
#
#   bash benches/soak.sh          # about 12 minutes plus the release build; not for CI
#
# Environment (all optional):
#   DURATION=600   seconds of traffic
#   SAMPLE=5       seconds between RSS samples
#   USERS=8        legitimate users (botgate-load closed loop, 5 messages per conversation,
#                  500 ms between a reply and the next message) on the open bot `helpdesk`
#   OUT=target/soak-results.txt
#   SKIP_BUILD=1   use the release binaries already in target/
#
# The hostile side (benches/soak/hostile.py, Python standard library) runs against the bot
# `target` of a second tenant: slowloris and silent sockets, 200 KB event floods over fresh
# conversations, typing floods, full-retention polls from watermark 0, WebSockets that never
# read, malformed activities, and lookups of random conversation ids. The figures that matter:
# peak and end RSS, and the legitimate traffic's errors, which must be none.
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION=${DURATION:-600}
SAMPLE=${SAMPLE:-5}
USERS=${USERS:-8}
OUT=${OUT:-target/soak-results.txt}
log() { echo "soak.sh: $*" >&2; }

if [ "${SKIP_BUILD:-0}" != 1 ]; then
  cargo build --release --bin botgate --bin botgate-load >&2
fi
work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT

# The embedded default, plus a second tenant with the hostile side's bot; per-bot limits are
# the defaults except the message rate (legitimate users send about 16 a second) and a 64 MiB
# byte budget per bot, so the bound shows within the run; `contoso` gets capacity add-ons so
# its legitimate traffic never exhausts the month.
sed -e 's/rate_limit_per_minute = 800/rate_limit_per_minute = 3000/' \
    -e 's/^  { kind = "user_licenses", quantity = 10, start = "2026-01-01" },/&\n  { kind = "capacity_addon", quantity = 1000, start = "2026-01-01" },/' \
    -e 's/^max_retained_activities = 500/max_retained_activities = 500\nmax_retained_bytes_per_bot = 67108864/' \
    config/default.toml > "$work/soak.toml"
cat >> "$work/soak.toml" <<'TOML'

[[tenants]]
id = "fabrikam"
name = "Fabrikam"
subscriptions = [{ kind = "tenant_license", quantity = 1, start = "2026-01-01" }]

[[bots]]
id = "target"
tenant = "fabrikam"
name = "Target"
published = true
kind = "builtin"

[[bots.topics]]
name = "Fallback"
kind = "system"
system = "fallback"
replies = ["?"]
TOML
grep -q max_retained_bytes_per_bot "$work/soak.toml" && grep -q capacity_addon "$work/soak.toml" \
  || { log "the config edit failed"; exit 2; }

target/release/botgate --config "$work/soak.toml" --data-dir "$work/data" \
  --listen 127.0.0.1:18080 --admin-listen 127.0.0.1:19464 > "$work/server.out" 2> "$work/server.log" &
pid=$!
for _ in $(seq 100); do grep -q "botgate listening" "$work/server.out" && break; sleep 0.1; done
grep -q "botgate listening" "$work/server.out" || { cat "$work/server.log" >&2; exit 2; }
rss() { awk '/VmRSS/ {print $2}' "/proc/$pid/status"; }
start_rss=$(rss)
log "server $pid up, RSS ${start_rss} kB; ${DURATION}s of traffic"

python3 benches/soak/hostile.py --port 18080 --duration "$DURATION" > "$work/hostile.out" &
hostile=$!
target/release/botgate-load --target http://127.0.0.1:18080 --admin http://127.0.0.1:19464 \
  -c "$USERS" -k 5 --think-ms 500 --text "my vpn is broken" -d "$DURATION" -q > "$work/legit.out" &
legit=$!

peak=0
: > "$work/rss.tsv"
while kill -0 "$legit" 2>/dev/null; do
  r=$(rss); echo "$(date +%s) $r" >> "$work/rss.tsv"
  (( r > peak )) && peak=$r
  sleep "$SAMPLE"
done
legit_rc=0; wait "$legit" || legit_rc=$?
wait "$hostile" || true
end_rss=$(rss)
{
  echo "soak: ${DURATION}s, ${USERS} legitimate users beside the hostile traffic"
  echo "RSS start ${start_rss} kB, peak ${peak} kB, end ${end_rss} kB"
  echo "legitimate traffic (botgate-load, exit ${legit_rc}):"
  sed 's/^/  /' "$work/legit.out"
  cat "$work/hostile.out"
} | tee "$OUT"
kill "$pid"; wait "$pid" || true
[ "$legit_rc" = 0 ] && grep -q "errors   none" "$work/legit.out"
