#!/usr/bin/env bash
# Metering's cost in instructions, which (unlike CPU time) this shared, noisy machine cannot
# blur: the release server runs under `valgrind --tool=callgrind`, a client sends N messages into
# one conversation, and the server's user-space instructions for those messages are counted, for
# metering on and off (`metering.enabled`), for a user topic and a system topic.
#
#   bash benches/instructions.sh          # N=1000 messages per case (about a minute in all)
#
# Kernel work (sockets, the ledger's fsync) is not counted: see benches/load.sh for CPU time.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
N=${N:-1000}
command -v valgrind >/dev/null || { echo "instructions.sh: installing valgrind" >&2; apt-get install -y -qq valgrind >&2; }
BIN=${BIN:-target/release/botgate}   # another build to compare: BIN=path SKIP_BUILD=1
[ "${SKIP_BUILD:-0}" = 1 ] || cargo build --release --bin botgate >&2
WORK=$(mktemp -d); trap 'rm -rf "$WORK"' EXIT
sed 's/^enabled = true$/enabled = false/' benches/load.toml > "$WORK/off.toml"

cat > "$WORK/drive.py" <<'PY'
import http.client, json, sys
port, text, n = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
c = http.client.HTTPConnection("127.0.0.1", port)
c.request("GET", "/api/v1/bots/helpdesk/directline/token"); t = json.loads(c.getresponse().read())
h = {"Authorization": "Bearer " + t["token"], "Content-Type": "application/json"}
c.request("POST", "/v3/directline/conversations", headers=h); c.getresponse().read()
body = json.dumps({"type": "message", "from": {"id": "dl_u"}, "text": text})
for _ in range(n):
    c.request("POST", "/v3/directline/conversations/%s/activities" % t["conversationId"], body=body, headers=h)
    r = c.getresponse(); r.read(); assert r.status == 200, r.status
PY

count() { # config text -> instructions for N messages (plus one token and one start)
  local d; d=$(mktemp -d -p "$WORK")
  local port; port=$(python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])')
  valgrind --tool=callgrind --callgrind-out-file="$d/cg.out" "$BIN" --config "$1" \
    --listen "127.0.0.1:$port" --admin-listen 127.0.0.1:0 --data-dir "$d/data" >"$d/out" 2>"$d/vg.err" &
  local vp=$!
  for _ in $(seq 300); do grep -q listening "$d/out" 2>/dev/null && break; sleep 0.2; done
  python3 "$WORK/drive.py" "$port" "$2" 200          # warm-up, not counted
  callgrind_control -z "$vp" >/dev/null
  python3 "$WORK/drive.py" "$port" "$2" "$N"
  callgrind_control -d "$vp" >/dev/null
  kill -INT "$vp"; wait "$vp" 2>/dev/null || true
  local best=0 v
  for f in "$d"/cg.out*; do v=$(grep -m1 '^summary:' "$f" | awk '{print $2}'); [ "${v:-0}" -gt "$best" ] && best=$v; done
  echo "$best"
}

on_user=$(count benches/load.toml "my vpn is broken"); off_user=$(count "$WORK/off.toml" "my vpn is broken")
on_sys=$(count benches/load.toml "hello there"); off_sys=$(count "$WORK/off.toml" "hello there")
per() { python3 -c "print(round($1/($N+2)))"; }
echo "instructions per message (N=$N, user space, all threads)"
echo "  user topic, metering on:  $(per "$on_user")"
echo "  user topic, metering off: $(per "$off_user")"
echo "  system topic, on:         $(per "$on_sys")"
echo "  system topic, off:        $(per "$off_sys")"
python3 -c "print('  metering cost: user topic %+.2f%%, system topic %+.2f%% (target <= 3%%)' % (($on_user/$off_user-1)*100, ($on_sys/$off_sys-1)*100))"
