#!/usr/bin/env bash
# Several nodes on one Redis, measured against one node in the same run.
#
#   bash benches/cluster.sh          # ROUNDS=2 DURATION=5 NODES=3 CONC=24 MESSAGES=20
#
# For each round: one node alone, then NODES nodes together (the load split evenly, each
# botgate-load talking to its own node), all on one redis-server (appendfsync always). Prints
# messages per second of each, their ratio, and Redis commands per billed session (from
# INFO commandstats) for the cluster runs. Every botgate-load run checks its billed sessions
# exactly and the script stops on a FAIL. Installs redis-server if it is missing.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROUNDS=${ROUNDS:-2}; DURATION=${DURATION:-5}; NODES=${NODES:-3}; CONC=${CONC:-24}; MESSAGES=${MESSAGES:-20}
log() { echo "cluster.sh: $*" >&2; }
command -v redis-server >/dev/null || { log "installing redis-server"; apt-get install -y -qq redis-server >&2; }
[ "${SKIP_BUILD:-0}" = 1 ] || cargo build --release --bin botgate --bin botgate-load >&2
BIN=target/release/botgate; LOAD=target/release/botgate-load
WORK=$(mktemp -d); PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$WORK"; }
trap cleanup EXIT

free_port() { python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])'; }

start_redis() {
  RPORT=$(free_port); mkdir -p "$WORK/redis"
  redis-server --bind 127.0.0.1 --port "$RPORT" --save "" --appendonly yes --appendfsync always \
    --dir "$WORK/redis" >/dev/null 2>&1 & PIDS+=($!)
  for _ in $(seq 100); do redis-cli -p "$RPORT" ping >/dev/null 2>&1 && return; sleep 0.05; done
  log "redis-server did not start"; exit 1
}

start_node() { # name -> sets NODE_PUBLIC NODE_ADMIN
  sed -e "s|backend = \"sqlite\"|backend = \"redis\"\nredis_url = \"redis://127.0.0.1:$RPORT/\"|" benches/load.toml > "$WORK/$1.toml"
  "$BIN" --config "$WORK/$1.toml" --listen 127.0.0.1:0 --admin-listen 127.0.0.1:0 --data-dir "$WORK/$1" \
    > "$WORK/$1.out" 2>/dev/null & PIDS+=($!)
  for _ in $(seq 100); do grep -q listening "$WORK/$1.out" 2>/dev/null && break; sleep 0.05; done
  NODE_PUBLIC=$(sed -E 's/.*public=([^ ]+).*/\1/' "$WORK/$1.out"); NODE_ADMIN=$(sed -E 's/.*admin=([^ ]+).*/\1/' "$WORK/$1.out")
}

redis_calls() { redis-cli -p "$RPORT" info commandstats | awk -F'[=,]' '/^cmdstat_/ {s+=$2} END {print s+0}'; }
sessions() { redis-cli -p "$RPORT" hlen 'bg:{contoso}:sessions'; }

run_load() { # public admin conc -> prints msgs_per_s
  local out; out=$("$LOAD" --target "http://$1" --admin "http://$2" -c "$3" -k "$MESSAGES" -d "$DURATION" -q 2>&1) || { log "FAIL: $out"; exit 1; }
  echo "$out" | grep '^summary' | sed -E 's/.*msgs_per_s=([0-9.]+).*/\1/'
}

for round in $(seq "$ROUNDS"); do
  cleanup; WORK=$(mktemp -d); PIDS=()
  start_redis; start_node solo
  one=$(run_load "$NODE_PUBLIC" "$NODE_ADMIN" "$CONC")
  cleanup; WORK=$(mktemp -d); PIDS=()
  start_redis
  publics=(); admins=()
  for i in $(seq "$NODES"); do start_node "n$i"; publics+=("$NODE_PUBLIC"); admins+=("$NODE_ADMIN"); done
  c0=$(redis_calls); s0=$(sessions)
  per=$(( (CONC + NODES - 1) / NODES )); outs=()
  for i in $(seq 0 $((NODES - 1))); do run_load "${publics[$i]}" "${admins[$i]}" "$per" > "$WORK/rps$i" & outs+=($!); done
  for p in "${outs[@]}"; do wait "$p" || { log "a node's load run failed"; exit 1; }; done
  many=$(cat "$WORK"/rps* | awk '{s+=$1} END {printf "%.1f", s}')
  c1=$(redis_calls); s1=$(sessions)
  ratio=$(python3 -c "print('%.2f' % ($many/$one))")
  per_session=$(python3 -c "print('%.3f' % (($c1-$c0)/max(1,$s1-$s0)))")
  [ -n "${VERBOSE:-}" ] && redis-cli -p "$RPORT" info commandstats >&2
  echo "round $round: one node $one msg/s; $NODES nodes $many msg/s (ratio $ratio); redis commands per billed session $per_session ($((s1 - s0)) sessions, exact)"
done
