#!/usr/bin/env bash
# profile.sh -- where pglifeguard and PgBouncer spend their CPU for the same pgbench work.
#
# Runs the same fixed number of pgbench transactions through each proxy, one after the other,
# under `perf stat` (CPU time, context switches, migrations: low overhead) and, with
# RECORD=1, under `perf record -g` (cpu-clock samples), then prints per proxy: CPU µs per
# transaction, switches per transaction, send/recv/epoll_wait/epoll_ctl calls per transaction,
# TCP segments per transaction, and with RECORD=1 the split between kernel and user samples
# and the samples under sendto, recvfrom and epoll_wait.
#
# Needs the shared cluster up (`$SHARED_BENCH/cluster.sh up`), perf, PgBouncer; run as root.
# Usage: benches/profile.sh
#
# Environment (defaults):
#   CLIENTS=8 MODE=prepared TXNS=80000 WORKLOAD=select (select | tpcb)  REPEAT=2
#   RECORD=0                          1 = also perf record (adds sampling overhead to both)
#   PGLIFEGUARD_BIN=<repo>/target/release/pglifeguard   OUT=/tmp/pglifeguard-profile
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SHARED_BENCH=${SHARED_BENCH:-$REPO/../shared/bench}
CLIENTS=${CLIENTS:-8} MODE=${MODE:-prepared} TXNS=${TXNS:-80000} WORKLOAD=${WORKLOAD:-select}
REPEAT=${REPEAT:-2} RECORD=${RECORD:-0}
PGLIFEGUARD_BIN=${PGLIFEGUARD_BIN:-$REPO/target/release/pglifeguard}
OUT=${OUT:-/tmp/pglifeguard-profile}
PGBIN=${PGBIN:-/usr/lib/postgresql/15/bin}
export BL=${BL:-/tmp/bl}
# What start_pglifeguard (lib.sh) reads: the same setup as compare.sh's pglifeguard target.
PGLIFEGUARD_PORT=6433 PGLIFEGUARD_METRICS_PORT=9187 PGLIFEGUARD_POOL_SIZE=40 PGLIFEGUARD_WORKERS=1
PRIMARY_PORT=55432 STANDBY_PORTS="55433 55434"
LG_PORT=$PGLIFEGUARD_PORT PB_PORT=6432
source "$REPO/benches/lib.sh"

[ "$(id -u)" = 0 ] || { say "run as root"; exit 2; }
command -v perf >/dev/null || { say "perf not installed"; exit 2; }
[ -x "$PGLIFEGUARD_BIN" ] || { say "$PGLIFEGUARD_BIN not found (cargo build --release)"; exit 2; }
[ "$("$PGBIN/psql" -X -A -t -h 127.0.0.1 -p "$PRIMARY_PORT" -U postgres -d bench -c 'select 1' 2>/dev/null)" = 1 ] ||
  { say "the shared cluster is not up ($SHARED_BENCH/cluster.sh up)"; exit 2; }
case "$WORKLOAD" in select) wflag=-S ;; tpcb) wflag= ;; *) say "WORKLOAD must be select or tpcb"; exit 2 ;; esac
# TCP segments sent per transaction in this network namespace (pgbench, proxy and servers;
# health checks add a few), from nstat's counters.
have_nstat() { command -v nstat >/dev/null; }
# System calls per transaction, from the syscall tracepoints when the kernel has them: both
# proxies read with recv (recvfrom), write with send (sendto) and wait in epoll_wait.
SYSCALL_EVENTS=""
tracepoints=$(perf list tracepoint 2>/dev/null || true)
for call in sendto recvfrom epoll_wait epoll_ctl; do
  if grep -q "syscalls:sys_enter_$call " <<<"$tracepoints"; then SYSCALL_EVENTS="$SYSCALL_EVENTS,syscalls:sys_enter_$call"; fi
done

mkdir -p "$OUT"
LG_PID=""
cleanup() { stop_pglifeguard; "$SHARED_BENCH/pgbouncer.sh" down >/dev/null 2>&1 || true; }
trap cleanup EXIT

