#!/usr/bin/env bash
# Load benchmark: botgate against a bare hyper hello-world server, measured in the same run.
#
#   bash benches/load.sh            # about 4-5 minutes on 2 cores; not for CI
#
# Environment (all optional):
#   ROUNDS=3          A/B rounds (each round runs every scenario once, in the same order)
#   DURATION=5        seconds per measured run
#   CONNS=32          wrk connections / botgate-load users
#   SERVER_CPU=0      core the server is pinned to (taskset)
#   LOAD_CPU=1        core the load generator is pinned to
#   EXTRAS=1          also run the one-off targets (open-loop p99 with messages that begin a
#                     session apart, an fdatasync probe, idle memory, 10k WebSockets)
#   IDLE_CONVS=100000 conversations for the memory-per-idle-conversation run
#   WS_CONVS=10000    WebSockets held at once
#   OUT=target/load-results.txt   where the summary is also written
#   SKIP_BUILD=1      use the release binaries already in target/ (no cargo build)
#
# Method (see BENCHMARKS.md): the server runs on one core and the load on the other; every
# scenario's figure is the server's CPU time (utime+stime from /proc/PID/stat) divided by the
# requests it answered, plus requests per second. Scenarios alternate within each round, and
# the report gives medians over rounds with the min-max spread, as ratios to the hello-world
# server measured in the same round.
#
# Scenarios:
#   hello    wrk GET / on examples/hello_baseline.rs.
#   msg_user wrk POST of "my vpn is broken" into ONE pre-started conversation with the built-in
#            bot: a user topic (VPN, one reply), metered: rate limit + turn + session decision,
#            a new billed session (pool draw + durable ledger write) every 100th message.
#   msg_sys  the same with "hello there": the Fallback system topic (one reply), never billed.
#   msg_off  msg_user on the same build with `metering.enabled = false` (no rate limit, no
#            turn, no session, no ledger): msg_user vs msg_off is "metering on vs off".
#   msg_nofsync  msg_user with `store.sqlite_sync = "normal"` (the ledger's commits are not
#            fsynced): msg_user vs msg_nofsync is the kernel's part of a durable commit.
#   msg_upstream  msg_user to an upstream bot (examples/echo_bot.rs, pinned beside the load so
#            its CPU is not the server's): the gateway POSTs each message to the bot, the bot
#            calls back on the connector, the gateway answers; billed as any upstream message.
#   me       wrk GET /api/v1/me with an author's JWT (`botgate token`, development issuer): an
#            authoring request through the full stack, the JWT's verification cached, the
#            license resolved per request.
#   conv_user / conv_sys  botgate-load closed loop, whole conversations of ONE message each
#            (token + start + POST + GET): with a user topic every message begins a billed
#            session (pool draw + ledger group commit before the answer); with a system topic
#            none does. This is metering's worst case: one session per message.
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-5}
CONNS=${CONNS:-32}
SERVER_CPU=${SERVER_CPU:-0}
LOAD_CPU=${LOAD_CPU:-1}
EXTRAS=${EXTRAS:-1}
IDLE_CONVS=${IDLE_CONVS:-100000}
WS_CONVS=${WS_CONVS:-10000}
OUT=${OUT:-target/load-results.txt}

log() { echo "load.sh: $*" >&2; }

# --- build and tools -------------------------------------------------------------------------
if [ "${SKIP_BUILD:-0}" != 1 ]; then
  cargo build --release --bin botgate --bin botgate-load --example hello_baseline --example echo_bot --example fsync_probe >&2
fi
BOTGATE=target/release/botgate
LOAD=target/release/botgate-load
HELLO=target/release/examples/hello_baseline
ECHO_BOT=target/release/examples/echo_bot
FSYNC_PROBE=target/release/examples/fsync_probe
if ! command -v wrk >/dev/null; then
  log "installing wrk"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO=sudo
  $SUDO apt-get install -y wrk >&2 || { $SUDO apt-get update >&2 && $SUDO apt-get install -y wrk >&2; }
fi
# Both servers and clients hold one descriptor per connection; the 10k WebSocket run needs more.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

WORK=$(mktemp -d)
SERVER_PID=""
stop_server() {
  if [ -n "$SERVER_PID" ] && kill -0 "$SERVER_PID" 2>/dev/null; then
    kill "$SERVER_PID" 2>/dev/null || true
    wait "$SERVER_PID" 2>/dev/null || true
  fi
  SERVER_PID=""
}
trap 'stop_server; rm -rf "$WORK"' EXIT

