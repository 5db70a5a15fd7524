#!/usr/bin/env bash
# callgrind.sh -- user-space instructions (and, on request, simulated cache misses) per
# transaction of the relay, under callgrind.
#
# Starts pglifeguard (or, with TARGET=pgbouncer, PgBouncer in session mode with the same pool
# size) under valgrind's callgrind in front of the shared bench cluster's primary, warms its
# pool with a short pgbench run, zeroes the counters, runs a fixed number of pgbench
# transactions (select-only, or tpcb-like with WORKLOAD=tpcb) and prints the instructions per
# transaction and the functions that execute most of them. Instruction counts are steady
# from run to run where CPU time is not, so this is the tool for comparing two versions of
# the hot path.
#
# CACHE_SIM=1 adds valgrind's cache simulation (this machine's cache sizes) and prints L1
# data-cache read and write misses per transaction. With many sessions, whether every
# session's hot state fits in the L1 cache decides much of the proxy's user time; the
# simulation shows it without hardware counters (it does not see the kernel or the other
# processes that also evict the cache between wake-ups, so real misses are higher).
# D1=size,associativity,line (e.g. D1=8192,8,64) simulates a smaller L1 instead: the kernel's
# work between two wake-ups of a session (about 80 % of a proxy's CPU) evicts much of the
# real L1, so a small simulated cache approximates the lines each transaction has to fetch.
#
# Needs the shared cluster up (`$SHARED_BENCH/cluster.sh up`) and valgrind; PgBouncer for
# TARGET=pgbouncer (run as root: PgBouncer runs as the postgres user).
# pglifeguard is started by start_pglifeguard (lib.sh), as compare.sh starts it.
# Usage: benches/callgrind.sh
#
# Environment (defaults):
#   WORKLOAD=select (select | tpcb)  MODE=prepared  CLIENTS=8  TXNS=8000 (total, split over the clients)
#   TARGET=pglifeguard (pglifeguard | pgbouncer)   CACHE_SIM=0   D1= (valgrind's --D1)
#   PORT=6450 (pglifeguard's metrics listener takes PORT+100)
#   PGLIFEGUARD_BIN=<repo>/target/release/pglifeguard   OUT=/tmp/pglifeguard-callgrind
#   PRIMARY_PORT=55432  PGBIN=/usr/lib/postgresql/15/bin
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
WORKLOAD=${WORKLOAD:-select} MODE=${MODE:-prepared} CLIENTS=${CLIENTS:-8} TXNS=${TXNS:-8000} PORT=${PORT:-6450}
TARGET=${TARGET:-pglifeguard} CACHE_SIM=${CACHE_SIM:-0}
PGLIFEGUARD_BIN=${PGLIFEGUARD_BIN:-$REPO/target/release/pglifeguard}
OUT=${OUT:-/tmp/pglifeguard-callgrind}
PRIMARY_PORT=${PRIMARY_PORT:-55432} PGBIN=${PGBIN:-/usr/lib/postgresql/15/bin}
source "$REPO/benches/lib.sh"

case "$WORKLOAD" in
select) SCRIPT=-S ;;
tpcb) SCRIPT="-b tpcb-like" ;;
*) say "WORKLOAD must be select or tpcb"; exit 2 ;;
esac
command -v valgrind >/dev/null || { say "valgrind not installed"; exit 2; }
rm -rf "$OUT"; mkdir -p "$OUT"
VALGRIND="valgrind --tool=callgrind --callgrind-out-file=$OUT/callgrind.out"
[ "$CACHE_SIM" = 1 ] && VALGRIND="$VALGRIND --cache-sim=yes${D1:+ --D1=$D1}"
LG_PID="" PB_PID=""
stop_pgbouncer() { # only the PgBouncer this script started, by its PID
  [ -n "$PB_PID" ] || return 0
  signal_and_wait "$PB_PID" TERM || true
  PB_PID=""
}
case "$TARGET" in
pglifeguard)
  [ -x "$PGLIFEGUARD_BIN" ] || { say "$PGLIFEGUARD_BIN not found (cargo build --release)"; exit 2; }
  # The proxy of compare.sh, in front of the primary alone (no standby health checks in the
  # counts), started under callgrind; valgrind runs it in its own process, so LG_PID is the
  # proxy's. Loading the binary's debug information makes startup slow.
  PGLIFEGUARD_PORT=$PORT PGLIFEGUARD_METRICS_PORT=$(( PORT + 100 )) PGLIFEGUARD_POOL_SIZE=40
  PGLIFEGUARD_WORKERS=1 STANDBY_PORTS="" PGLIFEGUARD_START_TIMEOUT=120
  PGLIFEGUARD_WRAPPER=$VALGRIND
  trap stop_pglifeguard EXIT
  start_pglifeguard "$OUT" || exit 1
  TARGET_PID=$LG_PID TARGET_NAME=$PGLIFEGUARD_BIN CONTROL="callgrind_control" ;;
