#!/usr/bin/env bash
# concurrent.sh -- pglifeguard and PgBouncer measured at the same time, not one after the other.
#
# compare.sh runs each cell on one proxy, then on the other: a sample's machine conditions
# (other tenants, the kernel's caches, autovacuum) differ from its partner's by the seconds
# between them, and on a shared machine that moves a row by 5-10 %. Here each round starts two
# pgbench processes together, the same cell, one through each proxy, for the same DURATION:
# both proxies serve their clients in the same seconds, against the same cluster, and what
# the machine does to one it does to the other. Per sample: TPS from pgbench and the proxy's
# on-CPU time per transaction from /proc/PID/task/*/schedstat (nanoseconds, user + system;
# /proc/PID/stat's clock ticks are 10 ms, 1-2 % of a 10 s sample's CPU).
#
# What it does not show: how each proxy does alone. Both share the two cores, so absolute TPS
# is lower than in compare.sh; the ratio is the figure. A proxy that needs less CPU per
# transaction answers sooner, so its closed-loop pgbench completes more transactions.
#
# The results file has compare.sh's columns (those benches/paired.py reads), so
#   python3 benches/paired.py $OUT/latest/results.tsv
# prints the per-row paired ratios with their intervals; the script prints that at the end.
#
# Needs the shared cluster up ($SHARED_BENCH/cluster.sh up), PgBouncer installed, root.
# Usage: ROUNDS=6 DURATION=10 benches/concurrent.sh
#
# Environment (defaults):
#   CLIENTS="1 8 32"  PROTOCOLS="simple prepared"  WORKLOADS="select tpcb"  (per proxy)
#   DURATION=10 ROUNDS=6 WARMUP=3 (seconds, unrecorded, per cell)  JOBS=2
#   PGLIFEGUARD_BIN=<repo>/target/release/pglifeguard (copied: a rebuild cannot swap it mid-run)
#   PGLIFEGUARD_PORT=6450 PGLIFEGUARD_POOL_SIZE=40 PGLIFEGUARD_WORKERS=1 (POOL_SIZE for PgBouncer
#   follows PGLIFEGUARD_POOL_SIZE)  OUT=/tmp/pglifeguard-concurrent  PGBIN=/usr/lib/postgresql/15/bin
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SHARED_BENCH=${SHARED_BENCH:-$REPO/../shared/bench}
CLIENTS=${CLIENTS:-"1 8 32"} PROTOCOLS=${PROTOCOLS:-"simple prepared"} WORKLOADS=${WORKLOADS:-"select tpcb"}
DURATION=${DURATION:-10} ROUNDS=${ROUNDS:-6} WARMUP=${WARMUP:-3} JOBS=${JOBS:-2}
PGLIFEGUARD_BIN=${PGLIFEGUARD_BIN:-$REPO/target/release/pglifeguard}
PGLIFEGUARD_PORT=${PGLIFEGUARD_PORT:-6450} PGLIFEGUARD_METRICS_PORT=${PGLIFEGUARD_METRICS_PORT:-6550}
PGLIFEGUARD_POOL_SIZE=${PGLIFEGUARD_POOL_SIZE:-40} PGLIFEGUARD_WORKERS=${PGLIFEGUARD_WORKERS:-1}
OUT=${OUT:-/tmp/pglifeguard-concurrent} PGBIN=${PGBIN:-/usr/lib/postgresql/15/bin}
PRIMARY_PORT=55432 STANDBY_PORTS="55433 55434" PGBOUNCER_PORT=6432   # fixed by the shared scripts
export BL=${BL:-/tmp/bl}
export POOL_SIZE=${POOL_SIZE:-$PGLIFEGUARD_POOL_SIZE}
source "$REPO/benches/lib.sh"

[ "$(id -u)" = 0 ] || { say "run as root (the shared scripts start servers as the postgres user)"; exit 2; }
[ -x "$PGLIFEGUARD_BIN" ] || { say "$PGLIFEGUARD_BIN not found (cargo build --release)"; exit 2; }
command -v pgbouncer >/dev/null || [ -x /usr/sbin/pgbouncer ] || { say "pgbouncer not installed"; exit 2; }
"$PGBIN/psql" -X -q -A -t -h 127.0.0.1 -p "$PRIMARY_PORT" -U postgres -d bench -c 'select 1' >/dev/null 2>&1 \
  || { say "the shared cluster is not up: $SHARED_BENCH/cluster.sh up"; exit 2; }

RUN_DIR=$OUT/$(date '+%Y%m%d-%H%M%S')
mkdir -p "$RUN_DIR/raw"
ln -sfn "$RUN_DIR" "$OUT/latest"
cp "$PGLIFEGUARD_BIN" "$RUN_DIR/pglifeguard"
PGLIFEGUARD_BIN=$RUN_DIR/pglifeguard
RESULTS=$RUN_DIR/results.tsv