# Waits for a "... listening ..." line in $1; prints the line.
wait_listening() {
  for _ in $(seq 1 100); do
    if grep -q listening "$1" 2>/dev/null; then grep -m1 listening "$1"; return 0; fi
    sleep 0.05
  done
  log "server did not start: $(cat "$1" "$1.err" 2>/dev/null | tail -5)"; return 1
}

# Server CPU time so far, in microseconds (utime + stime, fields 14 and 15 of /proc/PID/stat).
TCK=$(getconf CLK_TCK 2>/dev/null || echo 100)
cpu_us() { sed 's/.*) //' "/proc/$1/stat" | awk -v t="$TCK" '{ printf "%d", ($12 + $13) * 1000000 / t }'; }

start_hello() {
  taskset -c "$SERVER_CPU" "$HELLO" --listen 127.0.0.1:0 >"$WORK/hello.out" 2>"$WORK/hello.out.err" &
  SERVER_PID=$!
  ADDR=$(wait_listening "$WORK/hello.out" | awk '{print $3}')
}

start_botgate() { # [config]
  rm -rf "$WORK/data"; mkdir -p "$WORK/data"
  taskset -c "$SERVER_CPU" "$BOTGATE" --config "${1:-benches/load.toml}" --listen 127.0.0.1:0 \
    --admin-listen 127.0.0.1:0 --data-dir "$WORK/data" >"$WORK/bg.out" 2>"$WORK/bg.out.err" &
  SERVER_PID=$!
  local line; line=$(wait_listening "$WORK/bg.out")
  PUB=$(echo "$line" | sed -n 's/.*public=\([^ ]*\).*/\1/p')
  ADM=$(echo "$line" | sed -n 's/.*admin=\([^ ]*\).*/\1/p')
}

metric() { # name [bot] -> value of the bot's series (helpdesk by default) on the admin listener
  curl -s "http://$ADM/metrics" | awk -v n="$1" -v b="bot=\"${2:-helpdesk}\"" '$1 ~ "^"n"\\{" && index($1, b) { s += $2 } END { printf "%d", s }'
}

# The server's own view of the message route's latency: the share of its requests answered
# within 1 ms and 2.5 ms (its request-duration histogram), so the generator's tail is told apart.
server_share() {
  curl -s "http://$ADM/metrics" | awk -F'[ ,]' '/^botgate_http_request_duration_seconds_(bucket|count)\{route="\/v3\/directline\/conversations\/\{id\}\/activities"/ {
      if ($0 ~ /le="0.001"/) a = $NF; if ($0 ~ /le="0.0025"/) b = $NF; if ($0 ~ /_count/) n = $NF }
    END { if (n > 0) printf "server-side: %.2f%% of %d requests within 1 ms, %.2f%% within 2.5 ms", 100 * a / n, n, 100 * b / n }'
}

# The ledger's own view (its histograms): p50 and p99 of a batch's durable write and of a billed
# session's wait from queueing to its answer, each as the upper bound of its histogram bucket.
ledger_view() {
  curl -s "http://$ADM/metrics" | awk '
    function q(f, p,   i) { for (i = 1; i <= n[f]; i++) if (c[f, i] >= p * t[f]) return le[f, i] == "+Inf" ? "inf" : le[f, i] * 1000; return "inf" }
    /^botgate_ledger_(commit|session_wait)_seconds_bucket/ { f = ($0 ~ /commit/) ? "commit" : "wait"; match($0, /le="[^"]*"/)
      n[f]++; le[f, n[f]] = substr($0, RSTART + 4, RLENGTH - 5); c[f, n[f]] = $NF }
    /^botgate_ledger_commit_seconds_count/ { t["commit"] = $NF }
    /^botgate_ledger_session_wait_seconds_count/ { t["wait"] = $NF }
    END { if (t["wait"] > 0) printf "ledger: %d commits, p50 <= %s ms, p99 <= %s ms; %d sessions waited p50 <= %s ms, p99 <= %s ms",
      t["commit"], q("commit", 0.5), q("commit", 0.99), t["wait"], q("wait", 0.5), q("wait", 0.99) }'
}

