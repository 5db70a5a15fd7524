#!/usr/bin/env bash
# ab.sh -- two or more pglifeguard builds (and optionally PgBouncer) side by side on one cell.
#
# Starts every build at once on its own port, in front of the shared bench cluster, then runs
# the same pgbench cell against each target in turn, ROUNDS times, rotating which target goes
# first. Per sample it records TPS, the target's CPU µs per transaction and its context
# switches per transaction (from /proc); at the end it prints each target's medians. Quicker
# than compare.sh for deciding whether a change to the hot path helps: one cell, builds
# interleaved within seconds of each other.
#
# Needs the shared cluster up (`$SHARED_BENCH/cluster.sh up`); PgBouncer for PGBOUNCER=1; root.
# Usage:
#   BUILDS="before=/tmp/old/pglifeguard after=target/release/pglifeguard" PGBOUNCER=1 \
#     CLIENTS=32 MODE=prepared benches/ab.sh
#
# Environment (defaults):
#   BUILDS="current=<repo>/target/release/pglifeguard"   name=path pairs
#   PGBOUNCER=0 (1 adds PgBouncer in session mode, pool 40, via $SHARED_BENCH/pgbouncer.sh)
#   WORKLOAD=select (select | tpcb)  MODE=prepared  CLIENTS=32  DURATION=8  ROUNDS=6
#   PORT=6440 (first build; the next ones count up; metrics listeners at PORT+100…)
#   OUT=/tmp/pglifeguard-ab   PRIMARY_PORT=55432  PGBIN=/usr/lib/postgresql/15/bin
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SHARED_BENCH=${SHARED_BENCH:-$REPO/../shared/bench}
BUILDS=${BUILDS:-current=$REPO/target/release/pglifeguard} PGBOUNCER=${PGBOUNCER:-0}
WORKLOAD=${WORKLOAD:-select} MODE=${MODE:-prepared} CLIENTS=${CLIENTS:-32}
DURATION=${DURATION:-8} ROUNDS=${ROUNDS:-6} PORT=${PORT:-6440} OUT=${OUT:-/tmp/pglifeguard-ab}
PRIMARY_PORT=${PRIMARY_PORT:-55432} PGBIN=${PGBIN:-/usr/lib/postgresql/15/bin}
export BL=${BL:-/tmp/bl}
# What start_pglifeguard (lib.sh) reads: compare.sh's pglifeguard setup.
PGLIFEGUARD_POOL_SIZE=40 PGLIFEGUARD_WORKERS=1 STANDBY_PORTS=${STANDBY_PORTS:-"55433 55434"}
source "$REPO/benches/lib.sh"

[ "$(id -u)" = 0 ] || { say "run as root"; exit 2; }
case "$WORKLOAD" in select) wflag=-S ;; tpcb) wflag= ;; *) say "WORKLOAD must be select or tpcb"; exit 2 ;; esac
rm -rf "$OUT"; mkdir -p "$OUT"

NAMES=() PIDS=() PORTS=() STARTED=() PB_STARTED=0
cleanup() {
  local p
  for p in "${STARTED[@]:-}"; do [ -n "$p" ] && { LG_PID=$p; stop_pglifeguard; }; done
  [ "$PB_STARTED" = 1 ] && "$SHARED_BENCH/pgbouncer.sh" down >/dev/null 2>&1 || true
}
trap cleanup EXIT

port=$PORT
for build in $BUILDS; do
  name=${build%%=*} PGLIFEGUARD_BIN=${build#*=}
  [ -x "$PGLIFEGUARD_BIN" ] || { say "$PGLIFEGUARD_BIN not found"; exit 2; }
  mkdir -p "$OUT/$name"
  PGLIFEGUARD_PORT=$port PGLIFEGUARD_METRICS_PORT=$(( port + 100 ))
  start_pglifeguard "$OUT/$name" || exit 1
  STARTED+=("$LG_PID") NAMES+=("$name") PIDS+=("$LG_PID") PORTS+=("$port")
  port=$(( port + 1 ))
done
if [ "$PGBOUNCER" = 1 ]; then
  POOL_SIZE=40 "$SHARED_BENCH/pgbouncer.sh" up session >/dev/null
  PB_STARTED=1
  NAMES+=(pgbouncer) PIDS+=("$(cat "$BL/pgbouncer/pgbouncer.pid")") PORTS+=(6432)
fi

# CPU ticks (utime + stime) and context switches of all threads of a process.
cpu_ticks() { cat /proc/"$1"/task/*/stat | awk '{ s += $14 + $15 } END { print s }'; }
switches() { proc_switches "$1" | awk '{ print $1 + $2 }'; }
jobs=$(( CLIENTS < 2 ? 1 : 2 ))
pgbench() { "$PGBIN/pgbench" -n $wflag -M "$MODE" -c "$CLIENTS" -j "$jobs" -T "$1" -h 127.0.0.1 -p "$2" -U postgres bench 2>&1; }

n=${#NAMES[@]} hz=$(getconf CLK_TCK)
for i in $(seq 0 $(( n - 1 ))); do pgbench 2 "${PORTS[$i]}" >/dev/null; done   # warm every pool
printf 'round\ttarget\ttps\tcpu_us_per_txn\tswitches_per_txn\n' > "$OUT/samples.tsv"
for r in $(seq "$ROUNDS"); do
  for j in $(seq 0 $(( n - 1 ))); do
    i=$(( (j + r) % n )) pid=${PIDS[$i]}
    c0=$(cpu_ticks "$pid") s0=$(switches "$pid")
    out=$(pgbench "$DURATION" "${PORTS[$i]}")
    c1=$(cpu_ticks "$pid") s1=$(switches "$pid")
    read -r tps txns <<<"$(pgbench_result <<<"$out")"
    [ -n "$txns" ] && [ "$txns" -gt 0 ] || { say "pgbench against ${NAMES[$i]} failed:"; echo "$out" >&2; exit 1; }
    awk -v r="$r" -v t="${NAMES[$i]}" -v tps="$tps" -v c=$(( c1 - c0 )) -v s=$(( s1 - s0 )) -v n="$txns" -v hz="$hz" \
      'BEGIN { printf "%s\t%s\t%.0f\t%.2f\t%.3f\n", r, t, tps, c * 1e6 / hz / n, s / n }' | tee -a "$OUT/samples.tsv"
  done
done
say "$WORKLOAD -M $MODE, $CLIENTS clients, $ROUNDS rounds of $DURATION s; medians (samples in $OUT/samples.tsv):"
python3 - "$OUT/samples.tsv" <<'PY'
import csv, statistics, sys
rows = list(csv.DictReader(open(sys.argv[1]), delimiter="\t"))
for name in dict.fromkeys(r["target"] for r in rows):
    mine = [r for r in rows if r["target"] == name]
    med = lambda k: statistics.median(float(r[k]) for r in mine)
    print(f"{name:12s} TPS {med('tps'):8.0f}   CPU µs/txn {med('cpu_us_per_txn'):6.2f}   switches/txn {med('switches_per_txn'):.3f}")
PY