start_pglifeguard "$OUT" || exit 1
POOL_SIZE=40 "$SHARED_BENCH/pgbouncer.sh" up session >/dev/null
PB_PID=$(cat "$BL/pgbouncer/pgbouncer.pid")

per_client=$(( TXNS / CLIENTS ))
total=$(( per_client * CLIENTS ))
run_pgbench() { # $1 = port
  "$PGBIN/pgbench" -n $wflag -M "$MODE" -c "$CLIENTS" -j $(( CLIENTS < 2 ? 1 : 2 )) -t "$per_client" \
    -h 127.0.0.1 -p "$1" -U postgres bench 2>&1 | pgbench_result | cut -d' ' -f1
}
# Warm both pools so no backend is opened inside a measurement.
run_pgbench $LG_PORT >/dev/null; run_pgbench $PB_PORT >/dev/null

printf '%-12s %5s %8s %10s %9s %9s %19s %9s' proxy run tps cpu_us/txn cs/txn mig/txn send/recv/wait/ctl segs/txn
[ "$RECORD" = 1 ] && printf ' %8s %8s %8s %8s %8s' kernel user sendto recvfrom epoll
echo
for r in $(seq "$REPEAT"); do
  for target in pglifeguard pgbouncer; do
    if [ $target = pglifeguard ]; then port=$LG_PORT pid=$LG_PID; else port=$PB_PORT pid=$PB_PID; fi
    stat=$OUT/$target.$r.stat data=$OUT/$target.$r.data
    perf stat -e task-clock,context-switches,cpu-migrations$SYSCALL_EVENTS -p "$pid" -o "$stat" & sp=$!
    rp=""
    if [ "$RECORD" = 1 ]; then perf record -q -e cpu-clock -F 10000 -g -p "$pid" -o "$data" >/dev/null 2>&1 & rp=$!; fi
    sleep 0.3
    if have_nstat; then nstat -n; fi
    tps=$(run_pgbench "$port")
    segs=""
    if have_nstat; then segs=$(nstat 2>/dev/null | awk -v n="$total" '$1 == "TcpOutSegs" {printf "%.2f", $2 / n}'); fi
    kill -INT $sp; wait $sp 2>/dev/null || true
    [ -n "$rp" ] && { kill -INT $rp; wait $rp 2>/dev/null || true; }
    read -r cpu cs mig calls < <(awk -v n="$total" '
      { gsub(",", "", $1) }
      /task-clock/ {c=$1*1000/n} /context-switches/ {s=$1/n} /cpu-migrations/ {m=$1/n}
      /sys_enter_sendto/ {sd=$1/n} /sys_enter_recvfrom/ {rv=$1/n}
      /sys_enter_epoll_wait/ {ew=$1/n} /sys_enter_epoll_ctl/ {ec=$1/n}
      END {printf "%.2f %.3f %.4f %.2f/%.2f/%.2f/%.2f\n", c, s, m, sd, rv, ew, ec}' "$stat")
    printf '%-12s %5s %8.0f %10s %9s %9s %19s %9s' $target "$r" "$tps" "$cpu" "$cs" "$mig" "$calls" "${segs:--}"
    if [ "$RECORD" = 1 ]; then
      split=$(perf report -i "$data" --stdio --no-children --sort dso -g none -F sample,dso 2>/dev/null |
        awk '!/^#/ && NF { if ($2 == "[kernel.kallsyms]") k += $1; else u += $1 } END { print k + 0, u + 0 }')
      # Inclusive (children) share of each syscall, turned into samples.
      kids=$(perf report -i "$data" --stdio --children --sort sym -g none 2>/dev/null |
        awk -v total="$(echo $split | awk '{print $1 + $2}')" '
          { sub(/%/, "", $1) } /__x64_sys_sendto$/ {s=$1} /__x64_sys_recvfrom$/ {r=$1} /__x64_sys_epoll_wait$/ {e=$1}
          END {printf "%.0f %.0f %.0f\n", s*total/100, r*total/100, e*total/100}')
      printf ' %8s %8s %8s %8s %8s' $split $kids
    fi
    echo
  done
done
say "perf data and stat files in $OUT"