# Runs wrk pinned to the load core; sets REQS, RPS, NON2XX, CPU (server us per request).
run_wrk() { # url [lua]
  local before after out
  before=$(cpu_us "$SERVER_PID")
  if [ -n "${2:-}" ]; then
    out=$(taskset -c "$LOAD_CPU" wrk -t1 -c"$CONNS" -d"${DURATION}s" -s "$2" "$1")
  else
    out=$(taskset -c "$LOAD_CPU" wrk -t1 -c"$CONNS" -d"${DURATION}s" "$1")
  fi
  after=$(cpu_us "$SERVER_PID")
  REQS=$(echo "$out" | awk '/requests in/ { print $1 }')
  RPS=$(echo "$out" | awk '/Requests\/sec/ { printf "%d", $2 }')
  NON2XX=$(echo "$out" | awk '/Non-2xx/ { print $NF }'); NON2XX=${NON2XX:-0}
  ERRS=$(echo "$out" | awk '/Socket errors/ { print $0 }')
  [ -n "$ERRS" ] && log "wrk: $ERRS"
  CPU=$(awk -v a="$before" -v b="$after" -v n="$REQS" 'BEGIN { printf "%.2f", (b - a) / n }')
}

# One conversation for wrk to post into: sets CONV and TOKEN.
start_conversation() { # [bot]
  local t
  t=$(curl -s "http://$PUB/api/v1/bots/${1:-helpdesk}/directline/token" | sed -n 's/.*"token":"\([^"]*\)".*/\1/p')
  local body; body=$(curl -s -X POST -H "Authorization: Bearer $t" "http://$PUB/v3/directline/conversations")
  CONV=$(echo "$body" | sed -n 's/.*"conversationId":"\([^"]*\)".*/\1/p')
  TOKEN=$(echo "$body" | sed -n 's/.*"token":"\([^"]*\)".*/\1/p')
}

write_lua() { # file text
  cat >"$1" <<EOF
wrk.method = "POST"
wrk.body = '{"type":"message","from":{"id":"dl_u"},"text":"$2"}'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer $TOKEN"
EOF
}

# On a shared machine, a compiler running during a measurement steals the cores: wait (up to
# QUIET_WAIT seconds) until no rustc/cc/ld runs, and say so in the results when it did not stop.
QUIET_WAIT=${QUIET_WAIT:-180}
NOISY=0
wait_quiet() {
  local waited=0
  busy() { for n in rustc cargo cc ld clippy-driver; do pgrep -x "$n" >/dev/null && return 0; done; return 1; }
  while busy; do
    if [ "$waited" -ge "$QUIET_WAIT" ]; then
      log "other CPU-heavy processes are running; measuring anyway (figures are noisy)"
      NOISY=$((NOISY + 1)); return 0
    fi
    [ "$waited" -eq 0 ] && log "waiting for other builds on this machine to finish"
    sleep 2; waited=$((waited + 2))
  done
}

declare -A RES   # RES[scenario,round,field]
FAILURES=0

scenario_hello() { # round
  wait_quiet
  start_hello
  run_wrk "http://$ADDR/"
  RES[hello,$1,cpu]=$CPU; RES[hello,$1,rps]=$RPS
  log "round $1 hello: $RPS req/s, $CPU us CPU/req, non-2xx $NON2XX"
  stop_server
}

scenario_msg() { # round name text kind(user|system|off)
  wait_quiet
  if [ "$4" = off ]; then
    # The same build with metering switched off (`metering.enabled = false`).
    sed 's/^enabled = true$/enabled = false/' benches/load.toml > "$WORK/load-off.toml"
    start_botgate "$WORK/load-off.toml"
  elif [ "$4" = nofsync ]; then
    sed 's/^backend = "sqlite"$/backend = "sqlite"\nsqlite_sync = "normal"/' benches/load.toml > "$WORK/load-nofsync.toml"
    start_botgate "$WORK/load-nofsync.toml"
  else
    start_botgate
  fi
  start_conversation
  write_lua "$WORK/post.lua" "$3"
  local url="http://$PUB/v3/directline/conversations/$CONV/activities"
  run_wrk "$url" "$WORK/post.lua"
  RES[$2,$1,cpu]=$CPU; RES[$2,$1,rps]=$RPS
  # Billing check: one conversation, so ceil(turns / 100) sessions for a user topic, 0 otherwise.
  local turns billed expect
  turns=$(metric botgate_turns_total); billed=$(metric botgate_billed_sessions_total)
  if [ "$4" = user ] || [ "$4" = nofsync ]; then expect=$(( (turns + 99) / 100 )); else expect=0; fi
  local verdict=PASS counted=$turns
  [ "$4" = off ] && counted=$REQS   # nothing is metered, not even turns
  if [ "$billed" -ne "$expect" ] || [ "$NON2XX" -ne 0 ] || [ "$counted" -lt "$REQS" ]; then verdict=FAIL; FAILURES=$((FAILURES + 1)); fi
  log "round $1 $2: $RPS msg/s, $CPU us CPU/msg, non-2xx $NON2XX, turns $turns (wrk saw $REQS), billed $billed (expect $expect) $verdict"
  stop_server
}