LG_PID="" PB_UP=0
cleanup() {
  local rc=$?
  stop_pglifeguard
  [ "$PB_UP" = 1 ] && { "$SHARED_BENCH/pgbouncer.sh" down >/dev/null 2>&1 || true; }
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

start_pglifeguard "$RUN_DIR" || exit 1
"$SHARED_BENCH/pgbouncer.sh" up session >/dev/null || { say "pgbouncer.sh up session failed"; exit 1; }
PB_UP=1
PB_PID=$(cat "$BL/pgbouncer/pgbouncer.pid")
git_rev=$(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo unknown)
say "pglifeguard $git_rev pid $LG_PID on $PGLIFEGUARD_PORT, PgBouncer pid $PB_PID on $PGBOUNCER_PORT; results in $RUN_DIR"

# On-CPU nanoseconds of every thread of a process (first field of schedstat), then its
# voluntary and involuntary context switches: "ns vol invol".
proc_counters() {
  echo "$(cat /proc/"$1"/task/*/schedstat | awk '{ s += $1 } END { printf "%.0f", s }') $(proc_switches "$1")"
}

# Runs one cell on both proxies at once, the one named $6 started first. Prints a line per
# proxy: "target tps txns cpu_ns voluntary_switches involuntary_switches", with the target
# named as in compare.sh's results.
together() { # $1 = workload flag, $2 = protocol, $3 = clients, $4 = seconds, $5 = file prefix, $6 = first
  local wflag=$1 proto=$2 c=$3 secs=$4 prefix=$5 first=$6 j n order pids=() rc=0
  local -A pid=([pglifeguard]=$LG_PID [pgbouncer]=$PB_PID) port=([pglifeguard]=$PGLIFEGUARD_PORT [pgbouncer]=$PGBOUNCER_PORT)
  local -A target=([pglifeguard]=pglifeguard [pgbouncer]=pgbouncer-session) before after
  j=$(( c < JOBS ? c : JOBS ))
  order="pglifeguard pgbouncer"; [ "$first" = pgbouncer ] && order="pgbouncer pglifeguard"
  for n in pglifeguard pgbouncer; do before[$n]=$(proc_counters "${pid[$n]}"); done
  for n in $order; do
    # shellcheck disable=SC2086 # an empty workload flag means the builtin tpcb-like script
    "$PGBIN/pgbench" -n $wflag -M "$proto" -c "$c" -j "$j" -T "$secs" -h 127.0.0.1 -p "${port[$n]}" \
      -U postgres bench > "$prefix.$n" 2>&1 &
    pids+=($!)
  done
  for i in "${pids[@]}"; do wait "$i" || rc=1; done
  for n in pglifeguard pgbouncer; do after[$n]=$(proc_counters "${pid[$n]}"); done
  [ "$rc" = 0 ] || return 1
  for n in pglifeguard pgbouncer; do
    local result b a
    result=$(pgbench_result < "$prefix.$n")
    [ -n "$result" ] && [ "${result#* }" -gt 0 ] || return 1
    read -ra b <<<"${before[$n]}"; read -ra a <<<"${after[$n]}"
    echo "${target[$n]} $result $(( a[0] - b[0] )) $(( a[1] - b[1] )) $(( a[2] - b[2] ))"
  done
}

printf 'ts\ttarget\tworkload\tprotocol\tclients\tround\tduration_s\ttps\ttxns\tproxy_cpu_s\tproxy_cpu_s_per_1k_txn\tstatus\tvoluntary_switches_per_txn\tinvoluntary_switches_per_txn\n' > "$RESULTS"
failed=0 cell=0
for wl in $WORKLOADS; do
  case "$wl" in select) wflag=-S ;; tpcb) wflag= ;; *) say "unknown workload $wl"; exit 2 ;; esac
  for proto in $PROTOCOLS; do
    for c in $CLIENTS; do
      [ "$WARMUP" = 0 ] || together "$wflag" "$proto" "$c" "$WARMUP" "$RUN_DIR/raw/warmup" pglifeguard >/dev/null || true
      for round in $(seq "$ROUNDS"); do
        first=pglifeguard; [ $(( (round + cell) % 2 )) = 1 ] && first=pgbouncer
        prefix=$RUN_DIR/raw/$wl-$proto-$c-$round
        if ! out=$(together "$wflag" "$proto" "$c" "$DURATION" "$prefix" "$first"); then
          say "$wl $proto -c $c round $round: a pgbench failed (see $prefix.*)"; failed=1; continue
        fi
        ts=$(date '+%Y-%m-%d %H:%M:%S')
        while read -r target tps txns ns vol invol; do
          awk -v OFS='\t' -v ts="$ts" -v t="$target" -v wl="$wl" -v p="$proto" -v c="$c" -v r="$round" \
            -v d="$DURATION" -v tps="$tps" -v n="$txns" -v ns="$ns" -v vol="$vol" -v invol="$invol" \
            'BEGIN { print ts, t, wl, p, c, r, d, tps, n, sprintf("%.3f", ns / 1e9), sprintf("%.5f", ns / 1e9 / n * 1000), "ok",
                    sprintf("%.4f", vol / n), sprintf("%.4f", invol / n) }'
        done <<<"$out" >> "$RESULTS"
        say "$wl $proto -c $c round $round: $(tail -2 "$RESULTS" | awk -F'\t' '{ printf "%s %s TPS %s CPU s/1k %s+%s switches/txn  ", $2, $8, $11, $13, $14 }')"
      done
      cell=$((cell + 1))
    done
  done
done

{
  echo "# pglifeguard and PgBouncer at the same time"
  echo
  echo "Run $(date '+%Y-%m-%d %H:%M:%S %Z') on $(hostname) ($(nproc) CPUs), pglifeguard $git_rev (worker_threads $PGLIFEGUARD_WORKERS," \
       "pool_size $PGLIFEGUARD_POOL_SIZE), $( (pgbouncer --version 2>/dev/null || /usr/sbin/pgbouncer --version) | head -1)" \
       "(session, default_pool_size $POOL_SIZE); $ROUNDS rounds of $DURATION s per cell, both proxies loaded at once."
  echo
  python3 "$REPO/benches/paired.py" "$RESULTS"
} > "$RUN_DIR/report.md"
cat "$RUN_DIR/report.md"
exit "$failed"