pgbouncer)
  PGBOUNCER=$(command -v pgbouncer || echo /usr/sbin/pgbouncer)
  [ -x "$PGBOUNCER" ] || { say "pgbouncer not installed"; exit 2; }
  [ "$(id -u)" = 0 ] || { say "TARGET=pgbouncer: run as root"; exit 2; }
  # Session mode and pool size as in compare.sh's PgBouncer target, on PORT.
  chown postgres "$OUT"
  echo '"postgres" ""' > "$OUT/userlist.txt"
  printf '%s\n' "[databases]" "* = host=127.0.0.1 port=$PRIMARY_PORT" "[pgbouncer]" \
    "listen_addr = 127.0.0.1" "listen_port = $PORT" "unix_socket_dir = $OUT" "auth_type = trust" \
    "auth_file = $OUT/userlist.txt" "pool_mode = session" "default_pool_size = 40" \
    "max_client_conn = 2000" "server_reset_query = DISCARD ALL" \
    "ignore_startup_parameters = extra_float_digits" "logfile = $OUT/pgbouncer.log" \
    "pidfile = $OUT/pgbouncer.pid" "log_connections = 0" "log_disconnections = 0" > "$OUT/pgbouncer.ini"
  chown postgres "$OUT/userlist.txt" "$OUT/pgbouncer.ini"
  trap stop_pgbouncer EXIT
  runuser -u postgres -- $VALGRIND "$PGBOUNCER" "$OUT/pgbouncer.ini" >"$OUT/valgrind.log" 2>&1 &
  for _ in $(seq 600); do
    [ -s "$OUT/pgbouncer.pid" ] && "$PGBIN/psql" -X -A -t -h 127.0.0.1 -p "$PORT" -U postgres -d bench \
      -c 'select 1' >/dev/null 2>&1 && break
    sleep 0.2
  done
  PB_PID=$(cat "$OUT/pgbouncer.pid" 2>/dev/null || true)
  [ -n "$PB_PID" ] || { say "PgBouncer did not start under valgrind (see $OUT/valgrind.log)"; exit 1; }
  say "pgbouncer up on $PORT under callgrind, pid $PB_PID"
  # callgrind_control only finds processes of its own user.
  TARGET_PID=$PB_PID TARGET_NAME=pgbouncer CONTROL="runuser -u postgres -- callgrind_control" ;;
*) say "TARGET must be pglifeguard or pgbouncer"; exit 2 ;;
esac
per_client=$(( TXNS / CLIENTS )) total=$(( TXNS / CLIENTS * CLIENTS ))
pgbench() { "$PGBIN/pgbench" -n $SCRIPT -M "$MODE" -c "$CLIENTS" -j $(( CLIENTS < 2 ? 1 : 2 )) -t "$1" \
  -h 127.0.0.1 -p "$PORT" -U postgres bench >/dev/null; }
pgbench $(( per_client / 4 + 1 ))          # warm the pool and the caches
$CONTROL -z "$TARGET_PID" >/dev/null 2>&1  # count only what follows
pgbench "$per_client"
$CONTROL -d "$TARGET_PID" >/dev/null 2>&1
stop_pglifeguard; stop_pgbouncer; trap - EXIT
dump=$(ls "$OUT"/callgrind.out.* | head -n 1)
totals=$(callgrind_annotate "$dump" | awk '/PROGRAM TOTALS/ { gsub(",", ""); print $1, $9, $11 }')
read -r instructions d1_read d1_write <<<"$totals"
echo "$TARGET_NAME: $(( instructions / total )) user-space instructions per transaction ($WORKLOAD, -M $MODE, $CLIENTS clients, $total transactions)"
if [ "$CACHE_SIM" = 1 ]; then
  awk -v r="$d1_read" -v w="$d1_write" -v n="$total" \
    'BEGIN { printf "simulated L1 data-cache misses per transaction: %.1f reads, %.1f writes\n", r / n, w / n }'
fi
callgrind_annotate --threshold=100 --auto=no "$dump" | sed -n '/file:function/,$p' | sed -n '3,$p' |
  grep -v '100.0%' | head -n 25