scenario_upstream() { # round
  wait_quiet
  taskset -c "$LOAD_CPU" "$ECHO_BOT" --listen 127.0.0.1:0 >"$WORK/echo.out" 2>&1 &
  local bot_pid=$!
  local bot_addr; bot_addr=$(wait_listening "$WORK/echo.out" | awk '{print $3}')
  { cat benches/load.toml; printf '\n[outbound]\nallow_loopback = true\n\n[[bots]]\nid = "up"\ntenant = "contoso"\nname = "Echo"\nkind = "upstream"\nendpoint = "http://%s/api/messages"\n' "$bot_addr"; } >"$WORK/load-up.toml"
  start_botgate "$WORK/load-up.toml"
  start_conversation up
  write_lua "$WORK/post.lua" "my vpn is broken"
  run_wrk "http://$PUB/v3/directline/conversations/$CONV/activities" "$WORK/post.lua"
  RES[msg_upstream,$1,cpu]=$CPU; RES[msg_upstream,$1,rps]=$RPS
  local turns billed expect verdict=PASS replies
  turns=$(metric botgate_turns_total up); billed=$(metric botgate_billed_sessions_total up)
  expect=$(( (turns + 99) / 100 ))
  # The bot's replies reached the conversation: the last poll page ends with an `Echo: ` reply.
  replies=$(curl -s -H "Authorization: Bearer $TOKEN" "http://$PUB/v3/directline/conversations/$CONV/activities" | grep -c 'Echo: my vpn' || true)
  if [ "$billed" -ne "$expect" ] || [ "$NON2XX" -ne 0 ] || [ "$turns" -lt "$REQS" ] || [ "$replies" -lt 1 ]; then verdict=FAIL; FAILURES=$((FAILURES + 1)); fi
  log "round $1 msg_upstream: $RPS msg/s, $CPU us CPU/msg, non-2xx $NON2XX, turns $turns (wrk saw $REQS), billed $billed (expect $expect) $verdict"
  stop_server
  kill "$bot_pid" 2>/dev/null || true; wait "$bot_pid" 2>/dev/null || true
}

scenario_me() { # round
  wait_quiet
  start_botgate
  local jwt
  jwt=$("$BOTGATE" token --config benches/load.toml --data-dir "$WORK/data" --tenant contoso --user alice 2>/dev/null)
  printf 'wrk.headers["Authorization"] = "Bearer %s"\n' "$jwt" >"$WORK/me.lua"
  run_wrk "http://$PUB/api/v1/me" "$WORK/me.lua"
  RES[me,$1,cpu]=$CPU; RES[me,$1,rps]=$RPS
  local licensed verdict=PASS
  licensed=$(curl -s -H "Authorization: Bearer $jwt" "http://$PUB/api/v1/me" | grep -c '"licensed":true' || true)
  if [ "$NON2XX" -ne 0 ] || [ "$licensed" -ne 1 ]; then verdict=FAIL; FAILURES=$((FAILURES + 1)); fi
  log "round $1 me: $RPS req/s, $CPU us CPU/req, non-2xx $NON2XX, licensed $licensed $verdict"
  stop_server
}

scenario_conv() { # round name text kind
  wait_quiet
  start_botgate
  local s
  s=$(taskset -c "$LOAD_CPU" "$LOAD" --target "http://$PUB" --admin "http://$ADM" --server-pid "$SERVER_PID" \
      --threads 1 -q -c "$CONNS" -k 1 --text "$3" --topic "$4" --duration "$DURATION" | grep '^summary' || true)
  local reqs cpu_req rps billing errors
  cpu_req=$(echo "$s" | sed -n 's/.* cpu_us_per_req=\([^ ]*\).*/\1/p')
  rps=$(echo "$s" | sed -n 's/.* reqs_per_s=\([^ ]*\).*/\1/p')
  billing=$(echo "$s" | sed -n 's/.* billing=\([^ ]*\).*/\1/p')
  errors=$(echo "$s" | sed -n 's/.* errors=\([^ ]*\).*/\1/p')
  [ "$billing" = PASS ] && [ "$errors" = 0 ] || FAILURES=$((FAILURES + 1))
  RES[$2,$1,cpu]=$cpu_req; RES[$2,$1,rps]=${rps%.*}
  log "round $1 $2: $rps HTTP req/s, $cpu_req us CPU/req, errors $errors, billing $billing"
  stop_server
}

