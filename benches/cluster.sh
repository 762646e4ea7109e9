#!/usr/bin/env bash
# Several nodes on one Redis, measured against one node in the same run.
#
#   bash benches/cluster.sh          # ROUNDS=2 DURATION=5 NODES=3 CONC=24 MESSAGES=20 [LINGER=ms]
#   MODE=cluster bash benches/cluster.sh    # the NODES nodes on a 3-primary Redis Cluster
#   MODE=cluster REPLICAS=1 WAIT=1 bash benches/cluster.sh   # with a replica per primary, and
#                                           # cluster.ledger_wait_replicas = 1 on every node
#
# For each round: one node alone, then NODES nodes together, each on its own redis-server
# (appendfsync always; with MODE=cluster the NODES nodes share a Redis Cluster of 3 primaries,
# REPLICAS replicas each, every server appendfsync always; the one node stays on one server),
# driven the same way: NODES botgate-load processes with CONC/NODES
# connections each (all on the one node, or one per node). Prints messages per second of each,
# their ratio, and Redis commands per billed session (from INFO commandstats). Every run checks
# the Redis ledger against the generators' summed schedules exactly and the script stops on a
# FAIL. Installs redis-server if it is missing.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROUNDS=${ROUNDS:-2}; DURATION=${DURATION:-5}; NODES=${NODES:-3}; CONC=${CONC:-24}; MESSAGES=${MESSAGES:-20}
LINGER=${LINGER:-} # cluster.ledger_linger_ms of every node (unset: the default)
MODE=${MODE:-standalone}; REPLICAS=${REPLICAS:-0}; WAIT=${WAIT:-0}
RATE=${RATE:-}     # open loop: conversations per second per generator (unset: closed loop, CONC users)
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

# A Redis Cluster of 3 primaries with REPLICAS replicas each; sets CPORTS.
start_cluster() {
  CPORTS=()
  local addrs=() p i
  for i in $(seq $((3 * (1 + REPLICAS)))); do
    while :; do p=$(free_port); [ "$p" -lt 55000 ] && break; done
    mkdir -p "$WORK/c$i"
    redis-server --bind 127.0.0.1 --port "$p" --save "" --appendonly yes --appendfsync always \
      --cluster-enabled yes --cluster-config-file nodes.conf --cluster-node-timeout 2000 \
      --dir "$WORK/c$i" >/dev/null 2>&1 & PIDS+=($!)
    CPORTS+=("$p"); addrs+=("127.0.0.1:$p")
  done
  for p in "${CPORTS[@]}"; do
    for _ in $(seq 100); do redis-cli -p "$p" ping >/dev/null 2>&1 && break; sleep 0.05; done
  done
  redis-cli --cluster create "${addrs[@]}" --cluster-replicas "$REPLICAS" --cluster-yes >/dev/null
  for _ in $(seq 200); do
    local ok=0 synced
    for p in "${CPORTS[@]}"; do redis-cli -p "$p" cluster info | grep -q 'cluster_state:ok' && ok=$((ok + 1)); done
    synced=$(for p in "${CPORTS[@]}"; do redis-cli -p "$p" info replication; done | grep -c 'master_link_status:up' || true)
    [ "$ok" = "${#CPORTS[@]}" ] && [ "$synced" = $((3 * REPLICAS)) ] && return
    sleep 0.1
  done
  log "the cluster did not come up"; exit 1
}

start_node() { # name [cluster] -> sets NODE_PUBLIC
  if [ "${2:-}" = cluster ]; then
    local seeds; seeds=$(printf '"redis://127.0.0.1:%s/",' "${CPORTS[@]}")
    sed -e "s|backend = \"sqlite\"|backend = \"redis\"\nredis_mode = \"cluster\"\nredis_cluster_nodes = [${seeds%,}]|" benches/load.toml > "$WORK/$1.toml"
  else
    sed -e "s|backend = \"sqlite\"|backend = \"redis\"\nredis_url = \"redis://127.0.0.1:$RPORT/\"|" benches/load.toml > "$WORK/$1.toml"
  fi
  printf '\n[cluster]\nledger_wait_replicas = %s\n' "$([ "${2:-}" = cluster ] && echo "$WAIT" || echo 0)" >> "$WORK/$1.toml"
  [ -z "$LINGER" ] || printf 'ledger_linger_ms = %s\n' "$LINGER" >> "$WORK/$1.toml"
  "$BIN" --config "$WORK/$1.toml" --listen 127.0.0.1:0 --admin-listen 127.0.0.1:0 --data-dir "$WORK/$1" \
    > "$WORK/$1.out" 2>"$WORK/$1.err" & PIDS+=($!)
  for _ in $(seq 100); do grep -q listening "$WORK/$1.out" 2>/dev/null && break; sleep 0.05; done
  grep -q listening "$WORK/$1.out" || { log "node $1 did not start: $(tail -3 "$WORK/$1.err")"; exit 1; }
  NODE_PUBLIC=$(sed -E 's/.*public=([^ ]+).*/\1/' "$WORK/$1.out")
}

