#!/usr/bin/env bash
# callgrind.sh -- user-space instructions per transaction of the relay, under callgrind.
#
# Starts pglifeguard under valgrind's callgrind in front of the shared bench cluster's primary,
# warms its pool with a short pgbench run, zeroes the counters, runs a fixed number of
# select-only transactions and prints the instructions per transaction and the functions that
# execute most of them. Instruction counts are steady from run to run where CPU time is not,
# so this is the tool for comparing two versions of the hot path.
#
# Needs the shared cluster up (`$SHARED_BENCH/cluster.sh up`) and valgrind.
# The proxy is started by start_pglifeguard (lib.sh), as compare.sh starts it.
# Usage: benches/callgrind.sh
#
# Environment (defaults):
#   MODE=prepared  CLIENTS=8  TXNS=8000 (total, split over the clients)
#   PORT=6450 (the metrics listener takes PORT+100)
#   PGLIFEGUARD_BIN=<repo>/target/release/pglifeguard   OUT=/tmp/pglifeguard-callgrind
#   PRIMARY_PORT=55432  PGBIN=/usr/lib/postgresql/15/bin
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
MODE=${MODE:-prepared} CLIENTS=${CLIENTS:-8} TXNS=${TXNS:-8000} PORT=${PORT:-6450}
PGLIFEGUARD_BIN=${PGLIFEGUARD_BIN:-$REPO/target/release/pglifeguard}
OUT=${OUT:-/tmp/pglifeguard-callgrind}
PRIMARY_PORT=${PRIMARY_PORT:-55432} PGBIN=${PGBIN:-/usr/lib/postgresql/15/bin}
source "$REPO/benches/lib.sh"

command -v valgrind >/dev/null || { say "valgrind not installed"; exit 2; }
[ -x "$PGLIFEGUARD_BIN" ] || { say "$PGLIFEGUARD_BIN not found (cargo build --release)"; exit 2; }
rm -rf "$OUT"; mkdir -p "$OUT"
# The proxy of compare.sh, in front of the primary alone (no standby health checks in the
# counts), started under callgrind; valgrind runs it in its own process, so LG_PID is the
# proxy's. Loading the binary's debug information makes startup slow.
PGLIFEGUARD_PORT=$PORT PGLIFEGUARD_METRICS_PORT=$(( PORT + 100 )) PGLIFEGUARD_POOL_SIZE=40
PGLIFEGUARD_WORKERS=1 STANDBY_PORTS="" PGLIFEGUARD_START_TIMEOUT=120
PGLIFEGUARD_WRAPPER="valgrind --tool=callgrind --callgrind-out-file=$OUT/callgrind.out"
LG_PID=""
trap stop_pglifeguard EXIT
start_pglifeguard "$OUT" || exit 1
per_client=$(( TXNS / CLIENTS )) total=$(( TXNS / CLIENTS * CLIENTS ))
pgbench() { "$PGBIN/pgbench" -n -S -M "$MODE" -c "$CLIENTS" -j $(( CLIENTS < 2 ? 1 : 2 )) -t "$1" \
  -h 127.0.0.1 -p "$PORT" -U postgres bench >/dev/null; }
pgbench $(( per_client / 4 + 1 ))          # warm the pool and the caches
callgrind_control -z "$LG_PID" >/dev/null 2>&1  # count only what follows
pgbench "$per_client"
callgrind_control -d "$LG_PID" >/dev/null 2>&1
stop_pglifeguard; trap - EXIT
dump=$(ls "$OUT"/callgrind.out.* | head -n 1)
instructions=$(callgrind_annotate "$dump" | awk '/PROGRAM TOTALS/ { gsub(",", "", $1); print $1 }')
echo "$PGLIFEGUARD_BIN: $(( instructions / total )) user-space instructions per transaction (-M $MODE, $CLIENTS clients, $total transactions)"
callgrind_annotate --threshold=100 --auto=no "$dump" | sed -n '/file:function/,$p' | sed -n '3,$p' |
  grep -v '100.0%' | head -n 25