# median and min-max of the values on stdin
stats() { sort -g | awk '{ v[NR] = $1 } END { m = (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2; printf "%.2f (%.2f-%.2f)", m, v[1], v[NR] }'; }
values() { for r in $(seq 1 "$ROUNDS"); do echo "${RES[$1,$r,$2]}"; done; }
ratios() { for r in $(seq 1 "$ROUNDS"); do awk -v a="${RES[$1,$r,$3]}" -v b="${RES[$2,$r,$3]}" 'BEGIN { printf "%.4f\n", a / b }'; done; }

log "rounds=$ROUNDS duration=${DURATION}s conns=$CONNS server core $SERVER_CPU, load core $LOAD_CPU"
for r in $(seq 1 "$ROUNDS"); do
  scenario_hello "$r"
  scenario_msg "$r" msg_user "my vpn is broken" user
  scenario_msg "$r" msg_sys "hello there" system
  scenario_msg "$r" msg_off "my vpn is broken" off
  scenario_msg "$r" msg_nofsync "my vpn is broken" nofsync
  scenario_upstream "$r"
  scenario_me "$r"
  scenario_conv "$r" conv_user "my vpn is broken" user
  scenario_conv "$r" conv_sys "hello there" system
done

# ROUNDS=0 runs only the one-off targets below.
[ "$ROUNDS" -gt 0 ] && {
  echo "== botgate load benchmark: $(date -u +%FT%TZ), $(nproc) CPUs, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //')"
  echo "rounds=$ROUNDS duration=${DURATION}s conns=$CONNS; median (min-max over rounds); runs measured while other builds ran: $NOISY"
  printf '%-10s %-28s %-28s\n' scenario "server CPU us/request" "requests/s"
  for s in hello msg_user msg_sys msg_off msg_nofsync msg_upstream me conv_user conv_sys; do
    printf '%-10s %-28s %-28s\n' "$s" "$(values "$s" cpu | stats)" "$(values "$s" rps | stats)"
  done
  echo "ratios per round, median (min-max):"
  echo "  msg_user / hello, CPU per request:       $(ratios msg_user hello cpu | stats)   (target <= 1.5)"
  echo "  msg_sys / hello, CPU per request:        $(ratios msg_sys hello cpu | stats)"
  echo "  msg_user / msg_off, CPU per message:     $(ratios msg_user msg_off cpu | stats)   (metering on/off, same build, target <= 1.03)"
  echo "  msg_user / msg_sys, CPU per message:     $(ratios msg_user msg_sys cpu | stats)   (user topic vs never-billed topic)"
  echo "  msg_user / msg_nofsync, CPU per message: $(ratios msg_user msg_nofsync cpu | stats)   (the fsync of each session's commit)"
  echo "  msg_nofsync / msg_off, CPU per message:  $(ratios msg_nofsync msg_off cpu | stats)   (metering without the fsync)"
  echo "  msg_upstream / msg_user, CPU per message: $(ratios msg_upstream msg_user cpu | stats)   (an upstream bot vs the built-in one, gateway CPU, target <= 1.5)"
  echo "  me / hello, CPU per request:             $(ratios me hello cpu | stats)   (an authoring request with a JWT, target <= 1.3)"
  echo "  conv_user / conv_sys, CPU per request:   $(ratios conv_user conv_sys cpu | stats)   (a session per message: worst case)"
  echo "  hello / msg_user, requests per second:   $(ratios hello msg_user rps | stats)"
} | tee "$OUT"
[ "$ROUNDS" -gt 0 ] || : >"$OUT"