# The servers of the setup under test: one, or every node of the cluster (replicas included:
# their commands are the replication stream's).
servers() { if [ -n "${CLUSTER_UP:-}" ]; then echo "${CPORTS[@]}"; else echo "$RPORT"; fi; }
redis_calls() { for p in $(servers); do redis-cli -p "$p" info commandstats; done | awk -F'[=,]' '/^cmdstat_/ {s+=$2} END {print s+0}'; }
# Billed sessions: the ledger's per-bot counters; batches: one field each in the sessions hash
# (`-c` follows the cluster to the key's node).
sessions() { redis-cli -c -p "$(servers | cut -d' ' -f1)" --raw hgetall 'bg:{contoso}:usage' | awk 'NR % 2 == 1 {f = $0} NR % 2 == 0 && f ~ /\|sessions$/ {s += $0} END {print s + 0}'; }
batches() { redis-cli -c -p "$(servers | cut -d' ' -f1)" hlen 'bg:{contoso}:sessions'; }

run_load() { # public conc -> prints "msgs_per_s billed_expected billed_expected_max"
  local open=(); [ -z "$RATE" ] || open=(--rate "$RATE" --rate-of conversations --max-in-flight 4000)
  local out; out=$("$LOAD" --target "http://$1" -c "$2" -k "$MESSAGES" -d "$DURATION" "${open[@]}" -q --no-check 2>&1) || { log "FAIL: $out"; exit 1; }
  echo "$out" | grep '^summary' | sed -E 's/.*msgs_per_s=([0-9.]+).*p99_begins_us=([0-9]+).*billed_expected=([0-9]+) billed_expected_max=([0-9]+).*/\1 \3 \4 \2/'
}

# drive public... : NODES generators at once, generator i on node i mod (number of nodes), CONC
# split evenly; checks the Redis ledger exactly against their summed schedules; sets MSGS (total
# msg/s), PER_SESSION (Redis commands per billed session), PER_BATCH, SESSIONS.
drive() {
  local targets=("$@") c0 s0 b0 c1 s1 b1 lo hi per outs=()
  c0=$(redis_calls); s0=$(sessions); b0=$(batches)
  per=$(( (CONC + NODES - 1) / NODES ))
  for i in $(seq 0 $((NODES - 1))); do
    run_load "${targets[$(( i % ${#targets[@]} ))]}" "$per" > "$WORK/rps$i" & outs+=($!)
  done
  for p in "${outs[@]}"; do wait "$p" || { log "a load run failed"; exit 1; }; done
  MSGS=$(cat "$WORK"/rps* | awk '{s+=$1} END {printf "%.1f", s}')
  BEGINS_P99=$(cat "$WORK"/rps* | awk '$4 > m {m = $4} END {printf "%.1f", m / 1000}')
  lo=$(cat "$WORK"/rps* | awk '{s+=$2} END {print s}'); hi=$(cat "$WORK"/rps* | awk '{s+=$3} END {print s}')
  c1=$(redis_calls); s1=$(sessions); b1=$(batches)
  SESSIONS=$((s1 - s0))
  # Exact across nodes: the Redis ledger holds what the clients' schedules imply, summed.
  [ "$lo" = "$hi" ] || { log "FAIL: some messages' fate is unknown ($lo..$hi); not an exact run"; exit 1; }
  [ "$SESSIONS" = "$lo" ] || { log "FAIL: the Redis ledger moved by $SESSIONS, the clients imply $lo"; exit 1; }
  PER_SESSION=$(python3 -c "print('%.3f' % (($c1-$c0)/max(1,$SESSIONS)))")
  PER_BATCH=$(python3 -c "print('%.1f' % ($SESSIONS/max(1,$b1-$b0)))")
}

for round in $(seq "$ROUNDS"); do
  cleanup; WORK=$(mktemp -d); PIDS=()
  start_redis; start_node solo
  drive "$NODE_PUBLIC"
  one=$MSGS; one_cmds=$PER_SESSION; one_p99=$BEGINS_P99
  cleanup; WORK=$(mktemp -d); PIDS=()
  publics=()
  if [ "$MODE" = cluster ]; then
    start_cluster; CLUSTER_UP=1
    for i in $(seq "$NODES"); do start_node "n$i" cluster; publics+=("$NODE_PUBLIC"); done
  else
    start_redis
    for i in $(seq "$NODES"); do start_node "n$i"; publics+=("$NODE_PUBLIC"); done
  fi
  drive "${publics[@]}"
  CLUSTER_UP=
  many=$MSGS
  ratio=$(python3 -c "print('%.2f' % ($many/$one))")
  [ -n "${VERBOSE:-}" ] && redis-cli -p "$RPORT" info commandstats >&2
  echo "round $round: one node $one msg/s ($one_cmds redis commands per session, p99 of a session's first message $one_p99 ms); $NODES nodes ($MODE$([ "$MODE" = cluster ] && echo ", 3 primaries x $REPLICAS replicas, ledger_wait_replicas $WAIT")) $many msg/s (ratio $ratio, p99 of a session's first message $BEGINS_P99 ms); redis commands per billed session $PER_SESSION ($SESSIONS sessions, exact; $PER_BATCH per ledger batch; linger ${LINGER:-default}${RATE:+; open loop, $RATE conversations/s per generator})"
done
