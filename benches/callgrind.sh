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
# Usage: benches/callgrind.sh
#
# Environment (defaults):
#   MODE=prepared  CLIENTS=8  TXNS=8000 (total, split over the clients)  PORT=6450
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
cat > "$OUT/pglifeguard.yaml" <<YAML
listen: 127.0.0.1:$PORT
backends:
  - {name: pg0, host: 127.0.0.1, port: $PRIMARY_PORT}
pool:
  pool_size: 40
auth:
  method: trust
worker_threads: 1
health_check:
  user: postgres
  period: 2s
YAML
cd "$OUT"
setsid valgrind --tool=callgrind --callgrind-out-file="$OUT/callgrind.out" \
  "$PGLIFEGUARD_BIN" run --config "$OUT/pglifeguard.yaml" >"$OUT/log" 2>&1 </dev/null &
VG_PID=$!
stop() { kill -INT "$VG_PID" 2>/dev/null || true; wait "$VG_PID" 2>/dev/null || true; }
trap stop EXIT
for _ in $(seq 120); do
  "$PGBIN/psql" -X -q -h 127.0.0.1 -p "$PORT" -U postgres -d bench -c 'select 1' >/dev/null 2>&1 && break
  kill -0 "$VG_PID" 2>/dev/null || { say "pglifeguard exited; see $OUT/log"; exit 1; }
  sleep 0.5
done
per_client=$(( TXNS / CLIENTS )) total=$(( TXNS / CLIENTS * CLIENTS ))
pgbench() { "$PGBIN/pgbench" -n -S -M "$MODE" -c "$CLIENTS" -j $(( CLIENTS < 2 ? 1 : 2 )) -t "$1" \
  -h 127.0.0.1 -p "$PORT" -U postgres bench >/dev/null; }
pgbench $(( per_client / 4 + 1 ))          # warm the pool and the caches
callgrind_control -z "$VG_PID" >/dev/null 2>&1  # count only what follows
pgbench "$per_client"
callgrind_control -d "$VG_PID" >/dev/null 2>&1
stop; trap - EXIT
dump=$(ls "$OUT"/callgrind.out.* | head -n 1)
instructions=$(callgrind_annotate "$dump" | awk '/PROGRAM TOTALS/ { gsub(",", "", $1); print $1 }')
echo "$PGLIFEGUARD_BIN: $(( instructions / total )) user-space instructions per transaction (-M $MODE, $CLIENTS clients, $total transactions)"
callgrind_annotate --threshold=100 --auto=no "$dump" | sed -n '/file:function/,$p' | sed -n '3,$p' |
  grep -v '100.0%' | head -n 25