if [ "$EXTRAS" = 1 ]; then
  {
    echo "== one-off targets (server core $SERVER_CPU, load core $LOAD_CPU)"
    # Max message rate (closed loop, 20 messages per conversation, polling), then open loop at half.
    wait_quiet
    start_botgate
    s=$(taskset -c "$LOAD_CPU" "$LOAD" --target "http://$PUB" --admin "http://$ADM" --server-pid "$SERVER_PID" \
        --threads 1 -q -c "$CONNS" -k 20 --duration 8 | grep '^summary' || true)
    echo "max rate (closed loop, -c $CONNS -k 20, polling): $s"
    # The generator (one core) may saturate before the server does: "half of the max rate" is
    # half the rate the server's CPU per message allows on its core, capped at 80% of what the
    # generator reached, so the generator does not queue.
    max=$(echo "$s" | sed -n 's/.* msgs_per_s=\([^ ]*\).*/\1/p')
    cpu=$(echo "$s" | sed -n 's/.* cpu_us_per_msg=\([^ ]*\).*/\1/p')
    half=$(awk -v m="$max" -v c="$cpu" 'BEGIN { h = 1e6 / c / 2; if (h > 0.8 * m) h = 0.8 * m; printf "%d", h }')
    echo "server-implied max $(awk -v c="$cpu" 'BEGIN { printf "%d", 1e6 / c }') msg/s; generator reached $max msg/s; open loop at $half msg/s"
    s=$(taskset -c "$LOAD_CPU" "$LOAD" --target "http://$PUB" --admin "http://$ADM" --server-pid "$SERVER_PID" \
        --threads 1 -q -c 64 -k 20 --rate "$half" --duration 10 | grep '^summary' || true)
    echo "open loop ($half msg/s, polling; latency = POST until the reply was read): $s $(server_share); $(ledger_view)"
    # Each open-loop run on a fresh server: conversations of the runs before would still be
    # held and count against the node's bounds.
    stop_server; wait_quiet; start_botgate
    s=$(taskset -c "$LOAD_CPU" "$LOAD" --target "http://$PUB" --admin "http://$ADM" --server-pid "$SERVER_PID" \
        --threads 1 -q -c 64 -k 20 --rate "$half" --duration 10 --transport ws | grep '^summary' || true)
    echo "open loop ($half msg/s, WebSocket): $s $(server_share); $(ledger_view)"
    stop_server; wait_quiet; start_botgate
    s=$(taskset -c "$LOAD_CPU" "$LOAD" --target "http://$PUB" --admin "http://$ADM" --server-pid "$SERVER_PID" \
        --threads 1 -q -c 64 -k 20 --rate "$half" --duration 10 --text "hello there" --topic system | grep '^summary' || true)
    echo "open loop ($half msg/s, polling, system topic: no session begins): $s $(server_share)"
    stop_server
    # The machine's own durable-write latency on the data folder's file system, right after:
    # a message that begins a session waits for one ledger commit, which cannot beat this.
    wait_quiet
    echo "fsync probe (data folder's file system, $SERVER_CPU): $(taskset -c "$SERVER_CPU" "$FSYNC_PROBE" --dir "$WORK" --seconds 5)"

    # Memory per idle conversation: start conversations without messages, compare RSS.
    wait_quiet
    start_botgate
    s=$(taskset -c "$LOAD_CPU" "$LOAD" --target "http://$PUB" --admin "http://$ADM" --server-pid "$SERVER_PID" \
        --threads 1 -q -c "$CONNS" -k 0 --conversations "$IDLE_CONVS" --duration 120 | grep '^summary' || true)
    echo "idle conversations ($IDLE_CONVS, -k 0, polling): $s"
    stop_server

    # WebSockets held: every user opens its stream, sends one message, then idles 30 s with
    # keep-alives (the server's own keep-alive comes every 20 s).
    wait_quiet
    start_botgate
    s=$(taskset -c "$LOAD_CPU" "$LOAD" --target "http://$PUB" --admin "http://$ADM" --server-pid "$SERVER_PID" \
        --threads 1 -q --transport ws -c "$WS_CONVS" --conversations "$WS_CONVS" -k 1 --idle 30 \
        --duration 60 --max-connections 256 --timeout 30 2>&1 | grep -E '^(ws|errors|summary)' | tr '\n' ' ' || true)
    echo "websockets held ($WS_CONVS, -k 1, idle 30 s): $s"
    stop_server
  } | tee -a "$OUT"
fi

log "results in $OUT"
if [ "$FAILURES" -ne 0 ]; then
  log "$FAILURES run(s) had errors or a billing mismatch"
  exit 1
fi
