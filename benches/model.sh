#!/usr/bin/env bash
# The long run of the model-based billing tests (CI runs a bounded number of cases):
#
#   bash benches/model.sh            # MODEL_CASES=10000 CLUSTER_MODEL_RUNS=50 LEASE_MODEL_CASES=1000
#
# tests/model.rs: random operation sequences against one real server on a manual clock, checked
# step by step against a reference model of billing.md (a failure shrinks to a minimal sequence).
# tests/cluster_model.rs: random sequences over three real nodes on a real redis-server, with
# kill -9, restarts, a Redis restart and SIGSTOP past the lease TTL. tests/lease_model.rs: the
# lease protocol of three nodes across Redis failovers (a replica cut off, promoted, replaced) on a
# real primary and replica. Release builds; the exit
# status is the tests'. Installs redis-server if it is missing.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
log() { echo "model.sh: $*" >&2; }
command -v redis-server >/dev/null || { log "installing redis-server"; apt-get install -y -qq redis-server >&2; }
export MODEL_CASES=${MODEL_CASES:-10000}
export CLUSTER_MODEL_RUNS=${CLUSTER_MODEL_RUNS:-50}
export LEASE_MODEL_CASES=${LEASE_MODEL_CASES:-1000}
start=$(date +%s)
log "tests/model.rs, $MODEL_CASES cases"
cargo test --release --test model -- --test-threads=1
log "tests/cluster_model.rs, $CLUSTER_MODEL_RUNS sequences"
cargo test --release --test cluster_model
log "tests/lease_model.rs, $LEASE_MODEL_CASES sequences"
cargo test --release --test lease_model
log "passed in $(( $(date +%s) - start )) s"
